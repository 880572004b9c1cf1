"""Membership and claim queries, on SQLite, PostgreSQL, MariaDB and the memory fake alike.

Liveness is judged by the database's clock: instead of waiting, a test makes a
heartbeat old by moving it back by the database's own clock (:func:`age`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from metadatad.core.conductors import ConductorInfo, RingState
from metadatad.db.cluster import ClusterRepository, utc_ago
from metadatad.db.schema import conductors
from metadatad.db.store import NodeRepository, make_engine
from metadatad.testing import MemoryClusterRepository, MemoryNodeRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node

C1 = ConductorInfo("c1", "", "10.0.0.1", "http://10.0.0.1:8775")
C2 = ConductorInfo("c2")
C3 = ConductorInfo("c3")


class Repositories:
    """A cluster repository and the node repository of the same database."""

    def __init__(self, cluster: Any, nodes: Any, backend: str) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.backend = backend

    def add_nodes(self, count: int, **overrides: Any) -> list[str]:
        new = [make_node(i, **overrides) for i in range(count)]
        self.nodes.upsert_nodes(new)
        return sorted(n.uuid for n in new)


@pytest.fixture(params=("memory", *BACKENDS))
def repos(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any) -> Iterator[Any]:
    """Every implementation of the cluster repository, with its node repository."""
    if request.param == "memory":
        nodes = MemoryNodeRepository()
        yield Repositories(MemoryClusterRepository(nodes), nodes, "memory")
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 3)
    yield Repositories(ClusterRepository(engine), NodeRepository(engine), request.param)
    engine.dispose()


def age(repos: Repositories, name: str, seconds: float) -> None:
    """Make ``name``'s last heartbeat ``seconds`` old, by the database's clock."""
    if isinstance(repos.cluster, MemoryClusterRepository):
        row = repos.cluster._conductors[name]
        row["heartbeat_at"] = repos.cluster._moment() - timedelta(seconds=seconds)
        return
    with repos.cluster.engine.begin() as connection:
        connection.execute(
            update(conductors)
            .where(conductors.c.name == name)
            .values(heartbeat_at=utc_ago(seconds))
        )


# --- heartbeats and liveness ------------------------------------------------------------


def test_heartbeat_registers_a_live_conductor(repos: Repositories) -> None:
    """A first heartbeat creates the row: online, live, just now by the database."""
    cluster = repos.cluster
    assert cluster.conductors(60) == []
    assert cluster.heartbeat(C1, "instance-1") is None
    [record] = cluster.conductors(60)
    assert (record.name, record.group, record.tftp_address, record.http_address) == (
        "c1",
        "",
        "10.0.0.1",
        "http://10.0.0.1:8775",
    )
    assert record.online and record.live
    assert 0 <= record.heartbeat_age < 5
    assert record.started_at <= record.heartbeat_at
    assert cluster.live_members(60) == (("", "c1"),)
    document = record.to_document()
    assert document["heartbeat_at"].endswith("Z") and document["live"] is True


def test_heartbeat_again_updates_and_reports_the_instance(repos: Repositories) -> None:
    """Later heartbeats return the instance seen before; a new instance restarts
    started_at; group and addresses follow the latest heartbeat."""
    cluster = repos.cluster
    cluster.heartbeat(C1, "instance-1")
    [first] = cluster.conductors(60)
    assert cluster.heartbeat(C1, "instance-1") == "instance-1"
    [second] = cluster.conductors(60)
    assert second.started_at == first.started_at
    assert second.heartbeat_at >= first.heartbeat_at
    moved = ConductorInfo("c1", "rack-2", "10.0.0.9", "")
    assert cluster.heartbeat(moved, "instance-2") == "instance-1"
    [third] = cluster.conductors(60)
    assert third.started_at >= first.started_at
    assert (third.group, third.tftp_address, third.http_address) == ("rack-2", "10.0.0.9", "")
    assert cluster.live_members(60) == (("rack-2", "c1"),)


def test_liveness_is_judged_by_the_database_clock(repos: Repositories) -> None:
    """A heartbeat 30 s old (by the database) is live within 60 s, dead within 20 s,
    with sub-second precision."""
    cluster = repos.cluster
    cluster.heartbeat(C1, "i1")
    cluster.heartbeat(C2, "i2")
    age(repos, "c1", 30)
    assert cluster.live_members(60) == (("", "c1"), ("", "c2"))
    assert cluster.live_members(20) == (("", "c2"),)
    by_name = {r.name: r for r in cluster.conductors(20)}
    assert not by_name["c1"].live and by_name["c1"].online
    assert 29 < by_name["c1"].heartbeat_age < 35
    assert by_name["c2"].live
    age(repos, "c2", 2.5)
    assert ("", "c2") in cluster.live_members(3.5)
    assert ("", "c2") not in cluster.live_members(1.5)


def test_a_skewed_local_clock_changes_nothing(
    repos: Repositories, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With this process's clock 10 minutes fast, a fresh heartbeat is still fresh and
    an old one still old: no time of ours is ever written or compared."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 600)
    cluster = repos.cluster
    cluster.heartbeat(C1, "i1")
    cluster.heartbeat(C2, "i2")
    age(repos, "c2", 120)
    assert cluster.live_members(60) == (("", "c1"),)
    by_name = {r.name: r for r in cluster.conductors(60)}
    assert by_name["c1"].heartbeat_age < 5
    assert 119 < by_name["c2"].heartbeat_age < 125


def test_mark_offline_takes_a_conductor_out_at_once(repos: Repositories) -> None:
    """A clean stop is immediate; another instance of the name cannot mark it offline."""
    cluster = repos.cluster
    cluster.heartbeat(C1, "i1")
    cluster.heartbeat(C2, "i2")
    assert cluster.mark_offline("c1", "other-instance") is False
    assert ("", "c1") in cluster.live_members(60)
    assert cluster.mark_offline("c1", "i1") is True
    assert cluster.live_members(60) == (("", "c2"),)
    [c1] = [r for r in cluster.conductors(60) if r.name == "c1"]
    assert not c1.online and not c1.live
    assert cluster.mark_offline("nobody", "i1") is False
    cluster.heartbeat(C1, "i1")
    assert ("", "c1") in cluster.live_members(60)


# --- generations ------------------------------------------------------------------------


def test_observe_moves_the_generation_only_on_change(repos: Repositories) -> None:
    """Generation 1 records the first membership; each change adds one; no change,
    no move."""
    cluster = repos.cluster
    assert cluster.ring_state() == RingState()
    cluster.heartbeat(C1, "i1")
    first = cluster.observe(60)
    assert (first.generation, first.members) == (1, (("", "c1"),))
    assert first.changed_at is not None
    assert cluster.observe(60) == first
    cluster.heartbeat(C2, "i2")
    second = cluster.observe(60)
    assert (second.generation, second.members) == (2, (("", "c1"), ("", "c2")))
    age(repos, "c1", 90)
    third = cluster.observe(60)
    assert (third.generation, third.members) == (3, (("", "c2"),))
    assert cluster.ring_state() == third
    cluster.mark_offline("c2", "i2")
    assert cluster.observe(60).generation == 4
    assert cluster.observe(60).members == ()


def test_members_by_group(repos: Repositories) -> None:
    """The recorded membership keeps each conductor's group."""
    cluster = repos.cluster
    cluster.heartbeat(ConductorInfo("a", "rack-1"), "i")
    cluster.heartbeat(ConductorInfo("b", "rack-1"), "i")
    cluster.heartbeat(ConductorInfo("c", ""), "i")
    state = cluster.observe(60)
    assert state.by_group() == {"rack-1": ("a", "b"), "": ("c",)}


