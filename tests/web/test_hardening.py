"""The hardened HTTP channel: size limits, slow clients, idle connections, connection
caps per source and the per-response IP TTL.

Channels are driven byte by byte over ``StringTransport`` with a ``Clock``; the IP TTL
is read back from a real socket on loopback.
"""

from __future__ import annotations

import http.client
import socket
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metadatad.hardening import HardenedChannel, HardenedSite, Limits, limit_response_hops

LIMITS = Limits(
    max_header_bytes=1024,
    max_body_bytes=2048,
    client_timeout=10.0,
    idle_timeout=60.0,
    max_connections_per_source=3,
)


class Recorder(Resource):
    """Answers ``ok <body length>``; remembers every request it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Request) -> bytes:
        body = request.content.read() if request.content else b""
        self.seen.append(request.path)
        if request.path == b"/hops":
            limit_response_hops(request, 3)
        return b"ok %d" % len(body)


def connect(
    site: HardenedSite, host: str = "10.0.0.9"
) -> tuple[HardenedChannel, StringTransport] | None:
    address = IPv4Address("TCP", host, 40000)
    channel = site.buildProtocol(address)
    if channel is None:
        return None
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def make(limits: Limits = LIMITS) -> tuple[HardenedSite, Recorder, Clock]:
    clock = Clock()
    resource = Recorder()
    return HardenedSite(resource, limits, "test", reactor=clock), resource, clock


def status_of(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def test_a_normal_request_is_served() -> None:
    """Within the limits nothing changes."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert status_of(transport) == 200
    assert transport.value().endswith(b"ok 5")
    assert resource.seen == [b"/x"]
    assert not transport.disconnecting


class CountingTransport(StringTransport):
    """Counts how often the connection's addresses are asked for (``getHost`` is a
    getsockname() on a real socket)."""

    asked = 0

    def getHost(self) -> Any:
        self.asked += 1
        return super().getHost()

    def getPeer(self) -> Any:
        self.asked += 1
        return super().getPeer()


def test_the_addresses_are_asked_once_per_connection() -> None:
    """Three keep-alive requests: each sees the connection's addresses, which the
    transport was asked for once each."""
    site, _, _ = make()
    peer = IPv4Address("TCP", "10.0.0.9", 40000)
    channel = site.buildProtocol(peer)
    transport = CountingTransport(peerAddress=peer)
    channel.makeConnection(transport)
    seen = []

    class Addresses(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            seen.append((request.getClientAddress(), request.getHost()))
            return b"ok"

    site.resource = Addresses()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
    assert transport.value().count(b"200 OK") == 3
    assert seen == [(peer, transport.getHost())] * 3
    assert transport.asked == 2 + 1  # one each, and the line above


def test_oversize_headers_are_431_and_close() -> None:
    """Many headers past max_header_bytes: 431, closed, the resource never called."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 50) for i in range(30))
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert status_of(transport) == 431
    assert b"Request Header Fields Too Large" in transport.value()
    assert transport.disconnecting
    assert resource.seen == []


def test_lines_after_oversize_headers_are_not_read() -> None:
    """The 431 is the only answer: a request sent behind the oversize one, in the same
    bytes, is not read (Twisted stops reading lines once the connection closes)."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 50) for i in range(30))
    channel.dataReceived(
        b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert transport.value().count(b"HTTP/1.1 ") == 1
    assert status_of(transport) == 431
    assert resource.seen == []


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        # A line longer than the limit, never ended: 431 too (not a silent close).
        (b"GET /" + b"a" * 5000, 431),
        # Other requests Twisted refuses keep its 400 (only the size is a 431).
        (b"NONSENSE\r\nHost: a\r\n\r\n", 400),
    ],
    ids=["endless header line", "bad request line"],
)
def test_a_refused_request_is_answered_and_closed(sent: bytes, status: int) -> None:
    """Refused before any resource sees it: its status, and the connection closes."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(sent)
    assert status_of(transport) == status
    assert transport.disconnecting
    assert resource.seen == []


def test_oversize_content_length_is_413_before_the_body() -> None:
    """A Content-Length past max_body_bytes is 413 without reading the body."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2049\r\n\r\n")
    assert status_of(transport) == 413
    assert transport.disconnecting
    channel.dataReceived(b"x" * 2049)
    assert resource.seen == []
    assert transport.value().count(b"HTTP/1.1") == 1


