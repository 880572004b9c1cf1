"""Sans-IO TFTP protocol: codec, negotiation, sources and the read-session state machine.

The session is driven with literal ``now`` values and an in-test client model, so loss,
duplication and timeouts are exact and nothing sleeps.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metadatad.tftp.protocol import (
    Ack,
    BytesSource,
    Data,
    Error,
    ErrorCode,
    FileSource,
    MalformedPacket,
    NetasciiSource,
    OAck,
    Opcode,
    Outcome,
    Output,
    ReadSession,
    Request,
    RequestRefused,
    SessionConfig,
    TFTPError,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
    error_reply,
    negotiate,
    parse_packet,
    parse_request,
    unknown_tid_reply,
)

# ----------------------------------------------------------------------------- helpers


def rrq(name: str = "pxelinux.0", mode: str = "octet", **options: str) -> Request:
    return parse_request(encode_request(Opcode.RRQ, name, mode, options))


def session_for(
    data: bytes,
    options: dict[str, str] | None = None,
    *,
    mode: str = "octet",
    config: SessionConfig | None = None,
    **more: str,
) -> ReadSession:
    request = rrq(mode=mode, **(options or {}), **more)
    return ReadSession(request, BytesSource(data), config or SessionConfig())


def decode(datagrams: Sequence[bytes]) -> list[Data | OAck]:
    packets = [parse_packet(d) for d in datagrams]
    assert all(isinstance(p, Data | OAck) for p in packets)
    return packets  # type: ignore[return-value]


def blocks(out: Output) -> list[int]:
    return [p.block for p in decode(out.datagrams) if isinstance(p, Data)]


MAX_STEPS = 200_000  # loop guard: a broken session fails a test instead of hanging it


class Client:
    """A well-behaved RFC 1350/7440 receiver: ACK 0 for an OACK, ACK at the end of each
    window or the final block, and on a gap ACK the last block received in order."""

    def __init__(self, blksize: int = 512, windowsize: int = 1) -> None:
        self.blksize = blksize
        self.windowsize = windowsize
        self.expected = 1  # logical
        self.in_window = 0
        self.data = bytearray()
        self.done = False
        self.wire_blocks: list[int] = []

    def feed(self, datagrams: Sequence[bytes]) -> list[bytes]:
        acks: list[bytes] = []
        for datagram in datagrams:
            packet = parse_packet(datagram)
            if isinstance(packet, OAck):
                self.blksize = int(packet.options.get("blksize", self.blksize))
                self.windowsize = int(packet.options.get("windowsize", self.windowsize))
                acks.append(encode_ack(0))
                continue
            assert isinstance(packet, Data)
            if packet.block != self.expected & 0xFFFF:
                acks.append(encode_ack(self.expected - 1))
                self.in_window = 0
                continue
            self.wire_blocks.append(packet.block)
            self.data += packet.payload
            self.expected += 1
            self.in_window += 1
            if len(packet.payload) < self.blksize:
                self.done = True
                acks.append(encode_ack(packet.block))
            elif self.in_window == self.windowsize:
                acks.append(encode_ack(packet.block))
                self.in_window = 0
        return acks


def run(session: ReadSession, client: Client | None = None, now: float = 100.0) -> Client:
    """Lossless transfer; returns the client with what it received."""
    client = client or Client()
    out = session.start(now)
    steps = 0
    while not out.finished:
        steps += 1
        assert steps < MAX_STEPS, "transfer does not end"
        acks = client.feed(out.datagrams)
        assert acks, "server stalled with nothing to acknowledge"
        for ack in acks:
            out = session.receive(ack, now)
    assert client.done
    return client


class PatternSource:
    """Lazily generated content: byte i is i % 251. Big files cost no memory."""

    _pattern = bytes(range(251)) * ((65536 // 251) + 2)

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        start = offset % 251
        return self._pattern[start : start + length]


# ----------------------------------------------------------------------------- codec


def test_parse_rrq_lowercases_mode_and_option_names_keeping_order() -> None:
    raw = b"\x00\x01pxelinux.0\x00OCTET\x00TSize\x000\x00BLKSIZE\x001408\x00"
    request = parse_request(raw)
    assert request == Request(Opcode.RRQ, "pxelinux.0", "octet", {"tsize": "0", "blksize": "1408"})
    assert list(request.options) == ["tsize", "blksize"]


def test_duplicate_option_first_occurrence_wins() -> None:
    raw = b"\x00\x01f\x00octet\x00blksize\x001024\x00BlkSize\x0065464\x00"
    assert parse_request(raw).options == {"blksize": "1024"}


def test_nul_padding_and_dangling_option_name_are_ignored() -> None:
    assert parse_request(b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00\x00").options == {
        "tsize": "0"
    }
    assert parse_request(b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00").options == {
        "tsize": "0"
    }


def test_option_with_non_printable_bytes_is_dropped_not_fatal() -> None:
    raw = b"\x00\x01f\x00octet\x00x\xff\x001\x00blksize\x001024\x00"
    assert parse_request(raw).options == {"blksize": "1024"}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01", ErrorCode.ILLEGAL_OPERATION),  # no file name at all
        (b"\x00\x01file", ErrorCode.ILLEGAL_OPERATION),  # unterminated file name
        (b"\x00\x01file\x00", ErrorCode.ILLEGAL_OPERATION),  # no mode
        (b"\x00\x01file\x00octet", ErrorCode.ILLEGAL_OPERATION),  # unterminated mode
        (b"\x00\x01file\x00octet\x00blksize\x00512", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01\x00octet\x00", ErrorCode.ILLEGAL_OPERATION),  # empty file name
        (b"\x00\x01file\x00binary\x00", ErrorCode.ILLEGAL_OPERATION),  # bad mode
        (b"\x00\x01file\x00oct\xe9t\x00", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01fi\x01le\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
        (b"\x00\x01fi\x7fle\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
        (b"\x00\x01f\xc3\xa9\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
        (b"\x00\x01" + b"a" * 504 + b"\x00octet\x00", ErrorCode.ILLEGAL_OPERATION),  # 513 B
        (b"\x00\x00\x00\x00", ErrorCode.ILLEGAL_OPERATION),  # opcode 0
        (b"\x00\x07\x00\x01", ErrorCode.ILLEGAL_OPERATION),  # unknown opcode
        (b"\xff\xff\x00\x01", ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x03\x00", ErrorCode.ILLEGAL_OPERATION),  # truncated DATA
        (b"\x00\x04\x00", ErrorCode.ILLEGAL_OPERATION),  # truncated ACK
        (b"\x00\x05\x00", ErrorCode.ILLEGAL_OPERATION),  # truncated ERROR
        (b"\x00\x06blksize\x00512", ErrorCode.ILLEGAL_OPERATION),  # unterminated OACK
    ],
)
def test_malformed_packets_raise_malformed_packet_with_code(raw: bytes, code: int) -> None:
    with pytest.raises(MalformedPacket) as info:
        parse_packet(raw)
    assert info.value.code == code
    assert info.value.message
    assert parse_packet(info.value.packet) == Error(code, info.value.message)


def test_largest_legal_request_is_accepted() -> None:
    raw = b"\x00\x01" + b"a" * 503 + b"\x00octet\x00"
    assert len(raw) == 512
    assert parse_request(raw).filename == "a" * 503


def test_lenient_packets() -> None:
    assert parse_packet(b"\x00\x04\x00\x07junk") == Ack(7)
    assert parse_packet(b"\x00\x05\x00\x08User aborted") == Error(8, "User aborted")
    assert parse_packet(b"\x00\x05\x00\x00bad\xff\nmsg\x00tail") == Error(0, "bad??msg")
    assert parse_packet(b"\x00\x03\x00\x01") == Data(1, b"")


@given(st.binary(max_size=600))
@settings(max_examples=2000)
def test_fuzz_parse_packet_raises_only_malformed_packet(raw: bytes) -> None:
    try:
        packet = parse_packet(raw)
    except MalformedPacket as exc:
        assert isinstance(exc.code, int) and exc.message
        return
    assert isinstance(packet, Request | Data | Ack | Error | OAck)


@given(st.binary(max_size=64).map(lambda b: b"\x00\x01" + b))
@settings(max_examples=1000)
def test_fuzz_requests_raise_only_tftp_errors(raw: bytes) -> None:
    try:
        request = parse_request(raw)
    except TFTPError as exc:
        assert 0 <= exc.code <= 8
        return
    assert request.filename and request.mode in {"octet", "netascii"}
    assert all(0x20 <= ord(c) < 0x7F for c in request.filename)


_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)


@given(
    st.sampled_from([Opcode.RRQ, Opcode.WRQ]),
    _text,
    st.sampled_from(["octet", "netascii", "mail"]),
    st.dictionaries(_text.map(str.lower), _text, max_size=4),
)
def test_request_round_trip(opcode: Opcode, name: str, mode: str, options: dict[str, str]) -> None:
    request = Request(opcode, name, mode, options)
    assert parse_packet(request.encode()) == request


@given(st.integers(0, 0xFFFF), st.binary(max_size=1500), st.integers(0, 0xFFFF), _text)
def test_data_ack_error_oack_round_trip(block: int, payload: bytes, code: int, text: str) -> None:
    for packet in (Data(block, payload), Ack(block), Error(code, text), OAck({"tsize": text})):
        assert parse_packet(packet.encode()) == packet


def test_encoders_wrap_block_numbers_and_clean_messages() -> None:
    assert encode_data(65536 + 3, b"x") == b"\x00\x03\x00\x03x"
    assert encode_ack(65536) == b"\x00\x04\x00\x00"
    assert encode_error(1, "no\x00such \xe9file\n") == b"\x00\x05\x00\x01no?such ?file?\x00"
    assert encode_oack({"blksize": "1432"}) == b"\x00\x06blksize\x001432\x00"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (encode_request(Opcode.WRQ, "upload"), "write requests are not supported"),
        (encode_request(Opcode.RRQ, "f", "MAIL"), "mail mode is not supported"),
        (encode_ack(1), "expected a read request"),
        (encode_data(1, b"x"), "expected a read request"),
    ],
)
def test_parse_request_refuses_with_error_4(raw: bytes, message: str) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_request(raw)
    assert info.value.code == 4
    assert info.value.message == message
    assert error_reply(raw, info.value.code, info.value.message) == info.value.packet


def test_error_reply_never_answers_an_error() -> None:
    raw = encode_error(0, "whatever")
    with pytest.raises(RequestRefused) as info:
        parse_request(raw)
    assert error_reply(raw, info.value.code, info.value.message) is None
    assert unknown_tid_reply(raw) is None


def test_unknown_tid_reply_is_error_5() -> None:
    assert parse_packet(unknown_tid_reply(encode_ack(3)) or b"") == Error(5, "unknown transfer ID")
    assert unknown_tid_reply(b"") is not None  # even garbage from a stranger gets told


# ----------------------------------------------------------------------------- negotiation


def test_no_options_means_data_block_1_at_once() -> None:
    session = session_for(b"x" * 700)
    out = session.start(10.0)
    assert decode(out.datagrams) == [Data(1, b"x" * 512)]
    assert out.deadline == 11.0
    assert session.options.oack == {}


@pytest.mark.parametrize(
    ("options", "oack", "blksize", "windowsize", "first_deadline"),
    [
        ({"blksize": "1024"}, {"blksize": "1024"}, 1024, 1, 1.0),
        ({"tsize": "0"}, {"tsize": "3000"}, 512, 1, 1.0),
        ({"timeout": "5"}, {"timeout": "5"}, 512, 1, 5.0),
        ({"windowsize": "8"}, {"windowsize": "8"}, 512, 8, 1.0),
        (
            {"tsize": "0", "timeout": "3", "windowsize": "4", "blksize": "1432"},
            {"tsize": "3000", "timeout": "3", "windowsize": "4", "blksize": "1432"},
            1432,
            4,
            3.0,
        ),
        ({"blksize": "8"}, {"blksize": "8"}, 8, 1, 1.0),
        ({"blksize": "65464"}, {"blksize": "1468"}, 1468, 1, 1.0),  # capped
        ({"blksize": "0512"}, {"blksize": "512"}, 512, 1, 1.0),
        ({"windowsize": "65535"}, {"windowsize": "64"}, 512, 64, 1.0),  # capped
        ({"timeout": "255"}, {"timeout": "255"}, 512, 1, 255.0),
        ({"multicast": "", "blksize": "1024"}, {"blksize": "1024"}, 1024, 1, 1.0),
    ],
)
def test_option_matrix(
    options: dict[str, str],
    oack: dict[str, str],
    blksize: int,
    windowsize: int,
    first_deadline: float,
) -> None:
    session = session_for(b"y" * 3000, options)
    out = session.start(0.0)
    assert decode(out.datagrams) == [OAck(oack)]
    assert list(parse_packet(out.datagrams[0]).options) == list(oack)  # type: ignore[union-attr]
    assert out.deadline == first_deadline
    assert (session.options.blksize, session.options.windowsize) == (blksize, windowsize)
    out = session.receive(encode_ack(0), 1.0)
    payloads = [p.payload for p in decode(out.datagrams) if isinstance(p, Data)]
    assert len(payloads) == min(windowsize, 3000 // blksize + 1)
    assert all(len(p) == min(blksize, 3000 - i * blksize) for i, p in enumerate(payloads))
    assert run_rest(session, out) == b"y" * 3000


def run_rest(session: ReadSession, out: Output) -> bytes:
    client = Client(session.options.blksize, session.options.windowsize)
    for _ in range(MAX_STEPS):
        if out.finished:
            break
        acks = client.feed(out.datagrams)
        assert acks, "server stalled with nothing to acknowledge"
        for ack in acks:
            out = session.receive(ack, 2.0)
    assert session.outcome is Outcome.COMPLETE
    return bytes(client.data)


@pytest.mark.parametrize(
    "options",
    [
        {"blksize": "7"},
        {"blksize": "65465"},
        {"blksize": "-1"},
        {"blksize": "1_000"},
        {"blksize": " 512"},
        {"blksize": "abc"},
        {"blksize": ""},
        {"timeout": "0"},
        {"timeout": "256"},
        {"timeout": "1.5"},
        {"windowsize": "0"},
        {"windowsize": "65536"},
        {"tsize": "x"},
        {"tsize": "-5"},
        {"rollover": "0"},
        {"blksize": "9" * 30},
    ],
)
def test_out_of_range_or_unknown_options_are_ignored(options: dict[str, str]) -> None:
    session = session_for(b"z" * 600, options)
    out = session.start(0.0)
    assert decode(out.datagrams) == [Data(1, b"z" * 512)]  # nothing accepted: no OACK
    assert out.deadline == 1.0


def test_out_of_range_option_ignored_while_others_are_acknowledged() -> None:
    out = session_for(b"", blksize="100000", tsize="0", windowsize="0").start(0.0)
    assert decode(out.datagrams) == [OAck({"tsize": "0"})]


def test_configured_caps() -> None:
    config = SessionConfig(max_blksize=1024, max_windowsize=16)
    result = negotiate({"blksize": "1468", "windowsize": "32"}, 5, config)
    assert result.oack == {"blksize": "1024", "windowsize": "16"}
    assert negotiate({"blksize": "600"}, 5, config).blksize == 600


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_blksize": 7},
        {"max_blksize": 65465},
        {"max_windowsize": 0},
        {"max_windowsize": 32768},
        {"timeout": 0},
        {"max_timeout": -1},
        {"retries": -1},
    ],
)
def test_session_config_rejects_bad_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SessionConfig(**kwargs)  # type: ignore[arg-type]


def test_tsize_exact_for_rendered_bytes() -> None:
    rendered = b"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n"
    session = session_for(rendered, tsize="0", blksize="1408")
    out = session.start(0.0)
    assert decode(out.datagrams) == [OAck({"tsize": str(len(rendered)), "blksize": "1408"})]
    assert run_rest(session, session.receive(encode_ack(0), 0.1)) == rendered


def test_netascii_tsize_is_the_converted_size_and_content_is_converted() -> None:
    text = b"line one\nbare\rcrlf\r\n\n"
    converted = b"line one\r\nbare\r\0crlf\r\0\r\n\r\n"
    session = session_for(text, mode="netascii", tsize="0", blksize="8")
    out = session.start(0.0)
    assert decode(out.datagrams) == [OAck({"tsize": str(len(converted)), "blksize": "8"})]
    assert session.size == len(converted)
    assert run_rest(session, session.receive(encode_ack(0), 0.1)) == converted


def test_mode_is_case_insensitive() -> None:
    assert rrq(mode="NetASCII").mode == "netascii"
    assert rrq(mode="Octet").mode == "octet"


# ----------------------------------------------------------------------------- transfers


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 1536, 5000])
@pytest.mark.parametrize("windowsize", [None, "1", "3", "16"])
def test_lossless_transfer_sizes(size: int, windowsize: str | None) -> None:
    data = os.urandom(size)
    options = {"windowsize": windowsize} if windowsize else {}
    session = session_for(data, options)
    client = run(session)
    assert bytes(client.data) == data
    # The last block is short; a size that is a multiple of blksize ends with an empty one.
    assert client.wire_blocks == list(range(1, size // 512 + 2))
    assert session.outcome is Outcome.COMPLETE
    assert session.bytes_sent == size
    assert session.started_at == session.ended_at == 100.0
    assert session.retransmits == 0


def test_zero_length_file_is_one_empty_data_block() -> None:
    session = session_for(b"")
    out = session.start(0.0)
    assert decode(out.datagrams) == [Data(1, b"")]
    out = session.receive(encode_ack(1), 0.5)
    assert out == Output((), None)
    assert session.outcome is Outcome.COMPLETE and session.ended_at == 0.5


def test_exact_multiple_of_blksize_ends_with_empty_block() -> None:
    session = session_for(b"a" * 1024)
    assert blocks(session.start(0.0)) == [1]
    assert blocks(session.receive(encode_ack(1), 0.1)) == [2]
    out = session.receive(encode_ack(2), 0.2)
    assert decode(out.datagrams) == [Data(3, b"")]
    assert not session.finished
    assert session.receive(encode_ack(3), 0.3).finished


def test_lost_data_is_retransmitted_on_timeout_with_backoff() -> None:
    config = SessionConfig(timeout=1.0, max_timeout=4.0, retries=10)
    session = session_for(b"q" * 2000, config=config)
    first = session.start(0.0)
    assert first.deadline == 1.0
    # An early timer (lazy glue timers) does nothing.
    assert session.timeout(0.5) == Output((), 1.0)
    deadlines = []
    now = 1.0
    for _ in range(4):
        out = session.timeout(now)
        assert out.datagrams == first.datagrams  # same DATA 1 again
        deadlines.append(out.deadline)
        assert out.deadline is not None
        now = out.deadline
    assert deadlines == [3.0, 7.0, 11.0, 15.0]  # rto 2, 4, then capped at 4
    assert session.retransmits == 4
    # The client finally gets it: progress resets the backoff.
    out = session.receive(encode_ack(1), 15.5)
    assert blocks(out) == [2] and out.deadline == 16.5


def test_lost_ack_means_retransmit_then_the_re_ack_moves_on() -> None:
    session = session_for(b"r" * 1000)
    session.start(0.0)
    # The client's ACK 1 is lost: our timer fires and DATA 1 goes again.
    out = session.timeout(1.0)
    assert blocks(out) == [1]
    # The client answers the duplicate DATA with ACK 1 again, which is progress for us.
    out = session.receive(encode_ack(1), 1.1)
    assert blocks(out) == [2]
    assert session.receive(encode_ack(2), 1.2).finished


def test_duplicate_ack_sends_nothing_and_keeps_the_deadline() -> None:
    session = session_for(b"s" * 2000)
    session.start(0.0)
    out = session.receive(encode_ack(1), 0.2)
    assert blocks(out) == [2] and out.deadline == 1.2
    # DATA 2 is lost; the client keeps re-ACKing block 1 (Sorcerer's Apprentice bait).
    for now in (0.5, 0.9, 1.1):
        assert session.receive(encode_ack(1), now) == Output((), 1.2)
    # Only the timer resends, on schedule despite the duplicates.
    assert blocks(session.timeout(1.2)) == [2]
    assert session.packets_sent == 3


def test_stale_and_future_acks_are_ignored() -> None:
    session = session_for(b"t" * 5000, windowsize="2")
    session.start(0.0)
    out = session.receive(encode_ack(0), 0.1)
    assert blocks(out) == [1, 2]
    assert session.receive(encode_ack(5), 0.2) == Output((), 1.1)  # not sent yet
    assert session.receive(encode_ack(0), 0.3) == Output((), 1.1)  # duplicate of OACK ACK
    assert session.receive(encode_ack(40000), 0.3) == Output((), 1.1)


def test_lost_oack_is_retransmitted_and_ack_0_starts_data() -> None:
    session = session_for(b"u" * 100, tsize="0")
    first = session.start(0.0)
    assert session.receive(encode_ack(1), 0.5) == Output((), 1.0)  # no DATA sent yet
    out = session.timeout(1.0)
    assert out.datagrams == first.datagrams and out.deadline == 3.0
    out = session.receive(encode_ack(0), 1.5)
    assert decode(out.datagrams) == [Data(1, b"u" * 100)]
    assert out.deadline == 2.5


def test_gives_up_after_retry_cap() -> None:
    config = SessionConfig(timeout=2.0, max_timeout=60.0, retries=3)
    session = session_for(b"v" * 100, config=config)
    out = session.start(50.0)
    times = []
    for _ in range(10):  # bounded, so a missing cap fails instead of hanging
        if out.finished:
            break
        assert out.deadline is not None
        times.append(out.deadline)
        out = session.timeout(out.deadline)
    assert times == [52.0, 56.0, 64.0, 80.0]
    assert out == Output((), None)
    assert session.outcome is Outcome.TIMEOUT
    assert (session.started_at, session.ended_at) == (50.0, 80.0)
    assert session.retransmits == 3 and session.packets_sent == 4
    assert session.bytes_sent == 0 and session.sent_all  # one block, never ACKed
    # A finished session stays finished and quiet.
    assert session.timeout(1000.0) == Output((), None)
    assert session.receive(encode_ack(1), 1000.0) == Output((), None)
    assert session.outcome is Outcome.TIMEOUT


def test_gives_up_while_waiting_for_oack_ack() -> None:
    session = session_for(b"w", config=SessionConfig(retries=0), tsize="0")
    session.start(0.0)
    assert session.timeout(1.0).finished
    assert session.outcome is Outcome.TIMEOUT


def test_timeout_option_sets_the_retransmit_base() -> None:
    session = session_for(b"x" * 600, timeout="5", config=SessionConfig(max_timeout=8.0))
    assert session.start(0.0).deadline == 5.0
    assert session.receive(encode_ack(0), 1.0).deadline == 6.0
    assert session.timeout(6.0).deadline == 14.0  # 2 * 5, capped by max_timeout 8
    # A ceiling below the client's timeout never retransmits faster than it asked.
    session = session_for(b"x" * 600, timeout="5", config=SessionConfig(max_timeout=2.0))
    session.start(0.0)
    assert session.timeout(5.0).deadline == 10.0


def test_uefi_tsize_probe_ends_with_client_error_8() -> None:
    session = session_for(b"x" * 4096, tsize="0", blksize="1468")
    out = session.start(0.0)
    assert decode(out.datagrams) == [OAck({"tsize": "4096", "blksize": "1468"})]
    out = session.receive(encode_error(8, "User aborted the transfer"), 0.01)
    assert out == Output((), None)
    assert session.outcome is Outcome.CLIENT_ERROR
    assert session.error == Error(8, "User aborted the transfer")
    assert session.bytes_sent == 0 and session.ended_at == 0.01


def test_client_error_mid_transfer_ends_the_session() -> None:
    session = session_for(b"x" * 5000)
    session.start(0.0)
    session.receive(encode_ack(1), 0.1)
    out = session.receive(b"\x00\x05\x00\x00closed", 0.2)  # GRUB, unterminated message
    assert out.finished and session.outcome is Outcome.CLIENT_ERROR
    assert session.error == Error(0, "closed")
    assert session.bytes_sent == 512 and not session.sent_all


def test_error_after_completion_is_ignored() -> None:
    session = session_for(b"x")
    session.start(0.0)
    session.receive(encode_ack(1), 0.1)
    assert session.receive(encode_error(0, "No error, file close"), 0.2) == Output((), None)
    assert session.outcome is Outcome.COMPLETE


def test_abort_sends_error_and_ends() -> None:
    session = session_for(b"x" * 5000)
    session.start(0.0)
    out = session.abort(3.0, ErrorCode.NOT_DEFINED, "server shutting down")
    assert decode_error(out) == Error(0, "server shutting down")
    assert out.deadline is None
    assert session.outcome is Outcome.ABORTED and session.ended_at == 3.0
    assert session.abort(4.0) == Output((), None)


def decode_error(out: Output) -> Error:
    (packet,) = [parse_packet(d) for d in out.datagrams]
    assert isinstance(packet, Error)
    return packet


def test_other_packets_from_the_client_are_ignored() -> None:
    session = session_for(b"x" * 5000)
    session.start(0.0)
    for junk in (
        b"",
        b"\x00",
        b"\x00\x04\x00",
        encode_data(1, b"x"),
        encode_request(Opcode.RRQ, "f"),
        encode_request(Opcode.WRQ, "f"),
        encode_oack({"a": "b"}),
        b"\x01\x04\x00\x01",
    ):
        assert session.receive(junk, 0.5) == Output((), 1.0)
    assert not session.finished


def test_window_of_four() -> None:
    data = os.urandom(512 * 9 + 100)  # 10 blocks
    session = session_for(data, windowsize="4")
    session.start(0.0)
    out = session.receive(encode_ack(0), 0.1)
    assert blocks(out) == [1, 2, 3, 4] and out.deadline == 1.1
    assert blocks(session.receive(encode_ack(4), 0.2)) == [5, 6, 7, 8]
    out = session.receive(encode_ack(8), 0.3)
    assert decode(out.datagrams) == [Data(9, data[4096:4608]), Data(10, data[4608:])]
    assert session.receive(encode_ack(10), 0.4).finished
    assert session.outcome is Outcome.COMPLETE and session.bytes_sent == len(data)


def test_window_rewinds_to_the_block_after_an_earlier_ack() -> None:
    session = session_for(b"x" * 512 * 20, windowsize="4")
    session.start(0.0)
    session.receive(encode_ack(0), 0.1)  # 1..4 out; 3 gets lost
    out = session.receive(encode_ack(2), 0.2)
    assert blocks(out) == [3, 4, 5, 6]
    assert session.bytes_sent == 1024
    # A late ACK of the old window end (4) is still progress inside the new window.
    assert blocks(session.receive(encode_ack(4), 0.3)) == [5, 6, 7, 8]


def test_window_timeout_retransmits_from_last_ack() -> None:
    session = session_for(b"x" * 512 * 20, windowsize="4")
    session.start(0.0)
    session.receive(encode_ack(0), 0.1)
    session.receive(encode_ack(4), 0.2)  # 5..8 out, all lost
    out = session.timeout(1.2)
    assert blocks(out) == [5, 6, 7, 8] and out.deadline == 3.2
    assert session.retransmits == 4


def test_final_window_may_be_short_and_timeout_resends_only_unacked() -> None:
    session = session_for(b"x" * 512 * 5, windowsize="4")  # 6 blocks, last empty
    session.start(0.0)
    session.receive(encode_ack(0), 0.1)
    out = session.receive(encode_ack(4), 0.2)
    assert blocks(out) == [5, 6]
    assert blocks(session.timeout(1.2)) == [5, 6]
    assert blocks(session.receive(encode_ack(5), 1.3)) == [6]
    assert session.receive(encode_ack(6), 1.4).finished


@pytest.mark.parametrize(
    ("loss", "windowsize"),
    [({3, 4, 10}, "1"), ({2, 7, 8, 30}, "4"), ({5, 6, 7, 8, 9}, "8")],
)
def test_lossy_transfer_delivers_everything(loss: set[int], windowsize: str) -> None:
    """Drop chosen DATA transmissions (by send index) and check the bytes still arrive."""
    data = os.urandom(512 * 12 + 7)
    session = session_for(data, windowsize=windowsize)
    client = run_lossy(session, loss)
    assert bytes(client.data) == data
    assert session.outcome is Outcome.COMPLETE


def run_lossy(session: ReadSession, loss: set[int]) -> Client:
    """Play ``Client`` against ``session``, dropping the DATA transmissions whose send
    index (1-based) is in ``loss``; timeouts come from the session's deadlines."""
    client = Client()
    now = 0.0
    out = session.start(now)
    sent = 0
    for _ in range(MAX_STEPS):
        if out.finished:
            break
        delivered = []
        for datagram in out.datagrams:
            sent += 1
            if sent not in loss:
                delivered.append(datagram)
        acks = client.feed(delivered)
        if not acks:
            assert out.deadline is not None
            now = out.deadline
            out = session.timeout(now)
            continue
        for ack in acks:
            out = session.receive(ack, now)
    return client


