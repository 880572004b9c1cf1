"""The TFTP UDP glue with a fake clock and fake sockets: caps, TIDs, broadcasts,
malformed packets, full socket buffers, shutdown and boot events."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from metadatad.core.records import NodeRecord
from metadatad.db.bootevents import BootEvent
from metadatad.db.cache import CacheEntry
from metadatad.tftp.bootconfig import BootFiles, Templates
from metadatad.tftp.listening import PktinfoPort, TFTPListener, TFTPService
from metadatad.tftp.protocol import (
    Ack,
    Data,
    Error,
    ErrorCode,
    OAck,
    Opcode,
    encode_ack,
    encode_error,
    encode_request,
    parse_packet,
)
from metadatad.tftp.server import TFTPServer
from tests.support.factories import make_node

CLIENT = ("10.0.0.5", 40000)
LOCAL = "10.0.0.1"
MAC = "52:54:00:12:00:00"


class FakeSocket:
    """A transfer's sockets, demultiplexed like the kernel does: ``send``/``recv`` is the
    side connected to the client, ``stray`` gets every other sender's datagrams.
    ``sent`` records (datagram, destination) from both; ``full_after`` makes sends fail."""

    def __init__(self, local: str, number: int, client: tuple[str, int]) -> None:
        self.local = local
        self.number = number
        self.client = client
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False
        self.full_after: int | None = None
        self.inbox: list[tuple[bytes, tuple[str, int]]] = []
        self.stray = FakeStraySocket(self)

    def fileno(self) -> int:
        return 1000 + self.number

    def send(self, data: bytes) -> int:
        if self.full_after is not None and len(self.sent) >= self.full_after:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        self.sent.append((bytes(data), self.client))
        return len(data)

    def take(self, from_client: bool) -> tuple[bytes, tuple[str, int]]:
        for i, (_data, addr) in enumerate(self.inbox):
            if (addr == self.client) == from_client:
                return self.inbox.pop(i)
        raise BlockingIOError(errno.EAGAIN, "again")

    def recv(self, size: int) -> bytes:
        return self.take(True)[0][:size]

    def close(self) -> None:
        self.closed = True


class FakeStraySocket:
    """The unconnected sibling of a :class:`FakeSocket`."""

    def __init__(self, sock: FakeSocket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return 2000 + self.sock.number

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        data, addr = self.sock.take(False)
        return data[:size], addr

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sock.sent.append((bytes(data), addr))
        return len(data)


class FakeReactor(Clock):
    """task.Clock plus reader registration."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


