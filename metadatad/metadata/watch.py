# -*- test-case-name: tests.web.test_watch -*-
"""Long-poll watches on a project's peers and service view.

A watcher is a :class:`~twisted.internet.defer.Deferred` in :class:`WatchHub` plus
one timer of the injected clock: no thread, no lock and no database connection is held
while it waits.  The hub learns of new project indexes from three sources:

* writes through this conductor (the site tells it when a post commits);
* PostgreSQL ``LISTEN metadatad_peers`` (:class:`PostgresListener`): the listening
  connection's socket sits in the reactor like any other, and every bump anywhere in
  the cluster arrives at commit;
* a cheap poll of ``peer_index`` for the projects someone watches (:class:`WatchService`):
  every ``poll_interval`` seconds without LISTEN (MariaDB, SQLite), rarely with it (a
  safety net for a dropped listening connection).

A reader takes a :meth:`WatchHub.mark` before it reads the index, and waits from that
mark: a change that commits between its read and its wait is not missed.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.metrics import REGISTRY

__all__ = ["PostgresListener", "WatchHub", "WatchService"]

WATCHERS = Gauge(
    "metadatad_peer_watchers", "Watch requests held open, waiting for a change", registry=REGISTRY
)
WAKEUPS = Counter(
    "metadatad_peer_watch_returns",
    "Watch requests answered, by why",
    ["reason"],
    registry=REGISTRY,
)

# Notifications remembered per project, to answer readers that raced a change.
_RECENT = 16


class _Waiter:
    __slots__ = ("after", "deferred", "project", "timer")

    def __init__(self, project: str, after: int, canceller: Callable[[_Waiter], None]) -> None:
        self.project = project
        self.after = after
        # Cancelled when the client goes away (Klein cancels the request's Deferred).
        self.deferred: Deferred[int | None] = Deferred(lambda _: canceller(self))
        self.timer: Any = None


class WatchHub:
    """Watchers per project, woken when the project's index passes theirs."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiters: dict[str, set[_Waiter]] = {}
        self._recent: dict[str, collections.deque[tuple[int, int]]] = {}
        self._sequence = 0

    @property
    def watched(self) -> list[str]:
        """Projects with at least one watcher."""
        return list(self._waiters)

    def count(self) -> int:
        """Watchers held."""
        return sum(len(w) for w in self._waiters.values())

    def mark(self) -> int:
        """A point in the notification stream: pass it to :meth:`wait`."""
        return self._sequence

    def notify(self, project: str, index: int) -> None:
        """The project's index is ``index`` (or more): wake its watchers below it."""
        recent = self._recent.get(project)
        if recent is None:
            recent = self._recent[project] = collections.deque(maxlen=_RECENT)
        # Only news moves the mark: reads and polls repeat indexes all the time, and
        # the watchers one notification wakes share a read keyed by the mark.
        if not recent or index > recent[-1][1]:
            self._sequence += 1
            recent.append((self._sequence, index))
        waiters = self._waiters.get(project)
        if not waiters:
            return
        woken = [w for w in waiters if w.after < index]
        for waiter in woken:
            self._finish(waiter, index, "change")

    def notify_many(self, indexes: Iterable[tuple[str, int]]) -> None:
        """:meth:`notify` for each ``(project, index)``."""
        for project, index in indexes:
            self.notify(project, index)

    def wait(self, project: str, after: int, timeout: float, mark: int) -> Deferred[int | None]:
        """A Deferred that fires with the project's new index once it passes ``after``,
        or with None after ``timeout`` seconds; cancelling it forgets the watcher.

        ``mark`` is :meth:`mark` taken before ``after`` was read: a change notified
        since then fires at once.
        """
        waiter = _Waiter(project, after, self._forget)
        for sequence, index in self._recent.get(project, ()):
            if sequence > mark and index > after:
                waiter.deferred.callback(index)
                WAKEUPS.labels("change").inc()
                return waiter.deferred
        waiter.timer = self._clock.callLater(timeout, self._finish, waiter, None, "timeout")
        self._waiters.setdefault(project, set()).add(waiter)
        WATCHERS.inc()
        return waiter.deferred

    def _forget(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.project)
        if waiters is None or waiter not in waiters:
            return
        waiters.discard(waiter)
        if not waiters:
            del self._waiters[waiter.project]
        WATCHERS.dec()
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None

    def _finish(self, waiter: _Waiter, index: int | None, reason: str) -> None:
        if waiter.deferred.called:
            return  # woken already, by a notify nested in another watcher's answer
        self._forget(waiter)
        WAKEUPS.labels(reason).inc()
        waiter.deferred.callback(index)

    def close(self) -> None:
        """Answer every watcher now (the daemon stops): each re-reads and returns."""
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                self._finish(waiter, None, "shutdown")


