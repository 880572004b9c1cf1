# -*- test-case-name: tests.tftp.test_boot_http -*-
"""Boot files over HTTP: ``GET <http_address>/boot/<name>`` on the metadata site.

Kernels and initrds are tens of megabytes; TFTP's lock-step is the slowest way to move
them, and iPXE speaks HTTP.  The names are TFTP's: the same :class:`BootFiles` resolves
them, so the same path-safety rules apply (``..`` refused, also percent-encoded;
symlinks that leave the root refused; no directory listings) and per-node configs
(``<uuid>.ipxe``...) are rendered the same way, for the nodes this conductor owns.

HTTP adds what a download needs: ``Range`` (one range; anything else gets the whole
file, as RFC 9110 allows; past the end: 416), validators (``ETag``, ``Last-Modified``,
``If-None-Match``, ``If-Modified-Since``, ``If-Range``) and ``HEAD``.

The body is produced like twisted.web.static.File's: a pull producer reads one chunk
with ``pread`` each time the connection has sent the last one, so a download never
holds a whole file in memory, the reactor serves every other connection between two
chunks, and a slow client only slows itself.  All downloads share a byte budget per
turn of the reactor (2 MiB: a lone download moves 1 MiB chunks, a boot storm 64 KiB
chunks, and downloads over the budget wait for the next turn): a turn stays short
however many machines download, so the metadata site answers between two turns
(bench/bootfiles.py).

A file truncated under a download closes the connection (the client sees a short
body); one deleted under it is still read to the end through its open descriptor.
Each request with a decision is a boot event with ``protocol: http``.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections import deque
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from metadatad.db.bootevents import BootEvent, utc_moment
from metadatad.tftp.bootconfig import BootFiles, NotOwned, Opened
from metadatad.tftp.packets import ErrorCode, TFTPError
from metadatad.tftp.sources import FileSource

__all__ = ["PREFIX", "BootFilesResource", "BootRouter", "Plan", "Validators", "plan"]

PREFIX = b"/boot/"
# Bytes all downloads together read and write per turn of the reactor, and the bounds
# of one download's share (syscall overhead below, reactor latency above).
BUDGET = 2 << 20
MIN_CHUNK = 64 << 10
MAX_CHUNK = 1 << 20
_ALLOW = b"GET, HEAD"
_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


# --------------------------------------------------------------------------- pure rules


@attrs.frozen
class Validators:
    """What identifies one version of a file: its ETag and, for a static file, its
    modification time (epoch seconds)."""

    etag: str
    modified: float | None = None

    @classmethod
    def of_file(cls, info: os.stat_result) -> Validators:
        return cls(
            f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}"', float(int(info.st_mtime))
        )

    @classmethod
    def of_bytes(cls, data: bytes) -> Validators:
        return cls(f'"{hashlib.sha256(data).hexdigest()[:32]}"')


@attrs.frozen
class Plan:
    """The answer to a request for a file of ``size`` bytes: status, headers, and the
    byte range ``[start, end)`` of the body (empty for HEAD, 304 and 416)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    start: int = 0
    end: int = 0


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal[False] | None:
    """``(start, end)`` of one satisfiable ``bytes=`` range; None to send the whole
    file (no header, another unit, several ranges, bad syntax); False if the range
    starts past the end (416)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    found = _RANGE.fullmatch(spec)
    if found is None or not (found.group(1) or found.group(2)):
        return None
    first, last = found.group(1), found.group(2)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            return False
        return max(0, size - length), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        return False
    end = size if not last else min(int(last) + 1, size)
    return start, end


def _etags(header: str) -> list[str]:
    return [tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()]


def _date(header: str) -> float | None:
    try:
        return parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def plan(
    method: bytes, headers: Callable[[str], str | None], size: int, validators: Validators
) -> Plan:
    """What to answer (pure): conditional requests, ``Range`` and ``HEAD``."""
    common = [("ETag", validators.etag), ("Accept-Ranges", "bytes")]
    if validators.modified is not None:
        common.append(("Last-Modified", formatdate(validators.modified, usegmt=True)))
    none_match = headers("If-None-Match")
    if none_match is not None:
        if "*" in none_match or validators.etag in _etags(none_match):
            return Plan(304, tuple(common))
    else:
        since = headers("If-Modified-Since")
        since_at = _date(since) if since is not None else None
        if validators.modified is not None and since_at is not None:
            if validators.modified <= since_at:
                return Plan(304, tuple(common))
    wanted = parse_range(headers("Range"), size)
    if_range = headers("If-Range")
    if wanted is not None and if_range is not None:
        if if_range.strip().startswith(('"', "W/")):
            current = if_range.strip() == validators.etag  # strong comparison
        else:
            at = _date(if_range)
            current = at is not None and validators.modified == at
        if not current:
            wanted = None  # the file changed: send all of it
    if wanted is False:
        return Plan(416, (*common, ("Content-Range", f"bytes */{size}")))
    if wanted is None:
        status, start, end = 200, 0, size
    else:
        start, end = wanted
        status = 206
        common.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    common.append(("Content-Length", str(end - start)))
    if method == b"HEAD":
        return Plan(status, tuple(common))
    return Plan(status, tuple(common), start, end)


def request_name(path: bytes) -> str:
    """The TFTP-style name of a ``/boot/...`` path, percent-decoded per segment (so an
    encoded ``..`` or slash is seen by the path rules); ValueError if not UTF-8."""
    raw = path[len(PREFIX) :] if path.startswith(PREFIX) else b""
    segments = [urllib.parse.unquote_to_bytes(s) for s in raw.split(b"/")]
    return b"/".join(segments).decode("utf-8")


# --------------------------------------------------------------------------- glue

_STATUS_OF_CODE: dict[int, tuple[int, str, str]] = {
    ErrorCode.FILE_NOT_FOUND: (404, "not-found", "Not Found"),
    ErrorCode.ACCESS_VIOLATION: (403, "refused", "Forbidden"),
}


@implementer(IPullProducer)
class _Download:
    """Writes ``[start, end)`` of an opened file to ``request``, one chunk per call."""

    def __init__(
        self, request: Request, opened: Opened, start: int, end: int, turns: _Turns
    ) -> None:
        self.request = request
        self.opened = opened
        self.position = start
        self.end = end
        self.turns = turns
        self.sent = 0
        self.error: str | None = None
        self.stopped = False
        source = opened.source
        self._fd = source.fileno() if isinstance(source, FileSource) else -1

    def start(self) -> None:
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        length = min(self.turns.chunk(), self.end - self.position)
        if not self.turns.spend(length):
            # This turn's budget is spent: wait for the next turn, after the reactor
            # has served everyone else (the transport asks only once).
            self.turns.wait(self)
            return
        if self._fd >= 0:
            try:
                data = os.pread(self._fd, length, self.position)
            except OSError as e:
                data = b""
                self.error = f"cannot read: {e.strerror}"
        else:
            data = bytes(self.opened.source.read(self.position, length))
        if len(data) < length:
            # Truncated under us: the promised length cannot be sent; the client
            # must see a short body, not a silently different file.
            self.error = self.error or "the file shrank during the download"
            self.stopped = True
            self.request.unregisterProducer()
            transport = self.request.channel.transport if self.request.channel else None
            if transport is not None:
                # A TCP transport drops what is buffered; any other just closes.
                getattr(transport, "abortConnection", transport.loseConnection)()
            return
        self.position += length
        self.sent += length
        channel = self.request.channel
        if channel is not None:
            channel.resetTimeout()  # the idle timeout counts silence, not sending
        self.request.write(data)
        if self.position >= self.end:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        """The connection went away: nothing more to send."""
        self.stopped = True


class _Turns:
    """The byte budget of one turn of the reactor, shared by every download: at most
    ``budget`` bytes are read and written per turn, so a turn stays short however many
    machines download (the metadata site is served between turns).  A download over
    the budget waits in line; the next turn starts with the downloads waiting, in the
    order they came."""

    def __init__(self, clock: Any, budget: int) -> None:
        self.clock = clock
        self.budget = budget
        self.downloads = 0  # in progress
        self._left = budget
        self._waiting: deque[_Download] = deque()
        self._next: Any = None  # the call that starts the next turn

    def chunk(self) -> int:
        """One download's share of a turn."""
        return max(MIN_CHUNK, min(MAX_CHUNK, self.budget // max(1, self.downloads)))

    def spend(self, length: int) -> bool:
        """Whether ``length`` more bytes fit in this turn."""
        if self._left <= 0:
            return False
        self._left -= length
        self._schedule()
        return True

    def wait(self, download: _Download) -> None:
        """Resume ``download`` in a coming turn."""
        self._waiting.append(download)
        self._schedule()

    def _schedule(self) -> None:
        if self._next is None:
            # One delayed call per turn: it runs first thing in the next one.
            self._next = self.clock.callLater(0, self._turn)

    def _turn(self) -> None:
        self._next = None
        self._left = self.budget
        waiting = self._waiting
        while waiting and self._left > 0:
            waiting.popleft().resumeProducing()
        if waiting:
            self._schedule()


class BootFilesResource(Resource):
    """``/boot/<name>``: static files under the TFTP root and rendered configs."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        files: BootFiles,
        clock: Any,
        *,
        record: Callable[[BootEvent], None] | None = None,
        conductor: str = "",
        budget: int = BUDGET,
    ) -> None:
        super().__init__()
        self.files = files
        self._clock = clock
        self._record = record
        self.conductor = conductor
        self.turns = _Turns(clock, budget)

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", _ALLOW)
            return _error(request, 405, "Method Not Allowed")
        try:
            name = request_name(request.path)
        except ValueError:
            return _error(request, 400, "Bad Request")
        fetch = _Fetch(self, request, name)
        d: Deferred[Any] = maybeDeferred(self.files.open, name, fetch.client, fetch.server)
        d.addCallbacks(fetch.answer, fetch.refuse)
        d.addErrback(fetch.bug)
        return NOT_DONE_YET

    def record(self, event: BootEvent) -> None:
        if self._record is not None:
            self._record(event)


class _Fetch:
    """One request: its answer and, once its outcome is known, its boot event."""

    def __init__(self, resource: BootFilesResource, request: Request, name: str) -> None:
        self.resource = resource
        self.request = request
        self.name = name
        self.started = resource._clock.seconds()
        self.client = _host(request.getClientAddress())
        self.server = _host(request.getHost())
        self.kind = "static"
        self.node_uuid: str | None = None
        self.size: int | None = None
        self.outcome = "complete"
        self.error: str | None = None
        # A client may leave while its node is looked up: nothing to answer then.
        self.gone = False
        request.notifyFinish().addErrback(self._left)

    def _left(self, failure: Failure) -> None:
        self.gone = True

    def answer(self, opened: Opened) -> None:
        request = self.request
        source = opened.source
        if self.gone:
            _close(opened)
            return
        self.kind, self.node_uuid, self.size = opened.kind, opened.node_uuid, source.size
        if isinstance(source, FileSource):
            validators = Validators.of_file(os.fstat(source.fileno()))
            content_type = "application/octet-stream"
        else:
            validators = Validators.of_bytes(bytes(source.read(0, source.size)))
            content_type = "text/plain; charset=utf-8"
        answer = plan(request.method, _header_getter(request), source.size, validators)
        request.setResponseCode(answer.status)
        for key, value in answer.headers:
            request.setHeader(key, value)
        if answer.status in (200, 206):
            request.setHeader(b"Content-Type", content_type)
        if answer.end <= answer.start:  # HEAD, 304, 416, an empty file
            _close(opened)
            if answer.status == 416:
                self.outcome, self.error = "client-error", "range not satisfiable"
                request.setHeader(b"Content-Length", b"0")
            elif answer.status == 304:
                self.outcome = "not-modified"
            request.finish()
            self.done(0)
            return
        resource = self.resource
        download = _Download(request, opened, answer.start, answer.end, resource.turns)
        resource.turns.downloads += 1

        def finished(result: Any) -> None:
            resource.turns.downloads -= 1
            _close(opened)
            if isinstance(result, Failure) or download.error is not None:
                self.outcome = "aborted"
                self.error = download.error or "the client went away"
            self.done(download.sent)

        request.notifyFinish().addBoth(finished)
        download.start()

    def refuse(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, NotOwned):
            self.node_uuid = error.node_uuid
            status, self.outcome, message = 404, "not-owned", "Not Found"
        elif isinstance(error, TFTPError):
            status, self.outcome, message = _STATUS_OF_CODE.get(
                error.code, (500, "error", "Internal Server Error")
            )
        else:
            failure.raiseException()
        self.error = message
        if self.gone:
            return
        self.request.write(_error(self.request, status, message))
        self.request.finish()
        self.done(0)

    def bug(self, failure: Failure) -> None:
        self.resource.log.failure("boot file request failed", failure)
        request = self.request
        if not request.finished and not request.startedWriting:
            request.write(_error(request, 500, "Internal Server Error"))
            request.finish()

    def done(self, sent: int) -> None:
        resource = self.resource
        ended = resource._clock.seconds()
        resource.log.info(
            "http boot {client} {filename}: {outcome}, {bytes} bytes in {duration:.3f}s",
            client=self.client,
            filename=self.name,
            outcome=self.outcome,
            bytes=sent,
            duration=ended - self.started,
        )

        def build(uuid: str | None) -> None:
            # Unknown callers that got nothing are not events (a scan must not fill
            # the table), as for TFTP.
            if uuid is None and sent == 0:
                return
            resource.record(
                BootEvent(
                    node_uuid=uuid,
                    conductor=resource.conductor,
                    client=self.client,
                    server=self.server,
                    filename=self.name,
                    kind=self.kind,
                    outcome=self.outcome,
                    started_at=utc_moment(self.started),
                    duration=max(0.0, ended - self.started),
                    bytes_sent=sent,
                    size=self.size,
                    error=self.error,
                    protocol="http",
                )
            )

        if self.node_uuid is not None:
            build(self.node_uuid)
            return
        found = resource.files.node_of_client(self.client)
        if isinstance(found, Deferred):
            found.addCallback(build).addErrback(
                lambda f: resource.log.failure("node lookup for a boot event failed", f)
            )
        else:
            build(found)


def _close(opened: Opened) -> None:
    close = getattr(opened.source, "close", None)
    if close is not None:
        close()


def _error(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    body = (message + "\n").encode("utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    return body if request.method != b"HEAD" else b""


class BootRouter(Resource):
    """``/boot/...`` to the boot files, everything else to the metadata site."""

    isLeaf = True

    def __init__(self, boot: Resource, other: Resource) -> None:
        super().__init__()
        self._boot = boot
        self._other = other

    def render(self, request: Request) -> Any:
        if request.path.startswith(PREFIX) or request.path == PREFIX.rstrip(b"/"):
            return self._boot.render(request)
        return self._other.render(request)


def _host(address: Any) -> str:
    return str(getattr(address, "host", "") or "")


def _header_getter(request: Request) -> Callable[[str], str | None]:
    def get(name: str) -> str | None:
        value = request.getHeader(name)
        return value.decode("latin-1") if isinstance(value, bytes) else value

    return get
