# -*- test-case-name: tests.daemon.test_workers -*-
"""One metadata worker: ``python -m metadatad.worker --config FILE --index N``.

Started by the main process's :class:`~metadatad.workerpool.WorkerPool` (never by hand):
descriptor 3 is the metadata site's listening socket, stdin carries the set-up line and
then control lines, stdout carries ``changed`` back, stderr carries log events as JSON.
The worker serves the metadata site exactly as a single-process daemon does (the same
:func:`metadatad.tap.build_metadata`), and nothing else: membership, DHCP, TFTP and the
admin API stay in the main process.  It exits when told to (SIGTERM) or when the main
process goes away (its stdin closes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import stdio
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols.basic import LineOnlyReceiver

from metadatad.clients.keystone import make_keystone_client
from metadatad.config import Config, ConfigError, load_config
from metadatad.db.store import NodeRepository, Store
from metadatad.errors import SetupError
from metadatad.hardening import DRAIN_SECONDS
from metadatad.reload import ReloadService
from metadatad.tap import _database, build_metadata, freeze_heap
from metadatad.telemetry import MetricsService, Sources, snapshot

LISTENING_FD = 3
METRICS_INTERVAL = 1.0

log = Logger()


class Control(LineOnlyReceiver):
    """The main process's control lines on stdin; ``changed`` back on stdout."""

    delimiter = b"\n"

    def __init__(self, invalidate: Any, reload: Any, reactor: Any) -> None:
        self._invalidate = invalidate
        self._reload = reload
        self._reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        command = line.strip()
        if command == b"invalidate":
            self._invalidate()
        elif command == b"reload":
            self._reload()
        elif command:
            log.warn("unknown control line {line!r}", line=command)

    def send_metrics(self) -> None:
        """This worker's metrics, for the main process's ``/metrics``."""
        if self.transport is not None:
            self.sendLine(b"metrics " + json.dumps(snapshot()).encode("utf-8"))

    def changed(self) -> None:
        """A node was written through this worker: the others must forget it too."""
        if self.transport is not None:
            self.sendLine(b"changed")

    def connectionLost(self, reason: Any = None) -> None:
        # The main process is gone (or closed our stdin): so is the reason to serve.
        stop_once(self._reactor)


def stop_once(reactor: Any) -> None:
    """Stop ``reactor`` unless it is already stopping: a worker is told to stop more than
    once (a SIGTERM to the whole service's group, then one from the pool, then its stdin
    closing), and Twisted's own handler would log ReactorNotRunning as a critical
    traceback for each one after the first."""
    if reactor.running:
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()


