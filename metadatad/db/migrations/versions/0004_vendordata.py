"""Dynamic vendordata failures (the node's ``vendordata_error``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vendordata_errors",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("node_revision", sa.Integer(), nullable=False),
        sa.Column("conductor", sa.String(255), nullable=False),
        sa.Column("failed_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_uuid"],
            ["nodes.uuid"],
            name="fk_vendordata_errors_node_uuid",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_uuid", "target", name="pk_vendordata_errors"),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("vendordata_errors")
