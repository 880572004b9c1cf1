"""DHCP push times in double precision on MySQL/MariaDB.

``dhcp_pushes.next_attempt``, ``desired_at`` and ``pushed_at`` are epoch seconds.
Migration 0006 made them ``FLOAT``, which MySQL and MariaDB store in single precision
(2**7 = 128 s steps at today's epoch) and return rounded to 6 digits (thousands of
seconds off): a retry fell due minutes early or late, and the pusher, reading a
``next_attempt`` in the past, polled in a tight loop.  ``DOUBLE`` keeps microseconds.
PostgreSQL's ``FLOAT`` and SQLite's ``REAL`` are already double precision.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_COLUMNS = (("next_attempt", True), ("desired_at", False), ("pushed_at", True))


def upgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for name, nullable in _COLUMNS:
        op.alter_column(
            "dhcp_pushes",
            name,
            type_=sa.Double(),
            existing_type=sa.Float(),
            existing_nullable=nullable,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    for name, nullable in _COLUMNS:
        op.alter_column(
            "dhcp_pushes",
            name,
            type_=sa.Float(),
            existing_type=sa.Double(),
            existing_nullable=nullable,
        )
