"""SQLAlchemy Core tables.  Alembic migrations create them; this is the query-side view."""

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

# MySQL's TEXT holds 64 KiB: a node document with its user-data needs more.
LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

nodes = Table(
    "nodes",
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("project_id", String(255), nullable=False, index=True),
    Column("conductor_group", String(255), nullable=False),
    # The canonical node document (JSON text); the columns above are for queries.
    Column("document", LONG_TEXT, nullable=False),
    Column("password", Text, nullable=True),
    Column("revision", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

ports = Table(
    "ports",
    metadata,
    Column("mac", String(17), primary_key=True),
    Column(
        "node_uuid",
        String(36),
        ForeignKey("nodes.uuid", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("ip", String(45), nullable=True, unique=True),
    Column("pxe", Boolean, nullable=False),
)
