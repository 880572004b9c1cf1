"""The durable pusher on SQLite, PostgreSQL and MariaDB: desired vs pushed state,
fencing by claims, retries with backoff, takeover, retraction, crash recovery.

The database work runs synchronously (``run`` calls at once); time is a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from metadatad.core.bootmapping import BootDefaults
from metadatad.core.conductors import ClaimEvent, ConductorInfo
from metadatad.db.cluster import ClusterRepository
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.dhcp.provider import PushError
from metadatad.dhcp.pusher import DhcpPusher, backoff
from metadatad.testing import RecordingProvider
from tests.support.factories import make_node

A = ConductorInfo("a", "", "10.0.0.5", "http://10.0.0.5:8775")
B = ConductorInfo("b", "", "10.0.0.6", "http://10.0.0.6:8775")


def run_now(f: Any, *args: Any) -> Any:
    return maybeDeferred(f, *args)


class World:
    """A database with nodes, claims, and pushers over it."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, 2)
        self.nodes = NodeRepository(self.engine)
        self.cluster = ClusterRepository(self.engine)
        self.repository = DhcpPushRepository(self.engine)
        self.clock = Clock()
        self.clock.advance(1_000_000)

    def claim(self, info: ConductorInfo, uuids: list[str], alive: tuple[ConductorInfo, ...]) -> int:
        for member in alive:
            self.cluster.heartbeat(member, member.name)
        # Only ``alive`` count as live: the others stopped heartbeating long ago.
        for name in {"a", "b"} - {m.name for m in alive}:
            self.cluster.mark_offline(name, name)
        generation = self.cluster.observe(60).generation
        assert self.cluster.claim(info.name, "", generation, uuids) == sorted(uuids)
        return generation

    def pusher(self, info: ConductorInfo, provider: Any, **kwargs: Any) -> DhcpPusher:
        kwargs.setdefault("retry_min", 1.0)
        kwargs.setdefault("retry_max", 8.0)
        return DhcpPusher(
            self.repository, provider, info, BootDefaults(), self.clock, run=run_now, **kwargs
        )


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    w = World(database_url)
    yield w
    w.engine.dispose()


def test_start_up_pushes_every_owned_node_once(world: World) -> None:
    """At start-up the pusher reconciles: every node it holds is pushed once, with its
    claim's generation, recorded as pushed; a second reconcile pushes nothing."""
    nodes = [make_node(i) for i in range(5)]
    world.nodes.upsert_nodes(nodes)
    generation = world.claim(A, [n.uuid for n in nodes], (A,))
    provider = RecordingProvider()
    pusher = world.pusher(A, provider)
    pusher.startService()
    world.clock.advance(0)
    assert sorted(provider.pushed_uuids()) == sorted(n.uuid for n in nodes)
    assert {g for _, _, g in provider.pushes} == {generation}
    state = world.repository.state(nodes[0].uuid)
    assert state is not None and state.in_sync and state.attempts == 0
    assert state.desired["tftp_server"] == "10.0.0.5"
    world.clock.advance(pusher.reconcile_interval)
    assert len(provider.pushes) == 5
    assert world.repository.pending_count("a") == 0
    pusher.stopService()
    assert provider.stopped


def test_failures_back_off_and_permanent_ones_stop(world: World) -> None:
    """A failed push is retried after 1, 2, 4 s (capped); its attempts and error are
    recorded; a permanent failure without retries left (``permanent_retries=0``) is
    not retried until the mapping changes."""
    nodes = [make_node(0), make_node(1)]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, [n.uuid for n in nodes], (A,))
    provider = RecordingProvider()
    first, second = sorted(n.uuid for n in nodes)
    provider.outcomes = [PushError("boom"), PushError("404 no such port", permanent=True)]
    pusher = world.pusher(A, provider, permanent_retries=0)
    pusher.startService()
    world.clock.advance(0)
    failing = provider.pushes[0][0].node_uuid
    state = world.repository.state(failing)
    assert state is not None and (state.attempts, state.last_error) == (1, "boom")
    permanent = world.repository.state(second if failing == first else first)
    assert permanent is not None and permanent.permanent
    assert permanent.to_document()["status"] == "failed"
    provider.outcomes = [PushError("again")]
    world.clock.advance(0.99)
    assert len(provider.pushes) == 2
    world.clock.advance(0.01)  # 1 s after the first failure
    assert len(provider.pushes) == 3
    world.clock.advance(1.99)
    assert len(provider.pushes) == 3
    world.clock.advance(0.01)  # 2 s after the second
    assert len(provider.pushes) == 4
    state = world.repository.state(failing)
    assert state is not None and state.in_sync and state.last_error is None
    world.clock.advance(100)
    assert len(provider.pushes) == 4  # the permanent failure stays failed
    assert backoff(10, 1, 8) == 8
    pusher.stopService()


