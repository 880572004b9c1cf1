"""A Keystone v3 stub: ``POST /v3/auth/tokens`` with password authentication, as the
Identity API v3 reference describes it, checking every request it receives.

The one Keystone stub of the test suite and the benchmarks: alone (the token client,
dynamic vendordata) or inside :class:`~metadatad.testing.neutron.NeutronStub`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.web import server
from twisted.web.resource import Resource

__all__ = ["KEYSTONE_PROJECT", "KEYSTONE_USER", "TOKENS_PATH", "KeystoneStub"]

KEYSTONE_USER = {"name": "metadatad", "password": "s3cret-service-pw", "domain": "Default"}
KEYSTONE_PROJECT = {"name": "service", "domain": "Default"}
TOKENS_PATH = b"/v3/auth/tokens"


class KeystoneStub(Resource):
    """``POST /v3/auth/tokens``: password method, user by name and domain name, project
    scope by name and domain name (``user`` and ``project``: ``{"name", "domain"}``, the
    user's with its ``password``).

    A valid request (``Content-Type: application/json``) gets 201, ``X-Subject-Token``
    and ``{"token": {"expires_at": ..., ...}}``, with ``catalog`` (a v3 service catalog)
    when one is set; a malformed body 400, another Content-Type 415, wrong credentials
    401 (each reason appended to ``refused``); any other path or method 404.
    ``status_override`` answers every request with that status instead.  ``now`` is the
    stub's clock: tokens expire ``lifetime`` seconds after issue.  ``issued`` lists the
    tokens in order, ``tokens`` maps the valid ones to their expiry (clear it to revoke
    them all), ``requests`` counts the requests received.
    """

    isLeaf = True

    def __init__(
        self,
        now: Callable[[], float],
        lifetime: float = 3600.0,
        catalog: list[dict[str, Any]] | None = None,
        *,
        user: Mapping[str, str] = KEYSTONE_USER,
        project: Mapping[str, str] = KEYSTONE_PROJECT,
    ) -> None:
        super().__init__()
        self._now = now
        self.lifetime = lifetime
        self.catalog = catalog
        self.user = dict(user)
        self.project = dict(project)
        self.issued: list[str] = []
        self.tokens: dict[str, float] = {}
        self.refused: list[str] = []
        self.status_override: int | None = None
        self.requests = 0

    def valid(self, token: str) -> bool:
        """Whether ``token`` was issued here and has neither expired nor been revoked."""
        return self.tokens.get(token, float("-inf")) > self._now()

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.method != b"POST" or request.path != TOKENS_PATH:
            request.setResponseCode(404)
            return b'{"error": {"code": 404}}'
        self.requests += 1
        if request.getHeader(b"content-type") != b"application/json":
            return self._refuse(request, 415, "Content-Type must be application/json")
        if self.status_override is not None:
            request.setResponseCode(self.status_override)
            return b'{"error": {"code": %d}}' % self.status_override
        assert request.content is not None
        try:
            auth = json.loads(request.content.read())["auth"]
            identity = auth["identity"]
            user = identity["password"]["user"]
            project = auth["scope"]["project"]
            methods = identity["methods"]
            given = {
                "name": user["name"],
                "password": user["password"],
                "domain": user["domain"]["name"],
            }
            scope = {"name": project["name"], "domain": project["domain"]["name"]}
        except (ValueError, KeyError, TypeError) as e:
            return self._refuse(request, 400, f"malformed auth request: {e!r}")
        if methods != ["password"]:
            return self._refuse(request, 400, f"unexpected methods {methods}")
        if given != self.user or scope != self.project:
            return self._refuse(request, 401, "The request you have made requires authentication.")
        token = f"gAAAAA-test-token-{len(self.issued)}"
        now = self._now()
        self.issued.append(token)
        self.tokens[token] = now + self.lifetime
        expires = datetime.datetime.fromtimestamp(now + self.lifetime, datetime.UTC)
        issued_at = datetime.datetime.fromtimestamp(now, datetime.UTC)
        request.setResponseCode(201)
        request.setHeader(b"X-Subject-Token", token.encode())
        catalog = {} if self.catalog is None else {"catalog": self.catalog}
        return json.dumps(
            {
                "token": {
                    **catalog,
                    "methods": ["password"],
                    # Keystone's format: microseconds and a Z.
                    "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "issued_at": issued_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "user": {"name": self.user["name"], "domain": {"name": self.user["domain"]}},
                    "project": {
                        "name": self.project["name"],
                        "domain": {"name": self.project["domain"]},
                    },
                    "roles": [{"name": "service"}],
                }
            }
        ).encode()

    def _refuse(self, request: server.Request, status: int, message: str) -> bytes:
        self.refused.append(message)
        request.setResponseCode(status)
        return json.dumps({"error": {"code": status, "message": message}}).encode()