def test_concurrent_observers_agree(repos: Repositories) -> None:
    """Observers racing after one change move the generation exactly once."""
    if repos.backend == "memory":
        pytest.skip("the fake runs one call at a time")
    cluster = repos.cluster
    cluster.heartbeat(C1, "i1")
    start = cluster.observe(60).generation
    cluster.heartbeat(C2, "i2")
    seen: list[RingState] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def observe() -> None:
        try:
            barrier.wait()
            seen.append(cluster.observe(60))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=observe) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert {s.generation for s in seen} == {start + 1}
    assert cluster.ring_state().generation == start + 1


# --- claims ---------------------------------------------------------------------------------


def test_claims_are_written_at_the_current_generation(repos: Repositories) -> None:
    """A claim at the current generation inserts rows, with the database's time."""
    cluster = repos.cluster
    uuids = repos.add_nodes(4)
    cluster.heartbeat(C1, "i1")
    generation = cluster.observe(60).generation
    assert cluster.claim("c1", "", generation, uuids[:2]) == uuids[:2]
    claims = cluster.claims()
    assert sorted(claims) == uuids[:2]
    assert {(c.owner, c.group, c.generation) for c in claims.values()} == {("c1", "", generation)}
    claim = cluster.claim_of(uuids[0])
    assert claim is not None and claim.claimed_at is not None
    assert claim.to_document()["owner"] == "c1"
    assert cluster.claim_of(uuids[3]) is None
    assert cluster.claim_counts() == {"c1": 2}
    assert cluster.claim("c1", "", generation, []) == []
    # Claiming again what one holds is a no-op that reports it held.
    assert cluster.claim("c1", "", generation, uuids[:1]) == uuids[:1]


