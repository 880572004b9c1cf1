# -*- test-case-name: tests.db.test_cluster_repository -*-
"""Conductor membership and node claims in the shared database (synchronous queries).

Every time that decides liveness comes from the **database's clock**: heartbeats are
written as the database's current UTC time, in the same statement, and "live" is
computed in SQL against the database's current time.  A conductor whose own clock is
off by minutes is still judged correctly, because its clock is never consulted.

``utc_now()`` is the database's current UTC time as a naive timestamp on every
backend, whatever the session time zone: ``clock_timestamp() AT TIME ZONE 'UTC'`` on
PostgreSQL (``now()`` is the start of the transaction, stale after a lock wait),
``UTC_TIMESTAMP(6)`` on MariaDB/MySQL (``NOW()`` follows the session time zone), and
``strftime(...)`` on SQLite, padded to the six fractional digits SQLAlchemy writes, so
stored values compare correctly as text.

The fencing protocol these queries implement is described in
:mod:`metadatad.cluster.membership`; here are its two database-side rules:

* ``ring_state`` holds one row: the current *generation* and the membership recorded
  for it.  :meth:`ClusterRepository.observe` moves it forward by compare-and-set
  (``UPDATE ... WHERE generation = <the one read>``), so generations only increase
  and each names exactly one membership.
* :meth:`ClusterRepository.claim` writes a claim at generation G only if G is still
  the current generation and the node's stored claim is older than G (or was made for
  another conductor group): a claim row's generation never decreases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    and_,
    event,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import DateTime

from metadatad.core.conductors import (
    Claim,
    ConductorInfo,
    ConductorRecord,
    RingState,
    decode_members,
    encode_members,
)
from metadatad.db.bulk import chunks_for, member_of
from metadatad.db.schema import conductors, node_claims, nodes, ring_state

__all__ = [
    "Claim",
    "ClusterRepository",
    "ConductorInfo",
    "ConductorRecord",
    "RingState",
    "bound_waits",
    "utc_ago",
    "utc_now",
]

# Compare-and-set attempts of one observe() before it settles for what it read.
_CAS_ATTEMPTS = 5


# --- the database's clock ------------------------------------------------------------


class utc_now(FunctionElement[datetime]):
    """The database's current UTC time, as a naive timestamp."""

    type = DateTime()
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "(clock_timestamp() AT TIME ZONE 'UTC')"


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _utc_now_mysql(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # %f is SS.SSS: pad to the microseconds SQLAlchemy stores, so text compares work.
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


class utc_ago(FunctionElement[datetime]):
    """The database's current UTC time minus ``seconds``."""

    type = DateTime()
    # The interval is rendered into the SQL text (a number we computed, never input).
    inherit_cache = False

    def __init__(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        super().__init__()


@compiles(utc_ago, "postgresql")
def _utc_ago_postgresql(element: utc_ago, compiler: SQLCompiler, **kw: Any) -> str:
    return f"((clock_timestamp() AT TIME ZONE 'UTC') - interval '{element.seconds:.6f} seconds')"


@compiles(utc_ago, "mysql")
@compiles(utc_ago, "mariadb")
def _utc_ago_mysql(element: utc_ago, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(UTC_TIMESTAMP(6) - INTERVAL {round(element.seconds * 1e6)} MICROSECOND)"


@compiles(utc_ago, "sqlite")
def _utc_ago_sqlite(element: utc_ago, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '-{element.seconds:.6f} seconds')"


# --- sessions ------------------------------------------------------------------------------


def bound_waits(engine: Engine, lock_timeout: float, idle_timeout: float) -> None:
    """Bound how long the engine's sessions wait for row locks, and how long the server
    keeps a transaction its client left idle.

    A conductor stopped (SIGSTOP) in the middle of a transaction keeps its row locks:
    the others' claims would wait for them for minutes.  With these limits their
    statements fail after ``lock_timeout`` (and are retried on the next poll), and the
    server ends the stopped conductor's transaction after ``idle_timeout`` seconds.
    PostgreSQL: ``lock_timeout`` and ``idle_in_transaction_session_timeout``; MariaDB:
    ``innodb_lock_wait_timeout`` and ``idle_transaction_timeout`` (MySQL has no idle
    limit: there the lock wait alone bounds the delay).  SQLite: nothing to do.
    """
    backend = engine.url.get_backend_name()
    if backend not in ("postgresql", "mysql", "mariadb"):
        return
    lock_ms = max(1, round(lock_timeout * 1000))
    idle_ms = max(1000, round(idle_timeout * 1000))

    def configure(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if backend == "postgresql":
                cursor.execute(f"SET lock_timeout = {lock_ms}")
                cursor.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
            else:
                # Whole seconds, at least one.
                cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, lock_ms // 1000)}")
                cursor.execute("SELECT VERSION()")
                if "mariadb" in str(cursor.fetchone()[0]).lower():
                    cursor.execute(f"SET SESSION idle_transaction_timeout = {idle_ms // 1000}")
        finally:
            cursor.close()
        dbapi_connection.commit()

    event.listen(engine, "connect", configure)


# --- records ---------------------------------------------------------------------------


# --- the repository ------------------------------------------------------------------------


class ClusterRepository:
    """Synchronous queries on ``conductors``, ``ring_state`` and ``node_claims``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- heartbeats ------------------------------------------------------------------

    def heartbeat(self, info: ConductorInfo, instance: str) -> str | None:
        """Mark ``info.name`` online with the database's current time.

        ``instance`` identifies this process: the previous instance written on the row
        is returned (None for a new row), so a second daemon heartbeating under the same
        name shows up as a change.  ``started_at`` restarts when the instance changes.
        """
        values = {
            "conductor_group": info.group,
            "tftp_address": info.tftp_address,
            "http_address": info.http_address,
            "online": True,
            "heartbeat_at": utc_now(),
        }
        with self.engine.begin() as connection:
            previous = connection.execute(
                select(conductors.c.instance).where(conductors.c.name == info.name)
            ).first()
            if previous is None:
                connection.execute(
                    insert(conductors).values(
                        name=info.name, instance=instance, started_at=utc_now(), **values
                    )
                )
                return None
            if previous.instance != instance:
                values["instance"] = instance
                values["started_at"] = utc_now()
            connection.execute(
                update(conductors).where(conductors.c.name == info.name).values(**values)
            )
            return str(previous.instance)

    def mark_offline(self, name: str, instance: str) -> bool:
        """Mark the conductor offline (a clean stop), unless another instance took
        over the name since; True if marked."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(conductors)
                .where(conductors.c.name == name, conductors.c.instance == instance)
                .values(online=False)
            )
            return bool(result.rowcount)

    def conductors(self, timeout: float) -> list[ConductorRecord]:
        """Every registered conductor by name, judged live with ``timeout`` seconds."""
        live = and_(conductors.c.online == true(), conductors.c.heartbeat_at >= utc_ago(timeout))
        query = select(conductors, live.label("live"), utc_now().label("db_now")).order_by(
            conductors.c.name
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [
            ConductorRecord(
                name=row.name,
                group=row.conductor_group,
                tftp_address=row.tftp_address,
                http_address=row.http_address,
                online=bool(row.online),
                live=bool(row.live),
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                heartbeat_age=max(0.0, (row.db_now - row.heartbeat_at).total_seconds()),
            )
            for row in rows
        ]

    def live_members(self, timeout: float) -> tuple[tuple[str, str], ...]:
        """Sorted ``(group, name)`` of the conductors live by the database's clock."""
        with self.engine.connect() as connection:
            return self._live_members(connection, timeout)

    @staticmethod
    def _live_members(connection: Connection, timeout: float) -> tuple[tuple[str, str], ...]:
        rows = connection.execute(
            select(conductors.c.conductor_group, conductors.c.name).where(
                conductors.c.online == true(), conductors.c.heartbeat_at >= utc_ago(timeout)
            )
        ).all()
        return tuple(sorted((row.conductor_group, row.name) for row in rows))

    # --- generations -----------------------------------------------------------------

    def ring_state(self) -> RingState:
        """The current generation and its recorded membership (generation 0: none yet)."""
        with self.engine.connect() as connection:
            return self._ring_state(connection) or RingState()

    @staticmethod
    def _ring_state(connection: Connection) -> RingState | None:
        row = connection.execute(select(ring_state).where(ring_state.c.id == 1)).first()
        if row is None:
            return None
        return RingState(row.generation, decode_members(row.members), row.changed_at)

    def observe(self, timeout: float) -> RingState:
        """The current generation, moved forward first if the live membership (by the
        database's clock) differs from the one recorded for it."""
        for _attempt in range(_CAS_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    state = self._observe_once(connection, timeout)
            except IntegrityError:
                continue  # another conductor created the row first: read it again
            if state is not None:
                return state
            # Another conductor moved the generation between our read and our write.
        return self.ring_state()

    def _observe_once(self, connection: Connection, timeout: float) -> RingState | None:
        stored = self._ring_state(connection)
        live = self._live_members(connection, timeout)
        if stored is None:
            connection.execute(
                insert(ring_state).values(
                    id=1, generation=1, members=encode_members(live), changed_at=utc_now()
                )
            )
            return self._ring_state(connection)
        if stored.members == live:
            return stored
        moved = connection.execute(
            update(ring_state)
            .where(ring_state.c.id == 1, ring_state.c.generation == stored.generation)
            .values(
                generation=stored.generation + 1,
                members=encode_members(live),
                changed_at=utc_now(),
            )
        )
        return self._ring_state(connection) if moved.rowcount else None

    # --- nodes and claims ------------------------------------------------------------

    def node_groups(self, group: str | None = None) -> dict[str, str]:
        """``{node uuid: conductor group}`` of every node (of ``group`` if given)."""
        query = select(nodes.c.uuid, nodes.c.conductor_group)
        if group is not None:
            query = query.where(nodes.c.conductor_group == group)
        with self.engine.connect() as connection:
            return {row.uuid: row.conductor_group for row in connection.execute(query)}

    def claims(self, group: str | None = None) -> dict[str, Claim]:
        """``{node uuid: claim}`` of every claimed node (now in ``group`` if given)."""
        query = select(node_claims)
        if group is not None:
            query = query.join_from(
                node_claims, nodes, nodes.c.uuid == node_claims.c.node_uuid
            ).where(nodes.c.conductor_group == group)
        with self.engine.connect() as connection:
            return {row.node_uuid: _claim(row) for row in connection.execute(query)}

    def claim_of(self, node_uuid: str) -> Claim | None:
        """The node's claim, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(node_claims).where(node_claims.c.node_uuid == node_uuid)
            ).first()
        return _claim(row) if row is not None else None

    def claim_counts(self) -> dict[str, int]:
        """``{owner: number of nodes claimed}``."""
        query = select(node_claims.c.owner, func.count()).group_by(node_claims.c.owner)
        with self.engine.connect() as connection:
            return {owner: int(count) for owner, count in connection.execute(query)}

    def claim(
        self, owner: str, group: str, generation: int, node_uuids: Iterable[str]
    ) -> list[str]:
        """Claim ``node_uuids`` for ``owner`` at ``generation``, in one transaction.

        Fenced: nothing is written unless ``generation`` is the current one; a stored
        claim is replaced only if it is older than ``generation`` or was made for
        another conductor group; a node is claimed only while it is in ``group``.
        Returns the uuids, among those asked for, that ``owner`` holds afterwards by a
        claim made at ``generation`` for ``group`` while they are in it (sorted).
        """
        wanted = sorted(set(node_uuids))
        if not wanted:
            return []
        current = select(ring_state.c.generation).where(ring_state.c.id == 1).scalar_subquery()
        in_group = select(nodes.c.uuid).where(nodes.c.conductor_group == group)
        held: list[str] = []
        with self.engine.begin() as connection:
            dialect = connection.dialect.name
            for chunk in chunks_for(connection, wanted):
                connection.execute(
                    update(node_claims)
                    .where(
                        member_of(connection, node_claims.c.node_uuid, chunk),
                        or_(
                            node_claims.c.generation < generation,
                            node_claims.c.conductor_group != group,
                        ),
                        node_claims.c.node_uuid.in_(in_group),
                        current == generation,
                    )
                    .values(
                        owner=owner,
                        conductor_group=group,
                        generation=generation,
                        claimed_at=utc_now(),
                    )
                )
                fresh = select(
                    nodes.c.uuid,
                    literal(owner),
                    literal(group),
                    literal(generation),
                    utc_now(),
                ).where(
                    member_of(connection, nodes.c.uuid, chunk),
                    nodes.c.conductor_group == group,
                    ~exists().where(node_claims.c.node_uuid == nodes.c.uuid),
                    current == generation,
                )
                columns = ["node_uuid", "owner", "conductor_group", "generation", "claimed_at"]
                # A concurrent claimer may insert the same node first: skip, don't fail.
                if dialect == "postgresql":
                    statement: Any = (
                        postgresql.insert(node_claims)
                        .from_select(columns, fresh)
                        .on_conflict_do_nothing()
                    )
                else:
                    statement = insert(node_claims).from_select(columns, fresh)
                    statement = statement.prefix_with("IGNORE", dialect="mysql")
                    statement = statement.prefix_with("IGNORE", dialect="mariadb")
                    statement = statement.prefix_with("OR IGNORE", dialect="sqlite")
                connection.execute(statement)
                held.extend(
                    connection.execute(
                        select(node_claims.c.node_uuid).where(
                            member_of(connection, node_claims.c.node_uuid, chunk),
                            node_claims.c.owner == owner,
                            node_claims.c.generation == generation,
                            node_claims.c.conductor_group == group,
                            node_claims.c.node_uuid.in_(in_group),
                        )
                    ).scalars()
                )
        return sorted(held)


def _claim(row: Any) -> Claim:
    return Claim(
        node_uuid=row.node_uuid,
        owner=row.owner,
        group=row.conductor_group,
        generation=int(row.generation),
        claimed_at=row.claimed_at,
    )