def test_wraparound_over_32_mib_lock_step() -> None:
    size = 32 * 1024 * 1024 + 1000  # 65538 blocks of 512 (the last one short)
    session = ReadSession(rrq(), PatternSource(size))
    out = session.start(0.0)
    expected = 1
    seen_zero = False
    pattern = PatternSource(size)
    for _ in range(MAX_STEPS):
        if out.finished:
            break
        (datagram,) = out.datagrams
        block = (datagram[2] << 8) | datagram[3]
        assert block == expected & 0xFFFF
        offset = (expected - 1) * 512
        assert datagram[4:] == pattern.read(offset, 512)
        if block == 0:
            seen_zero = True
            # A late duplicate ACK 65535 right after the wrap: ignored, no error.
            assert session.receive(encode_ack(65535), 0.0) == Output((), 1.0)
        expected += 1
        out = session.receive(b"\x00\x04" + datagram[2:4], 0.0)
    assert seen_zero
    assert expected - 1 == size // 512 + 1 == 65538
    assert session.outcome is Outcome.COMPLETE and session.bytes_sent == size


def test_wraparound_with_window_straddling_the_wrap() -> None:
    size = 512 * 65540  # exact multiple: ends with an empty block 65541 (wire 5)
    session = ReadSession(rrq(windowsize="7"), PatternSource(size))
    client = run(session, Client())
    assert len(client.data) == size
    assert client.wire_blocks[65534:65538] == [65535, 0, 1, 2]
    assert client.wire_blocks[-1] == 65541 & 0xFFFF
    assert session.outcome is Outcome.COMPLETE


