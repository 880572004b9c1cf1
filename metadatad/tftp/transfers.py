# -*- test-case-name: tests.tftp.test_tftp_server -*-
"""TFTP transfers: one per read request, each on its own socket.

* Each transfer gets its own non-blocking socket bound to the address the client
  contacted (multi-homed conductors answer from the right address; firmware ignores
  replies from any other) and connected to the client, registered as a bare reader:
  no Twisted Port, so no two log lines per transfer and no per-packet address work.
  In the daemon the readers live in a :class:`~metadatad.tftp.hub.ReaderHub` (one
  reactor reader for all transfers; see there why).
* A datagram to a transfer port from anyone but the client reaches an unconnected
  sibling socket on the same port (:class:`TransferSocket`), gets ERROR 5, and the
  transfer goes on (RFC 1350 §4).  EAGAIN/ENOBUFS while sending a window drops the
  rest of the window: the session's timeout retransmits it.
* Timers come from the server's clock (``IReactorTime``): one lazy ``callLater`` per
  transfer, moved only when a deadline gets earlier.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from metadatad.tftp.bootconfig import Opened
from metadatad.tftp.protocol import (
    ErrorCode,
    ReadSession,
    Request,
    SessionConfig,
    unknown_tid_reply,
)

Address = tuple[str, int]

_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_RECV_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
_MAX_REPLY = 1024  # longest ACK/ERROR we read on a transfer socket


class TransferSocket:
    """The sockets of one transfer: one ``connect()``ed to the client, and an unconnected
    sibling bound to the same (address, port) that gets datagrams from anyone else.

    Connected, the per-block path is ``send``/``recv``: the kernel checks the peer and
    keeps the route, and Python builds and compares no address tuples (lock-step speed
    is per-packet cost). Alone, a connected socket would make the kernel drop a
    stranger's datagram silently, where RFC 1350 asks for an ERROR 5; so both sockets
    join one SO_REUSEPORT group, and Linux (since 5.3) delivers a datagram to the
    connected member when it comes from that member's peer and to the unconnected
    one otherwise. Only a process of the same user can join the group.
    """

    __slots__ = ("_sock", "recv", "send", "stray")

    def __init__(self, local: str, client: Address) -> None:
        family = socket.AF_INET6 if ":" in local else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        stray = None
        try:
            sock.setblocking(False)
            # SO_REUSEPORT only after the bind: with it set, the kernel's choice for
            # port 0 may be a port that another transfer's group already holds.
            sock.bind((local, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            stray = socket.socket(family, socket.SOCK_DGRAM)
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            stray.setblocking(False)
            stray.bind(sock.getsockname())
            # The client learns the port from our first packet, so nothing of its can
            # be queued on the wrong member before this.
            sock.connect(client)
        except BaseException:
            sock.close()
            if stray is not None:
                stray.close()
            raise
        self._sock = sock
        self.stray: Any = stray
        self.send = sock.send
        self.recv = sock.recv

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def close(self) -> None:
        self._sock.close()
        self.stray.close()


def open_transfer_socket(local: str, client: Address) -> TransferSocket:
    """Non-blocking sockets for a transfer to ``client``, bound to ``local`` on a port
    the kernel picks."""
    return TransferSocket(local, client)


# --------------------------------------------------------------------------- transfers


class Readers(Protocol):
    """Reader registration: the reactor's, or a :class:`~metadatad.tftp.hub.ReaderHub`."""

    def addReader(self, reader: Any) -> None: ...

    def removeReader(self, reader: Any) -> None: ...


class TransferHost(Protocol):
    """What a transfer needs of its server (a :class:`~metadatad.tftp.server.TFTPServer`)."""

    clock: IReactorTime
    config: SessionConfig
    counters: Counter[str]
    readers: Readers

    def finished(self, transfer: Transfer) -> None: ...


