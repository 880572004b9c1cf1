"""The membership service, driven by task.Clock over the memory fakes (no threads, no
sleeps): heartbeats, generations, takeovers, the fence, stops and failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from metadatad.cluster.membership import MembershipService
from metadatad.core.conductors import ClaimEvent, ConductorInfo
from metadatad.core.placement import Placement
from metadatad.db.cluster import ClusterRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.testing import MemoryClusterRepository, MemoryNodeRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node

INTERVAL = 1.0
TIMEOUT = 5.0
POINTS = 64  # a small ring builds fast; balance is not under test here


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """The pool replaced by an immediate call."""
    return maybeDeferred(f, *args)


class Runner:
    """Runs database work at once, unless paused: then calls wait (as in a process
    stopped with SIGSTOP) until :meth:`resume`.  ``pause_before`` pauses just before
    the first call of that repository method."""

    def __init__(self) -> None:
        self.paused = False
        self.pause_before: str | None = None
        self.waiting: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.pause_before is not None and getattr(f, "__name__", "") == self.pause_before:
            self.pause_before = None
            self.paused = True
        if self.paused:
            d: Deferred[Any] = Deferred()
            self.waiting.append((f, args, d))
            return d
        return maybeDeferred(f, *args)

    def resume(self) -> None:
        self.paused = False
        waiting, self.waiting = self.waiting, []
        for f, args, d in waiting:
            maybeDeferred(f, *args).chainDeferred(d)


class Cluster:
    """Conductors sharing one memory database; the database's clock follows ``clock``
    (plus ``db_offset``, for skew)."""

    def __init__(self, nodes: int = 300, db_offset: float = 0.0, **settings: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.db_offset = db_offset
        self.nodes = MemoryNodeRepository()
        self.repository = MemoryClusterRepository(self.nodes, now=self.db_now)
        self.nodes.upsert_nodes([make_node(i) for i in range(nodes)])
        self.services: dict[str, MembershipService] = {}
        self.runners: dict[str, Runner] = {}
        self.logs: dict[str, list[dict[str, Any]]] = {}
        self.events: dict[str, list[ClaimEvent]] = {}
        self.settings = {"points": POINTS, **settings}

    def db_now(self) -> float:
        return self.clock.seconds() + self.db_offset

    def add(self, name: str, group: str = "", start: bool = True) -> MembershipService:
        runner = Runner()
        service = MembershipService(
            self.repository,
            ConductorInfo(name, group, f"10.0.0.{len(self.services) + 1}"),
            self.clock,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=TIMEOUT,
            run=runner,
            **self.settings,
        )
        self.logs[name] = []
        service.log = Logger(observer=self.logs[name].append)  # type: ignore[misc]
        self.events[name] = []
        service.add_observer(self.events[name].append)
        self.services[name] = service
        self.runners[name] = runner
        if start:
            service.startService()
            self.clock.advance(0)
        return service

    def run_for(self, seconds: float, step: float = 0.1) -> None:
        target = self.clock.seconds() + seconds
        while self.clock.seconds() < target:
            self.clock.advance(min(step, target - self.clock.seconds()))

    def run_until(self, condition: Callable[[], bool], limit: float, step: float = 0.1) -> float:
        """Advance until ``condition()``; returns the simulated seconds it took."""
        start = self.clock.seconds()
        while not condition():
            if self.clock.seconds() - start > limit:
                raise AssertionError(f"not within {limit} s")
            self.clock.advance(step)
        return self.clock.seconds() - start

    def crash(self, name: str) -> None:
        """kill -9: the loop stops, nothing is written."""
        service = self.services.pop(name)
        service._loop.stop()

    def owners(self) -> dict[str, str]:
        return {uuid: claim.owner for uuid, claim in self.repository.claims().items()}

    def expected(self) -> dict[str, str | None]:
        """The placement the current generation's ring gives."""
        state = self.repository.ring_state()
        placement = Placement.of(state, **self.settings)
        return placement.assign(self.repository.node_groups())

    def settled(self) -> bool:
        expected = self.expected()
        owners = self.owners()
        return all(owners.get(uuid) == owner for uuid, owner in expected.items() if owner)

    def messages(self, name: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.logs[name]]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    built = Cluster()
    yield built
    for service in list(built.services.values()):
        if service.running:
            service.stopService()