def test_a_stale_generation_cannot_claim(repos: Repositories) -> None:
    """The fence: once the generation moved on, a claim made with the old one writes
    nothing, neither over a newer claim nor over an older one nor on a free node."""
    cluster = repos.cluster
    uuids = repos.add_nodes(3)
    cluster.heartbeat(C1, "i1")
    cluster.heartbeat(C2, "i2")
    old = cluster.observe(60).generation
    assert cluster.claim("c1", "", old, uuids[:2]) == uuids[:2]
    cluster.mark_offline("c1", "i1")  # c1 "paused": the others move on without it
    new = cluster.observe(60).generation
    assert new == old + 1
    assert cluster.claim("c2", "", new, [uuids[0]]) == [uuids[0]]
    # c1 wakes up with its view of generation `old`.
    assert cluster.claim("c1", "", old, uuids) == [uuids[1]]  # it still holds uuids[1]
    claims = cluster.claims()
    assert (claims[uuids[0]].owner, claims[uuids[0]].generation) == ("c2", new)
    assert (claims[uuids[1]].owner, claims[uuids[1]].generation) == ("c1", old)
    assert uuids[2] not in claims


def test_a_claim_replaces_only_an_older_one(repos: Repositories) -> None:
    """Within one generation the first claim stays; a newer generation replaces it."""
    cluster = repos.cluster
    [uuid] = repos.add_nodes(1)
    cluster.heartbeat(C1, "i1")
    first = cluster.observe(60).generation
    assert cluster.claim("c1", "", first, [uuid]) == [uuid]
    cluster.heartbeat(C2, "i2")
    second = cluster.observe(60).generation
    assert cluster.claim("c2", "", second, [uuid]) == [uuid]
    assert cluster.claim("c3", "", second, [uuid]) == []
    assert cluster.claim_of(uuid).owner == "c2"
    cluster.heartbeat(C3, "i3")
    third = cluster.observe(60).generation
    assert cluster.claim("c1", "", third, [uuid]) == [uuid]
    assert (cluster.claim_of(uuid).owner, cluster.claim_of(uuid).generation) == ("c1", third)


