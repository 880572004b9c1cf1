"""Node activity for the console's boot timeline, each node's last boot outcome, and
an index of nodes by name for the console's table.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_activity",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            autoincrement=True,
        ),
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("conductor", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(255), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("imdsv2", sa.Boolean(), nullable=False),
        sa.Column("first_at", sa.DateTime(), nullable=False),
        sa.Column("last_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_node_activity"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_node_activity_node_uuid_last_at", "node_activity", ["node_uuid", "last_at"])
    op.create_index("ix_node_activity_last_at", "node_activity", ["last_at"])
    op.create_table(
        "node_boot_status",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(255), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("node_uuid", name="pk_node_boot_status"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_node_boot_status_outcome", "node_boot_status", ["outcome"])
    op.create_index("ix_node_boot_status_at", "node_boot_status", ["at"])
    # The console's nodes table: pages by name from the index, and searches that read
    # the narrow index instead of the documents.
    op.create_index("ix_nodes_name_uuid", "nodes", ["name", "uuid"])


def downgrade() -> None:
    op.drop_index("ix_nodes_name_uuid", table_name="nodes")
    op.drop_table("node_boot_status")
    op.drop_table("node_activity")