def three(cluster: Cluster) -> None:
    for name in ("c1", "c2", "c3"):
        cluster.add(name)
    cluster.run_until(cluster.settled, limit=3)
    cluster.run_for(INTERVAL + 0.1)  # one more poll: each learns what the others took


# --- start-up -------------------------------------------------------------------------


def test_three_conductors_share_every_node(cluster: Cluster) -> None:
    """After start-up every node is claimed once, by its ring owner, and each
    conductor's owns() matches its claims."""
    three(cluster)
    owners = cluster.owners()
    assert len(owners) == 300
    counts = {name: list(owners.values()).count(name) for name in ("c1", "c2", "c3")}
    assert all(60 <= count <= 140 for count in counts.values()), counts
    for name, service in cluster.services.items():
        assert service.owned == {u for u, o in owners.items() if o == name}
        assert all(service.owns(u) for u in service.owned)
    state = cluster.repository.ring_state()
    assert state.members == (("", "c1"), ("", "c2"), ("", "c3"))
    assert all(s.state == state for s in cluster.services.values())
    assert cluster.events["c1"][0].reason == "start-up"


def test_the_first_poll_waits_for_the_reactor(cluster: Cluster) -> None:
    """startService returns without touching the database; stopping before the first
    poll writes nothing."""
    service = cluster.add("c1", start=False)
    service.startService()
    assert cluster.repository.conductors(TIMEOUT) == []
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]
    cluster.clock.advance(5)
    assert cluster.repository.conductors(TIMEOUT) == []


def test_a_generation_is_logged_once_and_takeovers_in_one_line(cluster: Cluster) -> None:
    """One line per new generation, one line per batch of claims (never per node)."""
    three(cluster)
    cluster.run_for(3)
    messages = cluster.messages("c3")
    claims = [m for m in messages if m.startswith("claimed ")]
    assert 1 <= len(claims) <= 3
    assert all("at generation" in m for m in claims)
    generations = [m for m in messages if m.startswith("ring generation")]
    assert len(generations) == len(set(generations))
    assert any("c1, c2, c3" in m for m in generations)


# --- takeovers ------------------------------------------------------------------------


def test_a_crashed_conductors_nodes_are_taken_over_in_time(cluster: Cluster) -> None:
    """kill -9: within heartbeat_timeout + 2 intervals every node of the dead conductor
    is claimed by a survivor at a newer generation; every node has one live owner."""
    three(cluster)
    before = cluster.repository.ring_state().generation
    lost = {u for u, o in cluster.owners().items() if o == "c2"}
    cluster.crash("c2")
    took = cluster.run_until(
        lambda: not any(o == "c2" for o in cluster.owners().values()),
        limit=TIMEOUT + 2 * INTERVAL,
    )
    assert took <= TIMEOUT + 2 * INTERVAL
    claims = cluster.repository.claims()
    assert len(claims) == 300
    assert {claims[u].owner for u in lost} <= {"c1", "c3"}
    assert all(claims[u].generation > before for u in lost)
    assert cluster.settled()
    events = cluster.events["c1"] + cluster.events["c3"]
    taken = [e for e in events if e.reason == "membership change"]
    assert {u for e in taken for u in e.nodes} == lost
    assert all(e.previous[u] == "c2" for e in taken for u in e.nodes)


def test_a_clean_stop_is_taken_over_within_a_poll(cluster: Cluster) -> None:
    """SIGTERM: stopService marks the conductor offline; survivors claim its nodes on
    their next poll (well within 2 s)."""
    three(cluster)
    lost = {u for u, o in cluster.owners().items() if o == "c1"}
    leaving = cluster.services.pop("c1")
    stopped: list[object] = []
    leaving.stopService().addBoth(stopped.append)
    assert stopped == [None]
    assert [r.online for r in cluster.repository.conductors(TIMEOUT) if r.name == "c1"] == [False]
    took = cluster.run_until(lambda: not (lost & set(_owned_by(cluster, "c1"))), limit=2)
    assert took <= INTERVAL + 0.2
    assert any("is offline" in m for m in cluster.messages("c1"))


def _owned_by(cluster: Cluster, name: str) -> list[str]:
    return [u for u, o in cluster.owners().items() if o == name]