def _on_stop_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop the worker once, however often they come."""

    def handler(signum: int, frame: object) -> None:
        log.info("metadata worker: {signal}, stopping", signal=signal.Signals(signum).name)
        reactor.callFromThread(stop_once, reactor)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def worker_config(config: Config, setup: dict[str, Any]) -> Config:
    """The worker's share of ``config``: the pool's signing secret when the file sets
    none, and per-node limits divided among the pool's workers (rounded up; the count
    comes from the pool, as ``auto`` is decided there)."""
    metadata = config.metadata
    count = setup["workers"]
    return attrs.evolve(
        config,
        metadata=attrs.evolve(
            metadata,
            token_secret=metadata.token_secret or setup["token_secret"],
            rate_limit=metadata.rate_limit / count,
            rate_burst=max(1, math.ceil(metadata.rate_burst / count)),
            max_connections_per_source=max(
                1, math.ceil(metadata.max_connections_per_source / count)
            ),
        ),
    )


def compose(
    config: Config, reactor: Any
) -> tuple[MultiService, Control, Callable[[], Deferred[None]]]:
    """The worker's services (not started), its control protocol, and how it stops
    (:func:`stopping`)."""
    engine = _database(config)
    root = MultiService()
    store = Store(NodeRepository(engine), reactor)
    store.setServiceParent(root)
    keystone = make_keystone_client(config, reactor)
    parts = build_metadata(root, config, engine, store, reactor, keystone=keystone)
    forget = [parts.cache.invalidate]
    if parts.vendordata is not None:
        forget.append(parts.vendordata.forget)
    reload = ReloadService(
        config,
        reactor,
        set_vendordata=parts.metadata_site.set_static_vendordata,
        invalidate=forget,
    )
    reload.setServiceParent(root)

    def invalidate() -> None:
        parts.cache.invalidate()

    control = Control(invalidate, reload.reload, reactor)
    store.add_change_listener(control.changed)
    MetricsService(Sources({"metadata": parts.cache}, clock=reactor)).setServiceParent(root)
    metrics = TimerService(METRICS_INTERVAL, control.send_metrics)
    metrics.clock = reactor
    metrics.setServiceParent(root)
    with socket.socket(fileno=LISTENING_FD) as inherited:
        family = inherited.family
        inherited.detach()
    port = reactor.adoptStreamPort(LISTENING_FD, family, parts.site)
    os.close(LISTENING_FD)  # the port listens on its own duplicate
    make_way = _wake_one_worker(reactor, port.fileno())
    _accept_few_per_wake(port, after_accepting=make_way)
    return root, control, lambda: stopping(port, parts.site, root)


def stopping(port: Any, site: Any, root: MultiService) -> Deferred[None]:
    """Stop a worker without losing what it accepted: stop accepting (the listening
    socket stays open elsewhere: later connections wait in the kernel's queue for the
    other workers or the next process), answer the requests in progress (at most
    :data:`~metadatad.hardening.DRAIN_SECONDS`), then stop the services, the store
    last.  Stopping the services while a request still waited on the store dropped that
    request.  (The single process does the same: ``RootService.drain_first``.)"""
    port.stopReading()
    drained: Deferred[None] = site.drained(DRAIN_SECONDS)
    drained.addCallback(lambda _: root.stopService())
    return drained


# Connections a worker accepts per wake-up (see _accept_few_per_wake).
ACCEPTS_PER_WAKE = 8


def _accept_few_per_wake(
    port: Any,
    count: int = ACCEPTS_PER_WAKE,
    after_accepting: Callable[[], None] | None = None,
) -> None:
    """Take at most ``count`` waiting connections per wake-up, not up to a hundred: a
    worker that accepted a burst alone would keep every keep-alive connection of it
    (measured: wrk's 50 all in one worker), while the kernel wakes an idle worker for
    each connection that arrives while this one is busy.  Not one either: in a boot
    storm (a new connection per request) each accept then cost a turn of the reactor
    of its own; 8 took 135-138 us of CPU per request against 165-183 with one, N = 1,000,
    2 workers.  Twisted's port raises ``numberAccepts`` after every full batch, so it
    is put back before each read.  ``after_accepting`` runs after a read that accepted
    a connection and built its channel (not after one whose connections were all turned
    away, past the per-source cap): :func:`_wake_one_worker`'s, making way."""
    read = port.doRead

    def doRead() -> object:
        port.numberAccepts = count
        before = port.sessionno
        why = read()
        if after_accepting is not None and port.sessionno != before:
            after_accepting()
        return why

    port.doRead = doRead


def _wake_one_worker(reactor: Any, fd: int) -> Callable[[], None] | None:
    """A new connection wakes one idle worker, not all of them (EPOLLEXCLUSIVE): the
    others would only find nothing to accept.  Twisted's epoll reactor has no option
    for it, so the listening descriptor is registered again by hand; the reactor's own
    bookkeeping (it reads, it never writes) is unchanged.

    Returns what a worker does after accepting (None without epoll): make way for the
    others.  The kernel wakes the first idle worker in registration order, and one
    busy accepting a burst took all of it while the worker woken for the rest waited
    for a core (wrk's 50 keep-alive connections on one worker in most rounds,
    docs/benchmarks.md "Two workers").  So it registers again, to the back of the
    queue, and yields its core (``sched_yield``: a no-op when nothing waits for it)."""
    poller = getattr(reactor, "_poller", None)
    exclusive = getattr(select, "EPOLLEXCLUSIVE", None)
    if poller is None or exclusive is None or not isinstance(poller, select.epoll):
        return None
    def register_exclusively() -> None:
        poller.unregister(fd)
        poller.register(fd, select.EPOLLIN | exclusive)

    def make_way() -> None:
        try:
            register_exclusively()
        except OSError:
            return  # not registered: the worker stopped accepting (stopping)
        os.sched_yield()

    register_exclusively()
    return make_way


def _first_line() -> bytes:
    """The set-up line, read a byte at a time: a buffered read could swallow the
    control lines behind it, which belong to the control protocol."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            break
        line += byte
    return bytes(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metadatad.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    setup = json.loads(_first_line())
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from twisted.internet import reactor

    try:
        config = worker_config(load_config(args.config), setup)
        root, control, stop = compose(config, reactor)
    except (ConfigError, SetupError) as e:
        log.critical("metadata worker {index} cannot start: {error}", index=args.index, error=e)
        return 1
    stdio.StandardIO(control, reactor=reactor)
    root.startService()
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.callWhenRunning(freeze_heap)
    # After the reactor's own handlers are in place, which these replace.
    reactor.callWhenRunning(_on_stop_signals, reactor)
    log.info("metadata worker {index} serving", index=args.index)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