# ----------------------------------------------------------------------------- sources


class FlakySource:
    def __init__(self, size: int, fail_at: int, exc: Exception | None) -> None:
        self.size = size
        self.fail_at = fail_at
        self.exc = exc

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.fail_at:
            if self.exc is not None:
                raise self.exc
            return b"short"
        return b"x" * min(length, self.size - offset)


@pytest.mark.parametrize(
    ("exc", "message"),
    [(OSError(5, "EIO"), "read error"), (None, "file changed during transfer")],
)
def test_source_failure_aborts_with_error_0(exc: Exception | None, message: str) -> None:
    session = ReadSession(rrq(), FlakySource(5000, 512, exc))
    session.start(0.0)
    out = session.receive(encode_ack(1), 0.1)
    assert decode_error(out) == Error(0, message)
    assert out.finished and session.outcome is Outcome.ABORTED
    assert session.error == Error(0, message)


def test_file_source(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "boot.bin")
    data = os.urandom(3000)
    with open(path, "wb") as f:
        f.write(data)
    with FileSource.open(path) as source:
        assert source.size == 3000
        assert source.read(2990, 512) == data[2990:]
        session = ReadSession(rrq(tsize="0", blksize="1468"), source)
        out = session.start(0.0)
        assert decode(out.datagrams) == [OAck({"tsize": "3000", "blksize": "1468"})]
        assert run_rest(session, session.receive(encode_ack(0), 0.0)) == data
    with open(path, "rb") as f:
        source = FileSource(f)
        assert source.read(0, 4) == data[:4]
        source.close()
        assert f.closed


