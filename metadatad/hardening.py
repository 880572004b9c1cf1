# -*- test-case-name: tests.web.test_hardening -*-
"""HTTP connections that untrusted machines cannot abuse.

:class:`HardenedSite` is a twisted.web ``Site`` whose channels

- answer ``431`` to a request line plus headers longer than ``max_header_bytes``;
- answer ``413`` to a body longer than ``max_body_bytes`` (by ``Content-Length``
  before reading it, or while reading a chunked body), without buffering it;
- answer ``408`` and close when a request is not complete ``client_timeout`` seconds
  after its first byte (slow clients: Twisted's idle timeout restarts on every byte);
  one timer per site watches the requests being received, in the order their first
  bytes came (:class:`Deadlines`): a request costs a dictionary insertion and removal,
  not a timer scheduled and cancelled (in a boot storm every request is a new
  connection);
- close connections idle for ``idle_timeout`` seconds;
- abort a connection whose client has taken none of its pending response for
  ``write_timeout`` seconds (Twisted's idle timeout is off while a response is
  written, and ``loseConnection`` waits for the buffer to drain: a client that stops
  reading would otherwise hold the connection and the response's memory forever);
- refuse a connection beyond ``max_connections_per_source`` open ones from one address
  (but from ``exempt`` networks: the trusted proxies, which speak for many machines);
- can send one response with a low IP TTL (:func:`limit_response_hops`, for IMDSv2's
  token ``PUT``); the socket's own TTL is restored before the next response.

Each refusal is one short ``text/plain`` answer and the connection closes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from prometheus_client import Counter
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from metadatad.core.addresses import IPNetwork, normalise_ip
from metadatad.metrics import REGISTRY

_log = Logger(namespace="metadatad.audit")

REFUSED_CONNECTIONS = Counter(
    "metadatad_http_refused_total",
    "HTTP requests or connections refused before reaching a site, by reason.",
    ["site", "reason"],
    registry=REGISTRY,
)

_PHRASES = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
}


@attrs.frozen
class Limits:
    """What one connection may send, and for how long."""

    max_header_bytes: int = 8192
    max_body_bytes: int = 65536
    client_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections_per_source: int = 64
    write_timeout: float = 30.0


class Deadlines:
    """The ``client_timeout`` deadlines of the requests being received on one site's
    channels, watched by one timer.

    Every request has the same time-out, so the order in which requests started is
    the order of their deadlines (while the clock moves forward: a clock stepped back
    delays the ones behind the oldest, as it delays any timer): the timer is set for
    the oldest, and when it fires it refuses every request whose deadline has passed
    and is set again for the next one.  A request finished before its deadline is
    simply taken out; the timer, if it was set for it, finds a later one or none."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self.clock = clock
        self._timeout = timeout
        # Channel -> when its request's first byte came; the oldest first.
        self._receiving: OrderedDict[HardenedChannel, float] = OrderedDict()
        self._timer: IDelayedCall | None = None

    def start(self, channel: HardenedChannel) -> float:
        """``channel`` received the first byte of a request now (returned)."""
        now = self._receiving[channel] = self.clock.seconds()
        if self._timer is None:
            self._timer = self.clock.callLater(self._timeout, self._expire)
        return now

    def stop(self, channel: HardenedChannel) -> None:
        """``channel``'s request is complete, refused, or its connection lost."""
        self._receiving.pop(channel, None)

    def receiving(self) -> int:
        """How many requests are being received."""
        return len(self._receiving)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        receiving = self._receiving
        while receiving:
            channel, since = next(iter(receiving.items()))
            left = since + self._timeout - now
            if left > 0:
                self._timer = self.clock.callLater(left, self._expire)
                return
            del receiving[channel]
            try:
                channel.refuse(408, "slow client")
            except Exception:
                # One connection's failure must not leave the others unwatched.
                _log.failure("refusing a slow client failed")


class HardenedRequest(Request):
    """A request whose body stops being read past the channel's body limit (it counts
    what it read in :attr:`body_bytes`), and which its site measures when it is done
    (:class:`HardenedSite`'s ``measure``)."""

    body_bytes = 0

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        try:
            Request.requestReceived(self, command, path, version)  # no super object
        except ValueError:
            # Where a site parses POST forms (the admin console), twisted.web parses the
            # Content-Type with the email package before any resource sees the request,
            # which raises on some bytes (U+0085 reads as a line break): a bad request,
            # not a traceback.  (Anything raised while rendering is caught inside.)
            channel = self.channel
            if not isinstance(channel, HardenedChannel):
                raise
            channel.refuse(400, "content type")

    def connectionLost(self, reason: Failure) -> None:
        if not self.finished:
            channel = self.channel
            site = getattr(channel, "factory", None)
            if isinstance(site, HardenedSite) and isinstance(channel, HardenedChannel):
                site.measured(self, channel, None)
        super().connectionLost(reason)

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, HardenedChannel):
            if channel.refused:
                return
            self.body_bytes += len(data)
            if self.body_bytes > channel.limits.max_body_bytes:
                channel.refuse(413, "request body")
                return
        super().handleContentChunk(data)


