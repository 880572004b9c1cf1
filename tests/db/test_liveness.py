"""Peer liveness: each node's last metadata request, noted by the site, written in
batches, and shown as ``last_seen_at`` beside each ``shared.json`` entry."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from metadatad.core import peers
from metadatad.core.identity import Identifier
from metadatad.db.cache import NodeCache
from metadatad.db.peers import PeerRepository, PeerStore
from metadatad.db.seen import SeenRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.metadata.peersite import PeerRoutes
from metadatad.metadata.seen import SeenRecorder
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.watch import WatchHub
from metadatad.testing import (
    MemoryNodeRepository,
    MemoryPeerRepository,
    MemorySeenRepository,
    MemoryStore,
)
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node
from tests.support.sites import Answer, fired

A0, A1, B2 = make_node(0), make_node(1), make_node(2, project_id="proj-b")
T0 = datetime(2026, 12, 6, 10, 0, 0)
T1 = datetime(2026, 12, 6, 10, 5, 0)


class Trio:
    def __init__(self, nodes: Any, peers: Any, seen: Any) -> None:
        self.nodes, self.peers, self.seen = nodes, peers, seen


@pytest.fixture(params=("memory", *BACKENDS))
def trio(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any) -> Iterator[Trio]:
    if request.param == "memory":
        nodes = MemoryNodeRepository()
        made = Trio(nodes, MemoryPeerRepository(nodes), MemorySeenRepository(nodes))
        made.nodes.upsert_nodes([A0, A1, B2])
        yield made
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    made = Trio(NodeRepository(engine), PeerRepository(engine), SeenRepository(engine))
    made.nodes.upsert_nodes([A0, A1, B2])
    yield made
    engine.dispose()


def test_times_only_move_forward_and_deleted_nodes_are_skipped(trio: Trio) -> None:
    gone = make_node(9).uuid
    assert trio.seen.record({A0.uuid: T0, gone: T0}) == 1
    assert trio.seen.seen_at(A0.uuid) == T0
    assert trio.seen.record({A0.uuid: T1}) == 1
    # An older time (another conductor's slower flush) does not go back.
    assert trio.seen.record({A0.uuid: T0}) == 0
    assert trio.seen.seen_at(A0.uuid) == T1
    assert trio.seen.seen_at(gone) is None
    trio.nodes.delete_node(A0.uuid)
    assert trio.seen.seen_at(A0.uuid) is None


def test_shared_view_carries_the_sharers_times(trio: Trio) -> None:
    trio.peers.post(A0.uuid, {"ip": "10.0.0.2"}, True, 128, 65536)
    trio.peers.post(A1.uuid, {"ip": "10.0.0.3"}, True, 128, 65536)
    trio.seen.record({A0.uuid: T0, B2.uuid: T1})
    index, view = trio.peers.shared_view("proj-a")
    assert index == trio.peers.index("proj-a")
    assert [uuid for uuid, _ in view.entries] == sorted([A0.uuid, A1.uuid])
    assert dict(view.seen) == {A0.uuid: T0}  # only sharers of this project
    assert view.changed_at is not None
    document = peers.shared_document(view.entries, view.seen)
    assert {e["uuid"]: e[peers.LIVENESS_KEY] for e in document} == {
        A0.uuid: "2026-12-06T10:00:00Z",
        A1.uuid: None,
    }


def test_recorder_batches_notes_and_keeps_them_when_the_write_fails() -> None:
    clock = Clock()
    clock.advance(1_765_015_200)  # 2025-12-06T10:00:00Z
    written: list[dict[str, datetime]] = []
    outcomes: list[Any] = []

    def write(seen: Any) -> Any:
        if outcomes:
            return fail(outcomes.pop(0))
        written.append(dict(seen))
        return succeed(len(seen))

    recorder = SeenRecorder(write, clock, interval=30)
    recorder.startService()
    recorder.note(A0.uuid)
    clock.advance(10)
    recorder.note(A0.uuid)
    recorder.note(A1.uuid)
    assert written == [] and recorder.pending() == 2
    outcomes.append(ConnectionError("database away"))
    clock.advance(20)  # the first batch fails: the notes stay
    assert written == [] and recorder.pending() == 2
    clock.advance(30)
    assert written == [
        {A0.uuid: datetime(2025, 12, 6, 10, 0, 10), A1.uuid: datetime(2025, 12, 6, 10, 0, 10)}
    ]
    recorder.note(A1.uuid)
    fired(recorder.stopService())  # the last notes are written on stop
    assert written[-1] == {A1.uuid: datetime(2025, 12, 6, 10, 1, 0)}
    assert recorder.pending() == 0


def test_site_notes_requests_and_shared_json_shows_them() -> None:
    """Through the metadata site: a node's request is noted, the flush writes it, and
    its entry in shared.json carries the time.  A posted key named like the liveness
    key stays inside "meta", prefixed."""
    store = MemoryStore()
    store.repository.upsert_nodes([A0, A1])
    peer_repository = MemoryPeerRepository(store.repository)
    seen_repository = MemorySeenRepository(store.repository)
    clock = Clock()
    clock.advance(1_765_015_200)
    recorder = SeenRecorder(lambda seen: store.run(seen_repository.record, seen), clock)
    recorder.startService()
    cache = NodeCache(store.node_by_ip, store.get_node, clock, 15, generation=store.node_generation)
    routes = PeerRoutes(PeerStore(peer_repository, store.run), WatchHub(clock))
    site = MetadataSite(
        cache,  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        Identifier([ipaddress.ip_network("127.0.0.1/32")]),
        peer_routes=routes,
        seen=recorder.note,
    )
    treq = StubTreq(site.resource())

    def request(method: str, path: str, node: Any, data: bytes | None = None) -> Answer:
        headers = {"X-Forwarded-For": node.local_ipv4}
        d = treq.request(method, "http://169.254.169.254" + path, headers=headers, data=data)
        treq.flush()
        response = fired(d)
        return Answer(response.code, response.headers, fired(response.content()))

    body = json.dumps({"last_seen_at": "forged", "ip": "10.0.0.2"}).encode()
    assert request("POST", "/openstack/latest/metadata?shared=project", A0, body).status == 200
    assert request("GET", "/latest/meta-data/instance-id", A1).status == 200
    clock.advance(30)
    entries = json.loads(request("GET", "/openstack/latest/shared.json", A1).body)
    assert entries == [
        {
            "meta": {"from_server_ip": "10.0.0.2", "from_server_last_seen_at": "forged"},
            "uuid": A0.uuid,
            "last_seen_at": "2025-12-06T10:00:00Z",
        }
    ]
    # A1's shared.json read is noted, for the next batch.
    assert recorder.pending() == 1
    recorder.stopService()
