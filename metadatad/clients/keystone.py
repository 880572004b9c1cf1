# -*- test-case-name: tests.web.test_keystone -*-
"""Keystone v3 tokens for every call metadatad makes to OpenStack services as itself
(dynamic vendordata, the Neutron DHCP provider).

:class:`KeystoneTokenClient` authenticates the ``[keystone]`` service user with a
password (``POST /v3/auth/tokens``, project-scoped).  ``token()`` answers from memory
while the token has more than ``refresh_margin`` seconds left; otherwise one request
runs (concurrent callers share it) and the new token, from the ``X-Subject-Token``
header, is kept until its ``expires_at``.  If Keystone fails while the old token is
still valid, the old token is used.  ``endpoint(service_type)`` looks a URL up in the
token's service catalog; ``invalidate(token)`` forgets a token a service refused.

:class:`StaticToken` is the same interface over a token obtained out of band.  One
:class:`KeystoneTokenClient` is built per daemon (:func:`make_keystone_client`) and
shared by its users.  Neither the password nor a token is ever logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs
from prometheus_client import Counter
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.clients.http import make_http_client
from metadatad.config import ConfigError, KeystoneConfig
from metadatad.metrics import REGISTRY

if TYPE_CHECKING:
    from metadatad.config import Config

__all__ = [
    "KeystoneError",
    "KeystoneTokenClient",
    "StaticToken",
    "auth_request_body",
    "catalog_endpoint",
    "make_keystone_client",
    "parse_expiry",
    "refresh_at",
    "tokens_url",
]

# A token is replaced this long before it expires (less for short-lived tokens).
REFRESH_MARGIN = 300.0
# While Keystone fails and the old token still works, ask again this often.
RETRY_INTERVAL = 10.0
# Keystone answers meaning the request itself is wrong: asking again cannot help.
PERMANENT_STATUSES = frozenset({400, 401, 403, 404})

TOKEN_REQUESTS = Counter(
    "metadatad_keystone_token_requests",
    "Keystone v3 token requests, by outcome (ok, error).",
    ["outcome"],
    registry=REGISTRY,
)


class KeystoneError(Exception):
    """Keystone did not issue a token; ``str()`` says why (never the password).

    ``permanent``: retrying cannot help (Keystone answered 400, 401, 403 or 404)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


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


def catalog_endpoint(catalog: Iterable[Any], service_type: str, interface: str) -> str | None:
    """The URL of ``service_type``'s ``interface`` endpoint in a v3 service catalog
    (without a trailing slash), or None."""
    for service in catalog:
        if not isinstance(service, dict) or service.get("type") != service_type:
            continue
        for endpoint in service.get("endpoints") or []:
            if (
                isinstance(endpoint, dict)
                and endpoint.get("interface") == interface
                and isinstance(endpoint.get("url"), str)
                and endpoint["url"]
            ):
                return str(endpoint["url"]).rstrip("/")
    return None


class KeystoneTokenClient:
    """A cached Keystone v3 token (and service catalog) for the service user of
    ``config``.  ``http_client`` is a treq ``HTTPClient`` (or ``StubTreq``); ``clock``
    an ``IReactorTime``, whose ``seconds()`` is compared with ``expires_at``."""

    log = Logger()

    def __init__(
        self,
        config: KeystoneConfig,
        http_client: Any,
        clock: IReactorTime,
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
        self._catalog: list[Any] = []
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

    def invalidate(self, token: str | None = None) -> None:
        """Forget the token (a service refused it): the next call fetches a new one.

        With ``token``, only if it is still the current one (a token fetched since
        the refused request stays)."""
        if token is None or token == self._token:
            self._token = None

    def endpoint(self, service_type: str, interface: str = "public") -> str | None:
        """``service_type``'s URL from the last token's catalog (None: not in it, or
        no token fetched yet)."""
        return catalog_endpoint(self._catalog, service_type, interface)

    def _fetch(self) -> Deferred[tuple[str, float, list[Any]]]:
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

    def _read(self, response: Any, issued: float) -> Deferred[tuple[str, float, list[Any]]]:
        def parse(body: bytes) -> tuple[str, float, list[Any]]:
            if response.code != 201:
                raise KeystoneError(
                    f"{self._url} answered HTTP {response.code}",
                    permanent=response.code in PERMANENT_STATUSES,
                )
            tokens = response.headers.getRawHeaders(b"X-Subject-Token") or []
            if len(tokens) != 1 or not tokens[0].strip():
                raise KeystoneError(f"{self._url}: no X-Subject-Token header in the answer")
            token = tokens[0].strip().decode("ascii", "replace")
            try:
                document = json.loads(body)
                expires = parse_expiry(document["token"]["expires_at"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise KeystoneError(
                    f"{self._url}: no token.expires_at in the answer ({e})"
                ) from None
            if expires <= issued:
                raise KeystoneError(f"{self._url}: the token expired at once ({expires})")
            catalog = document["token"].get("catalog")
            return token, expires, catalog if isinstance(catalog, list) else []

        d: Deferred[bytes] = response.content()
        return d.addCallback(parse)

    def _fetched(self, result: tuple[str, float, list[Any]] | Failure) -> None:
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
            error = result.value if isinstance(result.value, KeystoneError) else None
            failure = Failure(error or KeystoneError(f"{self._url}: {reason}"))
            for d in waiting:
                d.errback(failure)
            return
        TOKEN_REQUESTS.labels("ok").inc()
        self._token, self._expires, self._catalog = result
        self._refresh = refresh_at(now, self._expires, self._margin)
        self.log.info(
            "keystone token for {user}@{project} valid for {seconds:.0f} s",
            user=self._config.username,
            project=self._config.project_name,
            seconds=self._expires - now,
        )
        for d in waiting:
            d.callback(self._token)


@attrs.frozen
class StaticToken:
    """A token obtained out of band (read from a file at start-up); never renewed."""

    value: str = attrs.field(repr=False)

    def token(self) -> Deferred[str]:
        """The token."""
        return succeed(self.value)

    def invalidate(self, token: str | None = None) -> None:
        """Nothing better to use: the same token is sent again."""

    def endpoint(self, service_type: str, interface: str = "public") -> str | None:
        """No catalog: the user must be configured with the service's URL."""
        return None


def make_keystone_client(config: Config, reactor: Any) -> KeystoneTokenClient | None:
    """The daemon's one Keystone client (None without ``[keystone] auth_url``), over
    an HTTP client of its own that trusts ``[keystone] ca_file``.  Its requests time
    out after ``[keystone] timeout``, or when that is empty after ``[dhcp]
    neutron_timeout`` when the Neutron provider uses it, else 10 s.

    Raises ConfigError for an unusable CA file."""
    if not config.keystone.auth_url:
        return None
    timeout = config.keystone.timeout
    if timeout is None:
        uses_neutron = config.dhcp.provider == "neutron" and not config.dhcp.neutron_token_file
        timeout = config.dhcp.neutron_timeout if uses_neutron else 10.0
    try:
        http, _ = make_http_client(reactor, config.keystone.ca_file, timeout)
    except Exception as e:  # an unreadable or unparsable certificate file
        raise ConfigError(f"{config.path}: [keystone] ca_file: {e}") from None
    return KeystoneTokenClient(config.keystone, http, reactor, timeout=timeout)