def test_a_new_conductor_takes_its_share_and_a_returning_one_too(cluster: Cluster) -> None:
    """Joining moves nodes only to the newcomer, by claims at a newer generation."""
    three(cluster)
    before = cluster.owners()
    generation = cluster.repository.ring_state().generation
    cluster.add("c4")
    cluster.run_until(cluster.settled, limit=2)
    after = cluster.owners()
    moved = {u for u in after if after[u] != before[u]}
    assert moved and all(after[u] == "c4" for u in moved)
    claims = cluster.repository.claims()
    assert all(claims[u].generation > generation for u in moved)


def test_a_new_node_is_claimed_within_an_interval(cluster: Cluster) -> None:
    """Nodes added later get an owner within heartbeat_interval; deleted ones leave
    the owner's set."""
    three(cluster)
    node = make_node(1000)
    cluster.nodes.upsert_nodes([node])
    took = cluster.run_until(lambda: node.uuid in cluster.owners(), limit=INTERVAL + 0.2)
    assert took <= INTERVAL + 0.2
    owner = cluster.owners()[node.uuid]
    assert cluster.services[owner].owns(node.uuid)
    assert [e.reason for e in cluster.events[owner]][-1] == "reconcile"
    cluster.nodes.delete_node(node.uuid)
    cluster.run_for(INTERVAL + 0.2)
    assert not cluster.services[owner].owns(node.uuid)


def test_conductor_groups(cluster: Cluster) -> None:
    """A node of a group goes only to that group's conductors; a group without a live
    conductor leaves its nodes unowned."""
    cluster.nodes.upsert_nodes(
        [make_node(i, conductor_group="rack-a") for i in range(0, 300, 3)]
        + [make_node(i, conductor_group="rack-b") for i in range(1, 300, 3)]
    )
    cluster.add("a1", "rack-a")
    cluster.add("a2", "rack-a")
    cluster.add("free", "")
    cluster.run_until(cluster.settled, limit=3)
    groups = cluster.repository.node_groups()
    owners = cluster.owners()
    for uuid, group in groups.items():
        if group == "rack-a":
            assert owners[uuid] in ("a1", "a2")
        elif group == "":
            assert owners[uuid] == "free"
        else:
            assert uuid not in owners
    report: list[dict[str, Any]] = []
    cluster.services["a1"].ring().addCallback(report.append)
    assert report[0]["unowned"] == 100
    assert report[0]["unowned_groups"] == {"rack-b": 100}
    assert report[0]["pending"] == 0
    assert report[0]["groups"] == {"": ["free"], "rack-a": ["a1", "a2"]}


# --- the fence ------------------------------------------------------------------------


def test_a_paused_conductor_cannot_overwrite_newer_claims(cluster: Cluster) -> None:
    """SIGSTOP at the worst moment: c3 has planned its claims and is stopped before
    writing them.  The others judge it dead and move on; when c3 resumes its claim
    (of the old generation) is refused, no claim of the others changes, and c3 rejoins
    through a newer generation."""
    cluster.add("c1")
    cluster.add("c2")
    cluster.run_until(cluster.settled, limit=3)
    runner = cluster.add("c3", start=False) and cluster.runners["c3"]
    runner.pause_before = "claim"
    cluster.services["c3"].startService()
    cluster.clock.advance(0)
    assert runner.waiting, "c3 should be paused before its claim"
    stale = cluster.services["c3"].state
    assert stale is not None and ("", "c3") in stale.members
    # c1 and c2 see c3 live, then dead once its heartbeat is TIMEOUT old.
    cluster.run_for(TIMEOUT + 2 * INTERVAL)
    current = cluster.repository.ring_state()
    assert current.generation > stale.generation
    assert ("", "c3") not in current.members
    snapshot = cluster.repository.claims()
    assert "c3" not in {c.owner for c in snapshot.values()}
    runner.resume()  # SIGCONT: the claim made with the stale view goes through now
    assert cluster.repository.claims() == snapshot
    assert any("were refused" in m for m in cluster.messages("c3"))
    # c3 heartbeats again, becomes live, and claims its share at a newer generation.
    cluster.run_until(lambda: bool(_owned_by(cluster, "c3")) and cluster.settled(), limit=3)
    rejoined = cluster.repository.ring_state()
    assert rejoined.generation > current.generation
    claims = cluster.repository.claims()
    for uuid in _owned_by(cluster, "c3"):
        assert claims[uuid].generation > current.generation
    for uuid, claim in claims.items():
        if claim.owner != "c3":
            assert claim == snapshot[uuid]


