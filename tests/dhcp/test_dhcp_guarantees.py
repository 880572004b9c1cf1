"""The DHCP push guarantees of issue 16, on SQLite, PostgreSQL and MariaDB:

* a node deleted while its owner is dead is retracted by the survivor the ring gives
  it (its claim went with the node, so no takeover ever claims it);
* a withdrawal (retraction, or a MAC a node no longer has) is fenced by the MAC's
  current owner: a MAC another node has now is never set to ``ignore``;
* a permanent failure is retried ``permanent_retries`` times with backoff, showing
  ``failed`` meanwhile; a PXE port without ``neutron_port_id`` is never ``pushed``;
* the dnsmasq provider rewrites only the files whose content changed, and the
  generation fence still stops a stale writer.

The database work runs synchronously; time is a ``Clock``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from metadatad.core.bootmapping import BootDefaults, boot_mapping, retraction
from metadatad.core.conductors import ClaimEvent, ConductorInfo
from metadatad.core.ring import HashRing
from metadatad.db.cluster import ClusterRepository
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.dhcp.dnsmasq import DnsmasqProvider, host_file_name, opts_file_name
from metadatad.dhcp.files import SpareFiles
from metadatad.dhcp.provider import PushError
from metadatad.dhcp.pusher import DhcpPusher
from metadatad.testing import RecordingProvider
from tests.dhcp.test_dhcp_neutron import Loopback, loopback  # noqa: F401 (a fixture)
from tests.support.factories import make_node, node_document

A = ConductorInfo("a", "", "10.0.0.5", "http://10.0.0.5:8775")
B = ConductorInfo("b", "", "10.0.0.6", "http://10.0.0.6:8775")
C = ConductorInfo("c", "", "10.0.0.7", "http://10.0.0.7:8775")
EVERYONE = (A, B, C)
EPOCH = 1_796_553_201.25


def _entry(text: str) -> tuple[str, str]:
    """The MAC and tag of a host file's entry (its pinned address and name aside)."""
    mac, tag, *_ = text.splitlines()[-1].split(",")
    return mac, tag


def run_now(f: Any, *args: Any) -> Any:
    return maybeDeferred(f, *args)


