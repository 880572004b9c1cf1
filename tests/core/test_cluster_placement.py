"""Placement of nodes on conductor groups, claim plans and operator reports (pure)."""

from __future__ import annotations

import uuid as uuidlib
from datetime import datetime

import pytest

from metadatad.core.conductors import Claim, RingState
from metadatad.core.placement import Placement, moves_without, plan_claims, ring_report
from metadatad.core.ring import HashRing

NODES = [str(uuidlib.UUID(int=0x5EED0000000040008000000000000000 + i)) for i in range(300)]
WHEN = datetime(2026, 11, 22, 5, 0, 0)


def claim(uuid: str, owner: str, group: str = "", generation: int = 1) -> Claim:
    return Claim(uuid, owner, group, generation, WHEN)


def test_each_group_has_its_own_ring() -> None:
    """Nodes go to conductors of their group only; a group without any is unowned."""
    placement = Placement({"": ["a", "b"], "rack-1": ["c"]}, points=64)
    groups = {
        u: ("rack-1" if i % 3 == 0 else "" if i % 3 == 1 else "rack-2") for i, u in enumerate(NODES)
    }
    owners = placement.assign(groups)
    plain = HashRing(["a", "b"], points=64)
    for uuid, group in groups.items():
        if group == "rack-1":
            assert owners[uuid] == "c"
        elif group == "":
            assert owners[uuid] == plain.owner(uuid)
        else:
            assert owners[uuid] is None
    assert placement.ring("rack-2") is None
    assert placement.owners(NODES[1], "") == plain.owners(NODES[1], 2)
    assert placement.owners(NODES[1], "rack-2") == ()


def test_placement_of_a_recorded_membership() -> None:
    """Placement.of reads the (group, name) pairs of a ring state."""
    state = RingState(4, (("", "a"), ("", "b"), ("x", "c")), WHEN)
    placement = Placement.of(state, replicas=3, points=32)
    assert sorted(placement.rings) == ["", "x"]
    assert placement.rings[""].conductors == ("a", "b")
    assert placement.replicas == 3


def test_bounded_mode_caps_every_conductor() -> None:
    """With max_load_factor each conductor holds at most ceil(factor * mean) nodes."""
    placement = Placement({"": ["a", "b", "c"]}, points=16, max_load_factor=1.05)
    owners = placement.assign(dict.fromkeys(NODES, ""))
    counts = {name: list(owners.values()).count(name) for name in "abc"}
    assert max(counts.values()) <= 105
    assert sum(counts.values()) == 300


def test_plan_claims_lists_what_is_missing_or_someone_elses() -> None:
    """A conductor claims the nodes the ring gives it that it does not hold: unclaimed,
    claimed for another group, or claimed by another conductor at an older generation;
    a claim of the same generation by another is contested, not planned."""
    placement = Placement({"": ["a", "b"]}, points=64)
    groups = dict.fromkeys(NODES, "")
    owners = placement.assign(groups)
    mine = sorted(u for u, o in owners.items() if o == "a")
    claims = {
        mine[0]: claim(mine[0], "a", generation=1),
        mine[1]: claim(mine[1], "b", generation=1),
        mine[2]: claim(mine[2], "a", group="old-group", generation=2),
        mine[3]: claim(mine[3], "b", generation=2),
    }
    plan = plan_claims("a", "", placement, groups, claims, generation=2)
    assert plan.assigned == frozenset(mine)
    assert set(plan.claim) == {mine[1], mine[2], *mine[4:]}
    assert plan.contested == (mine[3],)
    assert plan.previous[mine[1]] == "b"
    assert plan.previous[mine[2]] == "a"
    assert plan.previous[mine[4]] is None
    assert mine[3] not in plan.previous
    assert plan.sources() == {"b": 1, "a": 1, None: len(mine) - 4}


def test_plan_claims_ignores_other_groups_and_absent_conductors() -> None:
    """Nodes of other groups are never planned; a conductor not in the ring gets none."""
    placement = Placement({"": ["a"], "x": ["b"]}, points=16)
    groups = {NODES[0]: "", NODES[1]: "x"}
    assert plan_claims("a", "", placement, groups, {}, generation=1).claim == (NODES[0],)
    assert plan_claims("z", "", placement, groups, {}, generation=1).claim == ()


def test_ring_report_counts_assigned_claimed_unowned_pending() -> None:
    """The report says what the ring gives each conductor and what each holds."""
    state = RingState(7, (("", "a"), ("", "b")), WHEN)
    placement = Placement.of(state, points=64)
    groups = dict.fromkeys(NODES[:200], "") | dict.fromkeys(NODES[200:], "lonely")
    owners = placement.assign(groups)
    claims = {u: claim(u, o) for u, o in owners.items() if o is not None}
    # One stale claim (a takeover in progress) and one unclaimed node.
    stale = next(u for u, o in owners.items() if o == "a")
    claims[stale] = claim(stale, "gone")
    unclaimed = next(u for u, o in owners.items() if o == "b")
    del claims[unclaimed]
    report = ring_report(state, placement, groups, claims)
    assert report["generation"] == 7
    assert report["changed_at"] == "2026-11-22T05:00:00Z"
    assert report["nodes"] == 300
    assert report["unowned"] == 100
    assert report["unowned_groups"] == {"lonely": 100}
    assert report["pending"] == 2
    by_name = {c["name"]: c for c in report["conductors"]}
    assert by_name["a"]["assigned"] + by_name["b"]["assigned"] == 200
    assert by_name["a"]["claimed"] == by_name["a"]["assigned"] - 1
    assert by_name["b"]["claimed"] == by_name["b"]["assigned"] - 1
    assert by_name["gone"] == {
        "name": "gone",
        "group": None,
        "live": False,
        "assigned": 0,
        "claimed": 1,
    }
    assert report["groups"] == {"": ["a", "b"]}


@pytest.mark.parametrize("factor", [None, 1.05])
def test_moves_without_a_conductor(factor: float | None) -> None:
    """Without HOST, HOST's nodes move to the survivors; in plain mode nothing else."""
    placement = Placement({"": ["a", "b", "c"], "x": ["c"]}, points=64, max_load_factor=factor)
    groups = dict.fromkeys(NODES[:290], "") | dict.fromkeys(NODES[290:], "x")
    before = placement.assign(groups)
    moves = moves_without(placement, groups, "c")
    on_c = {u for u, o in before.items() if o == "c"}
    assert on_c <= set(moves)
    for uuid, (old, new) in moves.items():
        assert old == before[uuid]
        assert new != "c"
        if groups[uuid] == "x":
            assert new is None
        else:
            assert new in ("a", "b")
    if factor is None:
        assert set(moves) == on_c
    assert moves_without(placement, groups, "nobody") == {}
