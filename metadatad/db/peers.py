# -*- test-case-name: tests.db.test_peers_repository -*-
"""Peer entries and per-project watch indexes in the shared database (synchronous).

Every change a project's peers can see (a shared entry, a node written or deleted, an
operator clearing a node's entries) bumps that project's row in ``peer_index`` in the
same transaction, so the index a reader gets always matches what it read.  The row is
also the project's write lock: a post locks it first (an upsert that changes nothing),
then reads the node's entries with a locking read, so two conductors posting the same
key at once are serialised and exactly one value is stored.  Projects are always locked
before nodes, in sorted order, so a post and a node import cannot deadlock.

On PostgreSQL a bump also sends ``NOTIFY metadatad_peers, '<index> <project>'``;
delivered at commit, it wakes the watchers on every conductor that LISTENs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from sqlalchemy import delete, func, insert, literal, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from metadatad.core.nodes import parse_node
from metadatad.core.peers import BUSY, PeerError, SharedView, check_quota, new_entries
from metadatad.core.services import Member, ProjectView
from metadatad.db.cluster import utc_now
from metadatad.db.schema import node_seen, nodes, peer_entries, peer_index, service_members
from metadatad.db.threaded import Facade, deferred

__all__ = [
    "CHANNEL",
    "PeerQueries",
    "PeerRepository",
    "PeerStore",
    "PostResult",
    "bump_projects",
    "lock_project",
]

CHANNEL = "metadatad_peers"
# A post that loses a race on SQLite (a writer committed between our read and our
# write) is run again; it then sees the other value.
_ATTEMPTS = 5


@attrs.frozen
class PostResult:
    """What a post did: the keys it added (none: all were already set, same values) and
    the project's index after it."""

    added: tuple[str, ...]
    index: int


def _upsert(connection: Connection, project: str, by: int) -> Any:
    # A bump also stamps the time (Last-Modified of the project's views); a lock does not.
    dialect = connection.dialect.name
    stamp: dict[str, Any] = {"changed_at": utc_now()} if by else {}
    if dialect == "postgresql":
        pg = postgresql.insert(peer_index).values(project_id=project, counter=by, **stamp)
        return pg.on_conflict_do_update(
            index_elements=[peer_index.c.project_id],
            set_={"counter": peer_index.c.counter + by, **stamp},
        )
    if dialect == "sqlite":
        lite = sqlite.insert(peer_index).values(project_id=project, counter=by, **stamp)
        return lite.on_conflict_do_update(
            index_elements=[peer_index.c.project_id],
            set_={"counter": peer_index.c.counter + by, **stamp},
        )
    my = mysql.insert(peer_index).values(project_id=project, counter=by, **stamp)
    return my.on_duplicate_key_update(counter=my.table.c.counter + by, **stamp)


def lock_project(connection: Connection, project: str) -> int:
    """Lock the project's index row (creating it at 0) until the transaction ends;
    returns the index."""
    connection.execute(_upsert(connection, project, 0))
    return int(
        connection.execute(
            select(peer_index.c.counter).where(peer_index.c.project_id == project).with_for_update()
        ).scalar_one()
    )


def bump_projects(connection: Connection, projects: Iterable[str]) -> dict[str, int]:
    """Add one to the index of each project (sorted: a fixed lock order); returns the
    new indexes.  On PostgreSQL each bump is also announced on ``CHANNEL`` at commit."""
    bumped: dict[str, int] = {}
    for project in sorted(set(projects)):
        connection.execute(_upsert(connection, project, 1))
        index = int(
            connection.execute(
                select(peer_index.c.counter).where(peer_index.c.project_id == project)
            ).scalar_one()
        )
        bumped[project] = index
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_notify(literal(CHANNEL), f"{index} {project}")))
    return bumped


