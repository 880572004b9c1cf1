"""Service membership and cardinal values, on SQLite, PostgreSQL, MariaDB and the memory
fake alike; concurrent joins on the server databases."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from metadatad.core.services import choose_cardinals
from metadatad.db.peers import PeerRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.testing import MemoryNodeRepository, MemoryPeerRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node


class Pair:
    def __init__(self, nodes: Any, peers: Any) -> None:
        self.nodes = nodes
        self.peers = peers

    def cardinals(self, project: str = "proj-a") -> dict[str, int | None]:
        _, view = self.peers.project_services(project)
        return {m.node.name: m.cardinal for m in view.members}


@pytest.fixture(params=("memory", *BACKENDS))
def pair(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any) -> Iterator[Pair]:
    if request.param == "memory":
        nodes = MemoryNodeRepository()
        yield Pair(nodes, MemoryPeerRepository(nodes))
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    yield Pair(NodeRepository(engine), PeerRepository(engine))
    engine.dispose()


def web(index: int, launch_index: int = 0, **overrides: Any) -> Any:
    return make_node(index, launch_index=launch_index, **overrides)


def test_choose_cardinals_is_pure_and_order_free() -> None:
    a, b, c = web(0, 0), web(1, 0), web(2, 7)
    assert choose_cardinals([], [a, b, c]) == {a.uuid: 0, b.uuid: 1, c.uuid: 7}
    assert choose_cardinals([], [c, b, a]) == {a.uuid: 0, b.uuid: 1, c.uuid: 7}
    assert choose_cardinals([0, 1, 3], [a]) == {a.uuid: 2}


def test_join_takes_launch_index_when_free_else_lowest_free(pair: Pair) -> None:
    pair.nodes.upsert_nodes([web(0, 0), web(1, 0), web(2, 5)])
    assert pair.cardinals() == {"web-0": 0, "web-1": 1, "web-2": 5}
    pair.nodes.upsert_nodes([web(3, 5)])
    assert pair.cardinals()["web-3"] == 2
    # Shown to operators with the node.
    assert pair.nodes.get_node(web(3).uuid).cardinal_value == 2
    assert pair.nodes.get_node(web(3).uuid).to_document()["cardinal_value"] == 2


def test_values_are_kept_across_rewrites_and_freed_on_leave(pair: Pair) -> None:
    pair.nodes.upsert_nodes([web(0, 0), web(1, 0)])
    # Rewriting the members (even with other launch indexes) keeps their values.
    pair.nodes.upsert_nodes([web(1, 0, hostname="renamed.example.org"), web(0, 3)])
    assert pair.cardinals() == {"web-0": 0, "web-1": 1}
    # web-0 leaves (no service): its 0 is free for the next joiner, not before.
    pair.nodes.upsert_nodes([web(0, 0, service=None)])
    assert pair.cardinals() == {"web-0": None, "web-1": 1}
    assert pair.nodes.get_node(web(0).uuid).cardinal_value is None
    pair.nodes.upsert_nodes([web(2, 1)])
    assert pair.cardinals()["web-2"] == 0
    # Rejoining is a new join: the lowest free value.
    pair.nodes.upsert_nodes([web(0, 0)])
    assert pair.cardinals()["web-0"] == 2


def test_deleting_or_moving_a_member_frees_its_value(pair: Pair) -> None:
    pair.nodes.upsert_nodes([web(0, 0), web(1, 0), web(2, 0)])
    pair.nodes.delete_node(web(0).uuid)
    pair.nodes.upsert_nodes([web(1, 0, service={"name": "db"})])  # to another service
    pair.nodes.upsert_nodes([web(2, 0, project_id="proj-b")])  # to another project
    assert pair.cardinals() == {"web-1": 0}
    assert pair.cardinals("proj-b") == {"web-2": 0}
    pair.nodes.upsert_nodes([web(3, 2), web(4, 2)])
    assert pair.cardinals() == {"web-1": 0, "web-3": 2, "web-4": 0}


def test_services_are_per_project_and_name(pair: Pair) -> None:
    pair.nodes.upsert_nodes(
        [web(0, 0), web(1, 0, service={"name": "db"}), web(2, 0, project_id="proj-b")]
    )
    assert pair.cardinals() == {"web-0": 0, "web-1": 0}
    assert pair.cardinals("proj-b") == {"web-2": 0}


def test_project_services_carries_last_change_time(pair: Pair) -> None:
    index, view = pair.peers.project_services("proj-a")
    assert (index, view.members, view.changed_at) == (0, (), None)
    pair.nodes.upsert_nodes([web(0, 0)])
    index, view = pair.peers.project_services("proj-a")
    assert index >= 1 and view.changed_at is not None


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_concurrent_joins_get_unique_values(
    backend: str, tmp_path: Any, scratch_databases: Any
) -> None:
    """Twelve writers import a node each into one service at once, all with launch
    index 0, through separate connections: the values are exactly 0..11."""
    url = empty_database(backend, tmp_path, scratch_databases)
    writers = 12
    engine = make_engine(url, writers)
    try:
        repository = NodeRepository(engine)
        barrier = threading.Barrier(writers)
        errors: list[BaseException] = []

        def join(index: int) -> None:
            try:
                barrier.wait(timeout=30)
                repository.upsert_nodes([web(index, 0)])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=join, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        _, view = PeerRepository(engine).project_services("proj-a")
        assert sorted(m.cardinal for m in view.members) == list(range(writers))
        # A second round: half leave at once while others join; still unique.
        barrier = threading.Barrier(writers)

        def churn(index: int) -> None:
            try:
                barrier.wait(timeout=30)
                if index % 2:
                    repository.upsert_nodes([web(index, 0, service=None)])
                else:
                    repository.upsert_nodes([web(index + 100, 0)])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=churn, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        _, view = PeerRepository(engine).project_services("proj-a")
        values = [m.cardinal for m in view.members if m.cardinal is not None]
        assert len(values) == len(set(values)) == writers
    finally:
        engine.dispose()
