"""DHCP boot mappings: desired and pushed per node.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "dhcp_pushes",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("desired", LONG_TEXT, nullable=False),
        sa.Column("desired_digest", sa.String(64), nullable=False),
        sa.Column("pushed", LONG_TEXT, nullable=True),
        sa.Column("pushed_digest", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(1024), nullable=True),
        sa.Column("permanent", sa.Boolean(), nullable=False),
        sa.Column("next_attempt", sa.Float(), nullable=True),
        sa.Column("desired_at", sa.Float(), nullable=False),
        sa.Column("pushed_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("node_uuid", name="pk_dhcp_pushes"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_dhcp_pushes_owner_next_attempt", "dhcp_pushes", ["owner", "next_attempt"])


def downgrade() -> None:
    op.drop_table("dhcp_pushes")
