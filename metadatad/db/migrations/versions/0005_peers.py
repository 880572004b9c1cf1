"""Peer discovery: write-once entries posted by nodes, and per-project watch indexes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
PEER_KEY = sa.String(255).with_variant(
    mysql.VARCHAR(255, collation="utf8mb4_bin"), "mysql", "mariadb"
)


def upgrade() -> None:
    op.create_table(
        "peer_entries",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("key", PEER_KEY, nullable=False),
        sa.Column("value", LONG_TEXT, nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_uuid"],
            ["nodes.uuid"],
            name="fk_peer_entries_node_uuid",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_uuid", "key", name="pk_peer_entries"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "peer_index",
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", name="pk_peer_index"),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("peer_index")
    op.drop_table("peer_entries")
