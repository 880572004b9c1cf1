"""Sans-IO TFTP: option negotiation and the read-transfer state machine, over the
packet codec of :mod:`~metadatad.tftp.packets` and the data sources of
:mod:`~metadatad.tftp.sources` (both re-exported here: this module is the contract).

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
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

import attrs

from metadatad.tftp.packets import (
    DEFAULT_BLKSIZE,
    MAX_BLKSIZE,
    MIN_BLKSIZE,
    Ack,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    OAck,
    Opcode,
    Packet,
    Request,
    RequestRefused,
    TFTPError,
    decode_message,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
    error_reply,
    pack_header,
    parse_packet,
    parse_request,
    unknown_tid_reply,
)
from metadatad.tftp.sources import (
    BytesSource,
    FileSource,
    NetasciiSource,
    Source,
)

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
                self.error = Error(code, decode_message(datagram[4:]))
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
                packets.append(pack_header(3, block & 0xFFFF) + data)
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