def test_a_conductor_paused_between_polls_rejoins_cleanly(cluster: Cluster) -> None:
    """SIGSTOP past the timeout, between polls: the others take its nodes; after
    SIGCONT it writes nothing old and gets its nodes back only at a new generation."""
    three(cluster)
    runner = cluster.runners["c2"]
    runner.paused = True
    lost = set(_owned_by(cluster, "c2"))
    cluster.run_until(lambda: not _owned_by(cluster, "c2"), limit=TIMEOUT + 2 * INTERVAL)
    takeover = cluster.repository.ring_state().generation
    snapshot = cluster.repository.claims()
    runner.resume()
    # Watch every claim from here on: no generation ever goes back, and nothing the
    # others claimed is replaced except by a claim newer than the takeover.
    seen = dict(snapshot)

    def check() -> bool:
        for uuid, claim in cluster.repository.claims().items():
            assert claim.generation >= seen[uuid].generation
            if claim != snapshot[uuid]:
                assert claim.generation > takeover
            seen[uuid] = claim
        return set(_owned_by(cluster, "c2")) == lost

    cluster.run_until(check, limit=3)
    claims = cluster.repository.claims()
    assert all(claims[u].generation > takeover for u in lost)
    assert cluster.settled()


# --- stopping -------------------------------------------------------------------------


def test_stop_waits_for_the_running_poll_then_marks_offline(cluster: Cluster) -> None:
    """A stop during a poll lets it finish first, so its heartbeat cannot revive the
    conductor after it was marked offline."""
    three(cluster)
    service = cluster.services.pop("c1")
    runner = cluster.runners["c1"]
    runner.paused = True
    cluster.run_for(INTERVAL + 0.1)  # the next poll starts and waits on its heartbeat
    assert runner.waiting
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == []
    runner.resume()
    assert stopped == [None]
    [c1] = [r for r in cluster.repository.conductors(TIMEOUT) if r.name == "c1"]
    assert not c1.online
    assert not service._loop.running


def test_stop_with_the_database_down_still_finishes(cluster: Cluster) -> None:
    """If the conductor cannot be marked offline, stopping still completes (the
    others wait for the timeout instead)."""
    three(cluster)
    service = cluster.services.pop("c1")
    cluster.repository.available = False
    stopped: list[object] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]
    assert any("could not mark conductor c1 offline" in m for m in cluster.messages("c1"))


# --- failures -------------------------------------------------------------------------


def test_a_database_outage_is_survived(cluster: Cluster) -> None:
    """While the database is down every poll fails and is retried (logged once, not
    every second); the loop never stops; the conductor keeps what it holds, and all
    rejoin when the database answers."""
    three(cluster)
    owned = {name: s.owned for name, s in cluster.services.items()}
    cluster.repository.available = False
    cluster.run_for(3 * TIMEOUT)
    for name, service in cluster.services.items():
        assert service._loop.running
        assert service.owned == owned[name]
        warnings = [m for m in cluster.messages(name) if "database unavailable" in m]
        assert len(warnings) == 1
        assert any("no heartbeat for" in m for m in cluster.messages(name))
    cluster.repository.available = True
    cluster.run_for(INTERVAL + 0.1)
    assert cluster.settled()
    assert len(cluster.owners()) == 300
    assert any("answers again" in m for m in cluster.messages("c1"))


def test_a_bug_is_logged_and_the_loop_goes_on(cluster: Cluster) -> None:
    """An unexpected exception is logged with its traceback; the next poll runs."""
    service = cluster.add("c1")
    cluster.run_until(cluster.settled, limit=2)
    original = cluster.repository.observe
    calls: list[int] = []

    def broken(timeout: float) -> Any:
        calls.append(1)
        raise TypeError("a bug")

    cluster.repository.observe = broken  # type: ignore[method-assign]
    cluster.run_for(2.05)
    assert len(calls) >= 2
    failures = [e for e in cluster.logs["c1"] if e.get("log_failure") is not None]
    assert failures and failures[0]["log_failure"].check(TypeError)
    cluster.repository.observe = original  # type: ignore[method-assign]
    cluster.run_for(1.05)
    assert service._loop.running


