# -*- test-case-name: tests.web.test_peers_render -*-
"""Peer discovery: the rules, with no HTTP and no storage.

Nova's "first-discover-your-peers" blueprint: write-once entries posted to
``/openstack/latest/metadata?shared=project`` and read back from ``shared.json``, keys
prefixed ``from_server_``, each entry with its sharer's ``last_seen_at``.  The cattle
"Metadata Server" service view is :mod:`metadatad.core.services`.  Refusals are
:class:`PeerError` with a :attr:`~PeerError.kind`; the web layer decides the status
code of each kind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import attrs

from metadatad.core.jsoninput import JSONInputError, parse_json

PREFIX = "from_server_"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
# The liveness key of each shared.json entry (beside "meta" and "uuid").
LIVENESS_KEY = "last_seen_at"

INVALID: Final = "invalid"
"""The request itself is malformed."""
OVER_QUOTA: Final = "over-quota"
"""The entries would take the node over its quota."""
CONFLICT: Final = "conflict"
"""A key is already set to another value or with another sharing (write-once)."""
BUSY: Final = "busy"
"""The node kept changing under the write; the caller may retry."""


class PeerError(Exception):
    """A request the peer rules refuse: a ``kind`` and a one-line ``message``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class PeerConflict(PeerError):
    """A posted key is already set to another value (or with another sharing)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(CONFLICT, message)
        self.key = key


# --- posting -------------------------------------------------------------------------


def parse_scope(shared: Sequence[str] | None) -> bool:
    """The ``shared`` query argument: absent means private, ``project`` means shared."""
    if not shared:
        return False
    if len(shared) > 1:
        raise PeerError(INVALID, "shared: give it once")
    if shared[0] != "project":
        raise PeerError(INVALID, f"shared: only 'project' is supported, got {shared[0][:64]!r}")
    return True


def parse_entries(body: bytes) -> dict[str, str]:
    """The posted JSON object of string keys and string values.

    Nova's ``{"meta": {...}}`` wrapper is accepted too.  Keys match ``KEY_PATTERN``.
    """
    try:
        document = parse_json(body)
    except JSONInputError as e:
        raise PeerError(INVALID, f"the body is refused: {e}") from None
    if (
        isinstance(document, dict)
        and set(document) == {"meta"}
        and isinstance(document["meta"], dict)
    ):
        document = document["meta"]
    if not isinstance(document, dict):
        raise PeerError(INVALID, "the body must be a JSON object of string keys and values")
    if not document:
        raise PeerError(INVALID, "the body must name at least one key")
    for key, value in document.items():
        if not KEY_PATTERN.fullmatch(key):
            raise PeerError(INVALID, f"bad key {key[:64]!r}: 1 to 255 of A-Z a-z 0-9 _ . : -")
        if not isinstance(value, str):
            raise PeerError(INVALID, f"key {key!r}: the value must be a string")
    return document


def entry_bytes(key: str, value: str) -> int:
    """What one entry counts against ``peer_max_bytes``: key and value, in UTF-8."""
    return len(key.encode("utf-8")) + len(value.encode("utf-8"))


def check_quota(
    stored: Mapping[str, str], new: Mapping[str, str], max_keys: int, max_bytes: int
) -> None:
    """Raise an over-quota :class:`PeerError` if ``stored`` plus ``new`` exceed a node's quota."""
    count = len(stored) + len(new)
    if count > max_keys:
        raise PeerError(OVER_QUOTA, f"over quota: {count} keys, at most {max_keys} per node")
    size = sum(entry_bytes(k, v) for k, v in stored.items()) + sum(
        entry_bytes(k, v) for k, v in new.items()
    )
    if size > max_bytes:
        raise PeerError(OVER_QUOTA, f"over quota: {size} bytes, at most {max_bytes} per node")


