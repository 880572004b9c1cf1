# -*- test-case-name: tests.web.test_vendordata -*-
"""Dynamic vendordata (Nova's vendordata v2): ``vendor_data2.json`` from the deployer's
services.

For each ``name@url`` target, the node's facts are POSTed as JSON (the body Nova
sends) with a service token in ``X-Auth-Token``; the JSON answer becomes the
``name`` member of ``vendor_data2.json`` beside ``static``.

- Answers are cached per (target, node, node revision) for ``cache_ttl`` seconds, or
  for the target's ``Cache-Control: max-age``; ``no-store``/``no-cache`` are not
  cached.  The cache is bounded in entries and bytes (least recently used go first).
- Concurrent requests for one entry share one upstream call; calls per target and
  failures remembered for ``failure_ttl`` are :mod:`~metadatad.metadata.vendorgate`'s.
- A target that times out, fails to connect or verify, answers non-2xx, too much or
  not JSON gives ``{}`` for that target and a warning.  With ``failure_fatal`` the
  request is answered 500 instead and the node is marked (``vendordata_error``).

Pure pieces (``request_body``, ``cache_lifetime``, :class:`ResponseCache`) do no
I/O; :class:`DynamicVendordata` is the Twisted glue and takes its treq ``HTTPClient``
and clock in ``__init__``.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import attrs
from OpenSSL import SSL
from prometheus_client import Counter, Gauge
from service_identity import VerificationError
from twisted.application.service import Service
from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss

from metadatad.clients.http import make_http_client
from metadatad.clients.keystone import StaticToken
from metadatad.config import Config, ConfigError, VendordataConfig, read_token_file
from metadatad.core.nodes import Node
from metadatad.db.vendordata import VendordataError
from metadatad.interfaces import TokenSource, VendordataMarks
from metadatad.metadata import openstack
from metadatad.metadata.reply import Reply, error, json_reply
from metadatad.metadata.vendorgate import TargetGate
from metadatad.metrics import REGISTRY

# A target's answer larger than this is refused (a runaway target must not fill memory).
MAX_RESPONSE_BYTES = 256 * 1024
# Cache bounds: whichever is reached first evicts the least recently used entries.
MAX_CACHE_ENTRIES = 50_000
MAX_CACHE_BYTES = 64 * 1024 * 1024
# A target's max-age is believed up to a day.
MAX_AGE_CAP = 86400.0
# Bookkeeping per cache entry, counted beside the body's size.
_ENTRY_OVERHEAD = 200
USER_AGENT = b"metadatad-vendordata"

UPSTREAM = Counter(
    "metadatad_vendordata_upstream_requests",
    "Calls to dynamic vendordata targets, by target and outcome "
    "(ok, timeout, connect, tls, http, invalid-json, too-large, auth, busy, error).",
    ["target", "outcome"],
    registry=REGISTRY,
)
LOOKUPS = Counter(
    "metadatad_vendordata_cache_lookups",
    "Dynamic vendordata lookups by target and result: hit (cached), shared (joined a "
    "call in flight), miss (called the target), failed (a failure kept, no call).",
    ["target", "result"],
    registry=REGISTRY,
)
FATAL = Counter(
    "metadatad_vendordata_fatal_failures",
    "vendor_data2.json requests answered 500 because a target failed (failure_fatal).",
    ["target"],
    registry=REGISTRY,
)
CACHED = Gauge(
    "metadatad_vendordata_cache_entries",
    "Dynamic vendordata answers held in memory.",
    registry=REGISTRY,
)


# --- pure pieces ---------------------------------------------------------------------


def request_body(node: Node) -> dict[str, Any]:
    """What Nova POSTs to a target: the node's facts, user-data as stored (base64)."""
    document = node.to_document()
    return {
        "project-id": node.project_id,
        "instance-id": node.uuid,
        "image-id": node.image_id,
        "user-data": document["user_data"],
        "hostname": node.hostname,
        "metadata": dict(node.meta),
        # Nova joins the booting user's role names with commas; ours are stored with
        # the node when it is registered, so a user's later role changes do not count.
        "boot-roles": ",".join(node.boot_roles),
    }