def test_an_observer_error_does_not_stop_claims(cluster: Cluster) -> None:
    """A failing observer is logged; the others still get the event."""

    def broken(event: ClaimEvent) -> None:
        raise RuntimeError("observer bug")

    service = cluster.add("c1", start=False)
    got: list[ClaimEvent] = []
    service.add_observer(broken)
    service.add_observer(got.append)
    service.startService()
    cluster.clock.advance(0)
    assert got and got[0].nodes
    assert any("observer failed" in m for m in cluster.messages("c1"))
    service.remove_observer(broken)


def test_two_daemons_under_one_name_are_reported(cluster: Cluster) -> None:
    """A second daemon heartbeating as the same conductor is an error in the log."""
    cluster.add("c1")
    twin = MembershipService(
        cluster.repository,
        ConductorInfo("c1"),
        cluster.clock,
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=TIMEOUT,
        run=run_now,
        points=POINTS,
    )
    twin.log = Logger(observer=lambda event: None)  # type: ignore[misc]
    twin.startService()
    cluster.run_for(2 * INTERVAL)
    assert any("another daemon heartbeats as conductor c1" in m for m in cluster.messages("c1"))
    twin.stopService()


# --- clocks ---------------------------------------------------------------------------


def test_a_skewed_conductor_clock_does_not_matter() -> None:
    """The database's clock runs 10 minutes ahead of (or behind) the conductors':
    liveness and takeovers behave exactly the same."""
    for offset in (600.0, -600.0):
        cluster = Cluster(db_offset=offset)
        three(cluster)
        assert all(r.live for r in cluster.repository.conductors(TIMEOUT))
        cluster.crash("c3")
        took = cluster.run_until(
            lambda c=cluster: not _owned_by(c, "c3"), limit=TIMEOUT + 2 * INTERVAL
        )
        assert TIMEOUT - INTERVAL <= took <= TIMEOUT + 2 * INTERVAL
        for service in cluster.services.values():
            service.stopService()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_local_clock_on_a_real_database(
    backend: str, tmp_path: Any, scratch_databases: Any
) -> None:
    """On a real database, a conductor whose own clock is 10 minutes fast registers
    live, and judges another conductor by the database's clock only."""
    url = empty_database(backend, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    try:
        repository = ClusterRepository(engine)
        NodeRepository(engine).upsert_nodes([make_node(i) for i in range(20)])
        repository.heartbeat(ConductorInfo("old"), "x")
        from tests.db.test_cluster_repository import Repositories, age

        age(Repositories(repository, None, backend), "old", 120)
        clock = Clock()
        clock.advance(time.time() + 600)
        service = MembershipService(
            repository,
            ConductorInfo("skewed"),
            clock,
            heartbeat_interval=INTERVAL,
            heartbeat_timeout=TIMEOUT,
            run=run_now,
            points=POINTS,
        )
        service.startService()
        clock.advance(0)
        live = {r.name: r.live for r in repository.conductors(TIMEOUT)}
        assert live == {"old": False, "skewed": True}
        assert service.state is not None and service.state.members == (("", "skewed"),)
        assert len(service.owned) == 20
        stopped: list[object] = []
        service.stopService().addBoth(stopped.append)
        assert stopped == [None]
        assert repository.live_members(TIMEOUT) == ()
    finally:
        engine.dispose()


def test_different_ring_settings_are_reported_not_fought_over() -> None:
    """Conductors configured with different ring points place nodes differently: the
    first claim of a generation stands (no flapping), and the others say why."""
    cluster = Cluster()
    cluster.add("c1")
    cluster.settings = {"points": POINTS * 2}  # c2 computes another ring
    cluster.add("c2")
    cluster.run_for(3)
    first = cluster.owners()
    cluster.run_for(3)
    assert cluster.owners() == first
    warned = [
        m for name in ("c1", "c2") for m in cluster.messages(name) if "compute different rings" in m
    ]
    assert warned and len(warned) <= 2
    for service in cluster.services.values():
        service.stopService()
