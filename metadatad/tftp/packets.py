# -*- test-case-name: tests.tftp.test_tftp_protocol -*-
"""TFTP packets (RFC 1350, options RFC 2347-2349, 7440): opcodes, error codes, and
their encoding and parsing.  Pure: bytes in, values out, or :class:`MalformedPacket`.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Mapping
from typing import Final

import attrs


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
pack_header = _HEADER.pack
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
    return pack_header(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return pack_header(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """ERROR packet; the message is forced to printable ASCII (it ends up in peers' logs)."""
    text = _NOT_PRINTABLE.sub("?", message).encode("ascii")
    return pack_header(Opcode.ERROR, code & 0xFFFF) + text + b"\0"


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
    return Error(number, decode_message(datagram[4:]))


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


def decode_message(raw: bytes) -> str:
    text = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
    return _NOT_PRINTABLE.sub("?", text)