def new_entries(
    stored: Mapping[str, tuple[str, bool]], entries: Mapping[str, str], shared: bool
) -> dict[str, str]:
    """The entries of ``entries`` not yet in ``stored`` (``{key: (value, shared)}``).

    Write-once: a key already set to the same value and sharing is left alone; another
    value or sharing is a :class:`PeerConflict`.
    """
    new: dict[str, str] = {}
    for key, value in entries.items():
        if key not in stored:
            new[key] = value
            continue
        old_value, old_shared = stored[key]
        if old_shared != shared:
            scope = "shared with the project" if old_shared else "private"
            raise PeerConflict(key, f"key {key!r} is already set, {scope}")
        if old_value != value:
            raise PeerConflict(key, f"key {key!r} is already set to another value")
    return new


# --- reading -------------------------------------------------------------------------


@attrs.frozen
class SharedView:
    """What the store read for ``shared.json``: ``[(uuid, {key: value})]``, when each
    sharer last made a metadata request, and when the project's index last changed."""

    entries: tuple[tuple[str, Mapping[str, str]], ...] = ()
    seen: Mapping[str, datetime] = attrs.field(factory=dict)
    changed_at: datetime | None = None


def shared_document(
    entries: Sequence[tuple[str, Mapping[str, str]]],
    seen: Mapping[str, datetime] | None = None,
) -> list[dict[str, Any]]:
    """``shared.json``: ``[{"meta": {"from_server_<key>": value}, "uuid": uuid}, ...]``.

    With ``seen``, each entry also carries ``last_seen_at`` (:data:`LIVENESS_KEY`): when
    the sharer last made a metadata request (ISO 8601 UTC), or null if never recorded.
    It sits beside ``meta``, never inside it, so no posted key can collide with it."""
    document = []
    for uuid, meta in entries:
        if not meta:
            continue
        entry: dict[str, Any] = {
            "meta": {PREFIX + key: value for key, value in sorted(meta.items())},
            "uuid": uuid,
        }
        if seen is not None:
            moment = seen.get(uuid)
            entry[LIVENESS_KEY] = iso_utc(moment) if moment is not None else None
        document.append(entry)
    return document


def iso_utc(moment: datetime) -> str:
    """A naive UTC time as ISO 8601 with ``Z``, to the second."""
    return moment.replace(microsecond=0).isoformat() + "Z"


# --- watches -------------------------------------------------------------------------


@attrs.frozen
class WatchRequest:
    """``?index=<n>&wait=<s>``: hold the answer while the project's index is ``index``."""

    index: int
    wait: float


def parse_watch(args: Mapping[str, Sequence[str]], max_wait: float) -> WatchRequest | None:
    """The watch asked for, or None; a bad value is an invalid :class:`PeerError`.

    ``wait`` (seconds, default and cap ``max_wait``) needs ``index``.
    """
    index_values = args.get("index")
    wait_values = args.get("wait")
    if not index_values:
        if wait_values:
            raise PeerError(INVALID, "wait: needs index=<the X-Metadatad-Index you have>")
        return None
    if len(index_values) > 1 or (wait_values and len(wait_values) > 1):
        raise PeerError(INVALID, "index and wait: give each once")
    raw = index_values[0]
    if not raw.isdigit() or len(raw) > 19:
        raise PeerError(INVALID, f"index: expected a non-negative integer, got {raw[:32]!r}")
    wait = max_wait
    if wait_values:
        raw_wait = wait_values[0].removesuffix("s")
        try:
            wait = float(raw_wait)
        except ValueError:
            raise PeerError(
                INVALID, f"wait: expected seconds, got {wait_values[0][:32]!r}"
            ) from None
        if not math.isfinite(wait) or wait < 0:
            raise PeerError(
                INVALID, f"wait: expected seconds >= 0, got {wait_values[0][:32]!r}"
            )
    return WatchRequest(int(raw), min(wait, max_wait))


def jittered(wait: float, fraction: float) -> float:
    """``wait`` plus up to a sixteenth more (``fraction`` in [0, 1)), as Consul does:
    watchers started together do not all come back in the same instant."""
    return wait + wait / 16 * fraction
