"""A Neutron stub: ``PUT /v2.0/ports/<id>`` with ``extra_dhcp_opts``, from the
Networking API v2.0 reference, checking what it receives; Keystone's
``POST /v3/auth/tokens`` (:class:`~metadatad.testing.keystone.KeystoneStub`) on the same
port, its catalog naming this Neutron.  Run in a process of its own by
``bench/neutron_stub.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metadatad.testing.keystone import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub

__all__ = ["NeutronStub"]

_NEUTRON_OPT_KEYS = {"opt_name", "opt_value", "ip_version"}


class NeutronStub:
    """``PUT /v2.0/ports/<id>`` and, under ``/v3/``, the Keystone stub.

    * Keystone (``keystone``): password auth with ``credentials`` (``username``,
      ``password``, ``user_domain_name``, ``project_name``, ``project_domain_name``;
      by default the Keystone stub's own user), tokens valid ``token_lifetime``
      seconds from ``now()``, a catalog whose ``network`` endpoint is ``neutron_url``.
    * Neutron: ``X-Auth-Token`` must be a token Keystone issued and not expired (or in
      ``static_tokens``), else 401; the body must be ``{"port": {"extra_dhcp_opts":
      [{"opt_name": str, "opt_value": str|null, "ip_version": 4|6}, ...]}}`` with no
      other key, option names at most 64 characters, values at most 255, else 400; an
      unknown port is 404 (Neutron's ``PortNotFound`` body).  Accepted options are
      merged into ``ports[id]`` (null deletes), as Neutron does.

    ``faults`` is a queue of actions for the next PUTs: an int status to answer
    (500, 503...) or ``"hang"`` (never answer: a timeout; the requests are kept in
    ``hanging``).  Every PUT is recorded in ``puts`` as ``(port id, body)``,
    ``accepted`` holds those applied and ``accepted_at`` each port's time of its last
    update.
    """

    def __init__(
        self,
        ports: Iterable[str] = (),
        credentials: dict[str, str] | None = None,
        now: Callable[[], float] = time.time,
        token_lifetime: float = 3600.0,
        neutron_url: str = "",
    ) -> None:
        self.ports: dict[str, dict[tuple[str, int], str]] = {p: {} for p in ports}
        self.now = now
        user, project = dict(KEYSTONE_USER), dict(KEYSTONE_PROJECT)
        if credentials:
            user = {
                "name": credentials["username"],
                "password": credentials["password"],
                "domain": credentials["user_domain_name"],
            }
            project = {
                "name": credentials["project_name"],
                "domain": credentials["project_domain_name"],
            }
        self.keystone = KeystoneStub(now, token_lifetime, user=user, project=project)
        self.neutron_url = neutron_url
        self.static_tokens: set[str] = set()
        self.faults: list[Any] = []
        self.puts: list[tuple[str, dict[str, Any]]] = []
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.accepted_at: dict[str, float] = {}  # port id -> time of its last update
        self.hanging: list[Any] = []

    @property
    def neutron_url(self) -> str:
        """This Neutron's URL, the ``network`` endpoint of Keystone's catalog."""
        return self._neutron_url

    @neutron_url.setter
    def neutron_url(self, url: str) -> None:
        self._neutron_url = url
        self.keystone.catalog = [
            {"type": "network", "endpoints": [{"interface": "public", "url": url}]}
        ]

    @property
    def tokens(self) -> dict[str, float]:
        """Keystone's valid tokens and their expiry (clear it to revoke them)."""
        return self.keystone.tokens

    @property
    def auth_requests(self) -> int:
        """How many token requests Keystone received."""
        return self.keystone.requests

    def resource(self) -> Resource:
        """The twisted.web resource serving both APIs."""
        stub = self

        class Root(Resource):
            isLeaf = True

            def render(self, request: Request) -> Any:
                if request.path.startswith(b"/v3/"):
                    return stub.keystone.render(request)
                return stub._render(request)

        return Root()

    def _render(self, request: Any) -> Any:
        path = request.path.decode()
        request.setHeader(b"Content-Type", b"application/json")
        prefix = "/v2.0/ports/"
        if request.method != b"PUT" or not path.startswith(prefix):
            request.setResponseCode(404)
            return b'{"NeutronError": {"type": "HTTPNotFound", "message": "no such resource"}}'
        port = path[len(prefix) :]
        raw = request.content.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.puts.append((port, body))
        token = (request.getHeader(b"X-Auth-Token") or b"").decode("ascii", "replace").strip()
        if token not in self.static_tokens and not self.keystone.valid(token):
            request.setResponseCode(401)
            return b'{"error": "Authentication required"}'
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "hang":
                self.hanging.append(request)
                return NOT_DONE_YET
            request.setResponseCode(int(fault))
            return b'{"NeutronError": {"type": "ServiceUnavailable", "message": "try again"}}'
        problem = _check_port_body(body)
        if problem:
            request.setResponseCode(400)
            return json.dumps(
                {"NeutronError": {"type": "HTTPBadRequest", "message": problem}}
            ).encode()
        if port not in self.ports:
            request.setResponseCode(404)
            return json.dumps(
                {
                    "NeutronError": {
                        "type": "PortNotFound",
                        "message": f"Port {port} could not be found.",
                    }
                }
            ).encode()
        options = self.ports[port]
        for option in body["port"]["extra_dhcp_opts"]:
            key = (option["opt_name"], option.get("ip_version", 4))
            if option["opt_value"] is None:
                options.pop(key, None)
            else:
                options[key] = option["opt_value"]
        self.accepted.append((port, body))
        self.accepted_at[port] = self.now()
        return json.dumps(
            {
                "port": {
                    "id": port,
                    "extra_dhcp_opts": [
                        {"opt_name": n, "opt_value": v, "ip_version": ver}
                        for (n, ver), v in options.items()
                    ],
                }
            }
        ).encode()


def _check_port_body(body: Any) -> str | None:
    """Why ``body`` is not a valid extra_dhcp_opts update (None: it is)."""
    if not isinstance(body, dict) or set(body) != {"port"} or not isinstance(body["port"], dict):
        return 'body must be {"port": {...}}'
    if set(body["port"]) != {"extra_dhcp_opts"}:
        return "only extra_dhcp_opts may be updated here"
    options = body["port"]["extra_dhcp_opts"]
    if not isinstance(options, list):
        return "extra_dhcp_opts must be a list"
    for option in options:
        if not isinstance(option, dict) or not set(option) <= _NEUTRON_OPT_KEYS:
            return f"bad option {option!r}"
        name, value = option.get("opt_name"), option.get("opt_value")
        if not isinstance(name, str) or not name or len(name) > 64:
            return f"bad opt_name {name!r}"
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            return f"bad opt_value {value!r}"
        if option.get("ip_version", 4) not in (4, 6):
            return f"bad ip_version {option.get('ip_version')!r}"
    return None
