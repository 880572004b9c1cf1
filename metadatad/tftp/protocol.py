"""Sans-IO TFTP: packet codec, data sources and the read-transfer state machine.

RFC 1350 with option negotiation (RFC 2347), blksize (RFC 2348), timeout and tsize
(RFC 2349) and windowsize (RFC 7440). Read-only: a WRQ is refused with error 4.
Nothing here touches a socket, the reactor or a clock; every method that needs the
time takes ``now`` (seconds, any monotonic origin).

How the UDP glue drives it
--------------------------
A datagram on a listening port (69):
  1. Drop it silently if it was sent to a broadcast address (RFC 1123 4.2.3.5); only
     the glue can know that.
  2. ``request = parse_request(datagram)``. On ``TFTPError as e`` send
     ``error_reply(datagram, e.code, e.message)`` back unless it is None (never answer an
     ERROR packet: two hosts would ping-pong errors forever).
  3. Turn ``request.filename`` into a source (``paths.normalize`` / ``paths.resolve``,
     ``FileSource.open`` or a rendered ``BytesSource``); map lookup failures to ERROR 1/2.
  4. ``session = ReadSession(request, source, config)``; ``out = session.start(now)``,
     sent from a fresh socket bound to the address the client contacted.
A datagram on the transfer socket from the client's (address, port):
  ``out = session.receive(datagram, now)``.
A datagram on the transfer socket from any other (address, port):
  send ``unknown_tid_reply(datagram)`` (if not None) to that sender and do NOT touch the
  session: RFC 1350 §4 says it is the one error that must not disturb the transfer.
The timer: ``out = session.timeout(now)``. Calling it early is harmless (it returns no
datagrams and the current deadline), so the glue may keep one lazy timer per session.

Every call returns an ``Output``: send ``out.datagrams`` in order to the client, then if
``out.deadline`` is None the session is over (close the socket and the source, record
``session.outcome``, ``bytes_sent``, ``started_at``/``ended_at``); otherwise arm the
timer for ``out.deadline``. If a send fails with EAGAIN/ENOBUFS, drop the rest of the
batch: the timeout retransmits it.
"""

from __future__ import annotations

import enum
import os
import re
import stat
import struct
from collections.abc import Mapping, Sequence
from typing import BinaryIO, Final, NamedTuple, Protocol, Self

import attrs

__all__ = [
    "DEFAULT_CONFIG",
    "Ack",
    "BytesSource",
    "Data",
    "Error",
    "ErrorCode",
    "FileSource",
    "MalformedPacket",
    "Negotiation",
    "NetasciiSource",
    "OAck",
    "Opcode",
    "Outcome",
    "Output",
    "Packet",
    "ReadSession",
    "Request",
    "RequestRefused",
    "SessionConfig",
    "Source",
    "TFTPError",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_oack",
    "encode_request",
    "error_reply",
    "negotiate",
    "parse_packet",
    "parse_request",
    "unknown_tid_reply",
]


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_NEGOTIATION = 8


DEFAULT_BLKSIZE: Final = 512
MIN_BLKSIZE: Final = 8
MAX_BLKSIZE: Final = 65464  # RFC 2348
MAX_REQUEST: Final = 512  # RFC 2347: "The maximum size of a request packet is 512 octets"
MODES: Final = frozenset({"netascii", "octet", "mail"})

_HEADER = struct.Struct(">HH")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
_PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


# --------------------------------------------------------------------------- errors