class Replies:
    """The listener side: what was answered from port 69."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int], str]] = []

    def reply(self, datagram: bytes, addr: tuple[str, int], local: str) -> None:
        self.sent.append((datagram, addr, local))


class Lookup:
    """NodeLookup over dicts; ``deferred`` makes every lookup wait for ``release``."""

    def __init__(self, records: list[NodeRecord]) -> None:
        self.records = records
        self.deferred = False
        self.waiting: list[tuple[Deferred[CacheEntry], CacheEntry]] = []

    def _answer(self, record: NodeRecord | None) -> Any:
        entry = CacheEntry(record, float("inf"))
        if not self.deferred:
            return entry
        d: Deferred[CacheEntry] = Deferred()
        self.waiting.append((d, entry))
        return d

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, entry in waiting:
            d.callback(entry)

    def by_mac(self, mac: str) -> Any:
        found = [r for r in self.records if any(p.mac == mac for p in r.node.ports)]
        return self._answer(found[0] if found else None)

    def by_ip(self, ip: str) -> Any:
        found = [r for r in self.records if ip in r.node.ips]
        return self._answer(found[0] if found else None)

    def by_uuid(self, uuid: str) -> Any:
        found = [r for r in self.records if r.node.uuid == uuid]
        return self._answer(found[0] if found else None)


def record_of(node: Any) -> NodeRecord:
    from datetime import datetime

    moment = datetime(2026, 1, 1)
    return NodeRecord(node=node, revision=1, created_at=moment, updated_at=moment)


class Harness:
    """A server over a temporary root with a fake reactor and fake sockets."""

    def __init__(self, tmp_path: Path, **kwargs: Any) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir()
        (self.root / "small.bin").write_bytes(b"x" * 1000)
        (self.root / "big.bin").write_bytes(bytes(range(256)) * 400)  # 102400 bytes
        templates = tmp_path / "templates"
        templates.mkdir()
        (templates / "pxelinux.tmpl").write_text("kernel $uuid/kernel\n# $mac\n")
        self.reactor = FakeReactor()
        self.reactor.advance(1_800_000_000)
        node = make_node(0, ports=[{"mac": MAC, "ip": CLIENT[0], "pxe": True}])
        self.node = node
        self.lookup = Lookup([record_of(node)])
        self.owned = True
        self.files = BootFiles(
            self.root, Templates(templates), self.lookup, lambda uuid: self.owned
        )
        self.sockets: list[FakeSocket] = []
        self.events: list[BootEvent] = []
        self.replies = Replies()
        self.server = TFTPServer(
            self.files,
            self.reactor,
            record=self.events.append,
            open_socket=self._open,
            conductor="c1",
            **kwargs,
        )

    def _open(self, local: str, client: tuple[str, int]) -> FakeSocket:
        sock = FakeSocket(local, len(self.sockets), client)
        self.sockets.append(sock)
        return sock

    def request(
        self,
        name: str = "small.bin",
        client: tuple[str, int] = CLIENT,
        dest: str | None = None,
        mode: str = "octet",
        **options: str,
    ) -> None:
        datagram = encode_request(Opcode.RRQ, name, mode, options)
        self.server.request_received(datagram, client, LOCAL, self.replies, dest)

    def transfer_of(self, sock: FakeSocket) -> Any:
        return next(t for t in self.server.transfers.values() if t.socket is sock)

    def feed(self, sock: FakeSocket, data: bytes, addr: tuple[str, int] = CLIENT) -> None:
        sock.inbox.append((data, addr))
        for reader in list(self.reactor.readers):
            if reader.socket in (sock, sock.stray):
                reader.doRead()


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def packets(sock: FakeSocket) -> list[Any]:
    return [parse_packet(d) for d, _ in sock.sent]


def download(h: Harness, sock: FakeSocket, blksize: int = 512) -> bytes:
    """Play a lossless lock-step client against ``sock`` until the last block."""
    data = bytearray()
    seen = 0
    client = h.transfer_of(sock).client
    while True:
        new = [d for d, addr in sock.sent[seen:] if addr == client]
        assert new, "server sent nothing"
        seen = len(sock.sent)
        packet = parse_packet(new[-1])
        if isinstance(packet, OAck):
            blksize = int(packet.options.get("blksize", blksize))
            h.feed(sock, encode_ack(0), client)
            continue
        assert isinstance(packet, Data)
        data += packet.payload
        h.feed(sock, encode_ack(packet.block), client)
        if len(packet.payload) < blksize:
            return bytes(data)


# --------------------------------------------------------------------------- transfers


def test_static_file_lock_step_and_event(harness: Harness) -> None:
    """A plain RRQ: DATA 1 at once from a socket bound to the contacted address; the
    whole file arrives, the socket is closed and a boot event names the node."""
    harness.request("small.bin")
    sock = harness.sockets[0]
    assert sock.local == LOCAL
    assert sock.sent[0][1] == CLIENT
    assert download(harness, sock) == b"x" * 1000
    assert sock.closed
    assert harness.server.active == 0
    assert not harness.reactor.readers
    assert not harness.reactor.getDelayedCalls()
    (event,) = harness.events
    assert event.node_uuid == harness.node.uuid
    assert (event.kind, event.outcome, event.bytes_sent, event.size) == (
        "static", "complete", 1000, 1000,
    )
    assert event.conductor == "c1"
    assert event.server == LOCAL
    assert harness.server.counters["transfers_complete"] == 1
    assert harness.server.counters["bytes_sent"] == 1000


def test_rendered_config_has_exact_tsize(harness: Harness) -> None:
    """A pxelinux name renders the node's template once; tsize equals the bytes sent."""
    harness.request("pxelinux.cfg/01-52-54-00-12-00-00", tsize="0", blksize="1408")
    sock = harness.sockets[0]
    oack = packets(sock)[0]
    assert isinstance(oack, OAck)
    body = download(harness, sock)
    assert body == f"kernel {harness.node.uuid}/kernel\n# {MAC}\n".encode()
    assert int(oack.options["tsize"]) == len(body)
    assert harness.events[0].kind == "pxelinux"


