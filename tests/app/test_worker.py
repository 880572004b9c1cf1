"""A metadata worker's share of the configuration (the process itself is tested in
tests/daemon/test_workers.py)."""

from __future__ import annotations

import select
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher

from metadatad.config import Config, MetadataConfig
from metadatad.worker import _accept_few_per_wake, _wake_one_worker, stop_once, worker_config


def config(**metadata: object) -> Config:
    return Config(metadata=MetadataConfig(**metadata))  # type: ignore[arg-type]


def test_the_pools_secret_is_used_only_when_the_file_sets_none() -> None:
    setup = {"token_secret": "from-the-pool", "workers": 2}
    assert worker_config(config(workers=2), setup).metadata.token_secret == "from-the-pool"
    chosen = config(workers=2, token_secret="from-the-file")
    assert worker_config(chosen, setup).metadata.token_secret == "from-the-file"


def test_per_node_limits_are_shared_out_rounded_up() -> None:
    metadata = worker_config(
        config(workers=3, rate_limit=100.0, rate_burst=1000, max_connections_per_source=64),
        {"token_secret": "s", "workers": 3},
    ).metadata
    assert metadata.rate_limit * 3 == 100.0
    assert (metadata.rate_burst, metadata.max_connections_per_source) == (334, 22)
    # Never below one.
    tiny = worker_config(
        config(workers=4, rate_burst=1, max_connections_per_source=1),
        {"token_secret": "s", "workers": 4},
    )
    assert (tiny.metadata.rate_burst, tiny.metadata.max_connections_per_source) == (1, 1)


def test_with_auto_the_pools_count_divides_the_limits() -> None:
    """``workers = auto`` is decided by the main process (CPUs there); a worker divides
    by the count it is told, not by anything it could work out itself."""
    metadata = worker_config(
        config(workers=None, rate_limit=100.0, rate_burst=1000, max_connections_per_source=64),
        {"token_secret": "s", "workers": 2},
    ).metadata
    assert (metadata.rate_limit, metadata.rate_burst, metadata.max_connections_per_source) == (
        50.0,
        500,
        32,
    )


class Kept(Protocol):
    """Keeps its connection's transport, to close the accepted socket after a test."""

    kept: list[Any] = []

    def connectionMade(self) -> None:
        self.kept.append(self.transport)


def test_a_worker_accepts_a_few_waiting_connections_per_wake_up() -> None:
    """Five connections wait; each read of the listening port accepts at most two of
    them, however many it took before, so connections arriving meanwhile wake another
    worker (Twisted would take them all, and take more per read after a full one)."""
    reactor = MemoryReactor()
    accepted: list[object] = []

    class Counting(Factory):
        def buildProtocol(self, addr: object) -> Protocol:
            accepted.append(addr)
            return Kept()

    port = tcp.Port(0, Counting(), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    clients = [socket.create_connection(port.socket.getsockname()) for _ in range(5)]
    try:
        _accept_few_per_wake(port, 2)
        for expected in (2, 4, 5):
            port.doRead()
            assert len(accepted) == expected
    finally:
        for client in clients:
            client.close()
        while Kept.kept:
            Kept.kept.pop().socket.close()
        port.socket.close()


def test_after_accepting_runs_only_after_a_read_that_accepted() -> None:
    """The worker makes way after a read that took a connection, not after one that
    found none (another worker took it first)."""
    reactor = MemoryReactor()
    port = tcp.Port(0, Factory.forProtocol(Kept), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    calls: list[int] = []
    client = None
    try:
        _accept_few_per_wake(port, 2, after_accepting=lambda: calls.append(port.sessionno))
        port.doRead()  # nothing waiting
        assert calls == []
        client = socket.create_connection(port.socket.getsockname())
        port.doRead()
        assert calls == [1]
        port.doRead()  # nothing more
        assert calls == [1]
    finally:
        if client is not None:
            client.close()
        while Kept.kept:
            Kept.kept.pop().socket.close()
        port.socket.close()


def _watched_events(epoll: select.epoll, fd: int) -> int:
    """The events ``epoll`` watches ``fd`` for, as the kernel shows them."""
    for line in Path(f"/proc/self/fdinfo/{epoll.fileno()}").read_text().splitlines():
        fields = line.split()
        if fields[:2] == ["tfd:", str(fd)]:
            return int(fields[fields.index("events:") + 1], 16)
    raise AssertionError(f"{fd} is not watched")


def test_making_way_keeps_the_listening_socket_watched_exclusively() -> None:
    """On epoll the listening socket is watched exclusively (one idle worker woken per
    connection); making way registers it again, still exclusively and still readable
    through the reactor, and does nothing once the worker has stopped accepting."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    poller = reactor._poller
    try:
        assert not _watched_events(poller, port.fileno()) & select.EPOLLEXCLUSIVE
        make_way = _wake_one_worker(reactor, port.fileno())
        assert make_way is not None
        assert _watched_events(poller, port.fileno()) & select.EPOLLEXCLUSIVE
        make_way()
        assert _watched_events(poller, port.fileno()) & select.EPOLLEXCLUSIVE
        with socket.create_connection(port.socket.getsockname()):
            assert dict(poller.poll(1)).get(port.fileno(), 0) & select.EPOLLIN
        port.stopReading()
        make_way()  # not registered any more: left so
        with pytest.raises(AssertionError, match="not watched"):
            _watched_events(poller, port.fileno())
    finally:
        port.socket.close()
        reactor.waker.connectionLost(None)
        poller.close()


def test_a_worker_stops_once_however_often_it_is_told() -> None:
    """SIGTERM from systemd, SIGTERM from the pool, stdin closing: the second and third
    requests to stop are no-ops, not a logged ReactorNotRunning."""
    reactor = SelectReactor()
    failures: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if "log_failure" in event:
            failures.append(event)

    def told_three_times() -> None:
        for _ in range(3):
            stop_once(reactor)

    globalLogPublisher.addObserver(observe)
    try:
        reactor.callWhenRunning(told_three_times)
        reactor.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []
    assert not reactor.running
    stop_once(reactor)  # and after it stopped
