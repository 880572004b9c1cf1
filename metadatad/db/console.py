# -*- test-case-name: tests.db.test_console_queries -*-
"""The console's queries (synchronous, run on the store's threadpool).

:meth:`ConsoleQueries.page` is the nodes table: one page of nodes matching a search
(name, uuid, MAC or IP, case-insensitive, anywhere in the text) and filters (owner,
DHCP push state, last boot outcome), with the total; everything is done by the
database, two indexed queries per page, so 10,000 nodes cost what a page costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.engine import Engine

from metadatad.core.conductors import RingState
from metadatad.core.placement import Placement, moves_without
from metadatad.db.cluster import ClusterRepository
from metadatad.db.schema import (
    dhcp_pushes,
    node_boot_status,
    node_claims,
    nodes,
    ports,
    vendordata_errors,
)

__all__ = ["PUSH_STATES", "ConsoleQueries", "NodeFilter", "NodeRow"]

PUSH_STATES = ("pushed", "pending", "failed", "none")
# The boot outcome filter's value for nodes without any recorded boot.
NO_BOOT = "none"


@attrs.frozen
class NodeFilter:
    """What the nodes table shows: ``search`` text, filters (empty: any), the page."""

    search: str = ""
    owner: str = ""
    push: str = ""
    outcome: str = ""
    page: int = 1
    per_page: int = 50


@attrs.frozen
class NodeRow:
    """One line of the nodes table."""

    uuid: str
    name: str
    conductor_group: str
    owner: str | None
    push: str
    outcome: str | None
    vendordata_error: bool
    macs: tuple[str, ...]
    ips: tuple[str, ...]


def _push_state() -> Any:
    in_sync = dhcp_pushes.c.pushed_digest == dhcp_pushes.c.desired_digest
    failed = and_(
        or_(dhcp_pushes.c.pushed_digest.is_(None), ~in_sync), dhcp_pushes.c.permanent.is_(True)
    )
    return (in_sync, failed)


class ConsoleQueries:
    """The console's reads and its one write (re-push), on ``engine``."""

    def __init__(self, engine: Engine, cluster_settings: Mapping[str, Any] | None = None) -> None:
        self.engine = engine
        self._settings = dict(cluster_settings or {})

    # --- the nodes table -------------------------------------------------------------

    def page(self, wanted: NodeFilter) -> tuple[int, list[NodeRow]]:
        """``(how many nodes match, the rows of the page)``, by name then uuid.

        Two steps: the matching uuids (joining only the tables a filter needs), then
        the details of the page's nodes alone."""
        conditions, joins = self._conditions(wanted)
        source: Any = nodes
        for table in (node_claims, dhcp_pushes, node_boot_status):
            if table in joins:
                # An inner join where a row must exist: the planner may hash it.
                join = source.outerjoin if joins[table] else source.join
                source = join(table, table.c.node_uuid == nodes.c.uuid)
        offset = (max(1, wanted.page) - 1) * wanted.per_page
        # Without joined filters the total rides along (a window count): one pass over
        # the matches.  With them, two statements: the page stops after its 50 names
        # (the name index) and the count is free to hash-join.
        window = () if joins else (func.count().over().label("total"),)
        page = (
            select(nodes.c.uuid, *window)
            .select_from(source)
            .where(*conditions)
            .order_by(nodes.c.name, nodes.c.uuid)
            .offset(offset)
            .limit(wanted.per_page)
        )
        with self.engine.connect() as connection:
            found = connection.execute(page).all()
            uuids = [row.uuid for row in found]
            if found and not joins:
                total = int(found[0].total)
            else:
                count = select(func.count()).select_from(source).where(*conditions)
                total = int(connection.execute(count).scalar() or 0)
            if not uuids:
                return total, []
            rows = {row.uuid: row for row in connection.execute(self._details(uuids))}
            addresses: dict[str, list[tuple[str, str | None]]] = {u: [] for u in uuids}
            for mac, node_uuid, ip in connection.execute(
                select(ports.c.mac, ports.c.node_uuid, ports.c.ip)
                .where(ports.c.node_uuid.in_(uuids))
                .order_by(ports.c.mac)
            ):
                addresses[node_uuid].append((mac, ip))
        return total, [_row(rows[uuid], addresses[uuid]) for uuid in uuids if uuid in rows]

    @staticmethod
    def _details(uuids: list[str]) -> Any:
        in_sync, failed = _push_state()
        return (
            select(
                nodes.c.uuid,
                nodes.c.name,
                nodes.c.conductor_group,
                node_claims.c.owner,
                dhcp_pushes.c.node_uuid.label("push_row"),
                in_sync.label("in_sync"),
                failed.label("failed"),
                node_boot_status.c.outcome,
                exists()
                .where(vendordata_errors.c.node_uuid == nodes.c.uuid)
                .label("vendordata_error"),
            )
            .select_from(
                nodes.outerjoin(node_claims, node_claims.c.node_uuid == nodes.c.uuid)
                .outerjoin(dhcp_pushes, dhcp_pushes.c.node_uuid == nodes.c.uuid)
                .outerjoin(node_boot_status, node_boot_status.c.node_uuid == nodes.c.uuid)
            )
            .where(nodes.c.uuid.in_(uuids))
        )

    def _conditions(self, wanted: NodeFilter) -> tuple[list[Any], dict[Any, bool]]:
        """The WHERE conditions of ``wanted``, and the tables they need joined (True:
        an outer join, the filter asks for nodes without a row there)."""
        conditions: list[Any] = []
        joins: dict[Any, bool] = {}
        search = wanted.search.strip().lower()
        if search:
            mac = search.replace("-", ":")
            by_port = select(ports.c.node_uuid).where(
                or_(
                    ports.c.mac.contains(mac, autoescape=True),
                    func.lower(ports.c.ip).contains(search, autoescape=True),
                )
            )
            conditions.append(
                or_(
                    nodes.c.name.icontains(search, autoescape=True),
                    nodes.c.uuid.contains(search, autoescape=True),
                    nodes.c.uuid.in_(by_port),
                )
            )
        if wanted.owner:
            joins[node_claims] = wanted.owner == "-"
            if wanted.owner == "-":
                conditions.append(node_claims.c.owner.is_(None))
            else:
                conditions.append(node_claims.c.owner == wanted.owner)
        in_sync, failed = _push_state()
        if wanted.push in PUSH_STATES:
            joins[dhcp_pushes] = wanted.push == "none"
        if wanted.push == "none":
            conditions.append(dhcp_pushes.c.node_uuid.is_(None))
        elif wanted.push == "pushed":
            conditions.append(in_sync)
        elif wanted.push == "failed":
            conditions.append(failed)
        elif wanted.push == "pending":
            conditions.append(
                and_(
                    dhcp_pushes.c.node_uuid.is_not(None),
                    or_(
                        dhcp_pushes.c.pushed_digest.is_(None),
                        dhcp_pushes.c.pushed_digest != dhcp_pushes.c.desired_digest,
                    ),
                    dhcp_pushes.c.permanent.is_(False),
                )
            )
        if wanted.outcome:
            joins[node_boot_status] = wanted.outcome == NO_BOOT
            if wanted.outcome == NO_BOOT:
                conditions.append(node_boot_status.c.outcome.is_(None))
            else:
                conditions.append(node_boot_status.c.outcome == wanted.outcome)
        return conditions, joins

    def choices(self) -> dict[str, list[str]]:
        """The filters' values that exist: owners and boot outcomes."""
        with self.engine.connect() as connection:
            owners = connection.execute(
                select(node_claims.c.owner).distinct().order_by(node_claims.c.owner)
            ).scalars()
            outcomes = connection.execute(
                select(node_boot_status.c.outcome).distinct().order_by(node_boot_status.c.outcome)
            ).scalars()
            return {"owners": list(owners), "outcomes": list(outcomes)}

    # --- actions -----------------------------------------------------------------------

    def repush(self, node_uuid: str) -> str | None:
        """Mark the node's mapping not pushed and due now (errors and attempts reset),
        so its owner pushes it again; returns the owner (None: no mapping)."""
        with self.engine.begin() as connection:
            owner = connection.execute(
                select(dhcp_pushes.c.owner).where(dhcp_pushes.c.node_uuid == node_uuid)
            ).scalar()
            if owner is None:
                return None
            connection.execute(
                update(dhcp_pushes)
                .where(dhcp_pushes.c.node_uuid == node_uuid, dhcp_pushes.c.owner == owner)
                .values(
                    pushed_digest=None,
                    attempts=0,
                    last_error=None,
                    permanent=False,
                    next_attempt=0.0,
                )
            )
            return str(owner)

    # --- what-if -----------------------------------------------------------------------

    def what_if(self, conductor: str, timeout: float) -> tuple[int, list[dict[str, Any]]]:
        """``metadatad-manage ring show --without``: how many nodes there are, and the
        ones that would move if ``conductor`` died (uuid, name, group, from, to), by the
        rings of the conductors live now."""
        repository = ClusterRepository(self.engine)
        recorded = repository.ring_state()
        live = RingState(recorded.generation, repository.live_members(timeout), recorded.changed_at)
        placement = Placement.of(live, **self._settings)
        node_groups = repository.node_groups()
        moves = moves_without(placement, node_groups, conductor)
        names: dict[str, str] = {}
        with self.engine.connect() as connection:
            for uuid, name in connection.execute(select(nodes.c.uuid, nodes.c.name)):
                if uuid in moves:
                    names[uuid] = name
        return len(node_groups), [
            {
                "uuid": uuid,
                "name": names.get(uuid, ""),
                "group": node_groups[uuid],
                "from": old,
                "to": new,
            }
            for uuid, (old, new) in moves.items()
        ]

    def live_conductors(self, timeout: float) -> list[str]:
        """Names of the conductors live now (the what-if choices)."""
        members = ClusterRepository(self.engine).live_members(timeout)
        return sorted(name for _group, name in members)


def _row(row: Any, addresses: list[tuple[str, str | None]]) -> NodeRow:
    if row.push_row is None:
        push = "none"
    elif row.in_sync:
        push = "pushed"
    else:
        push = "failed" if row.failed else "pending"
    return NodeRow(
        uuid=row.uuid,
        name=row.name,
        conductor_group=row.conductor_group,
        owner=row.owner,
        push=push,
        outcome=row.outcome,
        vendordata_error=bool(row.vendordata_error),
        macs=tuple(mac for mac, _ in addresses),
        ips=tuple(ip for _, ip in addresses if ip),
    )
