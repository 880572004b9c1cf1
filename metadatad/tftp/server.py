# -*- test-case-name: tests.test_tftp_server -*-
"""TFTP over UDP: the thin glue around :mod:`metadatad.tftp.protocol`.

* One listener per configured address (``[tftp] listen``), bound in
  ``privilegedStartService`` so port 69 is taken before twistd drops privileges.  A
  listener on ``0.0.0.0`` reads each request with IP_PKTINFO to learn which address the
  client contacted, and drops requests sent to a broadcast or multicast address
  (RFC 1123 4.2.3.5); a listener on one address never receives those.
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
* Caps on concurrent transfers, global and per client address.  A request over a cap
  is dropped, not refused: the client retries it after its timeout, which is the
  back-pressure wanted in a boot storm, and an error would make firmware give up.
* A retransmitted request (same client address, port and bytes) while its transfer is
  being set up or running is ignored: the session retransmits on its own timer.
* Timers come from the injected reactor (``IReactorTime``): one lazy ``callLater`` per
  transfer, moved only when a deadline gets earlier.

Counters for ``/metrics`` are in :attr:`TFTPServer.counters`; every request that was
served, or that concerned a known node, becomes a :class:`BootEvent`.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet import udp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from metadatad.db.bootevents import BootEvent, utc_moment
from metadatad.tftp.bootconfig import BootFiles, NotOwned, Opened
from metadatad.tftp.protocol import (
    DEFAULT_CONFIG,
    ErrorCode,
    MalformedPacket,
    Outcome,
    ReadSession,
    Request,
    SessionConfig,
    TFTPError,
    error_reply,
    parse_request,
    unknown_tid_reply,
)

__all__ = [
    "PktinfoPort",
    "TFTPListener",
    "TFTPServer",
    "TFTPService",
    "Transfer",
    "TransferSocket",
]

Address = tuple[str, int]

# Linux's IP_PKTINFO (socket.IP_PKTINFO appears only in Python 3.12).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("@I4s4s")  # ifindex, ipi_spec_dst, ipi_addr
_CMSG_SPACE = socket.CMSG_SPACE(_IN_PKTINFO.size)
_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_RECV_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})
_MAX_REPLY = 1024  # longest ACK/ERROR we read on a transfer socket
_BUSY_WARNING_INTERVAL = 10.0

_OUTCOME_COUNTERS = {
    Outcome.COMPLETE: "transfers_complete",
    Outcome.TIMEOUT: "transfers_timeout",
    Outcome.CLIENT_ERROR: "transfers_client_error",
    Outcome.ABORTED: "transfers_aborted",
}


class Clock(Protocol):
    """The reactor parts the server uses: ``IReactorTime`` and reader registration."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., Any], *a: Any, **kw: Any) -> Any: ...

    def addReader(self, reader: Any) -> None: ...

    def removeReader(self, reader: Any) -> None: ...


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


def _is_broadcast(dest: str, local: str) -> bool:
    """True for a request not sent to one of our unicast addresses.

    Linux reports a unicast datagram's destination as its local address (ipi_addr ==
    ipi_spec_dst); for a broadcast or multicast the local address is the interface's."""
    return dest != local


# --------------------------------------------------------------------------- transfers


