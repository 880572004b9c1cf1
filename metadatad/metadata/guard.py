# -*- test-case-name: tests.web.test_imds_site -*-
"""The metadata site's gate: IMDSv2 tokens, rate limits, body limits, required header.

The site calls the gate centrally, so every path (EC2, OpenStack, and any tree added
later) is treated alike:

1. :meth:`Guard.screen`, before identity: a body over the limit (413), the token path's
   method, version, ``X-Forwarded-For`` and TTL rules (405/403/403/400), the optional
   required header (403); it also checks a supplied token's signature and expiry, and
   notes a missing token under ``require_tokens``.  Its refusals wait for step 2.
2. :meth:`Guard.admit`, once the caller is known: its token bucket (429), then the
   refusal noted by ``screen``, so that every bad request counts against the rate.
   A caller that cannot be identified is charged by its address
   (:meth:`Guard.unidentified`).

Header values are read as bytes and decoded as Latin-1: any octet is a character, so
a non-UTF-8 byte is just a value that does not match (a 4xx), never a decoding error.
3. :meth:`Guard.authorise`, once its node is known: a supplied token must be that
   node's (401).
4. :meth:`Guard.issue` answers the token ``PUT`` (with the low IP TTL).

Refusals are counted and audit-logged (:meth:`Guard.deny`) with the node and the
reason, never the token; a flood of one refusal from one peer is logged sparingly.
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs
from prometheus_client import Counter
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from metadatad.core.identity import FORWARDED_FOR, Caller, normalise_ip
from metadatad.core.ratelimit import RateLimiter, retry_after
from metadatad.core.tokens import MAX_TTL, TokenError, TokenSigner, TTLError, parse_ttl
from metadatad.hardening import limit_response_hops
from metadatad.metadata import ec2
from metadatad.metadata.reply import Reply, error, text
from metadatad.metrics import REGISTRY

TOKEN_HEADER = "x-aws-ec2-metadata-token"
TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
_TOKEN_HEADER = TOKEN_HEADER.encode("ascii")

audit = Logger(namespace="metadatad.audit")

DENIED = Counter(
    "metadatad_metadata_denied_total",
    "Metadata requests refused by the gate (tokens, rate, size, header), by reason.",
    ["reason"],
    registry=REGISTRY,
)
TOKENS_ISSUED = Counter(
    "metadatad_imds_tokens_issued_total", "IMDSv2 session tokens issued.", registry=REGISTRY
)


@attrs.frozen
class Screened:
    """What :meth:`Guard.screen` let through: a token ``PUT`` (with its TTL), and the
    node a supplied, well-signed token names."""

    token_request: bool = False
    ttl: int = 0
    token_node: str | None = None
    # A refusal that waits until the caller is known, so that it counts against the
    # caller's rate limit (a flood of bad tokens is a flood like any other).
    refusal: Denied | None = None


@attrs.frozen
class Denied:
    """A refusal: the reply, and the reason for the audit log."""

    reply: Reply
    reason: str
    # False for the repeats of a flood: counted, but logged once.
    logged: bool = True


# What most requests are screened to: no token, nothing to refuse (shared: frozen).
_PLAIN = Screened()


def is_public_listing(parts: list[str]) -> bool:
    """``/``, ``/openstack`` and ``/ec2``: the same for every caller, no node data."""
    return parts in ([], ["openstack"], ["ec2"])


def is_token_path(parts: list[str]) -> bool:
    """``/<version>/api/token``, for ``latest`` and every dated EC2 version."""
    return (
        len(parts) == 3 and parts[2] == "token" and parts[1] == "api" and ec2.is_version(parts[0])
    )


class Guard:
    """The gate of the metadata site; collaborators and settings are passed in."""

    def __init__(
        self,
        clock: IReactorTime,
        signer: TokenSigner | None = None,
        *,
        require_tokens: bool = False,
        hop_limit: int = 1,
        limiter: RateLimiter | None = None,
        require_header: tuple[str, str | None] | None = None,
        max_body_bytes: int = 65536,
    ) -> None:
        self._clock = clock
        # Without a configured secret, tokens are valid on this process only.
        self._signer = signer if signer is not None else TokenSigner(secrets.token_urlsafe(32))
        self.require_tokens = require_tokens
        self._hop_limit = hop_limit
        self._limiter = limiter if limiter is not None else RateLimiter(0, 1)
        self._require_header = require_header
        self._max_body = max_body_bytes
        # Callers being rate limited: their first 429 is logged, not every one.
        self._limited: set[str] = set()
        # Audit lines per peer and reason: a few at once, then one per 10 s.
        self._log_budget = RateLimiter(0.1, 5, max_keys=10_000)

    def screen(self, request: Request, parts: list[str]) -> Screened:
        """Checks that need no identity (see the module docstring); a refusal is kept
        in the result for :meth:`admit`."""
        token_request = is_token_path(parts)
        ttl_or_refusal = self._first_refusal(request, parts, token_request)
        if isinstance(ttl_or_refusal, Denied):
            return Screened(token_request, refusal=ttl_or_refusal)
        ttl = ttl_or_refusal
        tokens = request.requestHeaders.getRawHeaders(_TOKEN_HEADER)
        if not tokens:
            if self.require_tokens and not token_request and not is_public_listing(parts):
                reply = error(401, "Unauthorized: a session token is required")
                return Screened(token_request, ttl, refusal=Denied(reply, "no token"))
            return Screened(token_request, ttl) if token_request else _PLAIN
        if len(tokens) != 1:
            refusal = Denied(error(401, "Unauthorized"), "several tokens")
            return Screened(token_request, ttl, refusal=refusal)
        try:
            token = tokens[0].decode("latin-1").strip()
            node, _ = self._signer.verify(token, self._clock.seconds())
        except TokenError as e:
            refusal = Denied(error(401, "Unauthorized"), e.reason)
            return Screened(token_request, ttl, refusal=refusal)
        return Screened(token_request, ttl, node)

    def _first_refusal(
        self, request: Request, parts: list[str], token_request: bool
    ) -> Denied | int:
        """The first rule ``request`` breaks, or the TTL a token ``PUT`` asks for."""
        size = _body_size(request)
        if size > self._max_body:
            return Denied(error(413, "Content Too Large"), "request body too large")
        ttl = 0
        if token_request:
            if request.method != b"PUT":
                reply = error(405, "Method Not Allowed")
                return Denied(attrs.evolve(reply, headers=(("Allow", "PUT"),)), "token method")
            if parts[0] != "latest":
                # As AWS: tokens come from /latest/api/token only.
                return Denied(error(403, "Forbidden"), "token PUT on a dated version")
            if request.requestHeaders.hasHeader(FORWARDED_FOR.encode("ascii")):
                # A proxy adds X-Forwarded-For; a token must not travel through one.
                return Denied(error(403, "Forbidden"), "token PUT with X-Forwarded-For")
            try:
                ttl = parse_ttl(_header(request, TTL_HEADER))
            except TTLError as e:
                return Denied(error(400, f"Bad Request: {e}"), "bad token TTL")
        if (
            self._require_header is not None
            and not is_public_listing(parts)
            and not self._has_required(request)
        ):
            return Denied(error(403, "Forbidden: required header missing"), "required header")
        return ttl

    def unidentified(self, peer: str, status: int, message: str) -> Denied:
        """The refusal of a request whose identity headers are unusable, charged to the
        bucket of the address it came from (429 once that is empty)."""
        try:
            key = f"ip:{normalise_ip(peer)}"
        except ValueError:
            key = f"peer:{peer}"
        denied = self._charge(key, Denied(error(status, message), message))
        assert denied is not None
        return denied

    def admit(self, caller: Caller, screened: Screened) -> Denied | None:
        """Spend one request of ``caller``'s bucket, or refuse with 429; then the
        refusal :meth:`screen` kept for a known caller, if any."""
        return self._charge(caller.rate_key, screened.refusal)

    def _charge(self, key: str, refusal: Denied | None) -> Denied | None:
        wait = self._limiter.take(key, self._clock.seconds())
        if wait <= 0:
            if self._limited:
                self._limited.discard(key)
            return refusal
        first = key not in self._limited
        if first and len(self._limited) < 100_000:
            self._limited.add(key)
        reply = error(429, "Too Many Requests")
        headers = (("Retry-After", retry_after(wait)),)
        return Denied(attrs.evolve(reply, headers=headers), "rate limit", logged=first)

    def authorise(self, screened: Screened, node_uuid: str | None) -> Denied | None:
        """A supplied token must be the asking node's."""
        if screened.token_node is not None and screened.token_node != node_uuid:
            return Denied(error(401, "Unauthorized"), "token of another node")
        return None

    def issue(self, request: Request, screened: Screened, node_uuid: str) -> Reply:
        """The token ``PUT``'s answer; its packets leave with IP TTL ``hop_limit``."""
        token = self._signer.issue(node_uuid, screened.ttl, self._clock.seconds())
        limit_response_hops(request, self._hop_limit)
        TOKENS_ISSUED.inc()
        headers = (("X-aws-ec2-metadata-token-ttl-seconds", str(screened.ttl)),)
        return attrs.evolve(text(token), headers=headers)

    def deny(self, request: Request, denied: Denied, peer: str, node: str | None = None) -> Reply:
        """Count a refusal and audit-log it (method, path, peer, node, reason; never a
        token or a body); repeats from one peer for one reason are logged sparingly."""
        DENIED.labels(denied.reason).inc()
        if (
            denied.logged
            and self._log_budget.take(f"{peer} {denied.reason}", self._clock.seconds()) == 0
        ):
            _audit_denied(request, denied, peer, node)
        return denied.reply

    def _has_required(self, request: Request) -> bool:
        assert self._require_header is not None
        name, value = self._require_header
        values = _header(request, name)
        if not values:
            return False
        return value is None or any(v.strip() == value for v in values)