class World:
    """A database with nodes, conductors that heartbeat or not, and pushers."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, 2)
        self.nodes = NodeRepository(self.engine)
        self.cluster = ClusterRepository(self.engine)
        self.repository = DhcpPushRepository(self.engine)
        self.clock = Clock()
        self.clock.advance(EPOCH)  # a real epoch: times must keep their precision

    def live(self, *alive: ConductorInfo) -> int:
        """Only ``alive`` are live (the others stopped); the generation for that."""
        for member in alive:
            self.cluster.heartbeat(member, member.name)
        for member in EVERYONE:
            if member not in alive:
                self.cluster.heartbeat(member, member.name)  # registered, in our group
                self.cluster.mark_offline(member.name, member.name)
        return self.cluster.observe(60).generation

    def claim(self, info: ConductorInfo, uuids: list[str], generation: int) -> None:
        assert self.cluster.claim(info.name, "", generation, uuids) == sorted(uuids)

    def pusher(self, info: ConductorInfo, provider: Any, **kwargs: Any) -> DhcpPusher:
        kwargs.setdefault("retry_min", 1.0)
        kwargs.setdefault("retry_max", 8.0)
        kwargs.setdefault("reconcile_interval", 10_000)
        return DhcpPusher(
            self.repository, provider, info, BootDefaults(), self.clock, run=run_now, **kwargs
        )


@pytest.fixture
def world(database_url: str) -> Iterator[World]:
    w = World(database_url)
    yield w
    w.engine.dispose()


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    hosts, opts = tmp_path / "hosts", tmp_path / "opts"
    hosts.mkdir(exist_ok=True)
    opts.mkdir(exist_ok=True)
    return hosts, opts


def dnsmasq(tmp_path: Path, owner: str) -> DnsmasqProvider:
    hosts, opts = dirs(tmp_path)
    return DnsmasqProvider(str(hosts), str(opts), owner, None, fsync="none", run=run_now)


def host_text(tmp_path: Path, mac: str) -> str:
    return (tmp_path / "hosts" / host_file_name(mac)).read_text()


# --- 7: a node deleted while its owner is dead ------------------------------------------


def test_node_deleted_while_its_owner_is_dead_is_retracted_by_a_survivor(
    world: World, tmp_path: Path
) -> None:
    """A holds and pushes 6 nodes, dies; two are deleted before the survivors notice
    (their claims go with them). B and C claim the rest: each deleted node is retracted
    once, by the survivor the ring gives it, at the new generation; its dnsmasq host
    file says ``ignore``. A coming back finds nothing of its own to push."""
    nodes = [make_node(i) for i in range(6)]
    uuids = [n.uuid for n in nodes]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, uuids, world.live(A, B, C))
    a = world.pusher(A, dnsmasq(tmp_path, "a"))
    a.startService()
    world.clock.advance(0)
    assert world.repository.pending_count("a") == 0
    a.stopService()  # A dies (kill -9: nothing more happens on its side)
    deleted = uuids[:2]
    for uuid in deleted:
        world.nodes.delete_node(uuid)
    generation = world.live(B, C)
    ring = HashRing(["b", "c"])
    providers = {"b": RecordingProvider(), "c": RecordingProvider()}
    for info in (B, C):
        mine = [u for u in uuids[2:] if ring.owner(u) == info.name]
        world.claim(info, mine, generation)
        pusher = world.pusher(info, providers[info.name])
        pusher.startService()
        pusher.claimed(ClaimEvent(info.name, generation, tuple(mine), {}, "membership change"))
        world.clock.advance(0)
        pusher.stopService()
    for uuid in deleted:
        pushes = [
            (name, m, g)
            for name, provider in providers.items()
            for m, _, g in provider.pushes
            if m.node_uuid == uuid
        ]
        assert len(pushes) == 1, pushes
        name, mapping, pushed_generation = pushes[0]
        assert name == ring.owner(uuid) and pushed_generation == generation
        assert mapping.removed and mapping.macs == (nodes[uuids.index(uuid)].ports[0].mac,)
        state = world.repository.state(uuid)
        assert state is not None and (state.owner, state.in_sync) == (name, True)
    # The same through the real provider: the host file now says ignore.
    retracted = uuids[0]
    owner = ring.owner(retracted)
    mac = nodes[0].ports[0].mac
    assert _entry(host_text(tmp_path, mac)) == (mac, f"set:node-{retracted}")
    mapping = providers[owner].pushes[0][0]
    dnsmasq(tmp_path, owner).write(mapping, None, generation)
    assert host_text(tmp_path, mac).endswith(f"{mac},ignore\n")
    assert world.repository.due("a", world.clock.seconds() + 1, 10) == []


def test_a_live_owner_keeps_its_deleted_nodes(world: World) -> None:
    """No adoption while the owner is live: it retracts its own deleted nodes."""
    node = make_node(0)
    world.nodes.upsert_nodes([node])
    generation = world.live(A, B)
    world.claim(A, [node.uuid], generation)
    a_provider, b_provider = RecordingProvider(), RecordingProvider()
    a = world.pusher(A, a_provider)
    a.startService()
    world.clock.advance(0)
    world.nodes.delete_node(node.uuid)
    b = world.pusher(B, b_provider)
    b.startService()
    world.clock.advance(0)
    assert b_provider.pushes == []
    a.nodes_changed()
    assert [m.removed for m, _, _ in a_provider.pushes] == [False, True]
    a.stopService()
    b.stopService()


# --- 8: a withdrawal is fenced by the MAC's current owner -------------------------------


def test_late_retraction_leaves_a_mac_another_node_has_now(world: World, tmp_path: Path) -> None:
    """D (A's) is deleted and its MAC given to a new node E (B's) at the same
    generation; B pushes E; A's late retraction of D must not set the MAC to ignore."""
    d = make_node(0)
    world.nodes.upsert_nodes([d])
    generation = world.live(A, B)
    world.claim(A, [d.uuid], generation)
    a = world.pusher(A, dnsmasq(tmp_path, "a"))
    a.startService()
    world.clock.advance(0)
    mac = d.ports[0].mac
    world.nodes.delete_node(d.uuid)
    e = make_node(9, ports=[{**node_document(0)["ports"][0], "ip": "10.0.9.9"}])
    assert e.ports[0].mac == mac
    world.nodes.upsert_nodes([e])
    world.claim(B, [e.uuid], generation)
    b = world.pusher(B, dnsmasq(tmp_path, "b"))
    b.startService()
    world.clock.advance(0)
    assert _entry(host_text(tmp_path, mac)) == (mac, f"set:node-{e.uuid}")
    a.nodes_changed()  # A's reconcile: D's retraction
    assert _entry(host_text(tmp_path, mac)) == (mac, f"set:node-{e.uuid}")
    state = world.repository.state(d.uuid)
    assert state is not None and state.in_sync and state.desired["removed"]
    # D's options are withdrawn all the same.
    assert (tmp_path / "opts" / opts_file_name(d.uuid)).read_text().count("\n") == 1
    a.stopService()
    b.stopService()


