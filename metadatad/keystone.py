# -*- test-case-name: tests.test_keystone -*-
"""A Keystone v3 service token: password authentication of metadatad's service user.

:class:`KeystoneTokenClient` takes its treq ``HTTPClient`` and clock in ``__init__``.
``token()`` answers from memory while the token has more than ``refresh_margin``
seconds left; otherwise one ``POST /v3/auth/tokens`` runs (concurrent callers share it)
and the new token, from the ``X-Subject-Token`` header, is kept until its ``expires_at``.
If Keystone fails while the old token is still valid, the old token is used.

Any service that talks to OpenStack APIs as metadatad (dynamic vendordata, Neutron)
can share one client built from the ``[keystone]`` section.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Counter
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.config import KeystoneConfig
from metadatad.metrics import REGISTRY

# A token is replaced this long before it expires (less for short-lived tokens).
REFRESH_MARGIN = 300.0
# While Keystone fails and the old token still works, ask again this often.
RETRY_INTERVAL = 10.0

TOKEN_REQUESTS = Counter(
    "metadatad_keystone_token_requests",
    "Keystone v3 token requests, by outcome (ok, error).",
    ["outcome"],
    registry=REGISTRY,
)


class Clock(Protocol):
    """The part of IReactorTime the client uses."""

    def seconds(self) -> float: ...


class KeystoneError(Exception):
    """Keystone did not issue a token; ``str()`` says why (never the password)."""


def auth_request_body(config: KeystoneConfig) -> dict[str, Any]:
    """The v3 password-auth document, scoped to the service user's project."""
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": config.username,
                        "domain": {"name": config.user_domain_name},
                        "password": config.password,
                    }
                },
            },
            "scope": {
                "project": {
                    "name": config.project_name,
                    "domain": {"name": config.project_domain_name},
                }
            },
        }
    }


def tokens_url(auth_url: str) -> str:
    """``/v3/auth/tokens`` under ``auth_url`` (given with or without its ``/v3``)."""
    base = auth_url.rstrip("/")
    if not base.endswith("/v3"):
        base += "/v3"
    return base + "/auth/tokens"


def parse_expiry(text: str) -> float:
    """Seconds since the epoch of Keystone's ``expires_at`` (ISO 8601, UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"expires_at without a time zone: {text!r}")
    return moment.timestamp()


def refresh_at(issued: float, expires: float, margin: float = REFRESH_MARGIN) -> float:
    """When to fetch the next token: ``margin`` before expiry, at most half-way through
    the token's life (a token shorter-lived than twice the margin)."""
    return max(issued + (expires - issued) / 2, expires - margin)


class KeystoneTokenClient:
    """A cached Keystone v3 token for the service user of ``config``."""

    log = Logger()

    def __init__(
        self,
        config: KeystoneConfig,
        http_client: Any,
        clock: Clock,
        *,
        timeout: float = 10.0,
        refresh_margin: float = REFRESH_MARGIN,
    ) -> None:
        self._config = config
        self._http = http_client
        self._clock = clock
        self._timeout = timeout
        self._margin = refresh_margin
        self._url = tokens_url(config.auth_url)
        self._token: str | None = None
        self._expires = 0.0
        self._refresh = 0.0
        self._waiting: list[Deferred[str]] | None = None
        self.requests = 0

    def token(self) -> Deferred[str]:
        """A valid token; fails with :class:`KeystoneError` when none can be had."""
        now = self._clock.seconds()
        if self._token is not None and now < self._refresh:
            return succeed(self._token)
        result: Deferred[str] = Deferred()
        if self._waiting is not None:
            self._waiting.append(result)
            return result
        self._waiting = [result]
        self._fetch().addBoth(self._fetched)
        return result

    def invalidate(self) -> None:
        """Forget the token (a service refused it): the next call fetches a new one."""
        self._token = None

    def _fetch(self) -> Deferred[tuple[str, float]]:
        self.requests += 1
        issued = self._clock.seconds()
        d = self._http.post(
            self._url,
            data=json.dumps(auth_request_body(self._config)).encode("utf-8"),
            headers={
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json"],
                b"User-Agent": [b"metadatad"],
            },
        )
        d.addCallback(self._read, issued)
        d.addTimeout(self._timeout, self._clock)
        return d

    def _read(self, response: Any, issued: float) -> Deferred[tuple[str, float]]:
        def parse(body: bytes) -> tuple[str, float]:
            if response.code != 201:
                raise KeystoneError(f"{self._url} answered HTTP {response.code}")
            tokens = response.headers.getRawHeaders(b"X-Subject-Token") or []
            if len(tokens) != 1 or not tokens[0].strip():
                raise KeystoneError(f"{self._url}: no X-Subject-Token header in the answer")
            try:
                document = json.loads(body)
                expires = parse_expiry(document["token"]["expires_at"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise KeystoneError(
                    f"{self._url}: no token.expires_at in the answer ({e})"
                ) from None
            if expires <= issued:
                raise KeystoneError(f"{self._url}: the token expired at once ({expires})")
            return tokens[0].strip().decode("ascii"), expires

        d: Deferred[bytes] = response.content()
        return d.addCallback(parse)

    def _fetched(self, result: tuple[str, float] | Failure) -> None:
        waiting, self._waiting = self._waiting or [], None
        now = self._clock.seconds()
        if isinstance(result, Failure):
            TOKEN_REQUESTS.labels("error").inc()
            reason = result.getErrorMessage() or result.type.__name__  # type: ignore[union-attr]
            if self._token is not None and now < self._expires:
                # Keystone is away but the token still works: keep using it.
                self.log.warn(
                    "keystone token refresh failed, the current token stays: {reason}",
                    reason=reason,
                )
                self._refresh = min(now + RETRY_INTERVAL, self._expires)
                for d in waiting:
                    d.callback(self._token)
                return
            self.log.warn("keystone refused or did not answer: {reason}", reason=reason)
            failure = Failure(KeystoneError(reason))
            for d in waiting:
                d.errback(failure)
            return
        TOKEN_REQUESTS.labels("ok").inc()
        self._token, self._expires = result
        self._refresh = refresh_at(now, self._expires, self._margin)
        self.log.info(
            "keystone token for {user} valid for {seconds:.0f} s",
            user=self._config.username,
            seconds=self._expires - now,
        )
        for d in waiting:
            d.callback(self._token)