class TFTPError(Exception):
    """A condition answered with a TFTP ERROR packet carrying ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"TFTP error {self.code}: {self.message}"

    @property
    def packet(self) -> bytes:
        """The ERROR packet to send for this condition."""
        return encode_error(self.code, self.message)


class MalformedPacket(TFTPError):
    """The datagram is not a well-formed TFTP packet (the only exception the codec raises)."""


class RequestRefused(TFTPError):
    """A well-formed packet at the request port that this read-only server will not serve."""


# --------------------------------------------------------------------------- packets


@attrs.frozen
class Request:
    """RRQ or WRQ. ``mode`` is lower case; ``options`` has lower-case names in request
    order, and when the client repeats an option the first occurrence wins."""

    opcode: Opcode
    filename: str
    mode: str = "octet"
    options: dict[str, str] = attrs.field(factory=dict, hash=False)

    def encode(self) -> bytes:
        return encode_request(self.opcode, self.filename, self.mode, self.options)


@attrs.frozen
class Data:
    block: int  # 16-bit wire number
    payload: bytes

    def encode(self) -> bytes:
        return encode_data(self.block, self.payload)


@attrs.frozen
class Ack:
    block: int

    def encode(self) -> bytes:
        return encode_ack(self.block)


@attrs.frozen
class Error:
    code: int
    message: str

    def encode(self) -> bytes:
        return encode_error(self.code, self.message)


@attrs.frozen
class OAck:
    options: dict[str, str] = attrs.field(hash=False)

    def encode(self) -> bytes:
        return encode_oack(self.options)


Packet = Request | Data | Ack | Error | OAck


def encode_request(
    opcode: int,
    filename: str,
    mode: str = "octet",
    options: Mapping[str, str] | None = None,
) -> bytes:
    """RRQ/WRQ bytes (used by tests and clients; the server only parses requests)."""
    parts = [filename, mode]
    for name, value in (options or {}).items():
        parts += (name, value)
    return struct.pack(">H", opcode) + b"".join(p.encode("ascii") + b"\0" for p in parts)


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """DATA for logical ``block`` (wrapped to 16 bits)."""
    return _pack_header(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _pack_header(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """ERROR packet; the message is forced to printable ASCII (it ends up in peers' logs)."""
    text = _NOT_PRINTABLE.sub("?", message).encode("ascii")
    return _pack_header(Opcode.ERROR, code & 0xFFFF) + text + b"\0"


def encode_oack(options: Mapping[str, str]) -> bytes:
    # No padding after the last value: Cisco switches reject trailing NULs (uftpd#43).
    body = b"".join(
        n.encode("ascii") + b"\0" + v.encode("ascii") + b"\0" for n, v in options.items()
    )
    return struct.pack(">H", Opcode.OACK) + body


def parse_packet(datagram: bytes) -> Packet:
    """Decode one datagram; raise ``MalformedPacket`` (and nothing else) if it is not TFTP.

    Lenient where it costs nothing: trailing bytes after an ACK are ignored, an ERROR
    message need not be terminated (a client's ERROR must always be able to end its
    transfer), NUL padding after the options is ignored, and options with non-printable
    names or values are dropped (RFC 2347: unknown options are ignored, not errors).
    """
    if len(datagram) < 2:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "truncated packet")
    opcode = (datagram[0] << 8) | datagram[1]
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return _parse_request(Opcode(opcode), datagram)
    if opcode == Opcode.OACK:
        return OAck(_parse_options(_split_strings(datagram)))
    if opcode > Opcode.OACK or opcode == 0:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, f"unknown opcode {opcode}")
    if len(datagram) < 4:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "truncated packet")
    number = (datagram[2] << 8) | datagram[3]
    if opcode == Opcode.DATA:
        return Data(number, bytes(datagram[4:]))
    if opcode == Opcode.ACK:
        return Ack(number)
    return Error(number, _decode_message(datagram[4:]))


def parse_request(datagram: bytes) -> Request:
    """Parse what arrived at the request port: a readable RRQ, or raise ``TFTPError``.

    ``MalformedPacket`` for garbage, ``RequestRefused`` (code 4) for a WRQ, the obsolete
    "mail" mode, or any other packet type (a stray DATA/ACK has no transfer here).
    """
    packet = parse_packet(datagram)
    if not isinstance(packet, Request):
        raise RequestRefused(ErrorCode.ILLEGAL_OPERATION, "expected a read request")
    if packet.opcode == Opcode.WRQ:
        raise RequestRefused(ErrorCode.ILLEGAL_OPERATION, "write requests are not supported")
    if packet.mode == "mail":
        raise RequestRefused(ErrorCode.ILLEGAL_OPERATION, "mail mode is not supported")
    return packet


def error_reply(datagram: bytes, code: int, message: str) -> bytes | None:
    """The ERROR to send back to the sender of ``datagram``, or None when that datagram
    was itself an ERROR (answering errors with errors can loop between two hosts)."""
    if datagram[:2] == b"\x00\x05":
        return None
    return encode_error(code, message)


