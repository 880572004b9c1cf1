# -*- test-case-name: tests.core.test_cluster_placement -*-
"""Which conductor should hold each node, and what one conductor must claim (pure).

A :class:`Placement` is the rings of one recorded membership, one ring per conductor
group: a node of group G is placed only on the live conductors of G, and a group
without any live conductor leaves its nodes unowned (``None``).  Every conductor that
reads the same membership computes the same placement.

:func:`plan_claims` compares a placement with the stored claims and lists the nodes a
conductor must claim; :func:`ring_report` and :func:`moves_without` answer the
operators' questions (``GET /v1/ring``, ``metadatad-manage ring show``).  Nothing here
does I/O or reads a clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from metadatad.core.conductors import Claim, RingState
from metadatad.core.ring import DEFAULT_POINTS, HashRing

__all__ = ["ClaimPlan", "Placement", "moves_without", "plan_claims", "ring_report"]


class Placement:
    """The rings of one membership, per conductor group."""

    def __init__(
        self,
        members: Mapping[str, Iterable[str]],
        *,
        replicas: int = 2,
        points: int = DEFAULT_POINTS,
        max_load_factor: float | None = None,
    ) -> None:
        self.replicas = replicas
        self.points = points
        self.max_load_factor = max_load_factor
        self.rings = {
            group: HashRing(names, replicas=replicas, points=points)
            for group, names in members.items()
            if names
        }

    @classmethod
    def of(cls, state: RingState, **settings: Any) -> Placement:
        """The placement of a recorded membership."""
        return cls(state.by_group(), **settings)

    def ring(self, group: str) -> HashRing | None:
        """The group's ring, or None if the group has no live conductor."""
        return self.rings.get(group)

    def assign(self, node_groups: Mapping[str, str]) -> dict[str, str | None]:
        """``{node uuid: owner or None}`` for ``{node uuid: conductor group}``.

        In bounded-load mode each group's nodes are placed together (the result depends
        on the group's whole node set, the same on every conductor that reads it).
        """
        by_group: dict[str, list[str]] = {}
        for uuid, group in node_groups.items():
            by_group.setdefault(group, []).append(uuid)
        owners: dict[str, str | None] = {}
        for group, uuids in by_group.items():
            ring = self.rings.get(group)
            if ring is None:
                owners.update(dict.fromkeys(uuids))
            elif self.max_load_factor is None:
                owners.update(ring.assign(uuids))
            else:
                owners.update(ring.assign_bounded(uuids, self.max_load_factor))
        return owners

    def owners(self, node_uuid: str, group: str) -> tuple[str, ...]:
        """Owner then standbys by the plain ring (``replicas`` names at most)."""
        ring = self.rings.get(group)
        return ring.owners(node_uuid) if ring is not None else ()


@attrs.frozen
class ClaimPlan:
    """The nodes one conductor must claim, with the owner each is taken from."""

    claim: tuple[str, ...] = ()
    previous: Mapping[str, str | None] = attrs.field(factory=dict)  # None: unclaimed
    # Nodes the placement gives this conductor (claimed already or to claim).
    assigned: frozenset[str] = frozenset()
    # Nodes it gives this conductor that another holds by a claim of the same
    # generation, which no claim can replace (see plan_claims).
    contested: tuple[str, ...] = ()

    def sources(self) -> dict[str | None, int]:
        """``{previous owner (None: unclaimed): count}`` of the nodes to claim."""
        return dict(Counter(self.previous[uuid] for uuid in self.claim))


