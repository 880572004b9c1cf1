# -*- test-case-name: tests.tftp.test_tftp_server,tests.tftp.test_tftp_activation -*-
"""TFTP's listening ports: one per configured address (``[tftp] listen``), bound in
``privilegedStartService`` so port 69 is taken before twistd drops privileges.

* A listener on ``0.0.0.0`` reads each request with IP_PKTINFO (:class:`PktinfoPort`)
  to learn which address the client contacted, and drops requests sent to a broadcast
  or multicast address (RFC 1123 4.2.3.5); a listener on one address never receives
  those.
* Socket activation: ``systemd:domain=INET:index=N`` (or ``name=NAME``) adopts a UDP
  socket handed over by systemd (``ListenDatagram=`` in a .socket unit), so the daemon
  never needs a capability for port 69.  A socket bound to ``0.0.0.0`` gets IP_PKTINFO,
  as the daemon's own wildcard listener does; a socket bound to one address is adopted
  as it is.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import fdesc, udp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.systemd import ListenFDs

from metadatad.core.systemd import SystemdSocket, parse
from metadatad.tftp.server import TFTPServer

Address = tuple[str, int]

# Linux's IP_PKTINFO (socket.IP_PKTINFO appears only in Python 3.12).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("@I4s4s")  # ifindex, ipi_spec_dst, ipi_addr
_CMSG_SPACE = socket.CMSG_SPACE(_IN_PKTINFO.size)
_RECV_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})

# The daemon's own listeners read datagrams of up to this size (Twisted's default).
MAX_PACKET_SIZE = 8192


class ActivationError(Exception):
    """No usable socket for a ``systemd:`` TFTP listener; ``str()`` is one line."""


def find_descriptor(
    spec: SystemdSocket, environ: Mapping[str, str] | None = None, start: int | None = None
) -> int:
    """The inherited descriptor ``spec`` names (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID;
    ``start`` replaces systemd's first descriptor, 3, in tests)."""
    if environ is None:
        # Twisted read LISTEN_FDS when its endpoints module was imported and, as
        # systemd advises, removed it from the environment: share what it found.
        from twisted.internet.endpoints import _SystemdParser

        fds: ListenFDs = _SystemdParser._sddaemon
    else:
        fds = ListenFDs.fromEnvironment(environ=dict(environ), start=start)
    if spec.name is not None:
        named = fds.inheritedNamedDescriptors()
        if spec.name not in named:
            raise ActivationError(
                f"{spec.description}: systemd passed no socket named {spec.name!r} "
                f"(names: {', '.join(sorted(named)) or 'none'})"
            )
        return named[spec.name]
    descriptors = fds.inheritedDescriptors()
    assert spec.index is not None
    if spec.index >= len(descriptors):
        raise ActivationError(
            f"{spec.description}: systemd passed {len(descriptors)} sockets, "
            f"no index {spec.index} (is the daemon started by its .socket unit?)"
        )
    return descriptors[spec.index]


def inspect(fd: int, spec: SystemdSocket) -> tuple[socket.AddressFamily, str, int]:
    """Check that ``fd`` is a UDP socket of ``spec.domain``: ``(family, host, port)``."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise ActivationError(f"{spec.description}: descriptor {fd}: {e.strerror}") from None
    with sock:
        family, kind = sock.family, sock.type
        address = sock.getsockname() if kind == socket.SOCK_DGRAM else ("", 0)
    wanted = socket.AF_INET if spec.domain == "INET" else socket.AF_INET6
    if kind != socket.SOCK_DGRAM or family != wanted:
        raise ActivationError(
            f"{spec.description}: descriptor {fd} is not a {spec.domain} UDP socket "
            "(ListenDatagram= in the .socket unit)"
        )
    host, port = address[0], address[1]
    if family == socket.AF_INET6 and host == "::":
        raise ActivationError(
            f"{spec.description}: a socket on [::] cannot tell which address a client "
            "contacted; use ListenDatagram=0.0.0.0:69 or one address per socket"
        )
    return family, host, port


def adopt(reactor: Any, fd: int, family: int, host: str, protocol: Any) -> Any:
    """Start reading ``protocol``'s datagrams from ``fd``; returns the port."""
    fdesc.setNonBlocking(fd)
    fdesc._setCloseOnExec(fd)
    if family == socket.AF_INET and host == "0.0.0.0":
        # Set on the shared socket: the port's own copy of the descriptor sees it.
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        port = PktinfoPort._fromListeningDescriptor(
            reactor, fd, family, protocol, maxPacketSize=MAX_PACKET_SIZE
        )
        port.startListening()
        return port
    return reactor.adoptDatagramPort(fd, family, protocol, maxPacketSize=MAX_PACKET_SIZE)


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
        try:
            spec = parse(self.host)
            fd = find_descriptor(spec)
            family, host, _port = inspect(fd, spec)
            self.listening = adopt(
                self._reactor, fd, family, host, _RequestProtocol(self.server, host)
            )
        except (ValueError, ActivationError) as e:
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

    def __init__(
        self,
        server: TFTPServer,
        addresses: Iterable[Address],
        reactor: Any,
        mac_cache: Any = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.mac_cache = mac_cache  # the node cache of lookups by MAC, if any
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