def test_not_owned_gets_fast_not_found_from_the_listener(harness: Harness) -> None:
    """A node of another conductor: ERROR 1 at once, no transfer socket, an event."""
    harness.owned = False
    harness.request("pxelinux.cfg/01-52-54-00-12-00-00")
    assert not harness.sockets
    ((datagram, addr, local),) = harness.replies.sent
    assert parse_packet(datagram) == Error(ErrorCode.FILE_NOT_FOUND, "file not found")
    assert (addr, local) == (CLIENT, LOCAL)
    assert harness.events[0].outcome == "not-owned"
    assert harness.events[0].kind == "pxelinux"
    assert harness.server.active == 0


def test_missing_file_of_unknown_machine_is_not_an_event(harness: Harness) -> None:
    """ERROR 1; a machine no node has does not add a boot event (only counters)."""
    harness.request("nothing", client=("10.9.9.9", 1234))
    assert parse_packet(harness.replies.sent[0][0]).code == ErrorCode.FILE_NOT_FOUND
    assert harness.events == []
    assert harness.server.counters["not_found"] == 1


def test_write_request_and_garbage_are_answered_from_the_listener(harness: Harness) -> None:
    """WRQ -> ERROR 4, garbage -> ERROR 4, an ERROR is never answered; nothing leaks."""
    server = harness.server
    server.request_received(
        encode_request(Opcode.WRQ, "f"), CLIENT, LOCAL, harness.replies
    )
    server.request_received(b"\x00\x09junk", CLIENT, LOCAL, harness.replies)
    server.request_received(encode_error(0, "x"), CLIENT, LOCAL, harness.replies)
    codes = [parse_packet(d).code for d, _, _ in harness.replies.sent]
    assert codes == [ErrorCode.ILLEGAL_OPERATION, ErrorCode.ILLEGAL_OPERATION]
    assert server.active == 0 and not harness.sockets


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_malformed_requests_never_crash_or_leak(tmp_path_factory: Any, raw: bytes) -> None:
    """Any bytes at the listener: no exception, and no session left behind unless the
    bytes were a readable request (whose transfer then times out and is cleaned)."""
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    h.server.request_received(raw, CLIENT, LOCAL, h.replies)
    h.reactor.pump([10] * 12)
    assert h.server.active == 0
    assert not h.reactor.readers
    assert all(s.closed for s in h.sockets)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_garbage_on_a_transfer_socket_never_crashes_or_leaks(
    tmp_path_factory: Any, datagrams: list[bytes]
) -> None:
    """Random datagrams from the client mid-transfer: it completes or times out."""
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    h.request("big.bin")
    sock = h.sockets[0]
    for datagram in datagrams:
        h.feed(sock, datagram)
    h.reactor.pump([10] * 12)
    assert h.server.active == 0
    assert sock.closed