def unknown_tid_reply(datagram: bytes) -> bytes | None:
    """ERROR 5 for a datagram that reached a transfer socket from a foreign (addr, port).

    The glue sends it to that sender and leaves the session alone (RFC 1350 §4)."""
    return error_reply(datagram, ErrorCode.UNKNOWN_TID, "unknown transfer ID")


def _split_strings(datagram: bytes) -> list[bytes]:
    body = bytes(datagram[2:])
    if not body:
        return []
    if not body.endswith(b"\0"):
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "unterminated string")
    return body[:-1].split(b"\0")


def _parse_request(opcode: Opcode, datagram: bytes) -> Request:
    if len(datagram) > MAX_REQUEST:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "request longer than 512 bytes")
    fields = _split_strings(datagram)
    if len(fields) < 2:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "request without transfer mode")
    raw_name, raw_mode = fields[0], fields[1]
    if not raw_name:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "empty file name")
    if not _PRINTABLE.match(raw_name):
        # Boot file names are ASCII; anything else is an attempt or a broken client.
        raise MalformedPacket(
            ErrorCode.ACCESS_VIOLATION,
            "file name contains control or non-ASCII characters",
        )
    mode = raw_mode.lower()
    if not _PRINTABLE.match(mode) or mode.decode("ascii") not in MODES:
        raise MalformedPacket(ErrorCode.ILLEGAL_OPERATION, "unknown transfer mode")
    return Request(
        opcode,
        raw_name.decode("ascii"),
        mode.decode("ascii"),
        _parse_options(fields[2:]),
    )


def _parse_options(fields: list[bytes]) -> dict[str, str]:
    while fields and not fields[-1]:
        fields.pop()  # NUL padding some clients append
    options: dict[str, str] = {}
    for i in range(0, len(fields) - 1, 2):
        name, value = fields[i], fields[i + 1]
        if not name:
            break  # an empty name ends the list (what PXELINUX does with padded OACKs)
        if _PRINTABLE.match(name) and _PRINTABLE.match(value):
            # RFC 2347 allows each option once; keeping the first means a repeated one
            # cannot override what was already decided.
            options.setdefault(name.decode("ascii").lower(), value.decode("ascii"))
    return options