def test_a_moved_mac_is_not_withdrawn_by_its_former_node(world: World) -> None:
    """A port moves from D to E (both A's): D's update withdraws no MAC E has now."""
    d, e = make_node(0), make_node(1)
    world.nodes.upsert_nodes([d, e])
    world.claim(A, [d.uuid, e.uuid], world.live(A))
    provider = RecordingProvider()
    a = world.pusher(A, provider)
    a.startService()
    world.clock.advance(0)
    moved = node_document(0)["ports"][0]
    spare = {**moved, "mac": "52:54:00:99:00:01", "ip": "10.0.9.1"}
    world.nodes.upsert_nodes([make_node(0, ports=[spare])])
    world.nodes.upsert_nodes(
        [make_node(1, ports=[node_document(1)["ports"][0], {**moved, "ip": "10.0.9.2"}])]
    )
    a.nodes_changed()
    by_node = {m.node_uuid: (m, p) for m, p, _ in provider.pushes[2:]}
    mapping, previous = by_node[d.uuid]
    assert mapping.macs == ("52:54:00:99:00:01",)
    assert previous is not None and moved["mac"] not in previous.macs
    assert moved["mac"] in by_node[e.uuid][0].macs
    a.stopService()


def test_dnsmasq_never_ignores_a_mac_written_for_another_node(tmp_path: Path) -> None:
    """At write time too (the race after the database read): an ``ignore`` for D does
    not replace the host file E's owner wrote for the MAC, even at a newer generation."""
    d = make_node(0)
    e = make_node(9, ports=[{**node_document(0)["ports"][0], "ip": "10.0.9.9"}])
    mac = d.ports[0].mac
    d_mapping = boot_mapping(d, "10.0.0.5", "", BootDefaults())
    dnsmasq(tmp_path, "a").write(d_mapping, None, 3)
    dnsmasq(tmp_path, "b").write(boot_mapping(e, "10.0.0.6", "", BootDefaults()), None, 4)
    late = retraction(d_mapping, d.uuid, d_mapping.macs)
    dnsmasq(tmp_path, "a").write(late, d_mapping, 5)
    assert _entry(host_text(tmp_path, mac)) == (mac, f"set:node-{e.uuid}")
    assert (tmp_path / "opts" / opts_file_name(d.uuid)).read_text().count("\n") == 1


# --- 9: permanent failures, and PXE ports Neutron cannot be told about ----------------


