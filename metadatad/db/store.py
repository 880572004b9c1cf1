# -*- test-case-name: tests.db.test_store -*-
"""All queries of the daemon, and the threadpool they run on.

:class:`NodeRepository` is synchronous (the CLI uses it directly); :class:`Store` runs
the same methods on a dedicated threadpool sized to the engine's connection pool and
hands back Deferreds (a :class:`~metadatad.db.threaded.Threaded` facade), so nothing
blocks the reactor.  A guard on the engine refuses any
connection checkout on the reactor thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import create_engine, delete, event, insert, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from metadatad.core.nodes import Node, parse_node
from metadatad.core.records import ConflictError, NodeRecord, port_fields, port_taken
from metadatad.db.peers import bump_projects
from metadatad.db.schema import node_generation, nodes, ports, service_members
from metadatad.db.services import assign_cardinals
from metadatad.db.threaded import Threaded, deferred

T = TypeVar("T")

# Bind-parameter lists are chunked: SQLite caps variables per statement.
_CHUNK = 500
# A node write that deadlocks or loses a race for a cardinal value is run again.
_ATTEMPTS = 5


class ReactorThreadError(RuntimeError):
    """Database work was attempted on the reactor thread."""


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine for ``url`` tuned for a long-running daemon."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {}
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite database cannot be shared: give a file")
        options["pool_size"] = pool_size
        options["max_overflow"] = 0
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A server can drop a pooled connection (restart, idle time-out): each checkout
        # checks it first.  A SQLite file cannot, and its check was a query of its own
        # on every checkout (5 % of a boot storm's samples, each node's first lookup).
        options.update(pool_size=pool_size, max_overflow=0, pool_recycle=1800, pool_pre_ping=True)
        # Bounded waits: a vanished server must fail queries (and let the daemon stop),
        # not hang a pool thread on TCP's own minutes-long timeouts.
        if backend == "postgresql":
            options["connect_args"] = {"connect_timeout": 10}
        else:
            options["connect_args"] = {
                "connect_timeout": 10,
                "read_timeout": 60,
                "write_timeout": 60,
            }
            if "charset" not in parsed.query:
                parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    engine = create_engine(parsed, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA busy_timeout = 30000")
    cursor.close()


def forbid_thread(engine: Engine, thread_ident: int) -> None:
    """Make every connection checkout on thread ``thread_ident`` raise ReactorThreadError."""

    def checkout(*_args: Any) -> None:
        if threading.get_ident() == thread_ident:
            raise ReactorThreadError("database work on the reactor thread")

    event.listen(engine, "checkout", checkout)


def _utcnow(now: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(now(), tz=UTC).replace(tzinfo=None, microsecond=0)


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class NodeRepository:
    """Synchronous queries on nodes and ports."""

    def __init__(self, engine: Engine, now: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._now = now

    # --- reads -------------------------------------------------------------------

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def get_node(self, uuid: str) -> NodeRecord | None:
        """The node with ``uuid``, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(_SELECT_NODE.where(nodes.c.uuid == uuid)).first()
        return _record(row) if row is not None else None

    def node_by_ip(self, ip: str) -> NodeRecord | None:
        """The node one of whose ports has address ``ip``, or None."""
        query = _SELECT_NODE.join_from(nodes, ports, ports.c.node_uuid == nodes.c.uuid).where(
            ports.c.ip == ip
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return _record(row) if row is not None else None

    def nodes_by_ip(self, ips: Sequence[str]) -> dict[str, NodeRecord]:
        """The nodes with a port at each of ``ips`` (at most a few hundred: one query),
        by address; an address no port has is left out."""
        query = (
            _SELECT_NODE.add_columns(ports.c.ip)
            .join_from(nodes, ports, ports.c.node_uuid == nodes.c.uuid)
            .where(ports.c.ip.in_(list(ips)))
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return {row.ip: _record(row) for row in rows}

    def node_by_mac(self, mac: str) -> NodeRecord | None:
        """The node with a port of MAC ``mac`` (lower case, colon separated), or None."""
        query = _SELECT_NODE.join_from(nodes, ports, ports.c.node_uuid == nodes.c.uuid).where(
            ports.c.mac == mac
        )
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return _record(row) if row is not None else None

    def list_nodes(self) -> list[NodeRecord]:
        """Every node, by uuid."""
        with self.engine.connect() as connection:
            rows = connection.execute(_SELECT_NODE.order_by(nodes.c.uuid)).all()
        return [_record(row) for row in rows]

    def get_password(self, uuid: str) -> str | None:
        """The password the node posted, or None."""
        with self.engine.connect() as connection:
            return connection.execute(select(nodes.c.password).where(nodes.c.uuid == uuid)).scalar()

    def node_generation(self) -> int:
        """The node generation: it changes with every write that can change what
        ``get_node``, ``node_by_ip`` or ``node_by_mac`` answer, on any conductor."""
        with self.engine.connect() as connection:
            value = connection.execute(_SELECT_GENERATION).scalar()
        return int(value) if value is not None else 0

    # --- writes ------------------------------------------------------------------

    def upsert_nodes(self, new_nodes: Sequence[Node], as_list: bool = True) -> list[bool]:
        """Create or replace ``new_nodes`` in one transaction; True where created.

        Ports (MACs, addresses) held by a node outside this import are a
        :class:`ConflictError`, and then nothing is written.  ``as_list`` says how to
        name fields in errors (``[2].ports[0].mac`` or ``ports[0].mac``).  Nodes join
        and leave services here (:mod:`metadatad.db.services`); a deadlock or a lost
        race for a cardinal value runs the transaction again.
        """
        for attempt in range(_ATTEMPTS):
            try:
                return self._upsert_once(new_nodes, as_list)
            except _CardinalRace:
                if attempt == _ATTEMPTS - 1:
                    raise ConflictError(
                        "service", "concurrent joins kept taking the same cardinal value; retry"
                    ) from None
            except OperationalError as e:
                if attempt == _ATTEMPTS - 1 or not _deadlock(e):
                    raise
        raise AssertionError("unreachable")

    def _upsert_once(self, new_nodes: Sequence[Node], as_list: bool) -> list[bool]:
        moment = _utcnow(self._now)
        uuids = [n.uuid for n in new_nodes]
        try:
            with self.engine.begin() as connection:
                existing: dict[str, int] = {}
                projects = {n.project_id for n in new_nodes}
                for chunk in _chunks(uuids):
                    for found in connection.execute(
                        select(nodes.c.uuid, nodes.c.revision, nodes.c.project_id).where(
                            nodes.c.uuid.in_(chunk)
                        )
                    ):
                        existing[found.uuid] = found.revision
                        projects.add(found.project_id)
                # Watchers of these projects' peers and services wake up (projects are
                # locked before nodes: see metadatad.db.peers).
                bump_projects(connection, projects)
                for chunk in _chunks(uuids):
                    connection.execute(delete(ports).where(ports.c.node_uuid.in_(chunk)))
                self._check_ports_free(connection, new_nodes, as_list)
                created = [n.uuid not in existing for n in new_nodes]
                fresh = [_node_row(n, moment) for n in new_nodes if n.uuid not in existing]
                if fresh:
                    connection.execute(insert(nodes), fresh)
                for node in new_nodes:
                    if node.uuid in existing:
                        row = _node_row(node, moment)
                        del row["created_at"], row["password"]
                        row["revision"] = existing[node.uuid] + 1
                        connection.execute(update(nodes).where(nodes.c.uuid == node.uuid), row)
                port_rows = [
                    {"mac": p.mac, "node_uuid": n.uuid, "ip": p.ip, "pxe": p.pxe}
                    for n in new_nodes
                    for p in n.ports
                ]
                if port_rows:
                    connection.execute(insert(ports), port_rows)
                try:
                    assign_cardinals(connection, new_nodes, moment)
                except IntegrityError:
                    raise _CardinalRace from None
                # Last: the generation row is the last lock a node write takes.
                bump_generation(connection)
        except IntegrityError:
            # Another writer took a MAC or address between our check and our insert.
            raise ConflictError(
                "ports", "a port MAC or address was taken by a concurrent change; retry"
            ) from None
        return created

    def _check_ports_free(
        self, connection: Connection, new_nodes: Sequence[Node], as_list: bool
    ) -> None:
        wanted = port_fields(new_nodes, as_list)
        for kind, column in (("mac", ports.c.mac), ("ip", ports.c.ip)):
            values = [value for k, value in wanted if k == kind]
            for chunk in _chunks(values):
                self._check_taken(connection, column, chunk, kind, wanted)

    @staticmethod
    def _check_taken(
        connection: Connection,
        column: Any,
        chunk: Sequence[str],
        kind: str,
        wanted: dict[tuple[str, str], str],
    ) -> None:
        taken = connection.execute(
            select(column, ports.c.node_uuid).where(column.in_(chunk))
        ).first()
        if taken is not None:
            raise port_taken(wanted[(kind, taken[0])], taken[0], taken.node_uuid)

    def delete_node(self, uuid: str) -> bool:
        """Delete a node and its ports; False if there was none."""
        with self.engine.begin() as connection:
            project = connection.execute(
                select(nodes.c.project_id).where(nodes.c.uuid == uuid)
            ).scalar()
            if project is not None:
                bump_projects(connection, [project])
            connection.execute(delete(ports).where(ports.c.node_uuid == uuid))
            deleted = connection.execute(delete(nodes).where(nodes.c.uuid == uuid)).rowcount > 0
            if deleted:
                bump_generation(connection)
            return deleted

    def set_password(self, uuid: str, password: str) -> bool | None:
        """Store a password once: True if stored, False if one was set, None if no node."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(nodes)
                .where(nodes.c.uuid == uuid, nodes.c.password.is_(None))
                .values(password=password)
            )
            if result.rowcount:
                bump_generation(connection)
                return True
            exists = connection.execute(select(nodes.c.uuid).where(nodes.c.uuid == uuid)).first()
            return False if exists is not None else None

    def clear_password(self, uuid: str) -> bool | None:
        """Forget the node's password (Nova's ``clear-password``), so the machine may
        post a new one: True if one was set, False if none was, None if no node."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(nodes)
                .where(nodes.c.uuid == uuid, nodes.c.password.is_not(None))
                .values(password=None)
            )
            if result.rowcount:
                bump_generation(connection)
                return True
            exists = connection.execute(select(nodes.c.uuid).where(nodes.c.uuid == uuid)).first()
            return False if exists is not None else None