def _decode_message(raw: bytes) -> str:
    text = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
    return _NOT_PRINTABLE.sub("?", text)


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    """What a transfer reads from: a fixed ``size`` and random-access ``read``.

    ``read(offset, length)`` returns exactly ``min(length, size - offset)`` bytes; the
    session aborts the transfer if a read comes back short (the file changed under it).
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | memoryview: ...


class BytesSource:
    """A rendered file held in memory; reads are zero-copy memoryview slices."""

    __slots__ = ("_view", "size")

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(bytes(data))
        self.size = len(self._view)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


class FileSource:
    """A static file, read with ``pread`` (no shared file position) in chunks.

    One ``pread`` fills a chunk of many blocks and each block is a memoryview slice of
    it: a lock-step transfer costs a syscall per chunk, not per block. Not ``mmap``: a
    file truncated while mapped kills the whole daemon with SIGBUS on the next read.
    The size is taken once, at construction, so a growing file cannot make tsize lie.
    The source owns the file: ``close()`` closes it.
    """

    __slots__ = ("_buf", "_chunk", "_end", "_fd", "_file", "_start", "size")

    def __init__(self, file: BinaryIO | int, *, chunk: int = 1 << 17) -> None:
        self._file = None if isinstance(file, int) else file
        self._fd = file if isinstance(file, int) else file.fileno()
        self.size = os.fstat(self._fd).st_size
        self._chunk = chunk
        self._buf = memoryview(b"")
        self._start = self._end = 0  # file offsets held in _buf

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileSource:
        """Open a regular file for serving.

        O_NOFOLLOW: the path should already be resolved (``paths.resolve``), so a symlink
        here means it was swapped in since. O_NONBLOCK: opening a FIFO must not hang the
        reactor. Raises ``IsADirectoryError`` / ``PermissionError`` for non-regular files.
        """
        flags = (
            os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        fd = os.open(path, flags)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(f"{os.fspath(path)} is a directory")
            if not stat.S_ISREG(mode):
                raise PermissionError(f"{os.fspath(path)} is not a regular file")
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def read(self, offset: int, length: int) -> memoryview:
        start = offset - self._start
        if start < 0 or offset + length > self._end:
            # Outside the chunk: a new one from here (a retransmitted window that
            # starts before the chunk, or the next chunk; reads mostly move forward).
            chunk = os.pread(self._fd, max(length, self._chunk), offset)
            self._buf = memoryview(chunk)
            self._start = offset
            self._end = offset + len(chunk)
            start = 0
            if len(chunk) < length:
                return self._buf  # short: end of file (or it shrank)
        return self._buf[start : start + length]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._buf = memoryview(b"")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetasciiSource:
    """Netascii view of another source (LF -> CR LF, CR -> CR NUL) with its exact size.

    The mapping is per byte, so chunks convert independently and the size is one pass
    counting CR and LF. Reads are expected to move forward; a rewind within ``keep``
    bytes is served from the buffer, an older one re-converts from the start (slow but
    correct; only netascii test clients ever get here).
    """

    def __init__(self, inner: Source, *, chunk: int = 1 << 16, keep: int = 1 << 20) -> None:
        self._inner = inner
        self._inner_size = inner.size
        self._chunk = chunk
        self._keep = keep
        extra = 0
        offset = 0
        while offset < self._inner_size:
            raw = bytes(inner.read(offset, min(chunk, self._inner_size - offset)))
            if not raw:
                break
            extra += raw.count(b"\n") + raw.count(b"\r")
            offset += len(raw)
        self.size = self._inner_size + extra
        self._buf = bytearray()
        self._out_start = 0  # output offset of self._buf[0]
        self._in_pos = 0  # next input offset to convert

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset < self._out_start:
            self._buf.clear()
            self._out_start = self._in_pos = 0
        buf = self._buf
        while self._out_start + len(buf) < end and self._in_pos < self._inner_size:
            drop = min(offset - self._keep - self._out_start, len(buf))
            if drop > 0:
                del buf[:drop]
                self._out_start += drop
            raw = bytes(
                self._inner.read(self._in_pos, min(self._chunk, self._inner_size - self._in_pos))
            )
            if not raw:
                break
            self._in_pos += len(raw)
            buf += raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        start = offset - self._out_start
        with memoryview(buf) as view:
            return bytes(view[start : start + max(0, end - offset)])


# --------------------------------------------------------------------------- negotiation


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class SessionConfig:
    """Server-side limits for one transfer."""

    max_blksize: int = attrs.field(
        default=1468,
        validator=[attrs.validators.ge(MIN_BLKSIZE), attrs.validators.le(MAX_BLKSIZE)],
    )
    # Capped at 32767, not RFC 7440's 65535: a window must stay under half the 16-bit
    # block space or an old duplicate ACK could be mistaken for one inside the window.
    max_windowsize: int = attrs.field(
        default=64, validator=[attrs.validators.ge(1), attrs.validators.le(32767)]
    )
    timeout: float = attrs.field(default=1.0, validator=_positive)  # first retransmit
    max_timeout: float = attrs.field(default=10.0, validator=_positive)  # backoff ceiling
    retries: int = attrs.field(default=5, validator=attrs.validators.ge(0))


@attrs.frozen
class Negotiation:
    """Transfer parameters in effect, and the OACK options (empty: no OACK, DATA at once)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    oack: dict[str, str] = attrs.field(factory=dict, hash=False)


def _uint(value: str, low: int, high: int) -> int | None:
    # isdigit on ASCII text rejects signs, spaces and "1_000" that int() would accept.
    if not value.isdigit() or len(value) > 20:
        return None
    number = int(value)
    return number if low <= number <= high else None