def make_guard(config: Any, clock: IReactorTime) -> Guard:
    """The gate for a ``[metadata]`` section (a :class:`~metadatad.config.MetadataConfig`).

    Without ``token_secret`` tokens are signed with a random per-process secret.  The
    previous secret counts for one maximum TTL from now (this daemon's start).
    """
    now = clock.seconds()
    secret = config.token_secret or secrets.token_urlsafe(32)
    if not config.token_secret:
        audit.info("no [metadata] token_secret: IMDSv2 tokens are valid on this conductor only")
    signer = TokenSigner(secret, config.token_secret_previous, now + MAX_TTL)
    return Guard(
        clock,
        signer,
        require_tokens=config.require_tokens,
        hop_limit=config.token_hop_limit,
        limiter=RateLimiter(config.rate_limit, config.rate_burst),
        require_header=config.require_header,
        max_body_bytes=config.max_body_bytes,
    )


def _audit_denied(request: Request, denied: Denied, peer: str, node: str | None) -> None:
    audit.info(
        "audit: denied {method} {path} from {peer} node {node}: {status} {reason}",
        method=_shown(request.method),
        path=_shown(request.path),
        peer=peer,
        node=node or "-",
        status=denied.reply.status,
        reason=denied.reason,
    )


def audit_write(what: str, node: str, peer: str) -> None:
    """Audit-log a write by a node (its password, its peer data); never the value."""
    audit.info("audit: node {node} from {peer} wrote {what}", node=node, peer=peer, what=what)


def _shown(raw: bytes) -> str:
    # Paths are attacker-chosen: bounded, and escaped so a log line stays one line.
    return raw[:200].decode("latin-1").encode("unicode_escape").decode("ascii")


def _header(request: Request, name: str) -> list[str] | None:
    # A bytes name: with a str name Twisted decodes values as UTF-8, which may fail.
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    return [v.decode("latin-1") for v in values]


def _body_size(request: Request) -> int:
    counted: int | None = getattr(request, "body_bytes", None)
    if counted is not None:
        # A HardenedRequest (the daemon's sites) counts its body as it reads it.
        return counted
    content = request.content
    if content is None:
        return 0
    position = content.tell()
    size = content.seek(0, 2)
    content.seek(position)
    return int(size)
