"""The store's queries, on SQLite, PostgreSQL, MariaDB and the memory fake alike."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_twisted
from sqlalchemy import delete, func, select
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from metadatad.core.records import ConflictError
from metadatad.db import schema
from metadatad.db.migrate import SchemaError, check_schema, current_revision, head_revision
from metadatad.db.store import NodeRepository, ReactorThreadError, Store, make_engine
from metadatad.testing import MemoryNodeRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import USER_DATA, make_node


class Clock:
    """A settable wall clock for the repository."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=("memory", *BACKENDS))
def repository(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any, clock: Clock):
    """Every implementation of the repository interface."""
    if request.param == "memory":
        yield MemoryNodeRepository(now=clock)
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    yield NodeRepository(engine, now=clock)
    engine.dispose()


def test_empty(repository: Any) -> None:
    """A new store has no nodes and answers pings."""
    repository.ping()
    assert repository.list_nodes() == []
    assert repository.get_node(make_node().uuid) is None
    assert repository.node_by_ip("10.0.0.2") is None


def test_round_trip(repository: Any, clock: Clock) -> None:
    """A stored node comes back equal, with revision 1 and its creation time."""
    node = make_node()
    assert repository.upsert_nodes([node]) == [True]
    record = repository.get_node(node.uuid)
    assert record.node == node
    assert record.node.user_data == USER_DATA
    assert record.revision == 1
    assert record.created_at == datetime.fromtimestamp(clock.now, tz=UTC).replace(tzinfo=None)
    assert record.has_password is False
    assert repository.node_by_ip("10.0.0.2").node == node
    assert [r.node.uuid for r in repository.list_nodes()] == [node.uuid]


def test_update_replaces_ports_and_bumps_revision(repository: Any, clock: Clock) -> None:
    """Re-importing a node replaces it: old addresses no longer find it."""
    node = make_node()
    repository.upsert_nodes([node])
    created = repository.get_node(node.uuid).created_at
    clock.now += 60
    moved = make_node(ports=[{"mac": "52:54:00:aa:bb:cc", "ip": "10.9.9.9"}], name="renamed")
    assert repository.upsert_nodes([moved]) == [False]
    record = repository.get_node(node.uuid)
    assert record.revision == 2
    assert record.node.name == "renamed"
    assert record.created_at == created
    assert record.updated_at > created
    assert repository.node_by_ip("10.0.0.2") is None
    assert repository.node_by_ip("10.9.9.9").node.uuid == node.uuid


def test_nodes_by_ip(repository: Any) -> None:
    """Many addresses in one query: each address a port has, to its node (a node with
    two addresses under both); unknown addresses left out; none asked, none found."""
    a = make_node(
        0,
        ports=[
            {"mac": "52:54:00:00:00:0a", "ip": "10.0.0.10"},
            {"mac": "52:54:00:00:00:0b", "ip": "fd00::10"},
        ],
    )
    b = make_node(1, ports=[{"mac": "52:54:00:00:00:0c", "ip": "10.0.0.11"}])
    repository.upsert_nodes([a, b])
    found = repository.nodes_by_ip(["10.0.0.10", "fd00::10", "10.0.0.11", "10.9.9.9"])
    assert {ip: record.node.uuid for ip, record in found.items()} == {
        "10.0.0.10": a.uuid,
        "fd00::10": a.uuid,
        "10.0.0.11": b.uuid,
    }
    assert found["10.0.0.11"] == repository.node_by_ip("10.0.0.11")
    assert repository.nodes_by_ip([]) == {}
    many = [f"10.1.{i // 250}.{i % 250}" for i in range(500)] + ["10.0.0.11"]
    assert list(repository.nodes_by_ip(many)) == ["10.0.0.11"]