def test_claims_follow_the_nodes_conductor_group(repos: Repositories) -> None:
    """A node is claimed only for its own group; after it moves to another group, that
    group's conductor may claim it within the same generation."""
    cluster = repos.cluster
    [uuid] = repos.add_nodes(1, conductor_group="rack-1")
    cluster.heartbeat(ConductorInfo("a", "rack-1"), "i")
    cluster.heartbeat(ConductorInfo("b", "rack-2"), "i")
    generation = cluster.observe(60).generation
    assert cluster.claim("b", "rack-2", generation, [uuid]) == []
    assert cluster.claim("a", "rack-1", generation, [uuid]) == [uuid]
    assert cluster.node_groups() == {uuid: "rack-1"}
    assert cluster.node_groups("rack-2") == {}
    assert set(cluster.claims("rack-1")) == {uuid}
    repos.nodes.upsert_nodes([make_node(0, conductor_group="rack-2")])
    assert cluster.claims("rack-1") == {}
    assert set(cluster.claims("rack-2")) == {uuid}
    assert cluster.claim("a", "rack-1", generation, [uuid]) == []
    assert cluster.claim("b", "rack-2", generation, [uuid]) == [uuid]
    claim = cluster.claim_of(uuid)
    assert (claim.owner, claim.group, claim.generation) == ("b", "rack-2", generation)


def test_deleting_a_node_deletes_its_claim(repos: Repositories) -> None:
    """Claims never outlive their node; unknown nodes cannot be claimed."""
    cluster = repos.cluster
    uuids = repos.add_nodes(2)
    cluster.heartbeat(C1, "i1")
    generation = cluster.observe(60).generation
    cluster.claim("c1", "", generation, uuids)
    assert repos.nodes.delete_node(uuids[0])
    assert cluster.claim_of(uuids[0]) is None
    assert set(cluster.claims()) == {uuids[1]}
    assert cluster.claim("c1", "", generation, ["0badc0de-0000-4000-8000-000000000001"]) == []


def test_nothing_is_claimed_before_the_first_generation(repos: Repositories) -> None:
    """Without a recorded generation there is nothing to be current."""
    uuids = repos.add_nodes(1)
    assert repos.cluster.claim("c1", "", 1, uuids) == []
    assert repos.cluster.claims() == {}


def test_many_claims_in_one_call(repos: Repositories) -> None:
    """Claims of more nodes than one statement may bind are made in one call."""
    cluster = repos.cluster
    uuids = repos.add_nodes(1200)
    cluster.heartbeat(C1, "i1")
    generation = cluster.observe(60).generation
    assert cluster.claim("c1", "", generation, uuids) == uuids
    assert cluster.claim_counts() == {"c1": 1200}
    cluster.heartbeat(C2, "i2")
    newer = cluster.observe(60).generation
    assert cluster.claim("c2", "", newer, uuids[::2]) == uuids[::2]
    assert cluster.claim_counts() == {"c1": 600, "c2": 600}


# --- bounded waits (a conductor stopped inside a transaction) -----------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_stopped_transaction_holds_the_others_up_only_briefly(
    backend: str, tmp_path: Any, scratch_databases: Any
) -> None:
    """With bound_waits, a statement waiting for a row lock gives up after the lock
    timeout, and the server ends a transaction left idle past the idle timeout."""
    from sqlalchemy.exc import DBAPIError

    from metadatad.db.cluster import bound_waits

    url = empty_database(backend, tmp_path, scratch_databases)
    stopped, other = make_engine(url, 1), make_engine(url, 1)
    for engine in (stopped, other):
        bound_waits(engine, lock_timeout=1.0, idle_timeout=2.0)
    try:
        ClusterRepository(other).heartbeat(C1, "i1")
        holder = stopped.connect()
        transaction = holder.begin()
        holder.execute(update(conductors).values(online=False))  # locks c1's row, then idles
        started = time.monotonic()
        with pytest.raises(DBAPIError):
            ClusterRepository(other).mark_offline("c1", "i1")
        assert time.monotonic() - started < 2.5
        time.sleep(2.5)  # past the idle timeout: the server ended the idle transaction
        assert ClusterRepository(other).mark_offline("c1", "i1") is True
        with pytest.raises(DBAPIError):
            transaction.commit()
        holder.invalidate()
        holder.close()
    finally:
        stopped.dispose()
        other.dispose()
