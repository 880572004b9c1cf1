# -*- test-case-name: tests.test_keystone -*-
"""Keystone v3 tokens for the daemon's own calls to OpenStack services.

:class:`KeystoneTokens` authenticates with a password (``POST /v3/auth/tokens``,
project-scoped) and keeps the token until shortly before its ``expires_at``; concurrent
callers share one request.  :class:`StaticToken` reads a token from a file instead
(operators with an out-of-band token).  Both have ``token()`` (a Deferred of the
token), ``endpoint(service_type)`` (from the catalog, when known) and
``invalidate(token)`` (after a 401).  Tokens and passwords are never logged.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from metadatad.config import KeystoneConfig

__all__ = ["KeystoneError", "KeystoneTokens", "StaticToken"]

# Renew this long before Keystone's expiry (clock skew, requests in flight).
EXPIRY_MARGIN = 60.0


class KeystoneError(Exception):
    """Authentication failed; ``permanent`` if retrying cannot help (401, 403, 400)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _parse_expiry(text: str) -> float:
    """Seconds since the epoch of Keystone's ``2026-11-30T10:00:00.000000Z``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class KeystoneTokens:
    """Project-scoped tokens from Keystone v3, cached until expiry.

    ``http_client`` is a ``treq.client.HTTPClient`` (or ``StubTreq``); ``clock`` an
    ``IReactorTime`` (its ``seconds()`` is wall-clock time, compared with the
    token's ``expires_at``)."""

    log = Logger()

    def __init__(
        self, settings: KeystoneConfig, http_client: Any, clock: Any, timeout: float = 10.0
    ) -> None:
        self.settings = settings
        self._http = http_client
        self._clock = clock
        self._timeout = timeout
        self._token: str | None = None
        self._expires = 0.0
        self._catalog: list[dict[str, Any]] = []
        self._waiting: list[Deferred[str]] | None = None

    def token(self) -> Deferred[str]:
        """A valid token (cached, or fetched once for all concurrent callers)."""
        if self._token is not None and self._clock.seconds() < self._expires - EXPIRY_MARGIN:
            return succeed(self._token)
        waiter: Deferred[str] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        self._authenticate().addBoth(self._deliver)
        return waiter

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the service answered 401): the next call authenticates."""
        if token == self._token:
            self._token = None

    def endpoint(self, service_type: str, interface: str = "public") -> str | None:
        """The catalog URL of ``service_type`` (None: unknown, or not fetched yet)."""
        for service in self._catalog:
            if service.get("type") != service_type:
                continue
            for endpoint in service.get("endpoints", []):
                if endpoint.get("interface") == interface and endpoint.get("url"):
                    return str(endpoint["url"]).rstrip("/")
        return None

    def _deliver(self, result: Any) -> None:
        waiters, self._waiting = self._waiting or [], None
        for waiter in waiters:
            if isinstance(result, str):
                waiter.callback(result)
            else:
                waiter.errback(result)

    def _authenticate(self) -> Deferred[str]:
        s = self.settings
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": s.username,
                            "domain": {"name": s.user_domain_name},
                            "password": s.password,
                        }
                    },
                },
                "scope": {
                    "project": {"name": s.project_name, "domain": {"name": s.project_domain_name}}
                },
            }
        }
        url = s.auth_url.rstrip("/") + "/auth/tokens"
        d = self._http.post(
            url,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": ["application/json"], "Accept": ["application/json"]},
            timeout=self._timeout,
        )

        def failed(failure: Any) -> Any:
            if failure.check(KeystoneError):
                return failure
            raise KeystoneError(f"Keystone {url}: {failure.getErrorMessage()}")

        def answered(response: Any) -> Deferred[str]:
            return response.content().addCallback(self._accept, response, url)

        return d.addCallback(answered).addErrback(failed)

    def _accept(self, content: bytes, response: Any, url: str) -> str:
        if response.code != 201:
            raise KeystoneError(
                f"Keystone {url} answered {response.code}",
                permanent=response.code in (400, 401, 403, 404),
            )
        tokens = response.headers.getRawHeaders("X-Subject-Token") or []
        try:
            document = json.loads(content)
            expires = _parse_expiry(document["token"]["expires_at"])
            catalog = document["token"].get("catalog", [])
        except (ValueError, KeyError, TypeError):
            raise KeystoneError(f"Keystone {url}: malformed token response") from None
        if not tokens:
            raise KeystoneError(f"Keystone {url}: no X-Subject-Token header")
        token = tokens[0].decode("ascii") if isinstance(tokens[0], bytes) else tokens[0]
        self._token, self._expires = token, expires
        self._catalog = catalog if isinstance(catalog, list) else []
        self.log.info(
            "Keystone token for {user}@{project} valid for {seconds:.0f} s",
            user=self.settings.username,
            project=self.settings.project_name,
            seconds=expires - self._clock.seconds(),
        )
        return token


class StaticToken:
    """A token read from a file once (one line); never expires by itself."""

    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"{path} must hold one token without spaces")
        self._token = token

    def token(self) -> Deferred[str]:
        return succeed(self._token)

    def invalidate(self, token: str) -> None:
        pass  # nothing better to use

    def endpoint(self, service_type: str, interface: str = "public") -> str | None:
        return None
