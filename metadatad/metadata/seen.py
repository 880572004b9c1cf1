# -*- test-case-name: tests.db.test_liveness -*-
"""Notes when each node makes a metadata request, and writes the notes in batches.

The metadata site calls :meth:`SeenRecorder.note` for every request it answers for an
identified node: a dict assignment, no query.  Every ``interval`` seconds the notes
go to the shared database in one batch (``node_seen``), and on stop the last ones do.
So a node's ``last_seen_at`` in ``shared.json`` lags its real last request by at most
``interval`` plus the readers' own timing.  A failed write keeps the notes for the
next round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["FLUSH_INTERVAL", "SeenRecorder"]

#: Seconds between two batches: the resolution of ``last_seen_at``.
FLUSH_INTERVAL = 30.0


class SeenRecorder(Service):
    """Batches of ``{node uuid: last request time}`` for ``write`` (a Deferred-returning
    call of :meth:`metadatad.db.seen.SeenRepository.record` on a threadpool)."""

    name = "seen"
    log = Logger()

    def __init__(
        self,
        write: Callable[[Mapping[str, datetime]], Deferred[Any]],
        clock: IReactorTime,
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._write = write
        self._clock = clock
        self._interval = interval
        self._notes: dict[str, float] = {}
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self._flushing: Deferred[Any] | None = None

    def note(self, node_uuid: str) -> None:
        """The node made a metadata request now."""
        self._notes[node_uuid] = self._clock.seconds()

    def pending(self) -> int:
        """How many nodes have notes not yet written."""
        return len(self._notes)

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.flush()

    def flush(self) -> Deferred[Any]:
        """Write the notes taken so far (one batch at a time)."""
        if self._flushing is not None or not self._notes:
            return self._flushing or succeed(None)
        batch, self._notes = self._notes, {}
        moments = {
            uuid: datetime.fromtimestamp(at, tz=UTC).replace(tzinfo=None, microsecond=0)
            for uuid, at in batch.items()
        }

        def failed(failure: Failure) -> None:
            # The database is away: keep the notes (newer ones win) for the next round.
            for uuid, at in batch.items():
                if self._notes.get(uuid, 0.0) < at:
                    self._notes[uuid] = at
            self.log.warn(
                "could not record {count} nodes' last requests: {error}",
                count=len(batch),
                error=failure.getErrorMessage(),
            )

        def done(result: Any) -> Any:
            self._flushing = None
            return result

        d = self._flushing = self._write(moments)
        d.addErrback(failed).addBoth(done)
        return d
