# -*- test-case-name: tests.db.test_bootevents -*-
"""Boot events: one row per TFTP request (or HTTP fetch of a boot file) that reached a
decision, and who saw it.

:class:`BootEventRepository` holds the synchronous queries; :class:`BootEventStore`
is the service the TFTP server hands events to.  It buffers them and writes a batch
every ``flush_interval`` seconds on a one-thread pool of its own (a boot storm is
thousands of events a second: one INSERT per batch, not per transfer), prunes rows
older than the retention, and writes what is left when it stops.  A crash loses at
most the last interval's events; a database outage keeps them buffered (bounded).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from twisted.internet.defer import Deferred

from metadatad.core.records import utc_moment
from metadatad.db.schema import boot_events
from metadatad.db.threaded import Batch, BatchedWriter, Runner

__all__ = ["BootEvent", "BootEventQueries", "BootEventRepository", "BootEventStore", "utc_moment"]


@attrs.frozen
class BootEvent:
    """What happened to one TFTP request or HTTP boot-file fetch."""

    node_uuid: str | None
    conductor: str
    client: str
    server: str
    filename: str
    kind: str  # static, pxelinux, grub, ipxe
    outcome: str  # complete, timeout, client-error, aborted, not-found, refused, ...
    started_at: datetime
    duration: float = 0.0
    bytes_sent: int = 0
    size: int | None = None
    error: str | None = None
    blksize: int | None = None
    windowsize: int | None = None
    retransmits: int = 0
    protocol: str = "tftp"  # or "http"

    def to_document(self) -> dict[str, Any]:
        """The JSON form the admin API shows."""
        document = attrs.asdict(self)
        document["started_at"] = (
            self.started_at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
        )
        document["duration"] = round(self.duration, 6)
        return document

    def row(self) -> dict[str, Any]:
        """The column values, with texts cut to their column widths."""
        row = attrs.asdict(self)
        row["filename"] = self.filename[:512]
        row["error"] = None if self.error is None else self.error[:255]
        row["conductor"] = self.conductor[:255]
        return row


def _event(row: Any) -> BootEvent:
    return BootEvent(**{f.name: getattr(row, f.name) for f in attrs.fields(BootEvent)})


class BootEventRepository:
    """Synchronous queries on ``boot_events``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, events: Sequence[BootEvent]) -> None:
        """Store ``events`` in one transaction."""
        if events:
            with self.engine.begin() as connection:
                connection.execute(insert(boot_events), [e.row() for e in events])

    def recent(self, node_uuid: str, limit: int = 50) -> list[BootEvent]:
        """The node's newest ``limit`` events, newest first."""
        query = (
            select(boot_events)
            .where(boot_events.c.node_uuid == node_uuid)
            .order_by(boot_events.c.started_at.desc(), boot_events.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [_event(row) for row in connection.execute(query)]

    def prune(self, before: datetime) -> int:
        """Delete events that started before ``before``; returns how many."""
        with self.engine.begin() as connection:
            result = connection.execute(
                delete(boot_events).where(boot_events.c.started_at < before)
            )
            return int(result.rowcount or 0)


class BootEventQueries(Protocol):
    """What :class:`BootEventStore` needs of a repository (the SQL one, its fake)."""

    def add(self, events: Sequence[BootEvent]) -> None: ...

    def recent(self, node_uuid: str, limit: int = 50) -> list[BootEvent]: ...

    def prune(self, before: datetime) -> int: ...


class BootEventStore(BatchedWriter[BootEventQueries]):
    """Buffered, batched writes of boot events, and reads for the admin API, on a
    one-thread pool of its own (``run`` replaces it in tests)."""

    name = "boot-events"
    what = "boot events"

    def __init__(
        self,
        repository: BootEventQueries,
        reactor: Any,
        *,
        flush_interval: float = 1.0,
        retention_days: float = 7.0,
        max_buffer: int = 100_000,
        run: Runner | None = None,
    ) -> None:
        super().__init__(
            repository,
            reactor,
            pool_name="metadatad-boot-events",
            flush_interval=flush_interval,
            retention_days=retention_days,
            run=run,
        )
        self._max_buffer = max_buffer
        self._buffer: list[BootEvent] = []
        self.dropped = 0

    def record(self, event: BootEvent) -> None:
        """Queue ``event`` for the next batch (never blocks, never fails)."""
        if len(self._buffer) >= self._max_buffer:
            # The database has been away for long: keep the newest events.
            del self._buffer[: len(self._buffer) // 10 or 1]
            self.dropped += 1
        self._buffer.append(event)

    def recent(self, node_uuid: str, limit: int = 50) -> Deferred[list[BootEvent]]:
        """The node's newest events, newest first (waiting events included)."""
        waiting = [e for e in reversed(self._buffer) if e.node_uuid == node_uuid]

        def merged(stored: list[BootEvent]) -> list[BootEvent]:
            events = waiting + stored
            events.sort(key=lambda e: e.started_at, reverse=True)
            return events[:limit]

        return self.run(self.repository.recent, node_uuid, limit).addCallback(merged)

    def _take_batch(self, everything: bool) -> Batch | None:
        if not self._buffer:
            return None
        batch, self._buffer = self._buffer, []

        def restore() -> None:
            self._buffer[:0] = batch

        return Batch(self.repository.add, (batch,), len(batch), restore)