def test_unknown_tid_gets_error_5_and_the_transfer_goes_on(harness: Harness) -> None:
    """A packet from another port: ERROR 5 to that sender, session untouched."""
    harness.request("small.bin")
    sock = harness.sockets[0]
    stranger = (CLIENT[0], CLIENT[1] + 1)
    harness.feed(sock, encode_ack(1), stranger)
    assert sock.sent[-1] == (encode_error(5, "unknown transfer ID"), stranger)
    harness.feed(sock, encode_error(0, "go away"), ("10.0.0.77", 69))  # never answered
    assert len(sock.sent) == 2
    assert download(harness, sock) == b"x" * 1000
    assert harness.server.counters["unknown_tid"] == 2
    assert harness.events[0].outcome == "complete"


def test_broadcast_requests_are_dropped(harness: Harness) -> None:
    """A request whose destination is not the local unicast address gets nothing."""
    harness.request("small.bin", dest="10.0.0.255")
    harness.request("small.bin", dest="255.255.255.255")
    assert not harness.sockets and not harness.replies.sent
    assert harness.server.counters["dropped_broadcast"] == 2
    harness.request("small.bin", dest=LOCAL)
    assert len(harness.sockets) == 1


def test_per_source_cap(tmp_path: Path) -> None:
    """Over the per-source cap requests are dropped silently; others still served;
    when a transfer ends its slot is free again."""
    h = Harness(tmp_path, max_transfers_per_source=2)
    for port in (1, 2, 3):
        h.request("small.bin", client=(CLIENT[0], port))
    assert len(h.sockets) == 2
    assert h.server.counters["dropped_busy"] == 1
    assert not h.replies.sent
    h.request("small.bin", client=("10.0.0.6", 1))
    assert len(h.sockets) == 3
    download(h, h.sockets[0])
    h.request("small.bin", client=(CLIENT[0], 4))
    assert len(h.sockets) == 4


def test_global_cap(tmp_path: Path) -> None:
    """The global cap counts every source."""
    h = Harness(tmp_path, max_transfers=3)
    for i in range(5):
        h.request("small.bin", client=(f"10.0.1.{i}", 1))
    assert len(h.sockets) == 3
    assert h.server.counters["dropped_busy"] == 2


def test_pending_lookups_count_towards_the_caps(tmp_path: Path) -> None:
    """A request waiting for its node lookup holds its slot; then it is served."""
    h = Harness(tmp_path, max_transfers=1)
    h.lookup.deferred = True
    h.request("pxelinux.cfg/01-52-54-00-12-00-00")
    h.request("small.bin", client=("10.0.0.9", 1))
    assert h.server.counters["dropped_busy"] == 1
    assert not h.sockets
    h.lookup.release()
    assert len(h.sockets) == 1
    assert download(h, h.sockets[0]).startswith(b"kernel ")


def test_retransmitted_request_is_ignored_while_its_transfer_runs(harness: Harness) -> None:
    """The same RRQ again from the same port: no second transfer (the session
    retransmits on its own); from a new port (UEFI probe then download): a new one."""
    harness.request("small.bin", tsize="0")
    harness.request("small.bin", tsize="0")
    assert len(harness.sockets) == 1
    assert harness.server.counters["duplicate_requests"] == 1
    harness.feed(harness.sockets[0], encode_error(8, "User aborted the transfer"))
    assert harness.events[0].outcome == "client-error"
    harness.request("small.bin", client=(CLIENT[0], CLIENT[1] + 1), tsize="0")
    assert len(harness.sockets) == 2


def test_full_socket_buffer_drops_the_rest_of_the_window(harness: Harness) -> None:
    """ENOBUFS after 3 of 8 blocks: the window stops there, the timeout resends from
    the last ACK, and the transfer completes."""
    harness.request("big.bin", windowsize="8")
    sock = harness.sockets[0]
    h = harness
    h.feed(sock, encode_ack(0))  # accept the OACK
    sent_before = len(sock.sent)
    sock.full_after = sent_before + 3
    h.feed(sock, encode_ack(0))  # duplicate: nothing
    assert len(sock.sent) == sent_before
    # Force a window: the first one went out before full_after was set; ACK it.
    h.feed(sock, encode_ack(8))
    assert len(sock.sent) == sent_before + 3
    assert h.server.counters["send_buffer_full"] == 1
    sock.full_after = None
    h.reactor.advance(1.0)  # retransmit from block 9
    assert parse_packet(sock.sent[sent_before + 3][0]) == Data(9, bytes(range(256)) * 2)
    assert h.server.active == 1