def test_node_by_mac(repository: Any) -> None:
    """A node is found by any of its port MACs; a re-import moves the MAC with it."""
    node = make_node(0, ports=[{"mac": "52:54:00:aa:00:01"}, {"mac": "52:54:00:aa:00:02"}])
    repository.upsert_nodes([node, make_node(1)])
    assert repository.node_by_mac("52:54:00:aa:00:02").node.uuid == node.uuid
    assert repository.node_by_mac("52:54:00:aa:00:01").node == node
    assert repository.node_by_mac("52:54:00:aa:00:03") is None
    repository.upsert_nodes([make_node(0, ports=[{"mac": "52:54:00:aa:00:03"}])])
    assert repository.node_by_mac("52:54:00:aa:00:01") is None
    assert repository.node_by_mac("52:54:00:aa:00:03").node.uuid == node.uuid
    repository.delete_node(node.uuid)
    assert repository.node_by_mac("52:54:00:aa:00:03") is None


def test_import_is_all_or_nothing(repository: Any) -> None:
    """A conflicting port anywhere in an import writes nothing at all."""
    first = make_node(0)
    repository.upsert_nodes([first])
    taken_ip = make_node(2, ports=[{"mac": "52:54:00:00:00:99", "ip": first.ips[0]}])
    with pytest.raises(ConflictError) as raised:
        repository.upsert_nodes([make_node(1), taken_ip])
    assert raised.value.field == "[1].ports[0].ip"
    assert first.uuid in raised.value.message
    assert [r.node.uuid for r in repository.list_nodes()] == [first.uuid]
    assert repository.get_node(make_node(1).uuid) is None


def test_conflicting_mac_single_form(repository: Any) -> None:
    """A MAC held by another node is a conflict named without a list index."""
    first = make_node(0)
    repository.upsert_nodes([first])
    other = make_node(1, ports=[{"mac": first.ports[0].mac}])
    with pytest.raises(ConflictError) as raised:
        repository.upsert_nodes([other], as_list=False)
    assert raised.value.field == "ports[0].mac"
    assert repository.get_node(other.uuid) is None


def test_ports_can_move_between_nodes_in_one_import(repository: Any) -> None:
    """Swapping addresses between two nodes of the same import is not a conflict."""
    a, b = make_node(0), make_node(1)
    repository.upsert_nodes([a, b])
    swapped_a = make_node(0, ports=[{"mac": b.ports[0].mac, "ip": b.ips[0]}])
    swapped_b = make_node(1, ports=[{"mac": a.ports[0].mac, "ip": a.ips[0]}])
    assert repository.upsert_nodes([swapped_a, swapped_b]) == [False, False]
    assert repository.node_by_ip(b.ips[0]).node.uuid == a.uuid
    assert repository.node_by_ip(a.ips[0]).node.uuid == b.uuid


def test_many_nodes_in_one_import(repository: Any) -> None:
    """Imports larger than one bind-parameter chunk work and can be repeated."""
    many = [make_node(i) for i in range(1200)]
    assert repository.upsert_nodes(many) == [True] * 1200
    assert repository.upsert_nodes(many) == [False] * 1200
    assert len(repository.list_nodes()) == 1200
    assert repository.node_by_ip(many[-1].ips[0]).node.uuid == many[-1].uuid


def test_delete(repository: Any) -> None:
    """Deleting a node frees its ports; deleting twice reports there was nothing."""
    node = make_node()
    repository.upsert_nodes([node])
    assert repository.delete_node(node.uuid) is True
    assert repository.delete_node(node.uuid) is False
    assert repository.node_by_ip(node.ips[0]) is None
    repository.upsert_nodes([make_node(1, ports=[{"mac": node.ports[0].mac, "ip": node.ips[0]}])])


def test_password_is_write_once(repository: Any) -> None:
    """The first password sticks; later ones are refused; updates keep it."""
    node = make_node()
    repository.upsert_nodes([node])
    assert repository.get_password(node.uuid) is None
    assert repository.set_password(node.uuid, "secret-1") is True
    assert repository.set_password(node.uuid, "secret-2") is False
    repository.upsert_nodes([node])
    assert repository.get_password(node.uuid) == "secret-1"
    assert repository.get_node(node.uuid).has_password is True
    assert repository.set_password(make_node(5).uuid, "x") is None


