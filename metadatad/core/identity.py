# -*- test-case-name: tests.core.test_identity -*-
"""Who is asking: the caller's address, a trusted proxy's X-Forwarded-For, or a
Neutron-style signed instance id.  Pure: headers and addresses in, a :class:`Caller`
or an :class:`IdentityError` out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Sequence

import attrs

from metadatad.core.addresses import IPNetwork, normalise_ip

INSTANCE_ID = "x-instance-id"
TENANT_ID = "x-tenant-id"
SIGNATURE = "x-instance-id-signature"
FORWARDED_FOR = "x-forwarded-for"
_SIGNED_HEADERS = (INSTANCE_ID, TENANT_ID, SIGNATURE)
_MAX_PEERS = 65536


class IdentityError(Exception):
    """A request whose identity headers are unusable; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class Caller:
    """Who asked: a node address, or an instance id vouched for by a signing proxy."""

    ip: str | None = None
    instance_id: str | None = None
    tenant_id: str | None = None
    # The rate limiter's bucket: the instance id when a proxy vouched for one, else the
    # address (made once: a remembered caller asks dozens of times).
    rate_key: str = attrs.field(init=False, eq=False, repr=False)

    @rate_key.default
    def _rate_key(self) -> str:
        return f"id:{self.instance_id}" if self.instance_id is not None else f"ip:{self.ip}"


def sign_instance_id(secret: str, instance_id: str) -> str:
    """The ``X-Instance-ID-Signature`` a proxy sharing ``secret`` sends."""
    return hmac.new(secret.encode("utf-8"), instance_id.encode("utf-8"), hashlib.sha256).hexdigest()


def _trusted(address: str, proxies: Sequence[IPNetwork]) -> bool:
    parsed = ipaddress.ip_address(address)
    return any(parsed in network for network in proxies)


class Identifier:
    """Applies the configured identity rules to requests."""

    def __init__(self, trusted_proxies: Sequence[IPNetwork] = (), shared_secret: str = "") -> None:
        self._proxies = tuple(trusted_proxies)
        self._secret = shared_secret
        # Callers known by their address alone, by peer: a Caller is immutable, and a
        # node asks dozens of paths in a crawl.  Cleared when full.
        self._by_peer: dict[str, Caller] = {}

    def remembered(self, peer: str) -> Caller | None:
        """The caller ``peer`` was identified as before, when its headers cannot change
        that (no signing proxy's secret is configured); else None: ask :meth:`identify`."""
        return None if self._secret else self._by_peer.get(peer)

    def identify(self, peer: str, header: Callable[[str], list[str] | None]) -> Caller:
        """Identify a request from ``peer``; ``header(name)`` returns a header's values.

        Signed headers count only when a shared secret is configured (without one they
        prove nothing and are ignored).  X-Forwarded-For counts only from a trusted
        proxy; the caller is the right-most address that is not a trusted proxy.
        """
        if self._secret and any(header(name) for name in _SIGNED_HEADERS):
            return self._signed(header)
        caller = self._by_peer.get(peer)
        if caller is not None:
            return caller
        try:
            ip = normalise_ip(peer)
        except ValueError:
            raise IdentityError(403, "Cannot identify callers on this listener") from None
        if self._proxies and _trusted(ip, self._proxies):
            forwarded = header(FORWARDED_FOR)
            if forwarded:
                return Caller(ip=self._forwarded_client(forwarded))
            # A trusted proxy asking for itself: not remembered, its next request may
            # carry X-Forwarded-For.
            return Caller(ip=ip)
        if len(self._by_peer) >= _MAX_PEERS:
            self._by_peer.clear()
        caller = self._by_peer[peer] = Caller(ip=ip)
        return caller

    def _signed(self, header: Callable[[str], list[str] | None]) -> Caller:
        values = {}
        for name in _SIGNED_HEADERS:
            found = header(name) or []
            if not found or not found[0].strip():
                raise IdentityError(400, f"Missing header {_title(name)}")
            if len(found) > 1 or "," in found[0]:
                raise IdentityError(400, f"Duplicate header {_title(name)}")
            values[name] = found[0].strip()
        expected = sign_instance_id(self._secret, values[INSTANCE_ID])
        if not hmac.compare_digest(expected.encode(), values[SIGNATURE].encode("utf-8", "replace")):
            raise IdentityError(403, "Invalid proxy request signature")
        # Signed as sent; looked up in canonical (lower-case) form, as uuids are stored.
        return Caller(instance_id=values[INSTANCE_ID].lower(), tenant_id=values[TENANT_ID])

    def _forwarded_client(self, values: list[str]) -> str:
        hops = [hop.strip() for value in values for hop in value.split(",")]
        addresses = []
        for hop in hops:
            try:
                addresses.append(normalise_ip(hop))
            except ValueError:
                raise IdentityError(400, "Malformed X-Forwarded-For header") from None
        for address in reversed(addresses):
            if not _trusted(address, self._proxies):
                return address
        return addresses[0]


def _title(name: str) -> str:
    return "-".join("ID" if part == "id" else part.capitalize() for part in name.split("-"))