def test_permanent_failures_are_retried_a_bounded_number_of_times(world: World) -> None:
    """A permanent failure is retried ``permanent_retries`` times after 1, 2, 4 s,
    showing ``failed`` with its next attempt; then it stays failed (no next attempt).
    Another node whose permanent error clears on the first retry gets pushed."""
    nodes = [make_node(0), make_node(1)]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, [n.uuid for n in nodes], world.live(A))
    provider = RecordingProvider()
    first, second = sorted(n.uuid for n in nodes)
    gone = PushError("404 port not found", permanent=True)
    provider.outcomes = [gone, gone]
    pusher = world.pusher(A, provider, permanent_retries=3)
    pusher.startService()
    world.clock.advance(0)
    state = world.repository.state(first)
    assert state is not None
    document = state.to_document()
    assert (document["status"], document["last_error"]) == ("failed", "404 port not found")
    assert document["next_attempt"] == world.clock.seconds() + 1
    provider.outcomes = [gone, None, gone, gone]  # first still gone; second fixed
    times = []
    for _ in range(20):
        world.clock.advance(0.5)
        count = sum(1 for m, _, _ in provider.pushes if m.node_uuid == first)
        if len(times) < count - 1:
            times.append(world.clock.seconds() - EPOCH)
    assert times == [1.0, 3.0, 7.0]  # 3 retries: after 1, 2 and 4 s
    state = world.repository.state(first)
    assert state is not None and state.permanent and state.next_attempt is None
    assert state.to_document()["status"] == "failed" and state.attempts == 4
    fixed = world.repository.state(second)
    assert fixed is not None and fixed.in_sync and fixed.last_error is None
    pusher.stopService()


@pytest_twisted.inlineCallbacks
def test_pxe_ports_without_neutron_port_are_never_pushed(
    loopback: Loopback,  # noqa: F811
    tmp_path: Any,
) -> Any:
    """Under the Neutron provider a node with a PXE port lacking ``neutron_port_id``
    shows ``failed`` with an error naming the cause, after its other port got the
    options; a node with none shows that nothing was sent."""
    engine = make_engine(f"sqlite:///{tmp_path / 'n.sqlite'}", 2)
    from metadatad.db.migrate import upgrade

    upgrade(engine)
    port = node_document(0)["ports"][0]
    partial = make_node(
        0,
        ports=[
            {**port, "neutron_port_id": "port-0"},
            {**port, "mac": "52:54:00:77:00:01", "ip": "10.0.7.1", "neutron_port_id": None},
        ],
    )
    none = make_node(1)
    NodeRepository(engine).upsert_nodes([partial, none])
    cluster = ClusterRepository(engine)
    cluster.heartbeat(A, "x")
    generation = cluster.observe(60).generation
    cluster.claim("a", "", generation, [partial.uuid, none.uuid])
    repository = DhcpPushRepository(engine)
    pusher = DhcpPusher(
        repository,
        loopback.provider(keystone=False),
        A,
        BootDefaults(),
        loopback.reactor,
        retry_min=60,
        retry_max=60,
        run=maybeDeferred,
    )
    pusher.running = True  # driven directly: no timers, no threads
    try:
        pusher._want_full = True
        yield pusher._run_cycle()
        states = {u: repository.state(u) for u in (partial.uuid, none.uuid)}
    finally:
        engine.dispose()
    assert [p for p, _ in loopback.stub.accepted] == ["port-0"]
    documents = {u: s.to_document() for u, s in states.items() if s is not None}
    assert documents[partial.uuid]["status"] == "failed"
    assert "1 of 2 PXE ports have no neutron_port_id" in documents[partial.uuid]["last_error"]
    assert documents[none.uuid]["status"] == "failed"
    assert "nothing was sent" in documents[none.uuid]["last_error"]


# --- 13: dnsmasq writes only what changed, the fence stays sound ------------------------


