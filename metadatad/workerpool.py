# -*- test-case-name: tests.daemon.test_workers -*-
"""``[metadata] workers``: the main process's side of the metadata site's workers.

The main process holds the metadata site's listening socket but never accepts on it;
each worker (``python -m metadatad.worker``) adopts it as its descriptor 3, so the kernel
hands each new connection to one of them.  Between the main process and a worker:

- the worker's stdin: one line of set-up (the IMDSv2 signing secret, so a token from
  one worker is good on every other), then control lines: ``invalidate`` (a node was
  written: drop the node cache) and ``reload`` (SIGHUP);
- the worker's stdout: ``changed`` when the worker itself wrote a node (a password),
  which the main process passes on to its own caches and every other worker, and
  every second ``metrics <json>``, its metrics, which ``/metrics`` adds up;
- the worker's stderr: its log events as JSON text sequences, re-emitted here through
  the daemon's own log observers with ``worker`` added.

A worker that exits while the pool runs is started again (after 0.5 s, doubling to at
most 10 s while it keeps dying within a minute of its start); stopping the pool sends
SIGTERM to each and waits (SIGKILL after ``stop_timeout``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
STABLE_AFTER = 60.0
_RS = b"\x1e"  # jsonFileLogObserver starts each event with a record separator


class _WorkerProtocol(ProcessProtocol):
    """One worker process, seen from the main process."""

    log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._control = b""
        self._logs = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._control += data
            *lines, self._control = self._control.split(b"\n")
            for line in lines:
                self.pool.message(self, line.strip())
        elif childFD == 2:
            self._logs += data
            *events, self._logs = self._logs.split(b"\n")
            for raw in events:
                self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        text = raw.lstrip(_RS).strip()
        if not text:
            return
        try:
            event = eventFromJSON(text.decode("utf-8", "replace"))
        except ValueError:
            # Not an event: something wrote to stderr directly (a crash's last words).
            self.log.warn(
                "worker {worker}: {line}", worker=self.index, line=text.decode("utf-8", "replace")
            )
            return
        event["worker"] = self.index
        globalLogPublisher(event)

    def send(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write(line.encode("ascii") + b"\n")

    def signal(self, name: str) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
        if self._logs:
            self._emit(self._logs)
        self.pool.ended(self, reason)
        self.ended.callback(None)


def _cancel(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


class WorkerPool(Service):
    """The ``metadata-workers`` service: ``count`` workers sharing the socket that
    ``fileno()`` returns (called at start, after the listener bound it)."""

    name = "metadata-workers"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        config_path: str,
        fileno: Callable[[], int],
        token_secret: str,
        *,
        on_changed: Iterable[Callable[[], None]] = (),
        stop_timeout: float = 10.0,
        argv: list[str] | None = None,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._config_path = config_path
        self._fileno = fileno
        self._secret = token_secret
        self._on_changed = tuple(on_changed)
        self._stop_timeout = stop_timeout
        self._argv = argv or [sys.executable, "-m", "metadatad.worker"]
        self._workers: dict[int, _WorkerProtocol] = {}
        self._metrics: dict[int, list[Any]] = {}
        self._delays: dict[int, float] = {}
        self._started_at: dict[int, float] = {}
        self._pending: dict[int, Any] = {}
        self.restarts = 0

    # --- state, for /healthz --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Configured and running workers, their pids, and restarts so far."""
        pids = {
            index: worker.transport.pid
            for index, worker in sorted(self._workers.items())
            if worker.transport is not None and worker.transport.pid is not None
        }
        return {
            "configured": self.count,
            "running": len(pids),
            "pids": list(pids.values()),
            "restarts": self.restarts,
        }

    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return list(self.status()["pids"])

    # --- messages --------------------------------------------------------------------

    def invalidate(self) -> None:
        """A node was written in this process: every worker drops its node cache."""
        for worker in self._workers.values():
            worker.send("invalidate")

    def reload(self) -> None:
        """SIGHUP reached the main process: every worker reads its configuration again."""
        for worker in self._workers.values():
            worker.send("reload")

    def snapshots(self) -> list[list[Any]]:
        """The latest metrics of each running worker (a restarted worker starts at 0,
        as a restarted daemon does)."""
        return [self._metrics[i] for i in sorted(self._metrics) if i in self._workers]

    def message(self, sender: _WorkerProtocol, line: bytes) -> None:
        if line.startswith(b"metrics "):
            try:
                self._metrics[sender.index] = json.loads(line[len(b"metrics ") :])
            except ValueError:
                self.log.warn("worker {worker} sent unreadable metrics", worker=sender.index)
        elif line == b"changed":
            for worker in self._workers.values():
                if worker is not sender:
                    worker.send("invalidate")
            for changed in self._on_changed:
                changed()
        elif line:
            self.log.warn(
                "worker {worker} sent an unknown message {line!r}", worker=sender.index, line=line
            )

    # --- life cycle ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        worker = _WorkerProtocol(self, index)
        fd = self._fileno()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self._reactor.spawnProcess(
            worker,
            self._argv[0],
            [*self._argv, "--config", self._config_path, "--index", str(index)],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", 3: fd},
        )
        # The first line a worker reads: its set-up.
        worker.send(json.dumps({"token_secret": self._secret, "workers": self.count}))
        self._workers[index] = worker
        self._started_at[index] = self._reactor.seconds()
        self.log.info(
            "metadata worker {worker} started (pid {pid})",
            worker=index,
            pid=worker.transport.pid if worker.transport is not None else None,
        )

    def ended(self, worker: _WorkerProtocol, reason: Failure) -> None:
        index = worker.index
        if self._workers.get(index) is worker:
            del self._workers[index]
            self._metrics.pop(index, None)
        if not self.running:
            return
        how = "exited" if reason.check(ProcessDone) else f"ended: {reason.value}"
        lived = self._reactor.seconds() - self._started_at.get(index, 0.0)
        delay = RESTART_DELAY
        if lived < STABLE_AFTER:
            delay = min(MAX_RESTART_DELAY, self._delays.get(index, RESTART_DELAY / 2) * 2)
        self._delays[index] = delay
        self.restarts += 1
        self.log.warn(
            "metadata worker {worker} {how}; starting it again in {delay} s",
            worker=index,
            how=how,
            delay=delay,
        )
        self._pending[index] = self._reactor.callLater(delay, self._spawn, index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        waits = []
        for worker in list(self._workers.values()):
            waits.append(worker.ended)
            worker.signal("TERM")
            kill = self._reactor.callLater(self._stop_timeout, worker.signal, "KILL")
            worker.ended.addBoth(_cancel, kill)
        return DeferredList(waits)
