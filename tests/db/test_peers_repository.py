"""Peer entries and watch indexes, on SQLite, PostgreSQL, MariaDB and the memory fake."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from metadatad.core.peers import CONFLICT, OVER_QUOTA, PeerConflict, PeerError
from metadatad.db.peers import CHANNEL, PeerRepository
from metadatad.db.schema import peer_entries
from metadatad.db.store import NodeRepository, make_engine
from metadatad.testing import MemoryNodeRepository, MemoryPeerRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node

A0 = make_node(0)
A1 = make_node(1)
B2 = make_node(2, project_id="proj-b")
KEYS, BYTES = 128, 65536


class Pair:
    """A node repository and the peer repository over the same data."""

    def __init__(self, nodes: Any, peers: Any) -> None:
        self.nodes = nodes
        self.peers = peers


@pytest.fixture(params=("memory", *BACKENDS))
def pair(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any) -> Iterator[Pair]:
    """Every implementation of the interface, with nodes A0, A1 (proj-a) and B2 (proj-b)."""
    if request.param == "memory":
        nodes = MemoryNodeRepository()
        made = Pair(nodes, MemoryPeerRepository(nodes))
        made.nodes.upsert_nodes([A0, A1, B2])
        yield made
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    made = Pair(NodeRepository(engine), PeerRepository(engine))
    made.nodes.upsert_nodes([A0, A1, B2])
    yield made
    engine.dispose()


def post(pair: Pair, node: Any, entries: dict[str, str], shared: bool = True, **quota: int):
    return pair.peers.post(
        node.uuid, entries, shared, quota.get("max_keys", KEYS), quota.get("max_bytes", BYTES)
    )


def test_write_once(pair: Pair) -> None:
    """A key is set once: the same value again changes nothing, another value is a 409
    and nothing of that post is written."""
    start = pair.peers.index("proj-a")
    first = post(pair, A0, {"ip": "10.0.0.2", "port": "7000"})
    assert first.added == ("ip", "port")
    assert first.index == start + 1
    again = post(pair, A0, {"ip": "10.0.0.2"})
    assert again.added == ()
    assert again.index == first.index
    with pytest.raises(PeerConflict) as caught:
        post(pair, A0, {"new": "x", "ip": "10.9.9.9"})
    assert caught.value.kind == CONFLICT
    assert caught.value.key == "ip"
    assert pair.peers.node_entries(A0.uuid) == {
        "shared": {"ip": "10.0.0.2", "port": "7000"},
        "private": {},
    }
    assert pair.peers.index("proj-a") == first.index


def test_keys_are_case_sensitive(pair: Pair) -> None:
    """``Key`` and ``key`` are two keys on every backend (MariaDB's default collation
    would make them one)."""
    post(pair, A0, {"key": "lower"})
    assert post(pair, A0, {"Key": "upper"}).added == ("Key",)
    assert pair.peers.node_entries(A0.uuid)["shared"] == {"Key": "upper", "key": "lower"}


def test_sharing_cannot_change(pair: Pair) -> None:
    """A private key cannot become shared, nor the other way round (409)."""
    assert post(pair, A0, {"token": "t"}, shared=False).added == ("token",)
    with pytest.raises(PeerConflict):
        post(pair, A0, {"token": "t"}, shared=True)
    post(pair, A0, {"ip": "1"})
    with pytest.raises(PeerConflict):
        post(pair, A0, {"ip": "1"}, shared=False)


def test_private_keys_are_not_shared_and_do_not_bump(pair: Pair) -> None:
    """Private callback data is the node's alone: not in the project's view, index kept."""
    before = pair.peers.index("proj-a")
    post(pair, A0, {"done": "yes"}, shared=False)
    assert pair.peers.index("proj-a") == before
    assert pair.peers.shared("proj-a") == (before, [])
    assert pair.peers.node_entries(A0.uuid) == {"shared": {}, "private": {"done": "yes"}}


def test_shared_view_is_per_project(pair: Pair) -> None:
    """A project's view holds its nodes' shared entries only, by uuid."""
    post(pair, A1, {"b": "2", "a": "1"})
    post(pair, A0, {"ip": "10.0.0.2"})
    post(pair, B2, {"secret": "of b"})
    index, entries = pair.peers.shared("proj-a")
    assert index == pair.peers.index("proj-a")
    assert entries == [(A0.uuid, {"ip": "10.0.0.2"}), (A1.uuid, {"a": "1", "b": "2"})]
    _, entries_b = pair.peers.shared("proj-b")
    assert entries_b == [(B2.uuid, {"secret": "of b"})]
    assert pair.peers.shared("proj-none") == (0, [])


@pytest.mark.parametrize(
    ("entries", "quota"),
    [
        ({f"k{i}": "v" for i in range(4)}, {"max_keys": 3}),
        ({"k": "v" * 100}, {"max_bytes": 100}),
    ],
)
def test_quota(pair: Pair, entries: dict[str, str], quota: dict[str, int]) -> None:
    """Over the key count or the byte budget (keys and values) is a 413; nothing kept."""
    with pytest.raises(PeerError) as caught:
        post(pair, A0, entries, **quota)
    assert caught.value.kind == OVER_QUOTA
    assert pair.peers.node_entries(A0.uuid) == {"shared": {}, "private": {}}


def test_quota_counts_what_is_stored(pair: Pair) -> None:
    """The quota is per node, over every post, private and shared alike."""
    post(pair, A0, {"a": "1", "b": "2"}, shared=False, max_keys=3)
    assert post(pair, A0, {"c": "3"}, max_keys=3).added == ("c",)
    with pytest.raises(PeerError) as caught:
        post(pair, A0, {"d": "4"}, max_keys=3)
    assert caught.value.kind == OVER_QUOTA
    # Exactly at the byte budget is allowed (key + value, in UTF-8 bytes).
    assert post(pair, A1, {"k": "é" * 4}, max_bytes=9).added == ("k",)


def test_unknown_node(pair: Pair) -> None:
    """Posting for a node that does not exist is None; so is clearing its keys."""
    ghost = make_node(9)
    assert post(pair, ghost, {"a": "b"}) is None
    assert pair.peers.delete_shared(ghost.uuid) is None


def test_node_writes_bump_the_projects(pair: Pair) -> None:
    """Importing or deleting a node bumps its project (old and new when it moves): the
    service view's watchers wake up."""
    a, b = pair.peers.index("proj-a"), pair.peers.index("proj-b")
    pair.nodes.upsert_nodes([make_node(1, project_id="proj-b")])
    assert pair.peers.index("proj-a") == a + 1
    assert pair.peers.index("proj-b") == b + 1
    pair.nodes.delete_node(B2.uuid)
    assert pair.peers.index("proj-b") == b + 2
    assert pair.peers.indexes(["proj-a", "proj-b", "nobody"]) == {
        "proj-a": a + 1,
        "proj-b": b + 2,
    }