def test_timeout_ends_the_transfer_and_records_it(harness: Harness) -> None:
    """A client that vanishes: retransmissions with backoff, then a timeout event."""
    harness.request("small.bin")
    sock = harness.sockets[0]
    harness.reactor.pump([1, 2, 4, 8, 10, 10, 10])
    assert len(sock.sent) == 6  # first send + 5 retries
    assert sock.closed
    assert harness.events[0].outcome == "timeout"
    assert harness.server.counters["transfers_timeout"] == 1


def test_stop_aborts_running_transfers_with_an_error(harness: Harness) -> None:
    """Shutdown: every client gets ERROR 0 now; later requests are ignored."""
    harness.request("big.bin")
    harness.lookup.deferred = True
    harness.request("pxelinux.cfg/01-52-54-00-12-00-00", client=("10.0.0.5", 2))
    sock = harness.sockets[0]
    harness.server.stop()
    assert parse_packet(sock.sent[-1][0]) == Error(0, "server shutting down")
    assert sock.closed
    harness.lookup.release()  # the pending one is closed, never started
    assert len(harness.sockets) == 1
    assert harness.server.active == 0
    harness.request("small.bin", client=("10.0.0.5", 3))
    assert len(harness.sockets) == 1


def test_socket_failure_is_error_0(harness: Harness) -> None:
    """No socket on the contacted address (it went away): ERROR 0 from the listener."""

    def fail(local: str, client: tuple[str, int]) -> Any:
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")

    harness.server._open_socket = fail
    harness.request("small.bin")
    assert parse_packet(harness.replies.sent[0][0]).code == 0
    assert harness.server.active == 0


def test_failing_lookup_is_error_0_and_logged(harness: Harness) -> None:
    """A database failure in the node lookup: ERROR 0, not a hang."""
    harness.lookup.deferred = True
    harness.request("pxelinux.cfg/01-52-54-00-12-00-00")
    d, _ = harness.lookup.waiting.pop()
    d.errback(ConnectionError("database unreachable"))
    assert parse_packet(harness.replies.sent[0][0]).code == 0
    assert harness.server.active == 0


def test_ack_path_does_not_touch_the_timer(harness: Harness) -> None:
    """Progress moves the deadline later without rescheduling: one DelayedCall."""
    harness.request("big.bin")
    sock = harness.sockets[0]
    calls = harness.reactor.getDelayedCalls()
    assert len(calls) == 1
    first = calls[0]
    for block in range(1, 20):
        harness.feed(sock, encode_ack(block))
    assert harness.reactor.getDelayedCalls() == [first]
    harness.reactor.advance(1.0)  # fires early, re-arms for the real deadline
    assert len(harness.reactor.getDelayedCalls()) == 1
    assert isinstance(packets(sock)[-1], Data)


# --------------------------------------------------------------------------- listeners


def test_service_names_and_real_loopback_listener(tmp_path: Path) -> None:
    """TFTPService is "tftp" with a child per address; listeners bind in
    privilegedStartService and release the port on stop."""
    from twisted.internet import reactor

    h = Harness(tmp_path)
    service = TFTPService(h.server, [("127.0.0.1", 0)], reactor)
    assert service.name == "tftp"
    (listener,) = service.listeners
    assert listener.name == "tftp-127.0.0.1:0"
    service.privilegedStartService()
    try:
        host, port = listener.address
        assert host == "127.0.0.1" and port > 0
    finally:
        service.startService()
        d = service.stopService()
    assert listener.listening is None
    assert d is not None


class SelectReactor:
    """Just enough reactor for a Port driven by hand."""

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass

    def callLater(self, *args: Any) -> None:
        pass