def negotiate(options: Mapping[str, str], size: int, config: SessionConfig) -> Negotiation:
    """Decide the options (RFC 2347/2348/2349/7440) for a read of ``size`` bytes.

    Only options the client asked for and we accept go into the OACK, in request order.
    Values out of range are ignored (left out of the OACK) rather than failing the
    transfer; blksize and windowsize above our caps are lowered to the cap.
    """
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, config.timeout
    oack: dict[str, str] = {}
    for name, value in options.items():
        if name == "blksize":
            if (number := _uint(value, MIN_BLKSIZE, MAX_BLKSIZE)) is not None:
                blksize = min(number, config.max_blksize)
                oack[name] = str(blksize)
        elif name == "windowsize":
            if (number := _uint(value, 1, 65535)) is not None:
                windowsize = min(number, config.max_windowsize)
                oack[name] = str(windowsize)
        elif name == "timeout":
            if (number := _uint(value, 1, 255)) is not None:
                timeout = float(number)
                oack[name] = str(number)  # RFC 2349: echo the client's value or omit it
        elif name == "tsize" and _uint(value, 0, 1 << 64) is not None:
            oack[name] = str(size)  # the client's value is a placeholder (0) in an RRQ
    return Negotiation(blksize, windowsize, timeout, oack)


# --------------------------------------------------------------------------- session


class Outcome(enum.StrEnum):
    COMPLETE = "complete"
    TIMEOUT = "timeout"
    CLIENT_ERROR = "client-error"
    ABORTED = "aborted"


class Output(NamedTuple):
    """What to do after a call: send ``datagrams`` in order, then wait until ``deadline``
    (None: the session is finished)."""

    datagrams: Sequence[bytes]
    deadline: float | None

    @property
    def finished(self) -> bool:
        return self.deadline is None


_FINISHED: Final = Output((), None)
DEFAULT_CONFIG: Final = SessionConfig()
_NEW, _NEGOTIATING, _TRANSFER, _DONE = range(4)