def test_oversize_chunked_body_is_413_while_reading() -> None:
    """A chunked body is counted as it arrives; past the limit 413, nothing buffered on."""
    site, resource, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        channel.dataReceived(b"400\r\n" + b"y" * 0x400 + b"\r\n")
    channel.dataReceived(b"0\r\n\r\n")
    assert status_of(transport) == 413
    assert transport.disconnecting
    assert resource.seen == []


def test_a_body_at_the_limit_is_served() -> None:
    """Exactly max_body_bytes is allowed."""
    site, _, _ = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\n\r\n" + b"z" * 2048
    )
    assert status_of(transport) == 200
    assert transport.value().endswith(b"ok 2048")


def test_a_slow_client_gets_408_however_it_drips() -> None:
    """Bytes trickling in do not extend the deadline: client_timeout after the first
    byte the request must be complete."""
    site, resource, clock = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"X")
    assert transport.value() == b""
    clock.advance(1)
    assert status_of(transport) == 408
    assert transport.disconnecting
    assert resource.seen == []


def test_the_deadline_is_per_request_not_per_connection() -> None:
    """A keep-alive connection gets a fresh deadline for each request, and none while
    idle (the idle timeout closes it instead)."""
    site, resource, clock = make()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(30)
    assert not transport.disconnecting
    channel.dataReceived(b"GET /2 HTTP/1.1\r\n")
    clock.advance(9)
    channel.dataReceived(b"Host: a\r\n\r\n")
    assert resource.seen == [b"/1", b"/2"]
    assert transport.value().count(b"HTTP/1.1 200") == 2
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting  # idle_timeout


