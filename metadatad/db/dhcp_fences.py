# -*- test-case-name: tests.dhcp.test_dhcp_guarantees -*-
"""Who may withdraw a MAC, and who retracts what a dead conductor left (synchronous).

Two fences on top of the claims that fence a node's own mapping
(:mod:`metadatad.db.dhcp`):

* **A withdrawal is fenced by the MAC's current owner.**  A retraction sets a deleted
  node's MACs to ``ignore``, and an update sets the MACs a node no longer has to
  ``ignore``.  A MAC belongs to at most one node (``ports.mac`` is the key): if another
  node has it now, it is that node's owner's to push, so the withdrawal leaves it out
  (and, for Neutron, leaves out that node's Neutron ports).  The dnsmasq provider
  checks the same at write time (a host file written for another node is not
  replaced by ``ignore``), which closes the window between this read and the write.
* **Orphaned retractions are adopted.**  A node deleted while the conductor that last
  pushed it is dead has no claim left (it went with the node), so no survivor ever
  takes it over.  Its row is *orphaned* while its owner, a conductor of our group, is
  not in the membership recorded for the current generation and the retraction is not
  pushed yet.  The survivor the ring (over the group's live conductors) gives the
  node's uuid adopts it: one compare-and-set per row (same owner and generation as
  read) makes it the row's owner at the current generation, with a retraction due at
  once.  Two survivors racing: one wins, the other's update matches nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from sqlalchemy import and_, exists, not_, or_, select, update
from sqlalchemy.engine import Connection, Engine

from metadatad.core.bootmapping import BootMapping, retraction
from metadatad.core.conductors import decode_members
from metadatad.db.bulk import chunks_for, member_of
from metadatad.db.schema import conductors, dhcp_pushes, nodes, ports, ring_state

__all__ = ["Orphan", "OrphanScan", "adopt_orphans", "fence_withdrawals", "orphaned_retractions"]

# The canonical JSON of a retraction (BootMapping.to_json: sorted keys, no spaces).
_REMOVED = '"removed":true'

Pair = tuple[BootMapping, BootMapping | None]


def fence_withdrawals(connection: Connection, pairs: Sequence[Pair]) -> list[Pair]:
    """``(desired, previous)`` pairs with every MAC another node has now left out of
    what they withdraw: a retraction's MACs (and those nodes' Neutron ports), an
    update's no-longer-present MACs (taken out of ``previous``)."""
    withdrawn: set[str] = set()
    for desired, previous in pairs:
        if desired.removed:
            withdrawn.update(desired.macs)
        elif previous is not None:
            withdrawn.update(mac for mac in previous.macs if mac not in desired.macs)
    if not withdrawn:
        return list(pairs)
    holders: dict[str, str] = {}
    for chunk in chunks_for(connection, sorted(withdrawn)):
        holders.update(
            (row.mac, row.node_uuid)
            for row in connection.execute(
                select(ports.c.mac, ports.c.node_uuid).where(
                    member_of(connection, ports.c.mac, chunk)
                )
            )
        )
    if not holders:
        return list(pairs)
    neutron = _neutron_ports(connection, set(holders.values()))
    return [_fenced(desired, previous, holders, neutron) for desired, previous in pairs]


def _fenced(
    desired: BootMapping,
    previous: BootMapping | None,
    holders: dict[str, str],
    neutron: dict[str, set[str]],
) -> Pair:
    """One pair with the MACs other nodes hold (``holders``: MAC -> node) left out."""
    uuid = desired.node_uuid
    if desired.removed:
        taken = {m for m in desired.macs if holders.get(m, uuid) != uuid}
        if not taken:
            return desired, previous
        theirs: set[str] = set()
        for mac in taken:
            theirs.update(neutron.get(holders[mac], ()))
        return (
            attrs.evolve(
                desired,
                macs=tuple(m for m in desired.macs if m not in taken),
                neutron_ports=tuple(p for p in desired.neutron_ports if p not in theirs),
            ),
            previous,
        )
    if previous is None:
        return desired, previous
    taken = {m for m in previous.macs if m not in desired.macs and holders.get(m, uuid) != uuid}
    if not taken:
        return desired, previous
    return desired, attrs.evolve(previous, macs=tuple(m for m in previous.macs if m not in taken))