class ReadSession:
    """One RRQ transfer, from the first OACK/DATA to the ACK of the last block.

    Blocks are counted with an unbounded logical counter (1 = first DATA) and put on the
    wire modulo 2**16, so files over 65535 blocks wrap to 0 like tftp-hpa and dnsmasq.
    """

    def __init__(
        self, request: Request, source: Source, config: SessionConfig = DEFAULT_CONFIG
    ) -> None:
        if request.mode == "netascii":
            source = NetasciiSource(source)
        self.request = request
        self.source = source
        self.config = config
        self._size = source.size
        self.options = negotiate(request.options, self._size, config)
        self._blksize = self.options.blksize
        self._windowsize = self.options.windowsize
        # The last block is shorter than blksize: zero bytes when size is a multiple.
        self._nblocks = self._size // self._blksize + 1
        self._base_rto = self.options.timeout
        self._max_rto = max(config.max_timeout, self._base_rto)
        self._rto = self._base_rto
        self._tries = 0
        self._acked = 0  # highest logical block acknowledged (0: OACK or nothing)
        self._sent = 0  # highest logical block sent in the current window
        self._state = _NEW
        self._deadline: float | None = None
        self._oack = b""
        self.outcome: Outcome | None = None
        self.error: Error | None = None  # the client's ERROR, or the one we ended with
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.packets_sent = 0
        self.retransmits = 0

    # ---------------------------------------------------------------- reporting

    @property
    def finished(self) -> bool:
        return self._state == _DONE

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def bytes_sent(self) -> int:
        """Payload bytes the client has acknowledged (what it really has)."""
        return min(self._acked * self._blksize, self._size)

    @property
    def sent_all(self) -> bool:
        """Every block went out at least once. With outcome TIMEOUT this usually means
        only the final ACK was lost or never sent (some clients don't): worth logging
        differently from a transfer that stalled halfway."""
        return self._sent >= self._nblocks

    @property
    def size(self) -> int:
        """Bytes on the wire for the whole file (netascii-converted size in that mode)."""
        return self._size

    # ---------------------------------------------------------------- driving

    def start(self, now: float) -> Output:
        """First packet: an OACK if any option was accepted, else DATA 1 at once."""
        if self._state != _NEW:
            raise RuntimeError("session already started")
        self.started_at = now
        if self.options.oack:
            self._state = _NEGOTIATING
            self._oack = encode_oack(self.options.oack)
            self._deadline = now + self._rto
            self.packets_sent += 1
            return Output((self._oack,), self._deadline)
        self._state = _TRANSFER
        return self._send_window(1, now)

    def receive(self, datagram: bytes, now: float) -> Output:
        """A datagram from the client's TID. ACKs advance, ERROR ends, the rest is ignored.

        Duplicate, stale and future ACKs change nothing and send nothing (Sorcerer's
        Apprentice, RFC 1123 4.2.3.1); they do not postpone the retransmit deadline either,
        or a client re-ACKing the previous block would stall a lost DATA forever.
        """
        state = self._state
        if state == _NEW:
            raise RuntimeError("receive() before start()")
        if len(datagram) >= 4 and datagram[0] == 0 and state != _DONE:
            opcode = datagram[1]
            if opcode == Opcode.ACK:
                block = (datagram[2] << 8) | datagram[3]
                if state == _TRANSFER:
                    acked = self._acked
                    delta = (block - acked) & 0xFFFF
                    if 0 < delta <= self._sent - acked:
                        return self._progress(acked + delta, now)
                elif block == 0:  # _NEGOTIATING: ACK 0 accepts the OACK
                    self._state = _TRANSFER
                    self._tries = 0
                    self._rto = self._base_rto
                    return self._send_window(1, now)
            elif opcode == Opcode.ERROR:
                # Any ERROR ends it quietly: ERROR 8 after the UEFI tsize probe, ERROR 0
                # from PXELINUX closing the file, real failures alike (RFC 1350 §7).
                code = (datagram[2] << 8) | datagram[3]
                self.error = Error(code, _decode_message(datagram[4:]))
                return self._finish(Outcome.CLIENT_ERROR, now)
        # Malformed or unexpected packets are dropped: the timer still bounds the session.
        return Output((), self._deadline)

    def timeout(self, now: float) -> Output:
        """Timer expiry: retransmit the unacknowledged OACK/window with exponential
        backoff, or give up after ``config.retries`` retransmissions."""
        if self._state == _NEW:
            raise RuntimeError("timeout() before start()")
        if self._deadline is None:  # finished
            return _FINISHED
        if now < self._deadline:
            return Output((), self._deadline)
        if self._tries >= self.config.retries:
            return self._finish(Outcome.TIMEOUT, now)
        self._tries += 1
        self._rto = min(self._rto * 2, self._max_rto)
        if self._state == _NEGOTIATING:
            self._deadline = now + self._rto
            self.packets_sent += 1
            self.retransmits += 1
            return Output((self._oack,), self._deadline)
        # RFC 7440: the last ACK received sets the start of the next window.
        out = self._send_window(self._acked + 1, now)
        self.retransmits += len(out.datagrams)
        return out

    def abort(
        self,
        now: float,
        code: int = ErrorCode.NOT_DEFINED,
        message: str = "transfer aborted",
    ) -> Output:
        """End the transfer from our side (shutdown, session cap); returns the ERROR to send."""
        if self._state == _DONE:
            return _FINISHED
        return self._fail(now, code, message)

    # ---------------------------------------------------------------- internals

    def _progress(self, block: int, now: float) -> Output:
        self._acked = block
        self._tries = 0
        self._rto = self._base_rto
        if block >= self._nblocks:
            return self._finish(Outcome.COMPLETE, now)
        # Whole window acknowledged: the next one. An earlier block of the window: the
        # client saw a gap after it (RFC 7440 §4), so restart right after it.
        return self._send_window(block + 1, now)

    def _send_window(self, first: int, now: float) -> Output:
        blksize = self._blksize
        nblocks = self._nblocks
        last = min(first + self._windowsize - 1, nblocks)
        read = self.source.read
        packets = []
        try:
            for block in range(first, last + 1):
                offset = (block - 1) * blksize
                want = blksize if block < nblocks else self._size - offset
                data = read(offset, want)
                if len(data) != want:
                    return self._fail(now, ErrorCode.NOT_DEFINED, "file changed during transfer")
                packets.append(_pack_header(3, block & 0xFFFF) + data)
        except OSError:
            return self._fail(now, ErrorCode.NOT_DEFINED, "read error")
        self._sent = last
        self._deadline = now + self._rto
        self.packets_sent += len(packets)
        return Output(packets, self._deadline)

    def _fail(self, now: float, code: int, message: str) -> Output:
        self.error = Error(code, message)
        self._finish(Outcome.ABORTED, now)
        return Output((encode_error(code, message),), None)

    def _finish(self, outcome: Outcome, now: float) -> Output:
        self._state = _DONE
        self._deadline = None
        self.outcome = outcome
        self.ended_at = now
        return _FINISHED
