# -*- test-case-name: tests.daemon.test_backlog -*-
"""Listen backlogs of the HTTP listeners.

Twisted listens with a backlog of 50 unless the endpoint string says otherwise; a rack
booting at once fills that in milliseconds and the kernel then drops SYNs (clients
retry after 1 s, 3 s, ...).  :func:`with_backlog` adds ``backlog=`` to a ``tcp``,
``tcp6`` or ``ssl`` endpoint string that has none, and leaves one the operator wrote
alone.  The kernel caps any backlog at ``net.core.somaxconn`` (see docs/operations.md).

Pure: strings in, strings out.
"""

from __future__ import annotations

import re

# The metadata site: a rack of machines connecting at once, one connection per request.
METADATA_BACKLOG = 4096
# The admin API: few clients, but it must not be the one a flood leaves waiting.
ADMIN_BACKLOG = 1024

_TYPES_WITH_BACKLOG = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=<backlog>`` unless it names one (or has no
    listen backlog of its own to set, as a ``systemd:`` socket: systemd's ``Backlog=``
    rules that)."""
    # Colons escaped with a backslash belong to values (IPv6 interfaces).
    fields = re.split(r"(?<!\\):", description)
    if fields[0] not in _TYPES_WITH_BACKLOG:
        return description
    if any(field.startswith("backlog=") for field in fields[1:]):
        return description
    return f"{description}:backlog={backlog}"
