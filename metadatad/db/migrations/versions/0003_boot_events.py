"""TFTP boot events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "boot_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            autoincrement=True,
        ),
        sa.Column("node_uuid", sa.String(36), nullable=True),
        sa.Column("conductor", sa.String(255), nullable=False),
        sa.Column("client", sa.String(45), nullable=False),
        sa.Column("server", sa.String(45), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error", sa.String(255), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.Column("blksize", sa.Integer(), nullable=True),
        sa.Column("windowsize", sa.Integer(), nullable=True),
        sa.Column("retransmits", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_boot_events"),
        mysql_charset="utf8mb4",
    )
    op.create_index(
        "ix_boot_events_node_uuid_started_at", "boot_events", ["node_uuid", "started_at"]
    )
    op.create_index("ix_boot_events_started_at", "boot_events", ["started_at"])


def downgrade() -> None:
    op.drop_table("boot_events")