_DIRECTIVE = re.compile(r"\s*([A-Za-z-]+)\s*(?:=\s*\"?([^\",]*)\"?)?\s*")


def cache_lifetime(cache_control: Iterable[str], default: float) -> float:
    """Seconds to keep an answer: 0 for ``no-store``/``no-cache``, ``max-age`` when
    the target gives one (up to a day), else ``default``."""
    max_age: float | None = None
    for header in cache_control:
        for item in header.split(","):
            match = _DIRECTIVE.fullmatch(item)
            if not match:
                continue
            name, value = match.group(1).lower(), match.group(2)
            if name in ("no-store", "no-cache"):
                return 0.0
            if name == "max-age" and value is not None and value.strip().isdigit():
                age = float(value.strip())
                max_age = age if max_age is None else min(max_age, age)
    if max_age is not None:
        return min(max_age, MAX_AGE_CAP)
    return default


_MISSING: Any = object()


class ResponseCache:
    """Bounded LRU of parsed answers with expiry times; pure (callers pass ``now``)."""

    def __init__(self, max_entries: int = MAX_CACHE_ENTRIES, max_bytes: int = MAX_CACHE_BYTES):
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[Any, tuple[float, int, Any]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, now: float) -> Any:
        """The value for ``key``, or ``_MISSING`` (absent or expired)."""
        found = self._entries.get(key)
        if found is None:
            return _MISSING
        expires, _cost, value = found
        if expires <= now:
            self._drop(key)
            return _MISSING
        self._entries.move_to_end(key)
        return value

    def put(self, key: Any, value: Any, size: int, expires: float) -> None:
        """Keep ``value`` until ``expires``; ``size`` is what it costs in bytes."""
        if key in self._entries:
            self._drop(key)
        cost = size + _ENTRY_OVERHEAD
        if cost > self._max_bytes:
            return
        self._entries[key] = (expires, cost, value)
        self.bytes += cost
        while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget every answer."""
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: Any) -> None:
        _expires, cost, _value = self._entries.pop(key)
        self.bytes -= cost


# --- failures ------------------------------------------------------------------------


class TargetFailure(Exception):
    """A target gave no usable answer; ``kind`` is the metric's outcome label."""

    def __init__(self, kind: str, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.status = status


def classify(failure: Failure, timeout: float) -> TargetFailure:
    """Turn what went wrong into a short reason (never a token or a body)."""
    value = failure.value
    if isinstance(value, TargetFailure):
        return value
    if isinstance(value, TimeoutError | neterror.TimeoutError):
        return TargetFailure("timeout", f"no answer within {timeout:g} s")
    reasons: list[Failure] = [failure]
    if isinstance(value, ResponseFailed | neterror.ConnectionLost) or hasattr(value, "reasons"):
        reasons.extend(getattr(value, "reasons", []) or [])
    for reason in reasons:
        if reason.check(VerificationError):
            return TargetFailure("tls", f"TLS: certificate does not match: {reason.value}")
        if reason.check(SSL.Error):
            return TargetFailure("tls", f"TLS: {_ssl_reason(reason.value)}")
    if isinstance(value, neterror.ConnectError):
        return TargetFailure("connect", f"cannot connect: {value.__class__.__name__}")
    if hasattr(value, "reasons"):
        return TargetFailure("connect", f"connection failed: {value.__class__.__name__}")
    return TargetFailure("error", f"{value.__class__.__name__}: {value}")


def _ssl_reason(value: Any) -> str:
    try:
        return "; ".join(str(part[2]) for part in value.args[0]) or "handshake failed"
    except (IndexError, TypeError):
        return "handshake failed"


class _BodyReader(TwistedProtocol):
    """Collects a response body up to ``limit`` bytes; cancelling aborts the connection."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        # A response body's transport is a push producer (Twisted's
        # TransportProxyProducer), though typed as a plain ITransport.
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(TargetFailure("too-large", f"answer larger than {self._limit} bytes"))
            self._cancel(self.done)
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)


# --- token sources -------------------------------------------------------------------


def read_service_token(config: Config) -> StaticToken:
    """The ``[vendordata] service_token_file`` token: one line without spaces."""
    filename = config.vendordata.service_token_file
    return StaticToken(read_token_file(config, "vendordata", "service_token_file", filename))


# --- the glue ------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """One target's part of a ``vendor_data2.json``: its document or its failure."""

    target: str
    document: Any = attrs.field(factory=dict)
    failure: TargetFailure | None = None


class DynamicVendordata(Service):
    """Calls the dynamic targets for a node, caching and sharing calls; the named
    ``vendordata`` service (stopping it closes the kept-alive connections)."""

    name = "vendordata"
    log = Logger()

    def __init__(
        self,
        targets: Sequence[tuple[str, str]],
        http_client: Any,
        clock: IReactorTime,
        *,
        token_source: TokenSource | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        cache_ttl: float = 60.0,
        failure_fatal: bool = False,
        errors: VendordataMarks | None = None,
        conductor: str = "",
        cache: ResponseCache | None = None,
        pool: HTTPConnectionPool | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_concurrent_calls: int = 16,
        failure_ttl: float = 5.0,
    ) -> None:
        self.targets = tuple(targets)
        self._http = http_client
        self._clock = clock
        self._token_source = token_source
        # The Agent bounds connecting; this bounds the whole exchange.
        self._timeout = connect_timeout + read_timeout
        self._cache_ttl = cache_ttl
        self._failure_fatal = failure_fatal
        self._errors = errors
        self._conductor = conductor
        self._cache = cache if cache is not None else ResponseCache()
        self._pool = pool
        self._max_response_bytes = max_response_bytes
        self._in_flight: dict[tuple[str, str, int], list[Deferred[Outcome]]] = {}
        # Calls running at once per target, and targets known to be down.
        self._gate = TargetGate([n for n, _ in targets], clock, max_concurrent_calls, failure_ttl)
        self.upstream_calls = 0
        if token_source is None and targets:
            self.log.warn(
                "no service token configured: dynamic vendordata requests are "
                "sent without X-Auth-Token"
            )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    # --- what the site calls ----------------------------------------------------

    def forget(self) -> None:
        """Drop the cached answers and failures (SIGHUP): the next read asks again."""
        self._cache.clear()
        self._gate.forget()

    def render(self, record: Any, static: Mapping[str, Any]) -> Deferred[Reply]:
        """``vendor_data2.json`` for the node of ``record`` (a NodeRecord): never
        fails; a fatal failure is a 500 reply.  Cancelling it (the caller hung up)
        leaves the upstream calls, shared with other callers, running."""
        answer: Deferred[Reply] = Deferred()
        self.fetch(record).addCallback(self._reply, record, static).chainDeferred(answer)
        return answer

    def fetch(self, record: Any) -> Deferred[list[Outcome]]:
        """Every target's outcome for the node, in target order."""
        calls = [self._target(name, url, record) for name, url in self.targets]

        def gathered(results: list[tuple[bool, Any]]) -> list[Outcome]:
            # _target never fails; a bug there still gives {} rather than a hang.
            return [
                outcome if ok else Outcome(name, {}, classify(outcome, self._timeout))
                for (ok, outcome), (name, _url) in zip(results, self.targets, strict=True)
            ]

        return DeferredList(calls, consumeErrors=True).addCallback(gathered)

    def _reply(self, outcomes: list[Outcome], record: Any, static: Mapping[str, Any]) -> Reply:
        failed = [o for o in outcomes if o.failure is not None]
        if failed and self._failure_fatal:
            for outcome in failed:
                FATAL.labels(outcome.target).inc()
            names = ", ".join(o.target for o in failed)
            return error(500, f"Internal Server Error: dynamic vendordata failed ({names})")
        document = openstack.vendor_data2(static)
        for outcome in outcomes:
            document[outcome.target] = outcome.document
        return json_reply(document)

    # --- one target -------------------------------------------------------------

    def _target(self, name: str, url: str, record: Any) -> Deferred[Outcome]:
        key = (name, record.node.uuid, record.revision)
        cached = self._cache.get(key, self._clock.seconds())
        if cached is not _MISSING and not isinstance(cached, TargetFailure):
            LOOKUPS.labels(name, "hit").inc()
            return succeed(Outcome(name, cached))
        failure = cached if cached is not _MISSING else self._gate.down(name)
        if failure is not None:
            LOOKUPS.labels(name, "failed").inc()
            if cached is _MISSING and self._failure_fatal and self._errors is not None:
                self._mark(record, name, failure.reason)
                self._cache.put(key, failure, len(failure.reason), self._gate.down_until(name))
            return succeed(Outcome(name, {}, failure))
        result: Deferred[Outcome] = Deferred()
        waiting = self._in_flight.get(key)
        if waiting is not None:
            LOOKUPS.labels(name, "shared").inc()
            waiting.append(result)
            return result
        LOOKUPS.labels(name, "miss").inc()
        self._in_flight[key] = [result]
        call = functools.partial(self._call, name, url, record.node)
        busy = functools.partial(TargetFailure, "busy")  # no slot of the target in time
        self._gate.turn(name, self._timeout, call, busy).addBoth(self._called, key, record)
        return result

    def _call(self, name: str, url: str, node: Node) -> Deferred[tuple[Any, float, int]]:
        self.upstream_calls += 1
        body = json.dumps(request_body(node)).encode("utf-8")
        headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"User-Agent": [USER_AGENT],
        }
        d: Deferred[Any] = succeed(None)
        if self._token_source is not None:

            def authenticate(token: str) -> None:
                headers[b"X-Auth-Token"] = [token.encode("ascii")]

            def no_token(failure: Failure) -> None:
                raise TargetFailure("auth", f"no service token: {failure.getErrorMessage()}")

            d = self._token_source.token().addCallbacks(authenticate, no_token)

        def post(_: None) -> Deferred[tuple[Any, float, int]]:
            request = self._http.post(url, data=body, headers=headers, unbuffered=True)
            request.addCallback(self._read)
            # Cancelling surfaces as whatever the connection died of; remember why.
            expired: list[bool] = []

            def expire() -> None:
                expired.append(True)
                request.cancel()

            timer = self._clock.callLater(self._timeout, expire)

            def settled(result: Any) -> Any:
                if expired:
                    raise TargetFailure("timeout", f"no answer within {self._timeout:g} s")
                timer.cancel()
                return result

            return request.addBoth(settled)

        return d.addCallback(post)

    def _read(self, response: Any) -> Deferred[tuple[Any, float, int]]:
        reader = _BodyReader(self._max_response_bytes)
        if not 200 <= response.code < 300:
            # The body is not wanted: drop the connection rather than read it.
            reader.done.addErrback(lambda _: None)
            response.deliverBody(reader)
            reader.done.cancel()
            if response.code in (401, 403):
                invalidate = getattr(self._token_source, "invalidate", None)
                if invalidate is not None:
                    invalidate()
            raise TargetFailure("http", f"HTTP {response.code}", response.code)
        lifetime = cache_lifetime(
            (v.decode("latin-1") for v in response.headers.getRawHeaders(b"cache-control", [])),
            self._cache_ttl,
        )
        response.deliverBody(reader)

        def parse(body: bytes) -> tuple[Any, float, int]:
            if not body.strip():
                return {}, lifetime, 0  # Nova: an empty answer (204) is {}
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise TargetFailure("invalid-json", f"answer is not JSON: {e}") from None
            return document, lifetime, len(body)

        return reader.done.addCallback(parse)

    def _called(self, result: Any, key: tuple[str, str, int], record: Any) -> None:
        name, uuid, _revision = key
        waiting = self._in_flight.pop(key)
        if isinstance(result, Failure):
            failure = classify(result, self._timeout)
            UPSTREAM.labels(name, failure.kind).inc()
            self.log.warn(
                "dynamic vendordata target {target} failed for node {uuid}: {reason}",
                target=name,
                uuid=uuid,
                reason=failure.reason,
            )
            outcome = Outcome(name, {}, failure)
            until = self._gate.failed(name, failure.kind, failure)
            if until is not None:
                self._cache.put(key, failure, len(failure.reason), until)
            if self._failure_fatal and self._errors is not None:
                self._mark(record, name, failure.reason)
        else:
            document, lifetime, size = result
            UPSTREAM.labels(name, "ok").inc()
            if lifetime > 0:
                self._cache.put(key, document, size, self._clock.seconds() + lifetime)
                CACHED.set(len(self._cache))
            outcome = Outcome(name, document)
            if self._errors is not None:
                self._clear(uuid, name)
        for d in waiting:
            d.callback(outcome)

    def _mark(self, record: Any, target: str, reason: str) -> None:
        assert self._errors is not None
        moment = datetime.fromtimestamp(self._clock.seconds(), tz=UTC).replace(
            tzinfo=None, microsecond=0
        )
        mark = VendordataError(
            node_uuid=record.node.uuid,
            target=target,
            reason=reason,
            node_revision=record.revision,
            conductor=self._conductor,
            failed_at=moment,
        )
        self._errors.mark(mark).addErrback(
            lambda f: self.log.warn(
                "could not record the vendordata failure of node {uuid}: {error}",
                uuid=record.node.uuid,
                error=f.getErrorMessage(),
            )
        )

    def _clear(self, uuid: str, target: str) -> None:
        assert self._errors is not None
        self._errors.clear(uuid, target).addErrback(
            lambda f: self.log.warn(
                "could not clear the vendordata failure of node {uuid}: {error}",
                uuid=uuid,
                error=f.getErrorMessage(),
            )
        )