def _utcnow(now: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(now(), tz=UTC).replace(tzinfo=None, microsecond=0)


class PeerRepository:
    """Synchronous queries on peer entries and indexes."""

    def __init__(self, engine: Engine, now: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._now = now

    # --- writes ------------------------------------------------------------------

    def post(
        self,
        node_uuid: str,
        entries: Mapping[str, str],
        shared: bool,
        max_keys: int,
        max_bytes: int,
    ) -> PostResult | None:
        """Store ``entries`` for the node, write-once; None if there is no such node.

        A key already set to the same value (and sharing) is left alone; another value
        or sharing is a :class:`PeerConflict` and nothing is written; more than
        ``max_keys`` entries or ``max_bytes`` per node is an over-quota :class:`PeerError`.
        """
        for attempt in range(_ATTEMPTS):
            try:
                return self._post_once(node_uuid, entries, shared, max_keys, max_bytes)
            except _Retry:
                continue
            except (IntegrityError, OperationalError) as e:
                # A lost race (SQLite: busy snapshot; any: a concurrent insert of the
                # same key) or a deadlock victim: run again, and see the winner's value.
                if attempt == _ATTEMPTS - 1 or not _retryable(e):
                    raise
        raise PeerError(BUSY, "the node kept changing; retry")

    def _post_once(
        self,
        node_uuid: str,
        entries: Mapping[str, str],
        shared: bool,
        max_keys: int,
        max_bytes: int,
    ) -> PostResult | None:
        with self.engine.connect() as connection:
            project = connection.execute(
                select(nodes.c.project_id).where(nodes.c.uuid == node_uuid)
            ).scalar()
        if project is None:
            return None
        with self.engine.begin() as connection:
            index = lock_project(connection, project)
            # The node may have moved or gone between the two transactions.
            current = connection.execute(
                select(nodes.c.project_id).where(nodes.c.uuid == node_uuid)
            ).scalar()
            if current != project:
                raise _Retry
            rows = connection.execute(
                select(peer_entries.c.key, peer_entries.c.value, peer_entries.c.shared)
                .where(peer_entries.c.node_uuid == node_uuid)
                .with_for_update()
            ).all()
            stored = {row.key: (row.value, bool(row.shared)) for row in rows}
            new = new_entries(stored, entries, shared)
            if not new:
                return PostResult((), index)
            check_quota({k: v for k, (v, _) in stored.items()}, new, max_keys, max_bytes)
            moment = _utcnow(self._now)
            connection.execute(
                insert(peer_entries),
                [
                    {
                        "node_uuid": node_uuid,
                        "key": key,
                        "value": value,
                        "shared": shared,
                        "created_at": moment,
                    }
                    for key, value in new.items()
                ],
            )
            if shared:
                index = bump_projects(connection, [project])[project]
            return PostResult(tuple(sorted(new)), index)

    def delete_shared(self, node_uuid: str) -> int | None:
        """Delete the node's shared entries (an operator's act); how many, or None if
        there is no such node."""
        with self.engine.begin() as connection:
            project = connection.execute(
                select(nodes.c.project_id).where(nodes.c.uuid == node_uuid)
            ).scalar()
            if project is None:
                return None
            lock_project(connection, project)
            count = connection.execute(
                delete(peer_entries).where(
                    peer_entries.c.node_uuid == node_uuid, peer_entries.c.shared.is_(True)
                )
            ).rowcount
            if count:
                bump_projects(connection, [project])
            return int(count or 0)

    # --- reads -------------------------------------------------------------------

    def index(self, project: str) -> int:
        """The project's index (0 before its first change)."""
        return self.indexes([project]).get(project, 0)

    def indexes(self, projects: Iterable[str]) -> dict[str, int]:
        """The index of each project that has one (the watchers' poll)."""
        wanted = sorted(set(projects))
        if not wanted:
            return {}
        found: dict[str, int] = {}
        with self.engine.connect() as connection:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                found.update(
                    (row.project_id, int(row.counter))
                    for row in connection.execute(
                        select(peer_index.c.project_id, peer_index.c.counter).where(
                            peer_index.c.project_id.in_(chunk)
                        )
                    )
                )
        return found

    def shared(self, project: str) -> tuple[int, list[tuple[str, dict[str, str]]]]:
        """The project's index and its nodes' shared entries, ``[(uuid, {key: value})]``
        by uuid; read in one transaction, so the index matches the entries."""
        with self.engine.begin() as connection:
            index = _read_index(connection, project)
            grouped = _shared_entries(connection, project)
        return index, list(grouped.items())

    def shared_view(self, project: str) -> tuple[int, SharedView]:
        """``shared()`` plus when each sharer was last seen and when the index last
        changed (``shared.json`` with its liveness key and Last-Modified)."""
        seen_query = (
            select(node_seen.c.node_uuid, node_seen.c.seen_at)
            .join_from(node_seen, nodes, nodes.c.uuid == node_seen.c.node_uuid)
            .where(nodes.c.project_id == project)
        )
        with self.engine.begin() as connection:
            index, changed_at = _read_index_and_time(connection, project)
            grouped = _shared_entries(connection, project)
            seen = {row.node_uuid: row.seen_at for row in connection.execute(seen_query)}
        return index, SharedView(
            tuple(grouped.items()),
            {uuid: seen[uuid] for uuid in grouped if uuid in seen},
            changed_at,
        )

    def project_services(self, project: str) -> tuple[int, ProjectView]:
        """The project's index, and its nodes with their cardinal values and the time
        the index last changed (the service view); one transaction."""
        query = (
            select(nodes.c.document, service_members.c.cardinal)
            .join_from(
                nodes,
                service_members,
                service_members.c.node_uuid == nodes.c.uuid,
                isouter=True,
            )
            .where(nodes.c.project_id == project)
            .order_by(nodes.c.uuid)
        )
        with self.engine.begin() as connection:
            index, changed_at = _read_index_and_time(connection, project)
            members = tuple(
                Member(parse_node(json.loads(found.document)), found.cardinal)
                for found in connection.execute(query)
            )
        return index, ProjectView(members, changed_at)

    def node_entries(self, node_uuid: str) -> dict[str, dict[str, str]]:
        """``{"shared": {...}, "private": {...}}``: what the node posted, for operators."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(peer_entries.c.key, peer_entries.c.value, peer_entries.c.shared)
                .where(peer_entries.c.node_uuid == node_uuid)
                .order_by(peer_entries.c.key)
            ).all()
        found: dict[str, dict[str, str]] = {"shared": {}, "private": {}}
        for row in rows:
            found["shared" if row.shared else "private"][row.key] = row.value
        return found


class _Retry(Exception):
    """The node changed project between reading it and locking the project."""


def _read_index(connection: Connection, project: str) -> int:
    value = connection.execute(
        select(peer_index.c.counter).where(peer_index.c.project_id == project)
    ).scalar()
    return int(value or 0)


def _shared_entries(connection: Connection, project: str) -> dict[str, dict[str, str]]:
    """``{uuid: {key: value}}`` of the project's shared entries, by uuid and key."""
    query = (
        select(peer_entries.c.node_uuid, peer_entries.c.key, peer_entries.c.value)
        .join_from(peer_entries, nodes, nodes.c.uuid == peer_entries.c.node_uuid)
        .where(nodes.c.project_id == project, peer_entries.c.shared.is_(True))
        .order_by(peer_entries.c.node_uuid, peer_entries.c.key)
    )
    grouped: dict[str, dict[str, str]] = {}
    for row in connection.execute(query):
        grouped.setdefault(row.node_uuid, {})[row.key] = row.value
    return grouped


def _read_index_and_time(connection: Connection, project: str) -> tuple[int, datetime | None]:
    row = connection.execute(
        select(peer_index.c.counter, peer_index.c.changed_at).where(
            peer_index.c.project_id == project
        )
    ).first()
    return (int(row.counter), row.changed_at) if row is not None else (0, None)


def _retryable(error: Exception) -> bool:
    if isinstance(error, IntegrityError):
        return True
    message = str(getattr(error, "orig", error)).lower()
    # SQLite: "database is locked"; MariaDB: 1213 deadlock; PostgreSQL: deadlock detected.
    return "locked" in message or "deadlock" in message or "1213" in message


class PeerQueries(Protocol):
    """What :class:`PeerStore` offers of a repository (the SQL one, its fake)."""

    def post(
        self,
        node_uuid: str,
        entries: Mapping[str, str],
        shared: bool,
        max_keys: int,
        max_bytes: int,
    ) -> PostResult | None: ...

    def delete_shared(self, node_uuid: str) -> int | None: ...

    def indexes(self, projects: Iterable[str]) -> dict[str, int]: ...

    def shared(self, project: str) -> tuple[int, list[tuple[str, dict[str, str]]]]: ...

    def shared_view(self, project: str) -> tuple[int, SharedView]: ...

    def project_services(self, project: str) -> tuple[int, ProjectView]: ...

    def node_entries(self, node_uuid: str) -> dict[str, dict[str, str]]: ...


class PeerStore(Facade[PeerQueries]):
    """The repository's methods as Deferreds, run by ``run`` (the store's threadpool:
    ``Store.run``)."""

    post = deferred(PeerQueries.post)
    delete_shared = deferred(PeerQueries.delete_shared)
    indexes = deferred(PeerQueries.indexes)
    shared = deferred(PeerQueries.shared)
    shared_view = deferred(PeerQueries.shared_view)
    project_services = deferred(PeerQueries.project_services)
    node_entries = deferred(PeerQueries.node_entries)
