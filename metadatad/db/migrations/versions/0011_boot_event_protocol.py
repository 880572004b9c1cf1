"""Boot events say which protocol served them (``tftp`` or ``http``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("boot_events") as batch:
        batch.add_column(sa.Column("protocol", sa.String(8), nullable=False, server_default="tftp"))


def downgrade() -> None:
    with op.batch_alter_table("boot_events") as batch:
        batch.drop_column("protocol")
