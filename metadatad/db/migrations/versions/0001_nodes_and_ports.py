"""Nodes and their ports.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("conductor_group", sa.String(255), nullable=False),
        # LONGTEXT on MySQL: its TEXT holds 64 KiB, less than a node with user-data.
        sa.Column(
            "document",
            sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column("password", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("uuid", name="pk_nodes"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_nodes_project_id", "nodes", ["project_id"])
    op.create_table(
        "ports",
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("ip", sa.String(45), nullable=True),
        sa.Column("pxe", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("mac", name="pk_ports"),
        sa.ForeignKeyConstraint(
            ["node_uuid"], ["nodes.uuid"], name="fk_ports_node_uuid", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("ip", name="uq_ports_ip"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_ports_node_uuid", "ports", ["node_uuid"])


def downgrade() -> None:
    op.drop_table("ports")
    op.drop_table("nodes")
