"""Service members with their cardinal values, nodes' last metadata request, and the
time each project's watch index last changed.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_members",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("project_id", sa.String(255), nullable=False),
        sa.Column("service_name", sa.String(255), nullable=False),
        sa.Column("cardinal", sa.Integer(), nullable=False),
        sa.Column("joined_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_uuid"],
            ["nodes.uuid"],
            name="fk_service_members_node_uuid",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("node_uuid", name="pk_service_members"),
        sa.UniqueConstraint(
            "project_id", "service_name", "cardinal", name="uq_service_members_cardinal"
        ),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "node_seen",
        sa.Column("node_uuid", sa.String(36), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_uuid"], ["nodes.uuid"], name="fk_node_seen_node_uuid", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("node_uuid", name="pk_node_seen"),
        mysql_charset="utf8mb4",
    )
    with op.batch_alter_table("peer_index") as batch:
        batch.add_column(sa.Column("changed_at", sa.DateTime(), nullable=True))
    # Members of a service before this revision: their launch index where it is unique
    # in the service, else the lowest free number (the rule new joins follow).
    _assign_existing()


def _assign_existing() -> None:
    import json
    from datetime import UTC, datetime

    connection = op.get_bind()
    rows = connection.execute(
        sa.text("SELECT uuid, project_id, document FROM nodes ORDER BY uuid")
    ).all()
    members: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for uuid, project, document in rows:
        parsed = json.loads(document)
        service = parsed.get("service")
        if service and service.get("name"):
            launch_index = int(parsed.get("launch_index") or 0)
            members.setdefault((project, service["name"]), []).append((launch_index, uuid))
    moment = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    table = sa.table(
        "service_members",
        sa.column("node_uuid"),
        sa.column("project_id"),
        sa.column("service_name"),
        sa.column("cardinal"),
        sa.column("joined_at"),
    )
    for (project, name), joined in members.items():
        taken: set[int] = set()
        for launch_index, uuid in sorted(joined):
            cardinal = launch_index
            if cardinal in taken:
                cardinal = 0
                while cardinal in taken:
                    cardinal += 1
            taken.add(cardinal)
            connection.execute(
                table.insert().values(
                    node_uuid=uuid,
                    project_id=project,
                    service_name=name,
                    cardinal=cardinal,
                    joined_at=moment,
                )
            )


def downgrade() -> None:
    with op.batch_alter_table("peer_index") as batch:
        batch.drop_column("changed_at")
    op.drop_table("node_seen")
    op.drop_table("service_members")
