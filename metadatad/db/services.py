# -*- test-case-name: tests.db.test_services_repository -*-
"""Service membership and cardinal values, kept in ``service_members``.

A node is a member of ``service.name`` within its ``project_id``.  It *joins* when it
is written with a service it was not a member of (a new node, a new service name, a
new project), and *leaves* when it is written without it or deleted.  A joiner gets
its ``launch_index`` as cardinal value when no member has that value, else the lowest
value no member has; a member keeps its value for as long as it stays, across
restarts and rewrites, so a value is only ever reused after its holder left.

:func:`assign_cardinals` runs inside the node write's transaction, after the write
has locked the projects it touches (:func:`metadatad.db.peers.bump_projects`): joins
to one service are serialised by that lock, and the unique constraint on (project,
service, cardinal) refuses anything that slipped by.  Members are read with a locking
read, which sees the latest committed rows even under MariaDB's repeatable read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from metadatad.core.nodes import Node
from metadatad.core.services import Membership, choose_cardinals, plan_membership
from metadatad.db.schema import service_members

__all__ = ["assign_cardinals"]


def assign_cardinals(connection: Connection, new_nodes: Sequence[Node], moment: datetime) -> None:
    """Update memberships for nodes just written in this transaction (see above)."""
    uuids = [n.uuid for n in new_nodes]
    current: dict[str, Membership] = {}
    for start in range(0, len(uuids), 500):
        chunk = uuids[start : start + 500]
        for row in connection.execute(
            select(
                service_members.c.node_uuid,
                service_members.c.project_id,
                service_members.c.service_name,
            ).where(service_members.c.node_uuid.in_(chunk))
        ):
            current[row.node_uuid] = (row.project_id, row.service_name)
    leaving, joining = plan_membership(current, new_nodes)
    for start in range(0, len(leaving), 500):
        connection.execute(
            delete(service_members).where(
                service_members.c.node_uuid.in_(leaving[start : start + 500])
            )
        )
    for (project, name), nodes in sorted(joining.items()):
        taken = connection.execute(
            select(service_members.c.cardinal)
            .where(service_members.c.project_id == project, service_members.c.service_name == name)
            .with_for_update()
        ).scalars()
        chosen = choose_cardinals(taken, nodes)
        connection.execute(
            insert(service_members),
            [
                {
                    "node_uuid": uuid,
                    "project_id": project,
                    "service_name": name,
                    "cardinal": value,
                    "joined_at": moment,
                }
                for uuid, value in chosen.items()
            ],
        )
