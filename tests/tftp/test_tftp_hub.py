"""ReaderHub: transfer sockets behind one reactor reader (real sockets, fake reactor)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.tftp.hub import ReaderHub


class Reactor:
    """Records reader registration."""

    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.remove(reader)


class Reader:
    """A UDP socket that records what it reads; ``explode`` makes doRead raise."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.got: list[bytes] = []
        self.lost: list[Failure] = []
        self.explode = False

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        data = self.sock.recv(100)
        if self.explode:
            raise ZeroDivisionError("bug")
        self.got.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    made = [Reader() for _ in range(3)]
    yield made
    for reader in made:
        reader.sock.close()


def send(to: Reader, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, to.address)


def test_one_reactor_reader_dispatching_only_ready_sockets(readers: list[Reader]) -> None:
    """The hub is registered while it has readers; without a budget a wake-up reads
    each ready socket once (level-triggered: a second queued datagram waits for the
    next wake-up)."""
    reactor = Reactor()
    hub = ReaderHub(reactor, budget=0)
    a, b, c = readers
    for reader in readers:
        hub.addReader(reader)
    hub.addReader(a)  # twice: no effect
    assert reactor.readers == [hub]
    send(a, b"1")
    send(a, b"2")
    send(c, b"3")
    hub.doRead()
    assert (a.got, b.got, c.got) == ([b"1"], [], [b"3"])
    hub.doRead()
    assert a.got == [b"1", b"2"]
    hub.doRead()  # nothing ready: nothing read, nothing blocks
    assert a.got == [b"1", b"2"] and c.got == [b"3"]
    for reader in readers:
        hub.removeReader(reader)
    assert reactor.readers == []
    hub.addReader(b)
    assert reactor.readers == [hub]
    hub.removeReader(b)
    hub.close()


def test_a_failing_reader_is_dropped_alone(readers: list[Reader]) -> None:
    """A reader that raises is logged and disconnected; the others go on."""
    reactor = Reactor()
    hub = ReaderHub(reactor, budget=0)
    events: list[dict[str, Any]] = []
    hub.log = Logger(observer=events.append)  # type: ignore[misc]
    a, b, _ = readers
    hub.addReader(a)
    hub.addReader(b)
    a.explode = True
    send(a, b"x")
    send(b, b"y")
    hub.doRead()
    assert b.got == [b"y"]
    assert len(a.lost) == 1 and a.lost[0].check(ZeroDivisionError)
    assert [e["log_failure"].type for e in events] == [ZeroDivisionError]
    assert hub.getReaders() == [b]
    send(a, b"z")
    hub.doRead()
    assert a.got == [] and len(a.lost) == 1


def test_connection_lost_reaches_every_reader(readers: list[Reader]) -> None:
    """Reactor shutdown disconnects the hub: every reader hears of it, once."""
    reactor = Reactor()
    hub = ReaderHub(reactor)
    for reader in readers:
        hub.addReader(reader)
    reason = Failure(ConnectionError("shutdown"))
    hub.connectionLost(reason)
    assert all(r.lost == [reason] for r in readers)
    assert hub.getReaders() == []


class Echo(Reader):
    """A reader that always has another datagram waiting (an endless transfer)."""

    def doRead(self) -> None:
        super().doRead()
        send(self, b"again")


def test_the_budget_bounds_the_time_away_from_the_reactor(readers: list[Reader]) -> None:
    """With a budget the hub keeps serving what becomes ready, but returns to the
    reactor once the budget is spent, even if a socket is always ready."""
    ticks = iter(range(1000))
    hub = ReaderHub(Reactor(), budget=0.005, idle=0.001, monotonic=lambda: next(ticks) / 1000)
    echo = Echo()
    try:
        hub.addReader(echo)
        send(echo, b"first")
        hub.doRead()
        assert 3 <= len(echo.got) <= 6  # about one read per simulated millisecond
    finally:
        echo.sock.close()


def test_the_budget_serves_follow_up_datagrams_in_one_wake_up(readers: list[Reader]) -> None:
    """Datagrams that are already queued, or arrive within ``idle``, are read in the
    same wake-up; with nothing more to do the hub returns."""
    hub = ReaderHub(Reactor())
    a, b, _ = readers
    hub.addReader(a)
    hub.addReader(b)
    for data in (b"1", b"2", b"3"):
        send(a, data)
    send(b, b"x")
    hub.doRead()
    assert a.got == [b"1", b"2", b"3"] and b.got == [b"x"]