def test_file_source_reads_in_chunks_and_serves_rewinds(tmp_path: os.PathLike[str]) -> None:
    """Blocks are slices of a chunk read ahead; a rewind (a retransmitted window) or a
    read past the chunk reads again, and every read returns the file's bytes."""
    path = os.path.join(tmp_path, "boot.bin")
    data = os.urandom(10_000)
    with open(path, "wb") as f:
        f.write(data)
    with FileSource(os.open(path, os.O_RDONLY), chunk=3000) as source:
        for offset, length in [(0, 512), (512, 512), (2900, 512), (100, 700), (9800, 512),
                               (0, 10_000), (9999, 1), (10_000, 512)]:
            assert bytes(source.read(offset, length)) == data[offset : offset + length]
        # Losses make windows restart before the chunk held: reads rewind.
        session = ReadSession(rrq(windowsize="4", blksize="700"), source)
        client = run_lossy(session, {3, 9, 10, 11})
        assert bytes(client.data) == data
        assert session.retransmits > 0


def test_file_truncated_during_transfer_aborts_it(tmp_path: os.PathLike[str]) -> None:
    """The file shrinks under a running transfer: ERROR 0, not a short file that looks
    complete and not a crash."""
    path = os.path.join(tmp_path, "boot.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    with FileSource.open(path) as source:
        session = ReadSession(rrq(), source)
        session.start(0.0)
        os.truncate(path, 200_000)
        out = Output((), 0.0)
        for block in range(1, 2049):
            out = session.receive(encode_ack(block), 0.0)
            if out.finished:
                break
        (error,) = out.datagrams
        assert parse_packet(error) == Error(0, "file changed during transfer")
        assert session.outcome is Outcome.ABORTED


def test_file_source_refuses_directories_fifos_and_symlinks(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(IsADirectoryError):
        FileSource.open(tmp_path)
    fifo = os.path.join(tmp_path, "fifo")
    os.mkfifo(fifo)
    with pytest.raises(PermissionError):
        FileSource.open(fifo)  # and does not block waiting for a writer
    target = os.path.join(tmp_path, "target")
    open(target, "wb").close()
    link = os.path.join(tmp_path, "link")
    os.symlink(target, link)
    with pytest.raises(OSError):
        FileSource.open(link)
    with pytest.raises(FileNotFoundError):
        FileSource.open(os.path.join(tmp_path, "missing"))


def test_bytes_source_reads_are_views() -> None:
    source = BytesSource(b"abcdef")
    assert source.size == 6
    assert bytes(source.read(4, 512)) == b"ef"
    assert bytes(source.read(6, 512)) == b""


@given(
    st.binary(max_size=3000).map(lambda b: b.replace(b"a", b"\n").replace(b"b", b"\r")),
    st.integers(1, 700),
    st.lists(st.tuples(st.integers(0, 7000), st.integers(0, 600)), max_size=20),
)
@settings(max_examples=300)
def test_netascii_source_matches_whole_conversion(
    data: bytes, chunk: int, reads: list[tuple[int, int]]
) -> None:
    converted = data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    source = NetasciiSource(BytesSource(data), chunk=chunk, keep=chunk)
    assert source.size == len(converted)
    for offset, length in reads:  # arbitrary order: forward, rewinds, past the end
        assert source.read(offset, length) == converted[offset : offset + length]


# ----------------------------------------------------------------------------- robustness


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.integers(0, 0xFFFF).map(encode_ack),
            st.builds(
                lambda b, p: b"\x00" + bytes([b]) + p, st.integers(0, 8), st.binary(max_size=8)
            ),
        ),
        max_size=30,
    ),
    st.sampled_from([{}, {"tsize": "0"}, {"windowsize": "4", "blksize": "8"}]),
)
@settings(max_examples=500)
def test_garbage_never_crashes_or_leaks_a_session(
    datagrams: list[bytes], options: dict[str, str]
) -> None:
    config = SessionConfig(retries=3)
    session = session_for(b"x" * 100, options, config=config)
    out = session.start(0.0)
    now = 0.0
    for datagram in datagrams:
        now += 0.01
        out = session.receive(datagram, now)
        assert all(isinstance(d, bytes) for d in out.datagrams)
    # Whatever happened, the session ends on its own within the retry budget.
    for _ in range(config.retries + 1):
        if out.finished:
            break
        assert out.deadline is not None
        now = max(now, out.deadline)
        out = session.timeout(now)
    assert session.finished and session.outcome is not None
    assert session.ended_at is not None


def test_driving_errors_are_programming_errors() -> None:
    session = session_for(b"x")
    with pytest.raises(RuntimeError):
        session.receive(encode_ack(1), 0.0)
    with pytest.raises(RuntimeError):
        session.timeout(0.0)
    session.start(0.0)
    with pytest.raises(RuntimeError):
        session.start(0.0)


def test_header_layout_matches_rfc_1350() -> None:
    assert struct.unpack(">HH", encode_data(7, b"")) == (Opcode.DATA, 7)
    assert (
        encode_request(Opcode.RRQ, "f", "octet", {"tsize": "0"})
        == b"\x00\x01f\x00octet\x00tsize\x000\x00"
    )