def bump_generation(connection: Connection) -> None:
    """Add one to the node generation in ``connection``'s transaction (its row is
    created if missing: a scratch database may have emptied the table)."""
    dialect = connection.dialect.name
    statement: Any
    if dialect in ("postgresql", "sqlite"):
        insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = (
            insert_(node_generation)
            .values(id=1, generation=1)
            .on_conflict_do_update(
                index_elements=[node_generation.c.id],
                set_={"generation": node_generation.c.generation + 1},
            )
        )
    else:
        my = mysql.insert(node_generation).values(id=1, generation=1)
        statement = my.on_duplicate_key_update(generation=node_generation.c.generation + 1)
    connection.execute(statement)


_SELECT_GENERATION = select(node_generation.c.generation).where(node_generation.c.id == 1)


class _CardinalRace(Exception):
    """A concurrent join took the cardinal value this write chose."""


def _deadlock(error: Exception) -> bool:
    message = str(getattr(error, "orig", error)).lower()
    # MariaDB: 1213 deadlock; PostgreSQL: deadlock detected.  (SQLite's "database is
    # locked" comes after its 30 s busy timeout: not worth waiting for again.)
    return "deadlock" in message or "1213" in message


_SELECT_NODE = select(
    nodes.c.document,
    nodes.c.revision,
    nodes.c.created_at,
    nodes.c.updated_at,
    nodes.c.password.is_not(None).label("has_password"),
    select(service_members.c.cardinal)
    .where(service_members.c.node_uuid == nodes.c.uuid)
    .scalar_subquery()
    .label("cardinal_value"),
)