def test_repository_clears_and_the_slot_opens_again(repository: Any) -> None:
    """Clearing opens the write-once slot again (Nova's clear-password)."""
    node = make_node()
    unknown = make_node(5).uuid
    repository.upsert_nodes([node])
    assert repository.clear_password(node.uuid) is False
    assert repository.set_password(node.uuid, "secret-1") is True
    assert repository.clear_password(node.uuid) is True
    assert repository.get_password(node.uuid) is None
    assert repository.get_node(node.uuid).has_password is False
    assert repository.set_password(node.uuid, "secret-2") is True
    assert repository.get_password(node.uuid) == "secret-2"
    assert repository.clear_password(unknown) is None


def test_unicode_survives(repository: Any) -> None:
    """Non-ASCII text round-trips on every backend (utf8mb4 on MariaDB)."""
    node = make_node(meta={"note": "caf\u00e9 \U0001f680"}, name="n\u00f6de")
    repository.upsert_nodes([node])
    assert repository.get_node(node.uuid).node == node


# Every write that can change what get_node / node_by_ip / node_by_mac answer, on the
# node 0 (with a password) and node 1 of the setup below.
GENERATION_WRITES = {
    "create": lambda r: r.upsert_nodes([make_node(2)]),
    "update": lambda r: r.upsert_nodes([make_node(0, hostname="renamed")]),
    "move a port": lambda r: r.upsert_nodes(
        [make_node(1, ports=[{"mac": "52:54:00:aa:bb:cc", "ip": "10.9.9.9"}])]
    ),
    "join a service": lambda r: r.upsert_nodes([make_node(1, service={"name": "db"})]),
    "import many": lambda r: r.upsert_nodes([make_node(i) for i in range(600)]),
    "delete": lambda r: r.delete_node(make_node(0).uuid),
    "set a password": lambda r: r.set_password(make_node(1).uuid, "pw"),
    "clear a password": lambda r: r.clear_password(make_node(0).uuid),
}

# Writes that change nothing, and so leave the generation as it is.
IDLE_WRITES = {
    "delete an unknown node": lambda r: r.delete_node(make_node(9).uuid),
    "set a password twice": lambda r: r.set_password(make_node(0).uuid, "other"),
    "set an unknown node's password": lambda r: r.set_password(make_node(9).uuid, "pw"),
    "clear no password": lambda r: r.clear_password(make_node(1).uuid),
    "clear an unknown node's password": lambda r: r.clear_password(make_node(9).uuid),
}


def _with_two_nodes(repository: Any) -> int:
    repository.upsert_nodes([make_node(0), make_node(1)])
    repository.set_password(make_node(0).uuid, "secret")
    return repository.node_generation()


@pytest.mark.parametrize("write", GENERATION_WRITES.values(), ids=GENERATION_WRITES.keys())
def test_every_node_write_bumps_the_generation(repository: Any, write: Any) -> None:
    """A write that changes a lookup's answer changes the node generation (what the
    node caches of every conductor revalidate with)."""
    before = _with_two_nodes(repository)
    write(repository)
    after = repository.node_generation()
    assert after > before
    assert repository.node_generation() == after  # a read changes nothing


@pytest.mark.parametrize("write", IDLE_WRITES.values(), ids=IDLE_WRITES.keys())
def test_writes_that_change_nothing_keep_the_generation(repository: Any, write: Any) -> None:
    """Refused or empty writes leave the generation (no cache anywhere reloads)."""
    before = _with_two_nodes(repository)
    write(repository)
    assert repository.node_generation() == before


def test_a_refused_import_keeps_the_generation(repository: Any) -> None:
    """An import refused for a taken port writes nothing, the generation included."""
    before = _with_two_nodes(repository)
    with pytest.raises(ConflictError):
        repository.upsert_nodes([make_node(5, ports=[{"mac": make_node(0).ports[0].mac}])])
    assert repository.node_generation() == before