def _neutron_ports(connection: Connection, uuids: set[str]) -> dict[str, set[str]]:
    """``{node uuid: its ports' neutron_port_ids}``."""
    found: dict[str, set[str]] = {}
    for chunk in chunks_for(connection, sorted(uuids)):
        query = select(nodes.c.uuid, nodes.c.document).where(
            member_of(connection, nodes.c.uuid, chunk)
        )
        for row in connection.execute(query):
            document = json.loads(row.document)
            found[row.uuid] = {
                str(port["neutron_port_id"])
                for port in document.get("ports", ())
                if port.get("neutron_port_id")
            }
    return found


@attrs.frozen
class Orphan:
    """A deleted node's row left by a dead conductor, as read."""

    node_uuid: str
    owner: str
    generation: int
    desired: BootMapping


@attrs.frozen
class OrphanScan:
    """The current generation, the group's live conductors at it, and the orphans."""

    generation: int
    live: tuple[str, ...]
    orphans: tuple[Orphan, ...]


def orphaned_retractions(engine: Engine, group: str) -> OrphanScan:
    """The rows of deleted nodes whose owner, a conductor of ``group``, is not live at
    the current generation and whose retraction is not pushed yet."""
    with engine.connect() as connection:
        row = connection.execute(
            select(ring_state.c.generation, ring_state.c.members).where(ring_state.c.id == 1)
        ).first()
        if row is None:
            return OrphanScan(0, (), ())
        live = tuple(sorted(n for g, n in decode_members(row.members) if g == group))
        node_gone = ~exists().where(nodes.c.uuid == dhcp_pushes.c.node_uuid)
        not_done = or_(
            dhcp_pushes.c.pushed_digest.is_(None),
            dhcp_pushes.c.pushed_digest != dhcp_pushes.c.desired_digest,
            not_(dhcp_pushes.c.desired.contains(_REMOVED, autoescape=True)),
        )
        query = (
            select(
                dhcp_pushes.c.node_uuid,
                dhcp_pushes.c.owner,
                dhcp_pushes.c.generation,
                dhcp_pushes.c.desired,
            )
            .join_from(dhcp_pushes, conductors, conductors.c.name == dhcp_pushes.c.owner)
            .where(conductors.c.conductor_group == group, node_gone, not_done)
            .order_by(dhcp_pushes.c.node_uuid)
        )
        if live:
            query = query.where(dhcp_pushes.c.owner.not_in(live))
        orphans = tuple(
            Orphan(
                r.node_uuid,
                r.owner,
                int(r.generation),
                BootMapping.from_document(json.loads(r.desired)),
            )
            for r in connection.execute(query)
        )
    return OrphanScan(int(row.generation), live, orphans)


def adopt_orphans(
    engine: Engine, owner: str, generation: int, orphans: Sequence[Orphan], now: float
) -> list[str]:
    """Make ``owner`` the owner of ``orphans`` at ``generation``, each a retraction due
    now; a row changed since it was read (another survivor adopted it, or the node
    came back) is left alone.  Returns the uuids adopted."""
    adopted: list[str] = []
    with engine.begin() as connection:
        for orphan in orphans:
            mapping = retraction(orphan.desired, orphan.node_uuid, orphan.desired.macs)
            result = connection.execute(
                update(dhcp_pushes)
                .where(
                    and_(
                        dhcp_pushes.c.node_uuid == orphan.node_uuid,
                        dhcp_pushes.c.owner == orphan.owner,
                        dhcp_pushes.c.generation == orphan.generation,
                        ~exists().where(nodes.c.uuid == dhcp_pushes.c.node_uuid),
                    )
                )
                .values(_adopted_values(owner, generation, mapping, now))
            )
            if result.rowcount:
                adopted.append(orphan.node_uuid)
    return adopted


def _adopted_values(owner: str, generation: int, mapping: BootMapping, now: float) -> Any:
    return {
        "owner": owner,
        "generation": generation,
        "desired": mapping.to_json(),
        "desired_digest": mapping.digest,
        "attempts": 0,
        "last_error": None,
        "permanent": False,
        "next_attempt": now,
        "desired_at": now,
    }