def test_takeover_rewrites_the_options_not_the_unchanged_host_files(tmp_path: Path) -> None:
    """B takes a node over: its option file (B's address, B's generation) is rewritten,
    its host file (same entry) is not; a stale writer between the two generations is
    still refused, by the option file, although the host file's header is older.
    Pushing the same mapping again writes nothing."""
    node = make_node(0)
    mac = node.ports[0].mac
    host_path = tmp_path / "hosts" / host_file_name(mac)
    opts_path = tmp_path / "opts" / opts_file_name(node.uuid)
    a_mapping = boot_mapping(node, "10.0.0.5", "", BootDefaults())
    dnsmasq(tmp_path, "a").write(a_mapping, None, 3)
    host_before, opts_before = os.stat(host_path), os.stat(opts_path)
    b_mapping = boot_mapping(node, "10.0.0.6", "", BootDefaults())
    dnsmasq(tmp_path, "b").write(b_mapping, a_mapping, 5)
    assert os.stat(host_path).st_ino == host_before.st_ino  # not replaced
    assert os.stat(opts_path).st_ino != opts_before.st_ino
    assert "generation=5" in opts_path.read_text() and "10.0.0.6" in opts_path.read_text()
    for stale in (a_mapping, retraction(a_mapping, node.uuid, ())):
        with pytest.raises(PushError) as caught:
            dnsmasq(tmp_path, "c").write(stale, None, 4)
        assert caught.value.permanent and "newer than 4" in caught.value.message
    assert _entry(host_path.read_text()) == (mac, f"set:node-{node.uuid}")
    assert "10.0.0.6" in opts_path.read_text()
    same = os.stat(opts_path).st_ino
    dnsmasq(tmp_path, "b").write(b_mapping, b_mapping, 5)
    assert (os.stat(opts_path).st_ino, os.stat(host_path).st_ino) == (same, host_before.st_ino)


def test_spare_files_replace_atomically_and_leave_no_dotfile(tmp_path: Path) -> None:
    """Rewriting existing files swaps in the thread's spare (no new inode per file),
    reads back exactly what was written, shorter or longer; without the exchange the
    spare is renamed over the file; after ``tidy`` no dotfile is left."""
    for exchange in (True, False):
        directory = tmp_path / str(exchange)
        directory.mkdir()
        files = SpareFiles("a", exchange=exchange)
        paths = [directory / f"f{i}.conf" for i in range(5)]
        for path in paths:
            files.replace(str(path), b"first version, long enough\n" * 3)
        inodes = set()
        for i, path in enumerate(paths):
            files.replace(str(path), f"second {i}\n".encode())
            inodes.add(path.stat().st_ino)
        assert [p.read_bytes() for p in paths] == [f"second {i}\n".encode() for i in range(5)]
        spares = [p for p in directory.iterdir() if p.name.startswith(".")]
        assert len(spares) == (1 if exchange else 0)
        files.tidy()
        assert sorted(p.name for p in directory.iterdir()) == [f"f{i}.conf" for i in range(5)]


def test_takeover_writes_ahead_once_and_records_after_the_drain(
    world: World, tmp_path: Path
) -> None:
    """Through the pusher: on B's takeover each node's option file is written once
    (ahead of its desired state being recorded), no host file is rewritten, and the
    drain that follows writes nothing more yet records every node as pushed by B."""
    nodes = [make_node(i) for i in range(8)]
    uuids = [n.uuid for n in nodes]
    world.nodes.upsert_nodes(nodes)
    world.claim(A, uuids, world.live(A, B))
    a = world.pusher(A, dnsmasq(tmp_path, "a"))
    a.startService()
    world.clock.advance(0)
    a.stopService()
    provider = dnsmasq(tmp_path, "b")
    written: list[str] = []
    replace = provider._files.replace

    def counting(path: str, data: bytes) -> None:
        written.append(os.path.basename(os.path.dirname(path)))
        replace(path, data)

    provider._files.replace = counting  # type: ignore[method-assign]
    b = world.pusher(B, provider)
    b.startService()
    world.clock.advance(0)
    assert written == []  # holds nothing yet
    generation = world.live(B)
    world.claim(B, uuids, generation)
    b.claimed(ClaimEvent("b", generation, tuple(uuids), dict.fromkeys(uuids, "a"), "test"))
    assert sorted(written) == ["opts"] * 8
    for uuid in uuids:
        state = world.repository.state(uuid)
        assert state is not None and (state.owner, state.in_sync) == ("b", True)
        assert state.pushed is not None and state.pushed["tftp_server"] == "10.0.0.6"
        text = (tmp_path / "opts" / opts_file_name(uuid)).read_text()
        assert f"owner=b generation={generation}" in text and "10.0.0.6" in text
    assert [p.name for p in (tmp_path / "opts").iterdir() if p.name.startswith(".")] == []
    b.stopService()