class HardenedChannel(HTTPChannel):
    """An HTTP/1.1 channel enforcing :class:`Limits` (see the module docstring)."""

    # Slots, not the instance dict: twisted.web's channel already keeps 23 attributes
    # in its dict, and past 30 CPython 3.11 gives up sharing the dict's keys between
    # instances, which makes every attribute read of every channel method a plain dict
    # lookup (ours in the dict made 31: 3-4 % more instructions per request).
    __slots__ = (
        "MAX_LENGTH",
        "_deadlines",
        "_host_address",
        "_idle_call",
        "_idle_due",
        "_idle_from",
        "_peer_address",
        "_receiving",
        "_saved_hops",
        "_source",
        "_stall",
        "_unsent_then",
        "limits",
        "name",
        "refused",
        "started",
        "totalHeadersSize",
    )

    def __init__(
        self,
        limits: Limits,
        name: str = "",
        clock: IReactorTime | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__()
        self.limits = limits
        self.name = name
        self.refused = False
        # When the first byte of the request being received (or the last one) came.
        self.started = 0.0
        # Whether a request is being received (its deadline is in ``_deadlines``).
        self._receiving = False
        self._stall: Any = None
        self._unsent_then: int | None = None
        self._saved_hops: tuple[int, int, int] | None = None
        self._source: str | None = None
        # The idle timeout (see setTimeout): its one timer, and when idleness began.
        self._idle_call: IDelayedCall | None = None
        self._idle_due = self._idle_from = 0.0
        # The connection's two addresses, asked of the transport once: twisted.web asks
        # for both on every request, and the local one is a getsockname() each time.
        self._peer_address: Any = None
        self._host_address: Any = None
        if deadlines is None:
            # A channel of its own (not built by a HardenedSite): its own deadlines.
            if clock is None:
                from twisted.internet import reactor

                clock = reactor
            deadlines = Deadlines(clock, limits.client_timeout)
        self._deadlines = deadlines
        # LineReceiver drops a longer line silently; lineLengthExceeded answers 431.
        self.MAX_LENGTH = limits.max_header_bytes
        # Twisted refuses past it; _respondToBadRequestAndDisconnect makes that a 431.
        self.totalHeadersSize = limits.max_header_bytes

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if not self._receiving and not self._handlingRequest:
            self._receiving = True
            self.started = self._deadlines.start(self)
        # The base class named, not super(): these run for every line of every request,
        # and a super object each time costs more than the checks themselves.
        HTTPChannel.dataReceived(self, data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted counts each line against totalHeadersSize and answers 400 past it: a 431
        # (caught here rather than by a check of every line before Twisted's own).
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, "request headers")
        else:
            HTTPChannel._respondToBadRequestAndDisconnect(self)

    def getPeer(self) -> Any:
        if self._peer_address is None:
            self._peer_address = self.transport.getPeer()  # type: ignore[union-attr]
        return self._peer_address

    def getHost(self) -> Any:
        if self._host_address is None:
            self._host_address = self.transport.getHost()  # type: ignore[union-attr]
        return self._host_address

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, "request headers")

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.limits.max_body_bytes:
            self.refuse(413, "request body")
            return
        HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        if self.refused:
            return
        self._receiving = False
        self._deadlines.stop(self)
        if self._saved_hops is not None:
            self._restore_hops()
        HTTPChannel.allContentReceived(self)

    # --- the idle timeout, without a timer per request --------------------------------

    def setTimeout(self, period: int | None) -> int | None:
        """TimeoutMixin's idle timeout, kept lazily: twisted.web turns it off for each
        request and on again after it (``setTimeout(None)``, ``setTimeout(period)``),
        which cancelled one timer and scheduled another per request (7 % of a
        keep-alive request's instructions).  Here the one timer stays; when it fires it
        closes the connection only if it has been idle for ``timeOut`` seconds, and
        otherwise is set again for the rest."""
        previous = self.timeOut
        self.timeOut = period
        if period is not None:
            now = self._idle_from = self._deadlines.clock.seconds()
            if self._idle_call is None:
                self._idle_call = self._deadlines.clock.callLater(period, self._idle_check)
                self._idle_due = now + period
            elif now + period < self._idle_due:
                # A shorter period than the timer was set for.
                self._idle_call.reset(period)
                self._idle_due = now + period
        return previous

    def resetTimeout(self) -> None:
        """Data came: idleness starts again (nothing to do while the timeout is off)."""
        if self.timeOut is not None:
            self._idle_from = self._deadlines.clock.seconds()

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.timeOut is None:
            return  # answering a request; setTimeout sets the timer again after it
        clock = self._deadlines.clock
        left = self._idle_from + self.timeOut - clock.seconds()
        if left > 0:
            self._idle_call = clock.callLater(left, self._idle_check)
            self._idle_due = self._idle_from + self.timeOut
        else:
            self.timeoutConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None
        self._deadlines.stop(self)
        self._cancel_stall()
        factory = getattr(self, "factory", None)
        if isinstance(factory, HardenedSite):
            factory.closed(self)
        super().connectionLost(reason)

    # --- clients that stop reading ----------------------------------------------------

    def pauseProducing(self) -> None:
        """The transport's buffer is full: the client must take some of it within
        ``write_timeout`` seconds."""
        super().pauseProducing()
        if self._stall is None:
            self._unsent_then = _unsent(self.transport)
            self._stall = self.callLater(self.limits.write_timeout, self._check_stall)

    def resumeProducing(self) -> None:
        """The transport's buffer drained."""
        self._cancel_stall()
        super().resumeProducing()

    def _check_stall(self) -> None:
        self._stall = None
        unsent = _unsent(self.transport)
        if unsent is not None and self._unsent_then is not None and unsent < self._unsent_then:
            # Slow but moving: another period.
            self._unsent_then = unsent
            self._stall = self.callLater(self.limits.write_timeout, self._check_stall)
            return
        REFUSED_CONNECTIONS.labels(self.name, "write stall").inc()
        transport: Any = self.transport
        _log.info(
            "audit: dropped {peer}: took none of its response for {seconds} s",
            peer=_host(transport.getPeer()),
            seconds=self.limits.write_timeout,
        )
        transport.abortConnection()

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with a short text body and close the connection."""
        if self.refused:
            return
        self.refused = True
        self._deadlines.stop(self)
        REFUSED_CONNECTIONS.labels(self.name, reason).inc()
        transport: Any = self.transport
        _log.info(
            "audit: refused {reason} from {peer}: {status}",
            reason=reason,
            peer=_host(transport.getPeer()),
            status=status,
        )
        body = f"{_PHRASES[status]}\n".encode()
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _PHRASES[status].encode(), len(body), body)
        )
        self.loseConnection()

    # --- IP TTL for one response ----------------------------------------------------

    def limit_hops(self, hops: int) -> bool:
        """Send what is written from now on with IP TTL (hop limit) ``hops``, until the
        next request arrives.  False if this transport has no IP socket."""
        sock = _socket_of(self.transport)
        if sock is None:
            return False
        level, option = _hops_option(sock)
        if self._saved_hops is None:
            self._saved_hops = (level, option, sock.getsockopt(level, option))
        sock.setsockopt(level, option, hops)
        if level == socket.IPPROTO_IPV6:
            # An IPv4 client of a dual-stack socket gets IPv4 packets: IP_TTL rules those.
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
            except OSError:
                pass
        return True

    def _restore_hops(self) -> None:
        if self._saved_hops is None:
            return
        level, option, value = self._saved_hops
        self._saved_hops = None
        sock = _socket_of(self.transport)
        if sock is not None:
            try:
                sock.setsockopt(level, option, value)
                if level == socket.IPPROTO_IPV6:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, -1)
            except OSError:
                pass


def _unsent(transport: Any) -> int | None:
    """Bytes written to a TCP transport and not yet taken by the kernel (None when the
    transport does not say, as TLS: then only a drained buffer counts as progress)."""
    buffer = getattr(transport, "dataBuffer", None)
    if not isinstance(buffer, bytes):
        return None
    return (
        len(buffer)
        - int(getattr(transport, "offset", 0))
        + int(getattr(transport, "_tempDataLen", 0))
    )


def _socket_of(transport: Any) -> socket.socket | None:
    try:
        handle = transport.getHandle()
    except Exception:
        return None
    if isinstance(handle, socket.socket) and handle.family in (socket.AF_INET, socket.AF_INET6):
        return handle
    return None


def _hops_option(sock: socket.socket) -> tuple[int, int]:
    if sock.family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
    return socket.IPPROTO_IP, socket.IP_TTL


def _host(address: Any) -> str:
    return str(getattr(address, "host", "") or "")


def _in(host: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(normalise_ip(host))
    except ValueError:
        return False
    return any(address in network for network in networks)


def limit_response_hops(request: Any, hops: int) -> bool:
    """Send ``request``'s response with IP TTL ``hops``, if its channel can."""
    channel = getattr(request, "channel", None)
    if isinstance(channel, HardenedChannel):
        return channel.limit_hops(hops)
    return False


