# -*- test-case-name: tests.dhcp.test_dhcp_neutron -*-
"""The ``neutron`` provider: ``PUT /v2.0/ports/<id>`` with ``extra_dhcp_opts``.

One PUT per PXE port that has a ``neutron_port_id`` (Ironic's option names and
``ip_version``s; Neutron's DHCP agent or OVN turns them into DHCP options).  A token
comes from :mod:`metadatad.clients.keystone` (password auth, cached until expiry) or a static
token file.  Each request has a timeout; 5xx answers, timeouts and connection errors
are retried with exponential backoff up to ``retries`` times (only the ports that
failed); a 401 renews the token once; any other 4xx is a permanent error (a missing
port, a refused option) recorded with Neutron's message.  A PXE port without a
``neutron_port_id`` is a permanent error too (after the other ports are updated):
nothing reaches its DHCP server, so the node must not show ``pushed``.  A deleted node's options
are removed (``opt_value: null``, Neutron's way of deleting an extra DHCP option).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from metadatad.clients.keystone import KeystoneError
from metadatad.core.bootmapping import BootMapping
from metadatad.dhcp.provider import PushError
from metadatad.interfaces import TokenSource

__all__ = ["NeutronProvider"]

# Option names a mapping may have set: what a retraction deletes.
_ALL_NAMES = (
    ("tag:!ipxe,67", 4),
    ("tag:ipxe,67", 4),
    ("67", 4),
    ("66", 4),
    ("150", 4),
    ("255", 4),
    ("tag:!ipxe6,59", 6),
    ("tag:ipxe6,59", 6),
    ("59", 6),
)


class _Retry(Exception):
    """A failure worth retrying (5xx, timeout, connection error, expired token)."""


class NeutronProvider:
    """Pushes mappings to Neutron ports.

    ``http_client``: a ``treq.client.HTTPClient`` (or ``StubTreq``); ``clock``: the
    ``IReactorTime`` of timeouts and backoff; ``tokens``: a
    :class:`~metadatad.clients.keystone.KeystoneTokenClient` or
    :class:`~metadatad.clients.keystone.StaticToken`; ``url``: Neutron's endpoint (empty: the
    ``network`` endpoint of Keystone's catalog)."""

    name = "neutron"
    log = Logger()

    def __init__(
        self,
        http_client: Any,
        clock: Any,
        tokens: TokenSource,
        url: str = "",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        interface: str = "public",
    ) -> None:
        self._http = http_client
        self._clock = clock
        self._tokens = tokens
        self._url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._interface = interface

    def start(self) -> None:
        pass

    def flush(self) -> None:
        pass  # every push is complete when its Deferred fires

    def stop(self) -> Deferred[None] | None:
        pool = getattr(getattr(self._http, "_agent", None), "_pool", None)
        if pool is not None:
            return pool.closeCachedConnections()  # type: ignore[no-any-return,unused-ignore]
        return None

    def push(
        self, mapping: BootMapping, previous: BootMapping | None, generation: int
    ) -> Deferred[None]:
        return self._push(mapping, previous)

    @inlineCallbacks
    def _push(self, mapping: BootMapping, previous: BootMapping | None) -> Any:
        if mapping.removed:
            options: list[dict[str, Any]] = [
                {"opt_name": name, "opt_value": None, "ip_version": version}
                for name, version in _ALL_NAMES
            ]
        else:
            options = [option.to_document() for option in mapping.options]
        ports = list(mapping.neutron_ports)
        # A PXE port without a Neutron port gets nothing: never "pushed" for it.
        missing = 0 if mapping.removed else len(mapping.macs) - len(ports)
        if not ports:
            if mapping.removed:
                return None  # nothing of the node's is in Neutron to withdraw
            raise PushError(
                "no PXE port of the node has a neutron_port_id: nothing was sent "
                "(set ports[].neutron_port_id)",
                permanent=True,
            )
        body = json.dumps({"port": {"extra_dhcp_opts": options}}).encode("utf-8")
        remaining = ports
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                yield deferLater(self._clock, self.backoff * 2 ** (attempt - 1), lambda: None)
            failed: list[str] = []
            for port in remaining:
                try:
                    yield self._put(port, body)
                except _Retry as e:
                    failed.append(port)
                    last = str(e)
            if not failed:
                break
            remaining = failed
        else:
            raise PushError(f"{last} (after {self.retries + 1} attempts)")
        if missing > 0:
            raise PushError(
                f"{missing} of {len(mapping.macs)} PXE ports have no neutron_port_id: only "
                f"{len(ports)} updated (set ports[].neutron_port_id)",
                permanent=True,
            )
        return None

    @inlineCallbacks
    def _put(self, port: str, body: bytes) -> Any:
        try:
            token = yield self._tokens.token()
        except KeystoneError as e:
            if e.permanent:
                raise PushError(str(e), permanent=True) from None
            raise _Retry(str(e)) from None
        base = self._url or self._tokens.endpoint("network", self._interface)
        if not base:
            raise PushError("no Neutron URL: set [dhcp] neutron_url", permanent=True)
        url = f"{base}/v2.0/ports/{port}"
        try:
            response = yield self._http.put(
                url,
                data=body,
                headers={
                    "X-Auth-Token": [token],
                    "Content-Type": ["application/json"],
                    "Accept": ["application/json"],
                },
                timeout=self.timeout,
                reactor=self._clock,
            )
            content = yield response.content()
        except Exception as e:  # timeouts, refused connections, resets
            raise _Retry(f"PUT {url}: {type(e).__name__}: {e}".strip()) from None
        code = response.code
        if 200 <= code < 300:
            return None
        message = _neutron_message(content)
        if code == 401:
            self._tokens.invalidate(token)
            raise _Retry(f"PUT {url}: 401 (token renewed)")
        if code >= 500:
            raise _Retry(f"PUT {url}: {code} {message}".strip())
        raise PushError(f"PUT {url}: {code} {message}".strip(), permanent=True)


def _neutron_message(content: bytes) -> str:
    """Neutron's ``{"NeutronError": {"message": ...}}``, else the start of the body."""
    try:
        document = json.loads(content)
        return str(document["NeutronError"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return content[:200].decode("utf-8", "replace").strip()
