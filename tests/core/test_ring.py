"""Tests of the pure consistent-hash ring (metadatad.core.ring)."""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import pickle
import random
import uuid
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metadatad.core.ring import (
    DEFAULT_POINTS,
    MAX_POINTS,
    EmptyRingError,
    HashRing,
    diff,
)

# Ring builds take milliseconds and the machine may be shared: no per-example deadline.
PROPERTY = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

names = st.text(min_size=1, max_size=12)
memberships = st.lists(names, min_size=1, max_size=8, unique=True)
# Few points make long gaps, wrap-around and empty-side cases; many make shared slots.
point_counts = st.sampled_from([1, 2, 3, 16, 256, DEFAULT_POINTS])
node_lists = st.lists(st.uuids().map(str), min_size=1, max_size=40, unique=True)


def random_nodes(seed: int, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


@st.composite
def node_batches(draw: st.DrawFn) -> list[str]:
    """Drawn uuids (shrinkable) plus a few hundred seeded ones (cheap coverage)."""
    return draw(node_lists) + random_nodes(draw(st.integers(0, 2**32)), 200)


# -- an independent oracle, written from the module docstring's definition ---------------

SLOT_BITS = 18
SLOTS = 1 << SLOT_BITS


@functools.cache
def oracle_points(name: str, points: int) -> tuple[int, list[int]]:
    """(seed, sorted slots): SHAKE-256 of the name; 8 bytes of seed, 4 per point."""
    stream = hashlib.shake_256(b"metadatad.ring.v1\x00" + name.encode()).digest(8 + 4 * points)
    slots = [
        int.from_bytes(stream[i : i + 4], "little") >> (32 - SLOT_BITS)
        for i in range(8, len(stream), 4)
    ]
    return int.from_bytes(stream[:8], "little"), sorted(slots)


def oracle_ranks(conductors: list[str], points: int, node: str) -> list[tuple[int, int, int, str]]:
    """(distance, side, -weight, name) per conductor, sorted: rank order."""
    key = int.from_bytes(hashlib.blake2b(node.encode(), digest_size=8).digest(), "little")
    slot = key >> (64 - SLOT_BITS)
    ranked = []
    for name in set(conductors):
        seed, slots = oracle_points(name, points)
        at = bisect.bisect_left(slots, slot)
        up = (slots[at % len(slots)] - slot) % SLOTS  # to the nearest point clockwise
        down = (slot - slots[at - 1]) % SLOTS  # counterclockwise
        x = key ^ seed
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
        x ^= x >> 31
        ranked.append((min(up, down), 0 if up <= down else 1, -x, name))
    return sorted(ranked)


def oracle_owners(conductors: list[str], points: int, node: str) -> list[str]:
    return [rank[-1] for rank in oracle_ranks(conductors, points, node)]


@PROPERTY
@given(memberships, st.sampled_from([1, 2, 5, 40, DEFAULT_POINTS]), node_lists)
def test_owners_match_the_definition(conductors: list[str], points: int, nodes: list[str]) -> None:
    ring = HashRing(conductors, points=points)
    for node in nodes:
        expected = oracle_owners(conductors, points, node)
        assert list(ring.owners(node, len(conductors))) == expected
        assert ring.owner(node) == expected[0]


@pytest.mark.parametrize("count", [5, 60])
def test_owners_match_the_definition_at_ties(count: int) -> None:
    # With few conductors about 1 % of nodes sit in the middle of a gap (equally far
    # from a point on each side); with many, nodes often share a slot with several.
    conductors = [f"conductor-{i}" for i in range(count)]
    ring = HashRing(conductors)
    middles = shared = 0
    for node in random_nodes(count, 2000):
        ranks = oracle_ranks(conductors, DEFAULT_POINTS, node)
        assert list(ring.owners(node, 6)) == [rank[-1] for rank in ranks[:6]]
        assert ring.owner(node) == ranks[0][-1]
        middles += ranks[0][0] == ranks[1][0] > 0 and ranks[0][1] != ranks[1][1]
        shared += ranks[0][0] == ranks[1][0] == 0
    assert (middles if count == 5 else shared) > 10


# -- properties ---------------------------------------------------------------------------


@PROPERTY
@given(memberships, point_counts, node_batches(), st.randoms(use_true_random=False))
def test_same_ring_whatever_the_input_order(
    conductors: list[str], points: int, nodes: list[str], rnd: random.Random
) -> None:
    ring = HashRing(conductors, points=points)
    shuffled = conductors * 2  # duplicates must not matter either
    rnd.shuffle(shuffled)
    again = HashRing(shuffled, points=points)
    assert again == ring
    assert again.conductors == tuple(sorted(conductors))
    assert again.assign(nodes) == ring.assign(nodes)
    for node in nodes[:20]:
        assert again.owners(node, 3) == ring.owners(node, 3)


@PROPERTY
@given(memberships, point_counts, node_batches())
def test_deterministic_and_assign_matches_owner(
    conductors: list[str], points: int, nodes: list[str]
) -> None:
    ring = HashRing(conductors, points=points)
    mapping = ring.assign(nodes)
    assert mapping == HashRing(conductors, points=points).assign(nodes)
    assert mapping == {node: ring.owner(node) for node in nodes}
    assert set(mapping.values()) <= set(conductors)


@PROPERTY
@given(
    st.lists(names, min_size=2, max_size=8, unique=True),
    point_counts,
    node_batches(),
    st.data(),
)
def test_removing_a_conductor_moves_only_its_nodes(
    conductors: list[str], points: int, nodes: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(conductors))
    before = HashRing(conductors, points=points)
    after = before.without(gone)
    assert gone not in after and len(after) == len(conductors) - 1
    old = before.assign(nodes)
    new = after.assign(nodes)
    for node in nodes:
        if old[node] == gone:
            assert new[node] != gone
        else:
            assert new[node] == old[node]
    # Standbys keep their order too: the leaver is simply skipped.
    for node in nodes[:20]:
        survivors = [c for c in before.owners(node, len(conductors)) if c != gone]
        assert list(after.owners(node, len(conductors))) == survivors


@PROPERTY
@given(memberships, names, point_counts, node_batches())
def test_adding_a_conductor_moves_nodes_only_to_it(
    conductors: list[str], joiner: str, points: int, nodes: list[str]
) -> None:
    if joiner in conductors:
        return
    before = HashRing(conductors, points=points)
    after = HashRing([*conductors, joiner], points=points)
    changed = diff(before, after, nodes)
    assert all(new == joiner for _, new in changed.values())
    old = before.assign(nodes)
    assert {node for node in nodes if after.owner(node) != old[node]} == set(changed)


@PROPERTY
@given(memberships, point_counts, st.integers(1, 10), node_lists)
def test_owners_are_distinct_owner_first(
    conductors: list[str], points: int, replicas: int, nodes: list[str]
) -> None:
    ring = HashRing(conductors, replicas=replicas, points=points)
    for node in nodes:
        owners = ring.owners(node)
        assert len(owners) == min(replicas, len(conductors))
        assert len(set(owners)) == len(owners)
        assert set(owners) <= set(conductors)
        assert owners[0] == ring.owner(node)
        # Asking for fewer gives a prefix of the same order.
        assert ring.owners(node, 1) == owners[:1]


@PROPERTY
@given(
    memberships,
    point_counts,
    node_batches(),
    st.sampled_from([1, 1.05, 1.25, 2.0]),
    st.randoms(use_true_random=False),
)
def test_bounded_loads_respect_the_cap_whatever_the_order(
    conductors: list[str],
    points: int,
    nodes: list[str],
    factor: float,
    rnd: random.Random,
) -> None:
    ring = HashRing(conductors, points=points)
    mapping = ring.assign_bounded(nodes, factor)
    assert set(mapping) == set(nodes)
    exact = {1: Fraction(1), 1.05: Fraction(21, 20), 1.25: Fraction(5, 4), 2.0: Fraction(2)}
    cap = math.ceil(exact[factor] * len(nodes) / len(conductors))
    loads = Counter(mapping.values())
    assert set(loads) <= set(conductors)
    assert max(loads.values()) <= cap
    shuffled_nodes = list(nodes) + nodes[:5]  # duplicates count once
    rnd.shuffle(shuffled_nodes)
    shuffled_conductors = list(conductors)
    rnd.shuffle(shuffled_conductors)
    again = HashRing(shuffled_conductors, points=points).assign_bounded(shuffled_nodes, factor)
    assert again == mapping


@PROPERTY
@given(memberships, point_counts, node_batches())
def test_bounded_loads_without_pressure_are_the_plain_ring(
    conductors: list[str], points: int, nodes: list[str]
) -> None:
    # A factor of N allows every node on one conductor: nobody spills.
    ring = HashRing(conductors, points=points)
    assert ring.assign_bounded(nodes, len(conductors)) == ring.assign(nodes)


def test_bounded_loads_spill_to_the_next_in_line() -> None:
    ring = HashRing(["a", "b", "c"])
    nodes = random_nodes(1, 3000)
    plain = ring.assign(nodes)
    bounded = ring.assign_bounded(nodes, 1.0)
    assert sorted(Counter(bounded.values()).values()) == [1000, 1000, 1000]
    for node in nodes:
        if bounded[node] != plain[node]:
            assert bounded[node] in ring.owners(node, 3)[1:]
    # Balance comes at the price of a few moved nodes, never a reshuffle.
    assert 0 < sum(bounded[n] != plain[n] for n in nodes) < len(nodes) // 10


def test_bounded_load_factor_is_exact_decimal() -> None:
    # ceil(1.05 * 100 / 3) is 35; the float 1.05 * 100 / 3 is just above 35.
    nodes = random_nodes(2, 100)
    loads = Counter(HashRing(["a", "b", "c"]).assign_bounded(nodes, 1.05).values())
    assert max(loads.values()) == 35


@pytest.mark.parametrize("factor", [0.99, 0, -1, float("nan"), float("inf")])
def test_bounded_load_factor_below_one_is_refused(factor: float) -> None:
    with pytest.raises(ValueError):
        HashRing(["a"]).assign_bounded(["n"], factor)


def test_bounded_load_factor_type() -> None:
    with pytest.raises(TypeError):
        HashRing(["a"]).assign_bounded(["n"], "1.05")  # type: ignore[arg-type]


# -- diff ---------------------------------------------------------------------------------


def test_diff_reports_old_and_new_owner() -> None:
    nodes = random_nodes(3, 2000)
    before = HashRing(["a", "b", "c", "d"])
    after = before.without("b")
    changed = diff(before, after, nodes)
    owned_by_b = {n for n, o in before.assign(nodes).items() if o == "b"}
    assert set(changed) == owned_by_b
    assert all(old == "b" and new in {"a", "c", "d"} for old, new in changed.values())
    assert diff(before, before, nodes) == {}


def test_diff_with_an_empty_side() -> None:
    ring = HashRing(["a", "b"])
    empty = HashRing([])
    nodes = random_nodes(4, 50)
    assert diff(empty, ring, nodes) == {n: (None, ring.owner(n)) for n in nodes}
    assert diff(ring, empty, nodes) == {n: (ring.owner(n), None) for n in nodes}
    assert diff(empty, empty, nodes) == {}


def test_diff_bounded() -> None:
    nodes = random_nodes(5, 1000)
    before = HashRing(["a", "b", "c"])
    after = HashRing(["a", "b", "c", "d"])
    changed = diff(before, after, nodes, max_load_factor=1.1)
    old = before.assign_bounded(nodes, 1.1)
    new = after.assign_bounded(nodes, 1.1)
    assert changed == {n: (old[n], new[n]) for n in nodes if old[n] != new[n]}
    assert changed


# -- edge cases ---------------------------------------------------------------------------


def test_one_conductor_owns_everything() -> None:
    ring = HashRing(["only"], replicas=3)
    nodes = random_nodes(6, 500)
    assert set(ring.assign(nodes).values()) == {"only"}
    assert ring.owners(nodes[0]) == ("only",)
    assert ring.assign_bounded(nodes, 1) == dict.fromkeys(nodes, "only")


def test_empty_ring() -> None:
    ring = HashRing([])
    assert len(ring) == 0
    assert ring.conductors == ()
    with pytest.raises(EmptyRingError):
        ring.owner("d8e02d56-2648-49a3-bf97-6be8f1204f38")
    assert ring.owners("d8e02d56-2648-49a3-bf97-6be8f1204f38") == ()
    assert ring.assign([]) == {}
    with pytest.raises(EmptyRingError):
        ring.assign(["x"])
    assert ring.assign_bounded([], 1.05) == {}
    with pytest.raises(EmptyRingError):
        ring.assign_bounded(["x"], 1.05)
    assert issubclass(EmptyRingError, LookupError)


def test_unicode_names_and_keys() -> None:
    conductors = ["κόμβος-1", "节点-2", "cond\N{SNOWMAN}", "plain", "\ud800lone-surrogate"]
    ring = HashRing(conductors)
    nodes = [*random_nodes(7, 200), "ünïcødé-node", "\udfffodd"]
    mapping = ring.assign(nodes)
    assert mapping == HashRing(reversed(conductors)).assign(nodes)
    assert mapping == {n: ring.owner(n) for n in nodes}
    assert set(mapping.values()) == set(conductors)


def test_replicas_beyond_membership() -> None:
    ring = HashRing(["a", "b", "c"], replicas=10)
    owners = ring.owners("node-1")
    assert sorted(owners) == ["a", "b", "c"]
    assert ring.owners("node-1", 2) == owners[:2]


def test_known_mapping_is_stable() -> None:
    # Every conductor of a cluster must compute this: a change here remaps all nodes of
    # a running cluster during a rolling upgrade, so it needs a new ring version.
    ring = HashRing(["conductor-1", "conductor-2", "conductor-3"], replicas=3)
    assert ring.owners("d8e02d56-2648-49a3-bf97-6be8f1204f38") == GOLDEN_OWNERS
    assert ring.assign(GOLDEN_NODES) == GOLDEN_MAPPING


GOLDEN_OWNERS = ("conductor-1", "conductor-3", "conductor-2")
GOLDEN_NODES = [f"00000000-0000-4000-8000-{i:012d}" for i in range(12)]
GOLDEN_MAPPING = {
    "00000000-0000-4000-8000-000000000000": "conductor-2",
    "00000000-0000-4000-8000-000000000001": "conductor-2",
    "00000000-0000-4000-8000-000000000002": "conductor-2",
    "00000000-0000-4000-8000-000000000003": "conductor-3",
    "00000000-0000-4000-8000-000000000004": "conductor-2",
    "00000000-0000-4000-8000-000000000005": "conductor-3",
    "00000000-0000-4000-8000-000000000006": "conductor-3",
    "00000000-0000-4000-8000-000000000007": "conductor-1",
    "00000000-0000-4000-8000-000000000008": "conductor-3",
    "00000000-0000-4000-8000-000000000009": "conductor-3",
    "00000000-0000-4000-8000-000000000010": "conductor-3",
    "00000000-0000-4000-8000-000000000011": "conductor-3",
}


def test_balance_and_disruption_at_a_glance() -> None:
    # The benchmark measures these properly; this only catches a gross regression.
    nodes = random_nodes(8, 20_000)
    conductors = [f"conductor-{i}" for i in range(10)]
    ring = HashRing(conductors)
    loads = Counter(ring.assign(nodes).values())
    assert max(loads.values()) / (len(nodes) / 10) < 1.08
    assert min(loads.values()) / (len(nodes) / 10) > 0.92
    moved = diff(ring, ring.without("conductor-4"), nodes)
    assert len(moved) == loads["conductor-4"]


def test_value_semantics_and_immutability() -> None:
    ring = HashRing(["b", "a"], replicas=2, points=64)
    assert ring == HashRing(["a", "b"], replicas=2, points=64)
    assert ring != HashRing(["a", "b"], replicas=1, points=64)
    assert ring != HashRing(["a", "b"], replicas=2, points=65)
    assert hash(ring) == hash(HashRing(["a", "b", "a"], replicas=2, points=64))
    assert (ring.conductors, ring.replicas, ring.points) == (("a", "b"), 2, 64)
    assert "a" in ring and "c" not in ring
    assert repr(ring) == "HashRing(['a', 'b'], replicas=2, points=64)"
    copy = pickle.loads(pickle.dumps(ring))
    assert copy == ring and copy.owners("n") == ring.owners("n")
    with pytest.raises(AttributeError):
        ring.replicas = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ring._table = []
    with pytest.raises(AttributeError):
        del ring._names
    assert ring.without("zzz") == HashRing(["a", "b"], replicas=2, points=64)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"conductors": "abc"}, TypeError),
        ({"conductors": b"abc"}, TypeError),
        ({"conductors": ["a", ""]}, ValueError),
        ({"conductors": ["a", 1]}, TypeError),
        ({"conductors": ["a"], "replicas": 0}, ValueError),
        ({"conductors": ["a"], "replicas": True}, TypeError),
        ({"conductors": ["a"], "replicas": 1.0}, TypeError),
        ({"conductors": ["a"], "points": 0}, ValueError),
        ({"conductors": ["a"], "points": MAX_POINTS + 1}, ValueError),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        HashRing(**kwargs)  # type: ignore[arg-type]


def test_node_uuid_must_be_text() -> None:
    ring = HashRing(["a"])
    with pytest.raises(TypeError):
        ring.owner(b"d8e02d56")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.owners(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.assign(["ok", 42])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        HashRing([]).assign([42])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ring.owners("n", 0)