# How long a stopping process waits for the requests it accepted to be answered
# (HardenedSite.drained): the single process's metadata site and each worker's.
DRAIN_SECONDS = 5.0


class HardenedSite(Site):
    """A ``Site`` of :class:`HardenedChannel` connections, capped per source address."""

    requestFactory = HardenedRequest

    def __init__(
        self,
        resource: Any,
        limits: Limits,
        name: str = "",
        access_log: bool = False,
        *,
        exempt: Sequence[IPNetwork] = (),
        forms: bool = False,
        measure: Callable[[bytes, int | None, float], object] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("timeout", limits.idle_timeout)
        # POST bodies are parsed as forms only where a route reads them (``forms``: the
        # admin site's console); the metadata site never does.
        super().__init__(resource, parsePOSTFormSubmission=forms, **kwargs)
        self.limits = limits
        self.name = name
        self.access_log = access_log
        self.displayTracebacks = False
        # ``measure(method, status or None if the caller hung up first, seconds from
        # the request's first byte)`` for every request (telemetry.RequestTally.observe):
        # counted here, where every response ends, rather than by a resource around the
        # site's (one layer and one clock read less per request).
        self._measure = measure
        self._exempt = tuple(exempt)
        self._deadlines = Deadlines(self.reactor, limits.client_timeout)
        # Every open channel (for drained()), and the open connections per source.
        self._channels: set[HardenedChannel] = set()
        self._open: dict[str, int] = {}
        # Sources being refused: logged once when refusing starts, not per connection.
        self._refusing: set[str] = set()

    def protocol(self) -> HardenedChannel:  # type: ignore[override]
        """A new channel (HTTP/1.1 only: no HTTP/2 upgrade for metadata clients)."""
        return HardenedChannel(self.limits, self.name, deadlines=self._deadlines)

    def buildProtocol(self, addr: Any) -> Any:
        """A channel for ``addr``, or None (the connection is closed) past the cap."""
        host = _host(addr)
        if host and self._exempt and _in(host, self._exempt):
            host = ""
        if host and self._open.get(host, 0) >= self.limits.max_connections_per_source:
            REFUSED_CONNECTIONS.labels(self.name, "connections per source").inc()
            if host not in self._refusing and len(self._refusing) < 10_000:
                self._refusing.add(host)
                _log.info(
                    "audit: refusing connections from {peer}: {count} open",
                    peer=host,
                    count=self._open[host],
                )
            return None
        channel = super().buildProtocol(addr)
        self._channels.add(channel)
        if host:
            self._open[host] = self._open.get(host, 0) + 1
            channel._source = host
        return channel

    def closed(self, channel: HardenedChannel) -> None:
        """``channel``'s connection closed."""
        self._channels.discard(channel)
        source, channel._source = channel._source, None
        if source is not None:
            self._refusing.discard(source)
            count = self._open.get(source, 0) - 1
            if count > 0:
                self._open[source] = count
            else:
                self._open.pop(source, None)

    def busy(self) -> int:
        """How many connections have a request being received or answered."""
        return sum(1 for channel in self._channels if channel.requests)

    def drained(self, timeout: float) -> Deferred[None]:
        """Fires once no connection has a request being received or answered (checked
        every 50 ms), or after ``timeout`` seconds: a process that stops answers what
        it accepted first.  Idle keep-alive connections do not count."""
        clock = self._deadlines.clock
        until = clock.seconds() + timeout
        done: Deferred[None] = Deferred()

        def check() -> None:
            if not self.busy() or clock.seconds() >= until:
                done.callback(None)
            else:
                clock.callLater(0.05, check)

        check()
        return done

    def open_connections(self, host: str) -> int:
        """How many connections from ``host`` are open."""
        return self._open.get(host, 0)

    def log(self, request: Any) -> None:
        """Called by twisted.web as each response is finished: measures it; an
        access-log line only when asked for (metrics count requests)."""
        channel = request.channel
        if self._measure is not None and isinstance(channel, HardenedChannel):
            seconds = self._deadlines.clock.seconds() - channel.started
            self._measure(request.method, request.code, seconds)
        if self.access_log:
            super().log(request)

    def measured(self, request: Any, channel: HardenedChannel, code: int | None) -> None:
        """``request`` on ``channel`` ended with ``code`` (None: its caller hung up)."""
        if self._measure is not None:
            seconds = self._deadlines.clock.seconds() - channel.started
            self._measure(request.method, code, seconds)
