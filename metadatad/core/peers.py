# -*- test-case-name: tests.web.test_peers_render -*-
"""Peer discovery and the service view: the rules, with no HTTP and no storage.

Two designs meet here: Nova's "first-discover-your-peers" blueprint (write-once entries
posted to ``/openstack/latest/metadata?shared=project`` and read back from
``shared.json``, keys prefixed ``from_server_``) and the cattle "Metadata Server"
service view.  Refusals are :class:`PeerError` with a :attr:`~PeerError.kind`; the web
layer decides the status code of each kind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from metadatad.core.jsoninput import JSONInputError, parse_json
from metadatad.core.nodes import Node

PREFIX = "from_server_"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,255}")

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


def shared_document(entries: Sequence[tuple[str, Mapping[str, str]]]) -> list[dict[str, Any]]:
    """``shared.json``: ``[{"meta": {"from_server_<key>": value}, "uuid": uuid}, ...]``."""
    return [
        {"meta": {PREFIX + key: value for key, value in sorted(meta.items())}, "uuid": uuid}
        for uuid, meta in entries
        if meta
    ]


def service_members(node: Node, project_nodes: Sequence[Node]) -> list[Node]:
    """The nodes of ``node``'s service in its project, by cardinal value then uuid."""
    if node.service is None:
        return []
    name = node.service.name
    members = [
        n
        for n in project_nodes
        if n.project_id == node.project_id and n.service is not None and n.service.name == name
    ]
    if all(n.uuid != node.uuid for n in members):
        members.append(node)
    return sorted(members, key=lambda n: (n.launch_index, n.uuid))


def _host(node: Node) -> dict[str, Any]:
    return {
        "cardinal_value": node.launch_index,
        "hostname": node.hostname,
        "virt_ip_address": node.local_ipv4 or None,
        "uuid": node.uuid,
    }


def service_document(node: Node, members: Sequence[Node]) -> dict[str, Any]:
    """The whole service view of ``node`` (``Accept: application/json``)."""
    assert node.service is not None
    return {
        "cardinal_value": node.launch_index,
        "hostname": node.hostname,
        "virt_ip_address": node.local_ipv4 or None,
        "service_domain": node.service.domain or None,
        "service_name": node.service.name,
        "port": node.service.port,
        "all_hosts": [_host(n) for n in members],
    }


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