def test_takeover_is_pushed_by_the_new_owner_and_fences_the_old(world: World) -> None:
    """B claims A's nodes at a newer generation: B's claim event pushes them with B's
    address; A can neither push nor record them any more."""
    nodes = [make_node(i) for i in range(3)]
    uuids = [n.uuid for n in nodes]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, uuids, (A,))
    a_provider, b_provider = RecordingProvider(), RecordingProvider()
    a = world.pusher(A, a_provider)
    a.startService()
    world.clock.advance(0)
    a.stopService()
    b = world.pusher(B, b_provider, reconcile_interval=10_000)
    b.startService()
    world.clock.advance(0)
    assert b_provider.pushes == []  # holds nothing yet
    generation = world.claim(B, uuids, (B,))
    b.claimed(
        ClaimEvent("b", generation, tuple(uuids), dict.fromkeys(uuids, "a"), "membership change")
    )
    assert sorted(b_provider.pushed_uuids()) == sorted(uuids)
    assert {m.tftp_server for m, _, _ in b_provider.pushes} == {"10.0.0.6"}
    # The previous mapping (A's) is handed to the provider.
    assert {p.tftp_server for _, p, _ in b_provider.pushes} == {"10.0.0.5"}
    state = world.repository.state(uuids[0])
    assert state is not None and (state.owner, state.generation, state.in_sync) == (
        "b",
        generation,
        True,
    )
    # A paused A wakes up: nothing of its is due, its stale results are not recorded.
    assert world.repository.due("a", world.clock.seconds() + 1, 10) == []
    assert world.repository.set_desired("a", [], world.clock.seconds()) == 0
    b.stopService()


def test_deleted_node_is_retracted_and_crash_leftovers_pushed(world: World) -> None:
    """A deleted node's mapping becomes a retraction; pushes in flight when the
    pusher 'crashed' (never recorded) are pushed again by the next pusher."""
    nodes = [make_node(i) for i in range(4)]
    uuids = [n.uuid for n in nodes]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, uuids, (A,))
    provider = RecordingProvider()
    provider.outcomes = ["hold"] * 4
    crashed = world.pusher(A, provider)
    crashed.startService()
    world.clock.advance(0)
    assert len(provider.held) == 4  # in flight; the process dies here
    restarted_provider = RecordingProvider()
    restarted = world.pusher(A, restarted_provider)
    restarted.startService()
    world.clock.advance(0)
    assert sorted(restarted_provider.pushed_uuids()) == sorted(uuids)
    assert world.repository.pending_count("a") == 0
    world.nodes.delete_node(uuids[0])
    restarted.nodes_changed()
    mapping, previous, _ = restarted_provider.pushes[-1]
    assert mapping.node_uuid == uuids[0] and mapping.removed
    assert mapping.macs == previous.macs
    assert world.repository.counts() == {"pushed": 4, "failed": 0, "pending": 0}
    restarted.stopService()


def test_concurrency_is_bounded(world: World) -> None:
    """At most ``concurrency`` pushes are in flight; the rest wait for a slot."""
    nodes = [make_node(i) for i in range(7)]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, [n.uuid for n in nodes], (A,))
    provider = RecordingProvider()
    provider.outcomes = ["hold"] * 7
    pusher = world.pusher(A, provider, concurrency=3)
    pusher.startService()
    world.clock.advance(0)
    assert len(provider.held) == 3
    provider.held[0].callback(None)
    assert len(provider.held) == 4
    for d in provider.held[1:]:
        d.callback(None)
    assert len(provider.pushes) == 7
    for d in provider.held[4:]:
        if not d.called:
            d.callback(None)
    assert world.repository.pending_count("a") == 0
    pusher.stopService()


def test_batch_provider_pushes_a_takeover_with_per_node_outcomes(
    world: World, tmp_path: Any
) -> None:
    """With a provider that pushes many nodes per call (dnsmasq), a takeover is pushed
    in one call per batch, each node's outcome recorded alone: the node whose file a
    newer generation wrote fails permanently, the others are pushed under B."""
    from metadatad.dhcp.dnsmasq import DnsmasqProvider

    hosts, opts = tmp_path / "h", tmp_path / "o"
    hosts.mkdir()
    opts.mkdir()
    nodes = [make_node(i) for i in range(6)]
    world.nodes.upsert_nodes(nodes)
    uuids = sorted(n.uuid for n in nodes)
    world.claim(A, uuids, (A,))
    provider_a = DnsmasqProvider(str(hosts), str(opts), "a", None, run=run_now)
    a = world.pusher(A, provider_a)
    a.startService()
    world.clock.advance(0)
    assert world.repository.pending_count("a") == 0
    a.stopService()
    generation = world.claim(B, uuids, (B,))
    fenced = DnsmasqProvider(str(hosts), str(opts), "z", None, run=run_now)
    fenced.write(_mapping_of(nodes, uuids[2]), None, 99)
    calls: list[int] = []
    provider_b = DnsmasqProvider(str(hosts), str(opts), "b", None, run=run_now)
    push_many = provider_b.push_many

    def counting(items: Any) -> Any:
        calls.append(len(items))
        return push_many(items)

    provider_b.push_many = counting  # type: ignore[method-assign]
    b = world.pusher(B, provider_b, batch=1000)
    b.claimed(ClaimEvent("b", generation, tuple(uuids), {u: "a" for u in uuids}, "test"))
    b.startService()
    world.clock.advance(0)
    assert calls and calls[0] == 6
    for uuid in uuids:
        state = world.repository.state(uuid)
        assert state is not None and state.owner == "b"
        if uuid == uuids[2]:
            assert state.permanent and "newer than" in (state.last_error or "")
        else:
            assert state.in_sync and state.pushed is not None
            assert state.pushed["tftp_server"] == "10.0.0.6"
    assert b.pushed == 5 and b.failed == 1
    b.stopService()


def _mapping_of(nodes: list[Any], uuid: str) -> Any:
    from metadatad.core.bootmapping import boot_mapping

    node = next(n for n in nodes if n.uuid == uuid)
    return boot_mapping(node, "10.0.0.9", "", BootDefaults())
