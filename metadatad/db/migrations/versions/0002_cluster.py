"""Conductor membership: conductors, the ring generation, node claims.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# MySQL's DATETIME keeps whole seconds unless asked for more.
PRECISE_DATETIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "conductors",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("conductor_group", sa.String(255), nullable=False),
        sa.Column("tftp_address", sa.String(255), nullable=False),
        sa.Column("http_address", sa.String(255), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("instance", sa.String(32), nullable=False),
        sa.Column("started_at", PRECISE_DATETIME, nullable=False),
        sa.Column("heartbeat_at", PRECISE_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_conductors"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "ring_state",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column(
            "members",
            sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column("changed_at", PRECISE_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ring_state"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "node_claims",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("conductor_group", sa.String(255), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("claimed_at", PRECISE_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("node_uuid", name="pk_node_claims"),
        sa.ForeignKeyConstraint(
            ["node_uuid"], ["nodes.uuid"], name="fk_node_claims_node_uuid", ondelete="CASCADE"
        ),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_node_claims_owner", "node_claims", ["owner"])


def downgrade() -> None:
    op.drop_table("node_claims")
    op.drop_table("ring_state")
    op.drop_table("conductors")