# --- construction (tap.py) -----------------------------------------------------------


def make_vendordata(
    config: Config,
    reactor: Any,
    errors: VendordataMarks | None,
    keystone: TokenSource | None = None,
) -> DynamicVendordata | None:
    """The dynamic vendordata service of ``config``, or None when no target is set.
    ``keystone``: the daemon's Keystone client (None without ``[keystone] auth_url``).

    Raises ConfigError for an unusable token file or CA file."""
    settings: VendordataConfig = config.vendordata
    if not settings.dynamic_targets:
        return None
    token_source: TokenSource | None = None
    if settings.service_token_file:
        token_source = read_service_token(config)
    else:
        token_source = keystone
    try:
        http, pool = make_http_client(reactor, settings.ca_file, settings.connect_timeout)
    except Exception as e:  # an unparsable certificate
        raise ConfigError(f"{config.path}: [vendordata] ca_file: {e}") from None
    return DynamicVendordata(
        settings.dynamic_targets,
        http,
        reactor,
        token_source=token_source,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        cache_ttl=settings.cache_ttl,
        failure_fatal=settings.failure_fatal,
        errors=errors,
        conductor=config.conductor.hostname,
        pool=pool,
        max_concurrent_calls=settings.max_concurrent_calls,
        failure_ttl=settings.failure_ttl,
    )


__all__ = [
    "DynamicVendordata",
    "Outcome",
    "ResponseCache",
    "StaticToken",
    "TargetFailure",
    "cache_lifetime",
    "make_http_client",
    "make_vendordata",
    "read_service_token",
    "request_body",
]