def test_wildcard_listener_reads_the_destination_address(tmp_path: Path) -> None:
    """On 0.0.0.0 the request's destination comes from IP_PKTINFO: the transfer socket
    is bound to it, and replies leave from it."""
    h = Harness(tmp_path)
    opened: list[str] = []

    def open_socket(local: str, client: tuple[str, int]) -> FakeSocket:
        opened.append(local)
        return h._open(local, client)

    h.server._open_socket = open_socket
    listener = TFTPListener(h.server, "0.0.0.0", 0, SelectReactor())
    listener._listen()
    port: PktinfoPort = listener.listening
    try:
        number = port.getHost().port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.sendto(encode_request(Opcode.RRQ, "nothing"), ("127.0.0.2", number))
            client.sendto(encode_request(Opcode.RRQ, "small.bin"), ("127.0.0.3", number))
            import select

            select.select([port.socket], [], [], 5)
            port.doRead()
            client.settimeout(5)
            error, source = client.recvfrom(100)
            assert parse_packet(error).code == ErrorCode.FILE_NOT_FOUND
            assert source == ("127.0.0.2", number)
        assert opened == ["127.0.0.3"]
    finally:
        port.stopListening()


def test_pktinfo_broadcast_rule() -> None:
    """Broadcast when the header destination differs from the local address."""
    from metadatad.tftp.server import _is_broadcast

    assert _is_broadcast("10.0.0.255", "10.0.0.1")
    assert _is_broadcast("255.255.255.255", "10.0.0.1")
    assert not _is_broadcast("10.0.0.1", "10.0.0.1")


def test_ack_helpers_are_well_formed() -> None:
    """Sanity: the helpers above speak RFC 1350."""
    assert parse_packet(encode_ack(3)) == Ack(3)




def test_transfer_socket_demultiplexes_client_and_strangers() -> None:
    """Real loopback sockets: the client's datagrams reach the connected socket, a
    stranger's (even from the client's address) reach the sibling on the same port,
    and replies from either leave from that one port."""
    import select

    from metadatad.tftp.transfers import TransferSocket

    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
    ):
        client.bind(("127.0.0.1", 0))
        stranger.bind(("127.0.0.1", 0))
        client.settimeout(5)
        stranger.settimeout(5)
        sock = TransferSocket("127.0.0.1", client.getsockname())
        try:
            port = sock.getsockname()
            assert sock.stray.getsockname() == port
            sock.send(b"\x00\x03\x00\x01hello")
            data, source = client.recvfrom(100)
            assert (data, source) == (b"\x00\x03\x00\x01hello", port)
            stranger.sendto(encode_ack(7), port)
            client.sendto(encode_ack(1), port)
            select.select([sock, sock.stray], [], [], 5)
            select.select([sock.stray], [], [], 5)
            assert sock.recv(1024) == encode_ack(1)
            data, source = sock.stray.recvfrom(1024)
            assert (data, source) == (encode_ack(7), stranger.getsockname())
            with pytest.raises(BlockingIOError):
                sock.recv(1024)
            sock.stray.sendto(encode_error(5, "unknown transfer ID"), source)
            assert stranger.recvfrom(100) == (encode_error(5, "unknown transfer ID"), port)
        finally:
            sock.close()
        assert sock.fileno() == -1 and sock.stray.fileno() == -1


def test_transfer_sockets_never_share_a_port() -> None:
    """Port 0 with SO_REUSEPORT set may be given a port another reuse group holds;
    TransferSocket binds first and joins the group after, so every transfer has a
    port of its own."""
    from metadatad.tftp.transfers import TransferSocket

    client = ("127.0.0.1", 9)
    socks = [TransferSocket("127.0.0.1", client) for _ in range(2000)]
    try:
        ports = [s.getsockname()[1] for s in socks]
        assert len(set(ports)) == len(ports)
    finally:
        for s in socks:
            s.close()