@implementer(IReadDescriptor)
class Transfer:
    """One read transfer: its sockets, its session, its timer.

    The transfer is the reactor's reader for the socket connected to the client; a
    :class:`_StrayReader` reads the sibling that gets everyone else's datagrams.
    """

    log = Logger()

    def __init__(
        self,
        server: TFTPServer,
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


# --------------------------------------------------------------------------- server


class Readers(Protocol):
    """Reader registration: the reactor's, or a :class:`~metadatad.tftp.hub.ReaderHub`."""

    def addReader(self, reader: Any) -> None: ...

    def removeReader(self, reader: Any) -> None: ...


class Replier(Protocol):
    """Sends a reply to a request from the address the request was sent to."""

    def reply(self, datagram: bytes, addr: Address, local: str) -> None: ...


class TFTPServer:
    """Requests in, transfers out: caps, file resolution, events and counters."""

    log = Logger()

    def __init__(
        self,
        files: BootFiles,
        clock: Clock,
        *,
        config: SessionConfig = DEFAULT_CONFIG,
        max_transfers: int = 1000,
        max_transfers_per_source: int = 16,
        record: Callable[[BootEvent], None] | None = None,
        conductor: str = "",
        open_socket: Callable[[str, Address], Any] = open_transfer_socket,
        readers: Readers | None = None,
    ) -> None:
        self.files = files
        self.clock = clock
        self.config = config
        self.max_transfers = max_transfers
        self.max_transfers_per_source = max_transfers_per_source
        self._record = record
        self._conductor = conductor
        self._open_socket = open_socket
        # Where transfer sockets are watched: a ReaderHub in the daemon, else the clock.
        self.readers: Readers = readers if readers is not None else clock
        self.transfers: dict[tuple[Address, bytes], Transfer] = {}
        self._per_source: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._last_busy_warning = float("-inf")
        self.stopping = False

    @property
    def active(self) -> int:
        """Transfers being set up or running."""
        return len(self.transfers)

    def request_received(
        self,
        datagram: bytes,
        client: Address,
        local: str,
        replier: Replier,
        dest: str | None = None,
    ) -> None:
        """A datagram at a listening port from ``client`` to ``dest`` (the address it was
        sent to; default ``local``), answered from ``local``."""
        counters = self.counters
        counters["requests"] += 1
        if self.stopping:
            return
        if dest is not None and _is_broadcast(dest, local):
            counters["dropped_broadcast"] += 1
            return
        try:
            request = parse_request(datagram)
        except TFTPError as e:
            counters["malformed" if isinstance(e, MalformedPacket) else "refused"] += 1
            reply = error_reply(datagram, e.code, e.message)
            if reply is not None:
                replier.reply(reply, client, local)
            return
        key = (client, datagram)
        if key in self.transfers:
            counters["duplicate_requests"] += 1
            return
        source = client[0]
        if (
            len(self.transfers) >= self.max_transfers
            or self._per_source[source] >= self.max_transfers_per_source
        ):
            counters["dropped_busy"] += 1
            now = self.clock.seconds()
            if now - self._last_busy_warning >= _BUSY_WARNING_INTERVAL:
                self._last_busy_warning = now
                self.log.warn(
                    "TFTP busy: dropping requests ({active} transfers, {source} has "
                    "{mine}; caps {total}/{per_source})",
                    active=len(self.transfers),
                    source=source,
                    mine=self._per_source[source],
                    total=self.max_transfers,
                    per_source=self.max_transfers_per_source,
                )
            return
        transfer = Transfer(self, request, client, local, key)
        self.transfers[key] = transfer
        self._per_source[source] += 1
        try:
            opened = self.files.open(request.filename, source, local)
        except Exception:
            self._open_failed(Failure(), transfer, replier)
            return
        if isinstance(opened, Deferred):
            opened.addCallbacks(
                self._opened,
                self._open_failed,
                callbackArgs=(transfer, replier),
                errbackArgs=(transfer, replier),
            )
        else:
            self._opened(opened, transfer, replier)

    def _opened(self, opened: Opened, transfer: Transfer, replier: Replier) -> None:
        if self.stopping or transfer.done:
            transfer.opened = opened
            transfer._finish()
            return
        try:
            sock = self._open_socket(transfer.local, transfer.client)
        except OSError as e:
            self.log.error(
                "cannot open a TFTP transfer socket on {local}: {error}",
                local=transfer.local,
                error=e,
            )
            close = getattr(opened.source, "close", None)
            if close is not None:
                close()
            self._refuse(transfer, replier, TFTPError(ErrorCode.NOT_DEFINED, "server error"))
            return
        try:
            transfer.start(opened, sock)
        except Exception:
            self.log.failure(
                "TFTP transfer of {filename} failed", filename=transfer.request.filename
            )
            if not transfer.done:
                transfer.opened = opened
                transfer._finish()

    def _open_failed(self, failure: Failure, transfer: Transfer, replier: Replier) -> None:
        if isinstance(failure.value, TFTPError):
            self._refuse(transfer, replier, failure.value)
            return
        self.log.failure(
            "cannot resolve TFTP file {filename}", failure, filename=transfer.request.filename
        )
        self._refuse(transfer, replier, TFTPError(ErrorCode.NOT_DEFINED, "server error"))

    def _refuse(self, transfer: Transfer, replier: Replier, error: TFTPError) -> None:
        """Answer the request with ``error`` from the listener and forget it."""
        if isinstance(error, NotOwned):
            outcome = "not-owned"
        elif error.code == ErrorCode.FILE_NOT_FOUND:
            outcome = "not-found"
        elif error.code == ErrorCode.ACCESS_VIOLATION:
            outcome = "refused"
        else:
            outcome = "error"
        self.counters[outcome.replace("-", "_")] += 1
        if not self.stopping:
            replier.reply(error.packet, transfer.client, transfer.local)
        transfer.done = True
        self._release(transfer)
        self._report(
            transfer,
            outcome,
            error.message,
            getattr(error, "node_uuid", None),
            getattr(error, "kind", None),
        )

    def finished(self, transfer: Transfer) -> None:
        """A transfer ended (called by the transfer)."""
        self._release(transfer)
        session = transfer.session
        if session is None or session.outcome is None:
            return
        counters = self.counters
        counters[_OUTCOME_COUNTERS[session.outcome]] += 1
        counters["bytes_sent"] += session.bytes_sent
        counters["retransmits"] += session.retransmits
        error = session.error.message if session.error is not None else None
        opened = transfer.opened
        self._report(
            transfer,
            str(session.outcome),
            error,
            opened.node_uuid if opened else None,
            opened.kind if opened else None,
        )

    def _release(self, transfer: Transfer) -> None:
        if self.transfers.pop(transfer.key, None) is None:
            return
        source = transfer.client[0]
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def _report(
        self,
        transfer: Transfer,
        outcome: str,
        error: str | None,
        node_uuid: str | None,
        kind: str | None,
    ) -> None:
        """Log the end of ``transfer`` and record its boot event."""
        ended = self.clock.seconds()
        session = transfer.session
        duration = max(0.0, ended - transfer.started)
        if session is not None:
            self.log.info(
                "tftp {client} {filename}: {outcome}, {bytes} bytes in {duration:.3f}s",
                client=transfer.client[0],
                filename=transfer.request.filename,
                outcome=outcome,
                bytes=session.bytes_sent,
                duration=duration,
            )
        else:
            self.log.debug(
                "tftp {client} {filename}: {outcome}",
                client=transfer.client[0],
                filename=transfer.request.filename,
                outcome=outcome,
            )
        if self._record is None:
            return

        def build(uuid: str | None) -> None:
            # Requests of unknown machines that sent nothing are counters only: a
            # PXELINUX walk or a spoofed flood must not fill the table.
            if uuid is None and session is None:
                return
            options = session.options if session is not None else None
            event = BootEvent(
                node_uuid=uuid,
                conductor=self._conductor,
                client=transfer.client[0],
                server=transfer.local,
                filename=transfer.request.filename,
                kind=kind or "static",
                outcome=outcome,
                started_at=utc_moment(transfer.started),
                duration=duration,
                bytes_sent=session.bytes_sent if session is not None else 0,
                size=session.size if session is not None else None,
                error=error,
                blksize=options.blksize if options is not None else None,
                windowsize=options.windowsize if options is not None else None,
                retransmits=session.retransmits if session is not None else 0,
            )
            assert self._record is not None
            self._record(event)

        if node_uuid is not None:
            build(node_uuid)
            return
        try:
            found = self.files.node_of_client(transfer.client[0])
        except Exception:
            self.log.failure("node lookup for a boot event failed")
            found = None
        if isinstance(found, Deferred):
            found.addErrback(lambda f: self.log.failure("node lookup failed", f)).addCallback(build)
        else:
            build(found)

    def stop(self) -> None:
        """Abort every transfer (shutdown): clients get ERROR 0 now, not a timeout."""
        self.stopping = True
        for transfer in list(self.transfers.values()):
            if transfer.session is not None:
                transfer.abort("server shutting down")
            else:
                transfer.done = True  # set-up still running: _opened closes it


# --------------------------------------------------------------------------- listeners


class _RequestProtocol(DatagramProtocol):
    """Port 69 on one address."""

    noisy = False

    def __init__(self, server: TFTPServer, host: str) -> None:
        self.server = server
        self.host = host

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.server.request_received(datagram, addr[:2], self.host, self)

    def pktinfoReceived(
        self, datagram: bytes, addr: Any, local: str | None, dest: str | None
    ) -> None:
        if local is None or dest is None:
            self.server.counters["dropped_no_pktinfo"] += 1
            return
        self.server.request_received(datagram, addr[:2], local, self, dest)

    def reply(self, datagram: bytes, addr: Address, local: str) -> None:
        transport: Any = self.transport
        try:
            if isinstance(transport, PktinfoPort):
                transport.write_from(datagram, addr, local)
            else:
                transport.write(datagram, addr)
        except Exception as e:
            self.server.counters["send_errors"] += 1
            self.server.log.debug("TFTP reply to {addr} failed: {error}", addr=addr, error=e)


class PktinfoPort(udp.Port):
    """An IPv4 UDP port on the wildcard address that tells, for each datagram, the
    address it was sent to (IP_PKTINFO), and sends replies from a chosen address."""

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        return sock

    def doRead(self) -> None:
        read = 0
        while read < self.maxThroughput:
            try:
                data, ancdata, _flags, addr = self.socket.recvmsg(self.maxPacketSize, _CMSG_SPACE)
            except OSError as e:
                if e.errno in _RECV_AGAIN or e.errno == errno.ECONNREFUSED:
                    return
                raise
            read += len(data)
            local = dest = None
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    if len(value) >= _IN_PKTINFO.size:
                        _index, spec_dst, header_dst = _IN_PKTINFO.unpack_from(value)
                        local = socket.inet_ntoa(spec_dst)
                        dest = socket.inet_ntoa(header_dst)
            try:
                self.protocol.pktinfoReceived(data, addr, local, dest)
            except Exception:
                Logger().failure("TFTP request handling failed")

    def write_from(self, datagram: bytes, addr: Address, local: str) -> None:
        """Send ``datagram`` to ``addr`` with source address ``local``."""
        info = _IN_PKTINFO.pack(0, socket.inet_aton(local), b"\0\0\0\0")
        self.socket.sendmsg([datagram], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, addr)


class TFTPListener(Service):
    """Port 69 (or another) on one address; binds in ``privilegedStartService``."""

    def __init__(self, server: TFTPServer, host: str, port: int, reactor: Any) -> None:
        self.server = server
        self.host = host
        self.port = port
        self._reactor = reactor
        self.listening: Any = None
        self.setName(host if host.startswith("systemd:") else f"tftp-{host}:{port}")

    def _listen(self) -> None:
        if self.listening is not None:
            return
        if self.host.startswith("systemd:"):
            self._adopt()
            return
        protocol = _RequestProtocol(self.server, self.host)
        try:
            if self.host == "0.0.0.0":
                port = PktinfoPort(self.port, protocol, self.host, reactor=self._reactor)
                port.startListening()
                self.listening = port
            else:
                self.listening = self._reactor.listenUDP(self.port, protocol, interface=self.host)
        except CannotListenError as e:
            # One line for the operator, like the HTTP listeners, not a traceback.
            raise SystemExit(
                f"metadatad: tftp: cannot listen on {self.host}:{self.port}: {e.socketError}"
            ) from None

    def _adopt(self) -> None:
        # A socket passed by systemd (ListenDatagram=): bound already, maybe to port 69.
        from metadatad.tftp import activation

        try:
            spec = activation.parse(self.host)
            fd = activation.find_descriptor(spec)
            family, host, _port = activation.inspect(fd, spec)
            self.listening = activation.adopt(
                self._reactor, fd, family, host, _RequestProtocol(self.server, host)
            )
        except (ValueError, activation.ActivationError) as e:
            raise SystemExit(f"metadatad: tftp: {e}") from None

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return succeed(None)
        result = listening.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)

    @property
    def address(self) -> Address:
        """The bound (host, port), e.g. to learn the port picked for port 0."""
        host = self.listening.getHost()
        return host.host, host.port


class TFTPService(MultiService):
    """The ``tftp`` service: a listener per address around one :class:`TFTPServer`."""

    def __init__(self, server: TFTPServer, addresses: Iterable[Address], reactor: Any) -> None:
        super().__init__()
        self.server = server
        self.mac_cache: Any = None  # the node cache of lookups by MAC, if any
        self.setName("tftp")
        self.listeners = [TFTPListener(server, host, port, reactor) for host, port in addresses]
        for listener in self.listeners:
            listener.setServiceParent(self)

    def startService(self) -> None:
        self.server.stopping = False
        super().startService()

    def stopService(self) -> Deferred[Any]:
        # Listeners first (no new transfers), then the running ones end with an ERROR.
        stopped: Deferred[Any] = super().stopService()
        self.server.stop()
        return stopped