def plan_claims(
    me: str,
    group: str,
    placement: Placement,
    node_groups: Mapping[str, str],
    claims: Mapping[str, Claim],
    *,
    generation: int,
) -> ClaimPlan:
    """What ``me`` (of conductor ``group``) must claim at ``generation`` so that the
    claims match ``placement``: the nodes placed on it that are unclaimed, claimed for
    another conductor group, or claimed by another conductor at an older generation.

    A node another conductor claimed at this same generation is *contested*, not
    planned: no claim can replace it (the fence).  That happens only when two
    conductors placed it differently with the same membership: briefly in bounded-load
    mode, when they read the node set at different moments (the node stays where it
    is until the next generation), or for good when their ring settings or versions
    differ (a configuration error the caller reports).
    """
    mine = {uuid for uuid, g in node_groups.items() if g == group}
    owners = placement.assign({uuid: group for uuid in mine})
    assigned = frozenset(uuid for uuid, owner in owners.items() if owner == me)
    claim: list[str] = []
    contested: list[str] = []
    previous: dict[str, str | None] = {}
    for uuid in sorted(assigned):
        held = claims.get(uuid)
        if held is None or held.group != group:
            claim.append(uuid)
        elif held.owner == me:
            continue
        elif held.generation < generation:
            claim.append(uuid)
        else:
            contested.append(uuid)
            continue
        previous[uuid] = held.owner if held is not None else None
    return ClaimPlan(tuple(claim), previous, assigned, tuple(contested))


def ring_report(
    state: RingState,
    placement: Placement,
    node_groups: Mapping[str, str],
    claims: Mapping[str, Claim],
) -> dict[str, Any]:
    """``GET /v1/ring``: the generation, per-conductor counts, and what is unsettled.

    ``assigned`` is what the ring gives a conductor, ``claimed`` what it holds;
    ``unowned`` counts nodes whose group has no live conductor (``unowned_groups``
    names them), ``pending`` nodes whose claim does not match the ring yet (a takeover
    in progress, or a node not claimed yet).
    """
    owners = placement.assign(node_groups)
    assigned = Counter(owner for owner in owners.values() if owner is not None)
    claimed = Counter(claim.owner for claim in claims.values())
    unowned_groups = Counter(node_groups[uuid] for uuid, owner in owners.items() if owner is None)
    pending = sum(
        1
        for uuid, owner in owners.items()
        if owner is not None and (uuid not in claims or claims[uuid].owner != owner)
    )
    group_of = {name: group for group, name in state.members}
    names = sorted(set(group_of) | set(claimed))
    return {
        "generation": state.generation,
        "changed_at": _isoformat(state),
        "conductors": [
            {
                "name": name,
                "group": group_of.get(name),
                "live": name in group_of,
                "assigned": assigned.get(name, 0),
                "claimed": claimed.get(name, 0),
            }
            for name in names
        ],
        "groups": {group: list(names) for group, names in sorted(state.by_group().items())},
        "nodes": len(node_groups),
        "unowned": sum(unowned_groups.values()),
        "unowned_groups": dict(sorted(unowned_groups.items())),
        "pending": pending,
        "points": placement.points,
        "replicas": placement.replicas,
        "max_load_factor": placement.max_load_factor,
    }


def _isoformat(state: RingState) -> str | None:
    if state.changed_at is None:
        return None
    return state.changed_at.isoformat() + "Z"


def moves_without(
    placement: Placement, node_groups: Mapping[str, str], conductor: str
) -> dict[str, tuple[str | None, str | None]]:
    """``{node uuid: (owner now, owner then)}`` of the nodes that would move if
    ``conductor`` failed: its own nodes, plus, in bounded-load mode, the few others
    the new caps displace.  ``None``: a group left without any conductor."""
    survivors = {
        group: [name for name in ring.conductors if name != conductor]
        for group, ring in placement.rings.items()
    }
    after = Placement(
        survivors,
        replicas=placement.replicas,
        points=placement.points,
        max_load_factor=placement.max_load_factor,
    )
    before_owners = placement.assign(node_groups)
    after_owners = after.assign(node_groups)
    return {
        uuid: (owner, after_owners[uuid])
        for uuid, owner in sorted(before_owners.items())
        if after_owners[uuid] != owner
    }