@implementer(IReadDescriptor)
class Transfer:
    """One read transfer: its sockets, its session, its timer.

    The transfer is the reactor's reader for the socket connected to the client; a
    :class:`_StrayReader` reads the sibling that gets everyone else's datagrams.
    """

    log = Logger()

    def __init__(
        self,
        server: TransferHost,
        request: Request,
        client: Address,
        local: str,
        key: tuple[Address, bytes],
    ) -> None:
        self.server = server
        self.request = request
        self.client = client
        self.local = local
        self.key = key
        self._seconds = server.clock.seconds
        self.started = self._seconds()
        self.session: ReadSession | None = None
        self.opened: Opened | None = None
        self.socket: Any = None
        self._stray: _StrayReader | None = None
        self._fileno = -1
        self._recv: Any = None
        self._send_one: Any = None
        self._timer: Any = None  # a DelayedCall
        self.done = False

    # ---------------------------------------------------------------- reader

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "tftp-transfer"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (shutdown): end the transfer."""
        if not self.done:
            self.abort("server shutting down")

    def doRead(self) -> None:
        """A datagram from the client (the kernel filtered the sender).

        One per call: in lock-step only one ACK is ever waiting, so a second recv
        would cost a syscall and an exception per block; the reactor (level-triggered)
        calls again while more are queued, which also keeps busy sockets fair.
        """
        if self.done:
            return
        try:
            # No ACK or ERROR worth reading is longer; a longer datagram is truncated.
            data = self._recv(_MAX_REPLY)
        except OSError as e:
            if e.errno not in _RECV_AGAIN:
                # ICMP errors (ECONNREFUSED...) surface here: the timer decides.
                self.server.counters["receive_errors"] += 1
            return
        session = self.session
        if session is not None:
            self._apply(session.receive(data, self._seconds()))

    # ---------------------------------------------------------------- protocol

    def stray_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """A datagram from anyone but the client: ERROR 5 to it, the transfer goes on
        untouched (RFC 1350 §4)."""
        if self.done:
            return
        self.server.counters["unknown_tid"] += 1
        reply = unknown_tid_reply(data)
        if reply is not None:
            try:
                self.socket.stray.sendto(reply, addr[:2])
            except OSError:
                self.server.counters["send_errors"] += 1

    def start(self, opened: Opened, sock: Any) -> None:
        """Begin sending ``opened`` from ``sock`` (a :class:`TransferSocket`)."""
        self.opened = opened
        self.socket = sock
        self._fileno = sock.fileno()
        self._recv = sock.recv
        self._send_one = sock.send
        self.session = session = ReadSession(self.request, opened.source, self.server.config)
        readers = self.server.readers
        readers.addReader(self)
        self._stray = _StrayReader(self, sock.stray)
        readers.addReader(self._stray)
        self.server.counters["transfers_started"] += 1
        self._apply(session.start(self._seconds()))

    def abort(self, message: str) -> None:
        """End the transfer from our side, telling the client."""
        if self.done or self.session is None:
            return
        self._apply(self.session.abort(self._seconds(), ErrorCode.NOT_DEFINED, message))

    def _apply(self, out: Any) -> None:
        datagrams, deadline = out
        if datagrams:
            send = self._send_one
            for datagram in datagrams:
                try:
                    send(datagram)
                except OSError as e:
                    # A full socket buffer mid-window: the rest of the window is lost
                    # and the retransmit timer resends from the last ACK (RFC 7440).
                    key = "send_buffer_full" if e.errno in _FULL else "send_errors"
                    self.server.counters[key] += 1
                    break
        if deadline is None:
            self._finish()
            return
        timer = self._timer
        if timer is None:
            self._timer = self.server.clock.callLater(
                max(0.0, deadline - self._seconds()), self._fire
            )
        elif timer.getTime() > deadline:
            # Only an earlier deadline moves the timer; a later one is found when it
            # fires (session.timeout is harmless early), so ACKs cost no timer work.
            timer.reset(max(0.0, deadline - self._seconds()))

    def _fire(self) -> None:
        self._timer = None
        if self.session is not None and not self.done:
            self._apply(self.session.timeout(self._seconds()))

    def _finish(self) -> None:
        self.done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.socket is not None:
            readers = self.server.readers
            readers.removeReader(self)
            if self._stray is not None:
                readers.removeReader(self._stray)
            self.socket.close()
        close = getattr(self.opened.source if self.opened else None, "close", None)
        if close is not None:
            close()
        self.server.finished(self)


@implementer(IReadDescriptor)
class _StrayReader:
    """Reads the transfer port's unconnected sibling: datagrams from strangers."""

    def __init__(self, transfer: Transfer, sock: Any) -> None:
        self.transfer = transfer
        self.socket = sock
        self._fileno = sock.fileno()

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "tftp-transfer"

    def connectionLost(self, reason: Failure) -> None:
        """Nothing to do: the transfer's own reader handles shutdown."""

    def doRead(self) -> None:
        try:
            data, addr = self.socket.recvfrom(_MAX_REPLY)
        except OSError:
            return
        self.transfer.stray_received(data, addr)