def _node_row(node: Node, moment: datetime) -> dict[str, Any]:
    return {
        "uuid": node.uuid,
        "name": node.name,
        "hostname": node.hostname,
        "project_id": node.project_id,
        "conductor_group": node.conductor_group,
        "document": json.dumps(node.to_document(), sort_keys=True, separators=(",", ":")),
        "password": None,
        "revision": 1,
        "created_at": moment,
        "updated_at": moment,
    }


def _record(row: Any) -> NodeRecord:
    return NodeRecord(
        node=parse_node(json.loads(row.document)),
        revision=row.revision,
        created_at=row.created_at,
        updated_at=row.updated_at,
        has_password=bool(row.has_password),
        cardinal_value=row.cardinal_value,
    )


class NodeQueries(Protocol):
    """What :class:`Store` offers of a node repository (``NodeRepository``, its fake)."""

    def ping(self) -> None: ...

    def get_node(self, uuid: str) -> NodeRecord | None: ...

    def node_by_ip(self, ip: str) -> NodeRecord | None: ...

    def nodes_by_ip(self, ips: Sequence[str]) -> dict[str, NodeRecord]: ...

    def node_by_mac(self, mac: str) -> NodeRecord | None: ...

    def list_nodes(self) -> list[NodeRecord]: ...

    def get_password(self, uuid: str) -> str | None: ...

    def node_generation(self) -> int: ...

    def upsert_nodes(self, new_nodes: Sequence[Node], as_list: bool = True) -> list[bool]: ...

    def delete_node(self, uuid: str) -> bool: ...

    def set_password(self, uuid: str, password: str) -> bool | None: ...

    def clear_password(self, uuid: str) -> bool | None: ...