def test_deleting_a_node_deletes_its_entries(pair: Pair) -> None:
    """Entries go with their node."""
    post(pair, A0, {"ip": "1"})
    pair.nodes.delete_node(A0.uuid)
    assert pair.peers.shared("proj-a")[1] == []
    assert pair.peers.node_entries(A0.uuid) == {"shared": {}, "private": {}}


def test_operator_deletes_shared_keys(pair: Pair) -> None:
    """Clearing a node's shared keys keeps its private ones, bumps the index, and lets
    the node post new values."""
    post(pair, A0, {"ip": "1", "port": "2"})
    post(pair, A0, {"done": "yes"}, shared=False)
    before = pair.peers.index("proj-a")
    assert pair.peers.delete_shared(A0.uuid) == 2
    assert pair.peers.index("proj-a") == before + 1
    assert pair.peers.node_entries(A0.uuid) == {"shared": {}, "private": {"done": "yes"}}
    assert pair.peers.delete_shared(A0.uuid) == 0
    assert pair.peers.index("proj-a") == before + 1
    assert post(pair, A0, {"ip": "3"}).added == ("ip",)


def test_project_services(pair: Pair) -> None:
    """The service view reads the project's nodes, with their cardinal values, with
    the project's index."""
    index, found = pair.peers.project_services("proj-a")
    assert index == pair.peers.index("proj-a")
    assert [(m.node.uuid, m.cardinal) for m in found.members] == sorted(
        [(A0.uuid, 0), (A1.uuid, 1)]
    )


# --- concurrency: two conductors, one database ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_posts_from_two_conductors(
    backend: str, tmp_path: Any, scratch_databases: Any
) -> None:
    """Two conductors (two engines) post different values for the same key of the same
    node at the same instant, many times: exactly one value is stored each time, one
    post succeeds and the other is a 409."""
    url = empty_database(backend, tmp_path, scratch_databases)
    engines = [make_engine(url, 2), make_engine(url, 2)]
    try:
        NodeRepository(engines[0]).upsert_nodes([A0])
        repositories = [PeerRepository(e) for e in engines]
        rounds = 15
        for round_ in range(rounds):
            key = f"leader{round_}"
            barrier = threading.Barrier(2)
            outcomes: list[Any] = [None, None]

            def run(
                which: int, key: str = key, barrier: Any = barrier, outcomes: Any = outcomes
            ) -> None:
                barrier.wait()
                try:
                    outcomes[which] = repositories[which].post(
                        A0.uuid, {key: f"conductor-{which}"}, True, KEYS, BYTES
                    )
                except PeerConflict as e:
                    outcomes[which] = e

            threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            winners = [i for i, o in enumerate(outcomes) if not isinstance(o, PeerConflict)]
            losers = [o for o in outcomes if isinstance(o, PeerConflict)]
            assert len(winners) == 1, outcomes
            assert len(losers) == 1 and losers[0].kind == CONFLICT
            with engines[0].connect() as connection:
                values = connection.execute(
                    select(peer_entries.c.value).where(peer_entries.c.key == key)
                ).all()
            assert values == [(f"conductor-{winners[0]}",)]
        # Every successful post bumped the index once: no lost update.
        assert repositories[0].index("proj-a") == 1 + rounds
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_announces_bumps(backend: str, tmp_path: Any, scratch_databases: Any) -> None:
    """On PostgreSQL a bump is a NOTIFY '<index> <project>' on CHANNEL, at commit."""
    import psycopg

    url = empty_database(backend, tmp_path, scratch_databases)
    engine = make_engine(url, 1)
    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")
            NodeRepository(engine).upsert_nodes([A0])
            PeerRepository(engine).post(A0.uuid, {"ip": "1"}, True, KEYS, BYTES)
            got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == ["1 proj-a", "2 proj-a"]
    finally:
        engine.dispose()