def test_generation_without_its_row(repository: Any) -> None:
    """A database whose generation row is gone (emptied tables) reads 0 and the next
    write brings the row back."""
    if isinstance(repository, NodeRepository):
        with repository.engine.begin() as connection:
            connection.execute(delete(schema.node_generation))
        assert repository.node_generation() == 0
        repository.upsert_nodes([make_node()])
        assert repository.node_generation() == 1
    else:
        assert repository.node_generation() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_check(backend: str, tmp_path: Any, scratch_databases: Any) -> None:
    """A migrated database passes the check; an empty one names the fix."""
    url = empty_database(backend, tmp_path, scratch_databases)
    engine = make_engine(url, 1)
    assert current_revision(engine) == head_revision()
    check_schema(engine)
    engine.dispose()
    empty = make_engine(f"sqlite:///{tmp_path}/empty.sqlite", 1)
    with pytest.raises(SchemaError, match="metadatad-manage --config CONF db upgrade"):
        check_schema(empty)


def test_reactor_thread_guard(tmp_path: Any) -> None:
    """Once a Store owns the engine, a query on the reactor thread raises."""
    url = empty_database("sqlite", tmp_path, {})
    repository = NodeRepository(make_engine(url, 1))
    Store(repository, reactor)
    with pytest.raises(ReactorThreadError):
        repository.list_nodes()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(repository.list_nodes()))
    worker.start()
    worker.join()
    assert result == [[]]


@pytest_twisted.inlineCallbacks
def test_store_runs_on_its_threadpool(tmp_path: Any) -> Any:
    """Store methods return Deferreds fired from its pool; writes notify listeners."""
    url = empty_database("sqlite", tmp_path, {})
    repository = NodeRepository(make_engine(url, 2))
    store = Store(repository, reactor)
    changes: list[str] = []
    store.add_change_listener(lambda: changes.append(threading.current_thread().name))
    store.startService()
    try:
        node = make_node()
        d = store.upsert_nodes([node])
        assert isinstance(d, Deferred)
        assert (yield d) == [True]
        assert changes == [threading.current_thread().name]
        record = yield store.node_by_ip(node.ips[0])
        assert record.node == node
        with pytest.raises(ConflictError):
            yield store.upsert_nodes([make_node(1, ports=[{"mac": node.ports[0].mac}])])
        assert len(changes) == 1
        assert (yield store.set_password(node.uuid, "pw")) is True
        assert (yield store.get_password(node.uuid)) == "pw"
        assert (yield store.delete_node(node.uuid)) is True
        assert (yield store.node_generation()) == 3  # import, password, delete
        yield store.ping()
    finally:
        store.stopService()
    # A second engine: the store's own refuses this (reactor) thread.
    with make_engine(url, 1).connect() as connection:
        assert connection.execute(select(func.count()).select_from(schema.nodes)).scalar() == 0


def test_only_server_engines_check_connections_at_checkout(tmp_path: Any) -> None:
    """A database server can drop a pooled connection (restart, idle time-out), so each
    checkout pings it first; a SQLite file cannot, and its ping was a query per
    checkout.  (Building an engine does not connect.)"""
    sqlite = make_engine(f"sqlite:///{tmp_path}/nodes.sqlite", 1)
    postgresql = make_engine("postgresql+psycopg://metadatad@127.0.0.1:1/none", 1)
    mariadb = make_engine("mysql+pymysql://metadatad@127.0.0.1:1/none", 1)
    assert sqlite.pool._pre_ping is False  # type: ignore[attr-defined]
    assert postgresql.pool._pre_ping is True  # type: ignore[attr-defined]
    assert mariadb.pool._pre_ping is True  # type: ignore[attr-defined]
    for engine in (sqlite, postgresql, mariadb):
        engine.dispose()