class NodeMethods:
    """The node repository's methods as Deferreds (mixed into a :class:`Facade`: the
    :class:`Store`, and its fake ``metadatad.testing.MemoryStore``); writes call the
    change listeners."""

    ping = deferred(NodeQueries.ping)
    get_node = deferred(NodeQueries.get_node)
    node_by_ip = deferred(NodeQueries.node_by_ip)
    nodes_by_ip = deferred(NodeQueries.nodes_by_ip)
    node_by_mac = deferred(NodeQueries.node_by_mac)
    list_nodes = deferred(NodeQueries.list_nodes)
    get_password = deferred(NodeQueries.get_password)
    node_generation = deferred(NodeQueries.node_generation)
    upsert_nodes = deferred(NodeQueries.upsert_nodes, changes=True)
    delete_node = deferred(NodeQueries.delete_node, changes=True)
    set_password = deferred(NodeQueries.set_password, changes=True)
    clear_password = deferred(NodeQueries.clear_password, changes=True)


class Store(NodeMethods, Threaded[NodeRepository]):
    """The repository's methods as Deferreds, run on a threadpool this service owns,
    sized to the engine's connection pool.

    Added first to the daemon's MultiService, so its pool starts first and stops last;
    when it stops, the engine is disposed of.  ``run(f, *args)`` runs another
    repository's synchronous ``f`` on the same pool.
    """

    name = "store"
    log = Logger()

    def __init__(self, repository: NodeRepository, reactor: IReactorThreads) -> None:
        size = repository.engine.pool.size()  # type: ignore[attr-defined]
        super().__init__(repository, reactor, pool_name="metadatad-store", size=size)
        forbid_thread(repository.engine, threading.get_ident())

    def stopService(self) -> None:
        super().stopService()
        self.repository.engine.dispose()
