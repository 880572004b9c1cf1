"""IP addresses and networks in the one form every layer compares them in."""

from __future__ import annotations

import functools
import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8192)
def normalise_ip(address: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4."""
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)
