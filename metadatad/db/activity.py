# -*- test-case-name: tests.db.test_console_queries -*-
"""What each node did over HTTP, for the console's boot timeline, and its last boot outcome.

The metadata site, the vendordata caller, the TFTP server and the console hand events
to :class:`ActivityRecorder`.  It aggregates them in memory (a cloud-init crawl of 40
requests becomes one row: first and last request, how many, and whether every one
carried an IMDSv2 token), writes a batch every ``flush_interval`` seconds on a
one-thread pool of its own (the rows of nodes quiet for ``QUIET_SECONDS``, and rows
open for ``MAX_OPEN_SECONDS``), and prunes rows past the boot events'
retention, exactly like :class:`~metadatad.db.bootevents.BootEventStore`.  The buffer
is bounded: past ``max_buffer`` distinct rows, new ones are dropped (and counted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred, succeed

from metadatad.db.bootevents import BootEvent, utc_moment
from metadatad.db.bulk import chunks_for, member_of
from metadatad.db.schema import node_activity, node_boot_status
from metadatad.db.threaded import Batch, BatchedWriter, Runner

__all__ = ["Activity", "ActivityRecorder", "ActivityRepository", "BootStatus", "fan_out"]

# The outcome a node's boot status takes once it reads its metadata.
METADATA_OUTCOME = "metadata"
# The periodic flush writes a node's rows once it has been quiet this long, so a crawl
# is one row (and its boot status one write) rather than one per flush interval, and a
# row open this long anyway, so a node that never stops still shows.  In a boot
# storm (1,000 machines, 2 workers) writing a row per node and second cost about 5 %
# of the workers' CPU.  Stopping writes everything.
QUIET_SECONDS = 1.0
MAX_OPEN_SECONDS = 10.0


def _iso(moment: datetime) -> str:
    return moment.isoformat() + "Z"


@attrs.frozen
class Activity:
    """One aggregated row: ``requests`` events of ``kind`` between first and last."""

    node_uuid: str
    conductor: str
    kind: str  # metadata, token, peer-post, vendordata, operator
    detail: str
    requests: int
    imdsv2: bool
    first_at: datetime
    last_at: datetime

    def to_document(self) -> dict[str, Any]:
        """The JSON form (times in ISO 8601, UTC)."""
        document = attrs.asdict(self)
        document["first_at"] = _iso(self.first_at)
        document["last_at"] = _iso(self.last_at)
        return document

    def row(self) -> dict[str, Any]:
        """Column values, texts cut to their widths."""
        row = attrs.asdict(self)
        row["detail"] = self.detail[:255]
        row["conductor"] = self.conductor[:255]
        return row


@attrs.frozen
class BootStatus:
    """A node's last boot outcome: a TFTP transfer's, or ``metadata``."""

    outcome: str
    detail: str
    at: datetime


class ActivityRepository:
    """Synchronous queries on ``node_activity`` and ``node_boot_status``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, rows: Sequence[Activity], statuses: Mapping[str, BootStatus]) -> None:
        """Store ``rows``, and move each node's boot status forward (never back)."""
        if rows:
            with self.engine.begin() as connection:
                connection.execute(insert(node_activity), [r.row() for r in rows])
        if statuses:
            try:
                self._set_statuses(statuses)
            except IntegrityError:
                # Another conductor inserted one of these nodes meanwhile: they exist now.
                self._set_statuses(statuses)

    def _set_statuses(self, statuses: Mapping[str, BootStatus]) -> None:
        uuids = sorted(statuses)
        with self.engine.begin() as connection:
            existing: set[str] = set()
            for chunk in chunks_for(connection, uuids):
                existing.update(
                    connection.execute(
                        select(node_boot_status.c.node_uuid).where(
                            member_of(connection, node_boot_status.c.node_uuid, chunk)
                        )
                    ).scalars()
                )
            values = [
                {
                    "u": uuid,
                    "o": statuses[uuid].outcome[:32],
                    "d": statuses[uuid].detail[:255],
                    "a": statuses[uuid].at,
                }
                for uuid in uuids
            ]
            updates = [v for v in values if v["u"] in existing]
            if updates:
                connection.execute(
                    update(node_boot_status)
                    .where(
                        node_boot_status.c.node_uuid == bindparam("u"),
                        node_boot_status.c.at <= bindparam("a"),
                    )
                    .values(outcome=bindparam("o"), detail=bindparam("d"), at=bindparam("a")),
                    updates,
                )
            inserts = [
                {"node_uuid": v["u"], "outcome": v["o"], "detail": v["d"], "at": v["a"]}
                for v in values
                if v["u"] not in existing
            ]
            if inserts:
                connection.execute(insert(node_boot_status), inserts)

    def recent(self, node_uuid: str, limit: int = 100) -> list[Activity]:
        """The node's newest ``limit`` rows, newest first."""
        query = (
            select(node_activity)
            .where(node_activity.c.node_uuid == node_uuid)
            .order_by(node_activity.c.last_at.desc(), node_activity.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [
                Activity(**{f.name: getattr(row, f.name) for f in attrs.fields(Activity)})
                for row in connection.execute(query)
            ]

    def status(self, node_uuid: str) -> BootStatus | None:
        """The node's last boot outcome, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(node_boot_status).where(node_boot_status.c.node_uuid == node_uuid)
            ).first()
        return None if row is None else BootStatus(row.outcome, row.detail, row.at)

    def prune(self, before: datetime) -> int:
        """Delete rows older than ``before``; returns how many activity rows went."""
        with self.engine.begin() as connection:
            result = connection.execute(
                delete(node_activity).where(node_activity.c.last_at < before)
            )
            connection.execute(delete(node_boot_status).where(node_boot_status.c.at < before))
            return int(result.rowcount or 0)


@attrs.define
class _Pending:
    first: float
    last: float
    requests: int = 0
    imdsv2: bool = True


class ActivityRecorder(BatchedWriter[ActivityRepository]):
    """Aggregates node activity in memory and writes it in batches."""

    name = "node-activity"
    what = "node activity rows"

    def __init__(
        self,
        repository: ActivityRepository,
        reactor: Any,
        conductor: str,
        *,
        flush_interval: float = 1.0,
        retention_days: float = 7.0,
        max_buffer: int = 100_000,
        run: Runner | None = None,
    ) -> None:
        super().__init__(
            repository,
            reactor,
            pool_name="metadatad-node-activity",
            flush_interval=flush_interval,
            retention_days=retention_days,
            run=run,
        )
        self._clock = reactor
        self._conductor = conductor
        self._max_buffer = max_buffer
        self._pending: dict[tuple[str, str, str], _Pending] = {}
        self._statuses: dict[str, tuple[str, str, float]] = {}
        self.dropped = 0

    # --- what happened (never blocks, never fails) -----------------------------------

    def note(self, node_uuid: str, kind: str, detail: str, imdsv2: bool = False) -> None:
        """Count one event of ``kind`` for the node (same kind and detail until the
        row is written: one row)."""
        now = self._clock.seconds()
        key = (node_uuid, kind, detail[:255])
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self._max_buffer:
                self.dropped += 1
                return
            pending = self._pending[key] = _Pending(now, now)
        pending.last = now
        pending.requests += 1
        pending.imdsv2 = pending.imdsv2 and imdsv2

    def metadata_request(self, node_uuid: str, method: str, imdsv2: bool) -> None:
        """A request of the metadata site answered for this node.  Runs on every
        request: past a crawl's first request, one clock read and two dict updates."""
        now = self._clock.seconds()
        pending = self._pending.get((node_uuid, "metadata", method))
        if pending is None:
            self.note(node_uuid, "metadata", method, imdsv2)
        else:
            pending.last = now
            pending.requests += 1
            pending.imdsv2 = pending.imdsv2 and imdsv2
        statuses = self._statuses
        if node_uuid in statuses or len(statuses) < self._max_buffer:
            statuses[node_uuid] = (METADATA_OUTCOME, "read its metadata", now)
        else:
            self.dropped += 1

    def tftp(self, event: BootEvent) -> None:
        """A TFTP transfer reached a decision: the node's boot status follows it."""
        if event.node_uuid is not None:
            detail = f"{event.filename}: {event.error}" if event.error else event.filename
            self._status(event.node_uuid, event.outcome, detail)

    def vendordata(self, node_uuid: str, target: str, reason: str | None) -> None:
        """A dynamic vendordata target answered (``reason`` None) or failed."""
        self.note(node_uuid, "vendordata", f"{target}: {'ok' if reason is None else reason}")

    def _status(self, node_uuid: str, outcome: str, detail: str) -> None:
        if node_uuid in self._statuses or len(self._statuses) < self._max_buffer:
            self._statuses[node_uuid] = (outcome, detail, self._clock.seconds())
        else:
            self.dropped += 1

    # --- reads -----------------------------------------------------------------------

    def recent(self, node_uuid: str, limit: int = 100) -> Deferred[list[Activity]]:
        """The node's newest rows, newest first (buffered ones included)."""
        waiting = self._rows(self._pending, node_uuid)

        def merged(stored: list[Activity]) -> list[Activity]:
            rows = waiting + stored
            rows.sort(key=lambda a: a.last_at, reverse=True)
            return rows[:limit]

        return self.run(self.repository.recent, node_uuid, limit).addCallback(merged)

    def status(self, node_uuid: str) -> Deferred[BootStatus | None]:
        """The node's last boot outcome (a buffered one first)."""
        waiting = self._statuses.get(node_uuid)
        if waiting is not None:
            return succeed(BootStatus(waiting[0], waiting[1], utc_moment(waiting[2])))
        return self.run(self.repository.status, node_uuid)

    def _rows(
        self, pending: dict[tuple[str, str, str], _Pending], only: str | None = None
    ) -> list[Activity]:
        return [
            Activity(
                uuid,
                self._conductor,
                kind,
                detail,
                p.requests,
                p.imdsv2 and kind == "metadata",
                utc_moment(p.first),
                utc_moment(p.last),
            )
            for (uuid, kind, detail), p in pending.items()
            if only is None or uuid == only
        ]

    # --- writing ---------------------------------------------------------------------

    def _take_batch(self, everything: bool) -> Batch | None:
        if everything:
            pending, statuses = self._pending, self._statuses
            self._pending, self._statuses = {}, {}
        else:
            pending, statuses = self._settled(self._clock.seconds())
        if not pending and not statuses:
            return None
        rows = self._rows(pending)
        moments = {
            uuid: BootStatus(outcome, detail, utc_moment(at))
            for uuid, (outcome, detail, at) in statuses.items()
        }

        def restore() -> None:
            _keep(self._pending, pending)
            for uuid, status in statuses.items():
                self._statuses.setdefault(uuid, status)

        return Batch(self.repository.add, (rows, moments), len(rows), restore)

    def _settled(
        self, now: float
    ) -> tuple[dict[tuple[str, str, str], _Pending], dict[str, tuple[str, str, float]]]:
        """Take the rows of the nodes that have gone quiet (no request of any kind for
        ``QUIET_SECONDS``) and the rows open for ``MAX_OPEN_SECONDS``, with the boot
        status of every node that is quiet or had a row taken (so a busy node's status
        is written at least as often as its rows)."""
        latest: dict[str, float] = {}
        for (uuid, _, _), p in self._pending.items():
            if p.last > latest.get(uuid, float("-inf")):
                latest[uuid] = p.last
        settled = {
            key: p
            for key, p in self._pending.items()
            if now - latest[key[0]] >= QUIET_SECONDS or now - p.first >= MAX_OPEN_SECONDS
        }
        for key in settled:
            del self._pending[key]
        written = {uuid for uuid, _, _ in settled}
        busy = {uuid for uuid, _, _ in self._pending}
        statuses = {
            uuid: status
            for uuid, status in self._statuses.items()
            if uuid in written or uuid not in busy
        }
        for uuid in statuses:
            del self._statuses[uuid]
        return settled, statuses


def _keep(
    into: dict[tuple[str, str, str], _Pending], failed: dict[tuple[str, str, str], _Pending]
) -> None:
    """Merge a batch that could not be written back into the buffer."""
    for key, p in failed.items():
        now = into.get(key)
        if now is None:
            into[key] = p
        else:
            into[key] = _Pending(
                p.first, now.last, p.requests + now.requests, p.imdsv2 and now.imdsv2
            )


def fan_out(*recorders: Callable[[BootEvent], None]) -> Callable[[BootEvent], None]:
    """One TFTP event recorder that hands each event to every one of ``recorders``."""

    def record(event: BootEvent) -> None:
        for recorder in recorders:
            recorder(event)

    return record