class PostgresListener:
    """``LISTEN`` on a connection of its own whose socket the reactor watches.

    Connecting runs on ``run`` (the store's threadpool); afterwards nothing blocks:
    the reactor calls :meth:`doRead` when the server sends a notification.  A lost
    connection is reported (``on_state(False)``) and retried after ``retry`` seconds.
    """

    log = Logger()

    def __init__(  # noqa: PLR0917
        self,
        conninfo: str,
        channel: str,
        reactor: Any,
        run: Callable[..., Deferred[Any]],
        on_notify: Callable[[str, int], None],
        on_state: Callable[[bool], None],
        retry: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._reactor = reactor
        self._run = run
        self._on_notify = on_notify
        self._on_state = on_state
        self._retry = retry
        self._connection: Any = None
        self._fileno = -1
        self._stopped = True
        self._pending: Any = None

    @property
    def connected(self) -> bool:
        """True while notifications can arrive."""
        return self._connection is not None

    def start(self) -> None:
        """Connect and listen (in the background)."""
        self._stopped = False
        self._connect()

    def _connect(self) -> None:
        self._pending = None
        if self._stopped:
            return
        self._run(self._open).addCallbacks(self._opened, self._failed)

    def _open(self) -> Any:
        import psycopg

        connection = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
        try:
            connection.execute(f"LISTEN {self._channel}")
            connection.pgconn.nonblocking = 1
        except Exception:
            connection.close()
            raise
        return connection

    def _opened(self, connection: Any) -> None:
        if self._stopped:
            connection.close()
            return
        self._connection = connection
        # The reactor watches a duplicate of libpq's socket: libpq closes its own
        # descriptor when the server goes away, and the reactor must still be able to
        # unregister ours (else epoll raises EBADF into the reactor).
        self._fileno = os.dup(connection.pgconn.socket)
        self._reactor.addReader(self)
        self.log.info("listening for peer changes on PostgreSQL")
        # libpq may have buffered notifications while LISTEN ran: the socket will not
        # say so.  Anything committed before LISTEN is found by the poll on_state asks.
        failed = self.doRead()
        if failed is not None:
            self.connectionLost(failed)
            return
        self._on_state(True)

    def _failed(self, failure: Failure) -> None:
        self.log.warn(
            "cannot LISTEN on PostgreSQL, polling instead; retry in {retry} s: {error}",
            retry=self._retry,
            error=failure.getErrorMessage(),
        )
        self._schedule()

    def _schedule(self) -> None:
        if not self._stopped and self._pending is None:
            self._pending = self._reactor.callLater(self._retry, self._connect)

    # --- IReadDescriptor ---------------------------------------------------------

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "PostgresListener"

    def doRead(self) -> Any:
        connection = self._connection
        if connection is None:
            return None
        try:
            pgconn = connection.pgconn
            pgconn.consume_input()
            while (notice := pgconn.notifies()) is not None:
                self._received(notice.extra.decode("utf-8", "replace"))
        except Exception as e:  # psycopg.OperationalError: the server went away
            from twisted.internet.error import ConnectionLost

            return Failure(ConnectionLost(str(e)))
        return None

    def _received(self, payload: str) -> None:
        index, _, project = payload.partition(" ")
        if index.isdigit():
            self._on_notify(project, int(index))

    def connectionLost(self, reason: Failure) -> None:
        self._drop()
        if not self._stopped:
            self.log.warn(
                "lost the PostgreSQL LISTEN connection: {error}", error=reason.getErrorMessage()
            )
            self._on_state(False)
            self._schedule()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._reactor.removeReader(self)
        os.close(self._fileno)
        self._fileno = -1
        try:
            connection.close()
        except Exception:  # closing a broken connection may fail: nothing to do
            pass

    def stop(self) -> None:
        """Stop listening and retrying."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self._drop()


class WatchService(Service):
    """Feeds the hub: polls ``peer_index`` for watched projects, and listens on
    PostgreSQL where the database is one.

    ``indexes(projects) -> Deferred[{project: index}]`` runs on the store's pool.
    """

    name = "peer-watch"
    log = Logger()

    def __init__(
        self,
        hub: WatchHub,
        indexes: Callable[[list[str]], Deferred[dict[str, int]]],
        clock: IReactorTime,
        *,
        poll_interval: float = 1.0,
        listening_poll_interval: float = 15.0,
        listener: PostgresListener | None = None,
    ) -> None:
        self.hub = hub
        self._indexes = indexes
        self._clock = clock
        self.poll_interval = poll_interval
        self.listening_poll_interval = listening_poll_interval
        self.listener = listener
        self._polling = False
        self._last_poll = float("-inf")
        # Ticks every poll_interval; skips polls while LISTEN is up, except the safety net.
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.listener is not None:
            self.listener.start()
        self._loop.start(self.poll_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self.listener is not None:
            self.listener.stop()
        self.hub.close()

    def listener_state(self, up: bool) -> None:
        """The LISTEN connection came up or went down: poll once now either way."""
        self._last_poll = float("-inf")
        if self.running:
            self._tick()

    def _tick(self) -> None:
        # Never raises: a LoopingCall that fails stops for good.
        listening = self.listener is not None and self.listener.connected
        interval = self.listening_poll_interval if listening else self.poll_interval
        now = self._clock.seconds()
        if self._polling or now - self._last_poll < interval - 1e-6:
            return
        projects = self.hub.watched
        if not projects:
            return
        self._polling = True
        self._last_poll = now

        def done(result: dict[str, int] | Failure) -> None:
            self._polling = False
            if isinstance(result, Failure):
                self.log.warn("could not poll peer indexes: {error}", error=result.value)
                return
            try:
                self.hub.notify_many(result.items())
            except Exception:
                self.log.failure("waking watchers failed")

        self._indexes(projects).addBoth(done)