def test_a_later_request_gets_its_own_deadline_from_the_same_timer() -> None:
    """One timer per connection: when it fires for a finished request while a later one
    is being received, that one still gets its full client_timeout; requests on a
    keep-alive connection schedule no timer each."""
    site, resource, clock = make()
    channel, transport = connect(site)  # type: ignore[misc]
    timers = len(clock.getDelayedCalls())
    for i in range(5):
        channel.dataReceived(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
    assert len(clock.getDelayedCalls()) <= timers + 1
    clock.advance(5)
    channel.dataReceived(b"GET /late HTTP/1.1\r\n")
    clock.advance(LIMITS.client_timeout - 0.1)
    assert transport.value().count(b"HTTP/1.1 408") == 0
    clock.advance(0.1)
    assert b"HTTP/1.1 408" in transport.value()
    assert transport.disconnecting
    assert resource.seen == [b"/%d" % i for i in range(5)]


def test_the_deadlines_of_many_connections_share_one_timer() -> None:
    """Requests on separate connections (a boot storm: one connection per request) are
    watched by one timer of the site, and each still gets its full client_timeout from
    its own first byte; a request completed in time, or a connection lost, is left
    alone."""
    site, resource, clock = make()
    hosts = [f"10.0.1.{i}" for i in range(6)]
    connections = [connect(site, host) for host in hosts]
    timers = len(clock.getDelayedCalls())  # the idle timeouts
    started = []
    for i, connection in enumerate(connections):
        channel, transport = connection  # type: ignore[misc]
        channel.dataReceived(b"GET /%d HTTP/1.1\r\n" % i)
        started.append(clock.seconds())
        assert len(clock.getDelayedCalls()) <= timers + 1
        clock.advance(1)
    done, _ = connections[1]  # type: ignore[misc]
    done.dataReceived(b"Host: a\r\n\r\n")
    lost, _ = connections[2]  # type: ignore[misc]
    lost.connectionLost(Failure(ConnectionDone()))
    for i, connection in enumerate(connections):
        channel, transport = connection  # type: ignore[misc]
        if i in (1, 2):
            continue
        clock.advance(started[i] + LIMITS.client_timeout - clock.seconds() - 0.1)
        assert b"408" not in transport.value(), i
        clock.advance(0.1)
        assert status_of(transport) == 408, i
        assert transport.disconnecting
    assert b"HTTP/1.1 200" in connections[1][1].value()  # type: ignore[index]
    assert resource.seen == [b"/1"]
    assert site._deadlines.receiving() == 0


def test_a_channel_without_a_site_keeps_its_own_deadline() -> None:
    """A HardenedChannel made on its own still answers a slow client 408."""
    clock = Clock()
    channel = HardenedChannel(LIMITS, "test", clock)
    channel.callLater = clock.callLater  # type: ignore[method-assign]
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(LIMITS.client_timeout)
    assert status_of(transport) == 408


class Held(Resource):
    """Answers later: each request waits in ``pending`` until the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


def test_the_site_measures_each_request_from_its_first_byte_once() -> None:
    """``measure`` hears each request once: its method, its status as the response
    finishes and the time since its first byte came, or None when the caller hangs up
    first; requests refused by the channel are not requests of the site."""
    clock = Clock()
    held = Held()
    measured: list[tuple[bytes, int | None, float]] = []
    site = HardenedSite(
        held, LIMITS, "test", reactor=clock, measure=lambda *args: measured.append(args)
    )
    channel, _ = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET /a HTTP/1.1\r\n")
    clock.advance(0.25)
    channel.dataReceived(b"Host: a\r\n\r\n")
    first = held.pending[0]
    clock.advance(0.5)
    first.setResponseCode(404)
    first.finish()
    assert measured == [(b"GET", 404, 0.75)]
    clock.advance(3)
    channel.dataReceived(b"PUT /b HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(2)
    channel.connectionLost(Failure(ConnectionDone()))
    assert measured == [(b"GET", 404, 0.75), (b"PUT", None, 2)]
    refused, _ = connect(site)  # type: ignore[misc]
    refused.dataReceived(b"GET /" + b"a" * LIMITS.max_header_bytes + b" HTTP/1.1\r\n\r\n")
    assert len(measured) == 2


def test_connections_per_source_are_capped() -> None:
    """Past the cap a source's connection is refused; others are not; a closed
    connection frees its slot."""
    site, _, _ = make()
    opened = [connect(site, "10.0.0.9") for _ in range(3)]
    assert all(opened)
    assert connect(site, "10.0.0.9") is None
    assert connect(site, "10.0.0.10") is not None
    assert site.open_connections("10.0.0.9") == 3
    channel, _ = opened[0]  # type: ignore[misc]
    channel.connectionLost(None)  # type: ignore[arg-type]
    assert site.open_connections("10.0.0.9") == 2
    assert connect(site, "10.0.0.9") is not None


def test_hop_limit_needs_a_socket() -> None:
    """Over a transport without a socket, limiting hops is a no-op that says so."""
    site, _, _ = make()
    channel, _ = connect(site)  # type: ignore[misc]
    assert channel.limit_hops(1) is False


# --- IP TTL on a real socket ------------------------------------------------------------


def _exchange(port: int, family: int, host: str, probe: Any) -> list[int]:
    """On one keep-alive connection: PUT /hops, probe; GET /after, probe."""
    ttls = []
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for method, path in (("PUT", "/hops"), ("GET", "/after")):
            connection.request(method, path)
            response = connection.getresponse()
            assert response.status == 200
            response.read()
            ttls.append(probe())
    finally:
        connection.close()
    return ttls


@pytest.mark.parametrize(
    ("family", "host", "level", "option"),
    [
        (socket.AF_INET, "127.0.0.1", socket.IPPROTO_IP, socket.IP_TTL),
        (socket.AF_INET6, "::1", socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS),
    ],
)
@pytest_twisted.inlineCallbacks
def test_one_response_leaves_with_the_hop_limit(
    family: int, host: str, level: int, option: int
) -> Any:
    """The server socket carries TTL 3 for the /hops response, and its own default
    again for the next request on the same connection."""
    from twisted.internet import reactor, threads
    from twisted.internet.threads import blockingCallFromThread

    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    channels: list[HardenedChannel] = []

    class Watching(HardenedSite):
        def buildProtocol(self, addr: Any) -> Any:
            channel = super().buildProtocol(addr)
            channels.append(channel)
            return channel

    site = Watching(Recorder(), LIMITS, "test")
    try:
        port = reactor.listenTCP(0, site, interface=host)  # type: ignore[attr-defined]
    except Exception as e:  # no ::1 configured
        pytest.skip(f"cannot listen on {host}: {e}")
    default = socket.socket(family, socket.SOCK_STREAM)
    expected_default = default.getsockopt(level, option)
    default.close()

    def probe() -> int:
        return int(
            blockingCallFromThread(
                reactor, lambda: channels[0].transport.getHandle().getsockopt(level, option)
            )
        )

    try:
        ttls = yield threads.deferToThread(_exchange, port.getHost().port, family, host, probe)
    finally:
        yield port.stopListening()
    assert ttls == [3, expected_default]
    assert threading.current_thread() is threading.main_thread()


def test_exempt_sources_are_not_capped_and_refusals_are_logged_once() -> None:
    """A trusted proxy speaks for many machines: no cap.  A capped source is logged once
    until one of its connections closes."""
    import ipaddress

    from twisted.logger import capturedLogs

    site = HardenedSite(
        Recorder(), LIMITS, "test", exempt=[ipaddress.ip_network("10.9.0.0/16")], reactor=Clock()
    )
    assert all(connect(site, "10.9.1.1") for _ in range(10))
    held = [connect(site, "10.0.0.9") for _ in range(3)]
    with capturedLogs() as events:
        assert [connect(site, "10.0.0.9") for _ in range(5)] == [None] * 5
        channel, _ = held[0]  # type: ignore[misc]
        channel.connectionLost(None)  # type: ignore[arg-type]
        assert connect(site, "10.0.0.9") is not None
        assert connect(site, "10.0.0.9") is None
    refusals = [e for e in events if e.get("log_namespace") == "metadatad.audit"]
    assert [e["peer"] for e in refusals] == ["10.0.0.9", "10.0.0.9"]


class BufferingTransport(StringTransport):
    """A StringTransport that shows a send buffer the way Twisted's TCP transport does
    (``dataBuffer``, ``offset``, ``_tempDataLen``), and records an abort."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


def stalled(limits: Limits = LIMITS) -> tuple[HardenedChannel, BufferingTransport, Clock]:
    """A channel whose transport just reported a full send buffer of 1 MB."""
    site, _, clock = make(limits)
    address = IPv4Address("TCP", "10.0.0.9", 40000)
    channel = site.buildProtocol(address)
    transport = BufferingTransport(address)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    transport.dataBuffer = b"x" * 1_000_000
    channel.pauseProducing()
    return channel, transport, clock


def test_a_client_that_stops_reading_is_dropped() -> None:
    """None of a pending response taken for write_timeout seconds: the connection is
    aborted (not closed gracefully, which would wait for the buffer for ever)."""
    _, transport, clock = stalled()
    clock.advance(LIMITS.write_timeout - 0.1)
    assert not transport.aborted
    clock.advance(0.1)
    assert transport.aborted


def test_a_slow_reader_that_keeps_reading_is_not_dropped() -> None:
    """Each period in which the kernel took some of the response earns another."""
    _, transport, clock = stalled()
    for _ in range(5):
        transport.offset += 1000
        clock.advance(LIMITS.write_timeout)
        assert not transport.aborted
    clock.advance(LIMITS.write_timeout)
    assert transport.aborted


def test_a_drained_buffer_cancels_the_stall_timer() -> None:
    """The transport resuming its producer (buffer sent) ends the watch."""
    channel, transport, clock = stalled()
    transport.dataBuffer = b""
    channel.resumeProducing()
    clock.advance(10 * LIMITS.write_timeout)
    assert not transport.aborted


def test_requests_on_a_keep_alive_connection_schedule_no_idle_timer_each() -> None:
    """The idle timeout keeps one timer per connection across requests (twisted.web turns
    it off and on for each); it still closes the connection idle_timeout seconds after
    the last request was answered."""
    site, _, clock = make()
    channel, transport = connect(site)  # type: ignore[misc]

    def channel_timers() -> list[Any]:
        return [c for c in clock.getDelayedCalls() if getattr(c.func, "__self__", None) is channel]

    timers = channel_timers()
    assert len(timers) == 1
    for i in range(5):
        channel.dataReceived(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        clock.advance(5)
        assert channel_timers() == timers
    assert transport.value().count(b"HTTP/1.1 200") == 5
    clock.advance(LIMITS.idle_timeout - 5 - 0.5)
    assert not transport.disconnecting
    clock.advance(0.5)
    assert transport.disconnecting


def test_the_idle_timer_goes_with_the_connection_and_follows_a_shorter_period() -> None:
    """A lost connection leaves no idle timer behind; a shorter period set while the
    timer is pending takes effect at once."""
    site, _, clock = make()
    before = set(clock.getDelayedCalls())
    channel, _ = connect(site)  # type: ignore[misc]
    assert len(set(clock.getDelayedCalls()) - before) == 1
    channel.connectionLost(Failure(ConnectionDone()))
    assert set(clock.getDelayedCalls()) == before
    other, other_transport = connect(site)  # type: ignore[misc]
    clock.advance(10)
    other.setTimeout(5)
    clock.advance(4.9)
    assert not other_transport.disconnecting
    clock.advance(0.1)
    assert other_transport.disconnecting


def test_a_content_type_twisted_cannot_parse_is_a_bad_request_on_a_form_site() -> None:
    """On a site that parses POST forms (the admin console), a Content-Type that
    twisted.web's parser raises on (U+0085 reads as a line break to the email package;
    found by fuzzing) is answered 400 and the connection closed; nothing is rendered and
    no failure is logged."""
    clock = Clock()
    resource = Recorder()
    site = HardenedSite(resource, LIMITS, "test", forms=True, reactor=clock)
    channel, transport = connect(site)  # type: ignore[misc]
    with capturedLogs() as events:
        channel.dataReceived(
            b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Type: \x85\x01\r\n"
            b"Content-Length: 1\r\n\r\nx"
        )
    assert status_of(transport) == 400
    assert transport.disconnecting
    assert resource.seen == []
    assert not [e for e in events if "log_failure" in e]


def test_drained_waits_for_requests_in_progress_not_for_idle_connections() -> None:
    """A stopping process first answers what it accepted: drained() fires once no
    connection has a request being received or answered (idle keep-alive connections do
    not count), or after its time-out."""
    clock = Clock()
    held = Held()
    site = HardenedSite(held, LIMITS, "test", reactor=clock)
    _idle, _ = connect(site)  # type: ignore[misc]
    answering, transport = connect(site, "10.0.0.2")  # type: ignore[misc]
    receiving, _ = connect(site, "10.0.0.3")  # type: ignore[misc]
    answering.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    receiving.dataReceived(b"GET /b HTTP/1.1\r\n")
    assert site.busy() == 2
    drained = site.drained(5)
    clock.advance(1)
    assert not drained.called
    held.pending[0].finish()
    receiving.connectionLost(Failure(ConnectionDone()))
    assert site.busy() == 0
    clock.advance(0.05)
    assert drained.called
    assert b"HTTP/1.1 200" in transport.value()
    answering.dataReceived(b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
    bounded = site.drained(5)
    clock.advance(4.99)
    assert not bounded.called
    clock.advance(0.05)
    assert bounded.called
