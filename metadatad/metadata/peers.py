# -*- test-case-name: tests.test_peers_render -*-
"""Peer discovery and the service view: pure checks and renderers.

No I/O: the site hands in the request's parts and what the store read, and gets back
:class:`~metadatad.metadata.reply.Reply` objects or a :class:`PeerError`.  Two designs
meet here: Nova's "first-discover-your-peers" blueprint (write-once entries posted to
``/openstack/latest/metadata?shared=project`` and read back from ``shared.json``, keys
prefixed ``from_server_``) and the cattle "Metadata Server" service view
(``/service/latest/...``, a leaf per fact, each with its own status code).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from metadatad.metadata.reply import JSON, Reply, error, json_reply, text
from metadatad.nodes import Node

PREFIX = "from_server_"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
INDEX_HEADER = "X-Metadatad-Index"
SHARED_NAMES = ("shared.json", "peer_data")
SERVICE_LEAVES = (
    "cardinal_value",
    "hostname",
    "virt_ip_address",
    "service_domain",
    "service_name",
    "port",
    "all_hosts",
)


class PeerError(Exception):
    """A request the peer API refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def reply(self) -> Reply:
        """The answer for this refusal."""
        return error(self.status, self.message)


# --- posting -------------------------------------------------------------------------


def parse_scope(shared: Sequence[str] | None) -> bool:
    """The ``shared`` query argument: absent means private, ``project`` means shared."""
    if not shared:
        return False
    if len(shared) > 1:
        raise PeerError(400, "shared: give it once")
    if shared[0] != "project":
        raise PeerError(400, f"shared: only 'project' is supported, got {shared[0][:64]!r}")
    return True


def parse_entries(body: bytes) -> dict[str, str]:
    """The posted JSON object of string keys and string values.

    Nova's ``{"meta": {...}}`` wrapper is accepted too.  Keys match ``KEY_PATTERN``.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise PeerError(400, f"the body is not valid JSON: {e}") from None
    if (
        isinstance(document, dict)
        and set(document) == {"meta"}
        and isinstance(document["meta"], dict)
    ):
        document = document["meta"]
    if not isinstance(document, dict):
        raise PeerError(400, "the body must be a JSON object of string keys and values")
    if not document:
        raise PeerError(400, "the body must name at least one key")
    for key, value in document.items():
        if not KEY_PATTERN.fullmatch(key):
            raise PeerError(400, f"bad key {key[:64]!r}: 1 to 255 of A-Z a-z 0-9 _ . : -")
        if not isinstance(value, str):
            raise PeerError(400, f"key {key!r}: the value must be a string")
    return document


def entry_bytes(key: str, value: str) -> int:
    """What one entry counts against ``peer_max_bytes``: key and value, in UTF-8."""
    return len(key.encode("utf-8")) + len(value.encode("utf-8"))


def check_quota(
    stored: Mapping[str, str], new: Mapping[str, str], max_keys: int, max_bytes: int
) -> None:
    """Raise a 413 :class:`PeerError` if ``stored`` plus ``new`` exceed a node's quota."""
    count = len(stored) + len(new)
    if count > max_keys:
        raise PeerError(413, f"over quota: {count} keys, at most {max_keys} per node")
    size = sum(entry_bytes(k, v) for k, v in stored.items()) + sum(
        entry_bytes(k, v) for k, v in new.items()
    )
    if size > max_bytes:
        raise PeerError(413, f"over quota: {size} bytes, at most {max_bytes} per node")


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


def render_service(
    node: Node, members: Sequence[Node], parts: Sequence[str], as_json: bool
) -> Reply:
    """``/service/latest/<parts>``: the listing, a leaf, or ``all_hosts/<cardinal>``.

    A leaf without a value (no domain, no port, no address) is a 404 of its own, so a
    client can tell a missing fact from a missing service.
    """
    if node.service is None:
        return error(404, "Not Found: this node is not a member of a service")
    document = service_document(node, members)
    if not parts:
        return json_reply(document) if as_json else text("\n".join(SERVICE_LEAVES))
    leaf = parts[0]
    if leaf not in document:
        return error(404, "Not Found")
    if leaf == "all_hosts":
        hosts = document["all_hosts"]
        if len(parts) == 1:
            if as_json:
                return json_reply(hosts)
            return text("\n".join(f"{h['cardinal_value']}={h['hostname']}" for h in hosts))
        chosen = [h for h in hosts if str(h["cardinal_value"]) == parts[1]]
        if not chosen:
            return error(404, "Not Found: no host with that cardinal value")
        host = chosen[0]
        if len(parts) == 2:
            return json_reply(host) if as_json else text("\n".join(k for k in host))
        if len(parts) > 3 or parts[2] not in host:
            return error(404, "Not Found")
        return _leaf(host[parts[2]], as_json)
    if len(parts) > 1:
        return error(404, "Not Found")
    return _leaf(document[leaf], as_json)


def _leaf(value: Any, as_json: bool) -> Reply:
    if value is None:
        return error(404, "Not Found: no value")
    if as_json:
        return json_reply(value)
    return text(str(value))


def wants_json(accept: str | None) -> bool:
    """True when the Accept header asks for JSON before (or instead of) text."""
    if not accept:
        return False
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in ("application/json", "application/*"):
            return True
        if media in ("text/plain", "text/*", "*/*"):
            return False
    return False


# --- watches -------------------------------------------------------------------------


@attrs.frozen
class WatchRequest:
    """``?index=<n>&wait=<s>``: hold the answer while the project's index is ``index``."""

    index: int
    wait: float


def parse_watch(args: Mapping[str, Sequence[str]], max_wait: float) -> WatchRequest | None:
    """The watch asked for, or None; a bad value is a 400 :class:`PeerError`.

    ``wait`` (seconds, default and cap ``max_wait``) needs ``index``.
    """
    index_values = args.get("index")
    wait_values = args.get("wait")
    if not index_values:
        if wait_values:
            raise PeerError(400, "wait: needs index=<the X-Metadatad-Index you have>")
        return None
    if len(index_values) > 1 or (wait_values and len(wait_values) > 1):
        raise PeerError(400, "index and wait: give each once")
    raw = index_values[0]
    if not raw.isdigit() or len(raw) > 19:
        raise PeerError(400, f"index: expected a non-negative integer, got {raw[:32]!r}")
    wait = max_wait
    if wait_values:
        raw_wait = wait_values[0].removesuffix("s")
        try:
            wait = float(raw_wait)
        except ValueError:
            raise PeerError(400, f"wait: expected seconds, got {wait_values[0][:32]!r}") from None
        if not math.isfinite(wait) or wait < 0:
            raise PeerError(400, f"wait: expected seconds >= 0, got {wait_values[0][:32]!r}")
    return WatchRequest(int(raw), min(wait, max_wait))


def jittered(wait: float, fraction: float) -> float:
    """``wait`` plus up to a sixteenth more (``fraction`` in [0, 1)), as Consul does:
    watchers started together do not all come back in the same instant."""
    return wait + wait / 16 * fraction


def etag(reply: Reply) -> str:
    """A strong ETag from the content (the same content gives the same tag again)."""
    digest = hashlib.sha256(reply.content_type.encode() + b"\0" + reply.body).hexdigest()
    return f'"{digest[:16]}"'


def with_watch_headers(reply: Reply, index: int, if_none_match: str | None) -> Reply:
    """``reply`` with its ``ETag`` and ``X-Metadatad-Index``; a 304 when the caller
    already holds this content."""
    headers = (*reply.headers, (INDEX_HEADER, str(index)))
    if reply.status != 200:
        return attrs.evolve(reply, headers=headers)
    tag = etag(reply)
    headers = (*headers, ("ETag", tag))
    if if_none_match is not None and _matches(if_none_match, tag):
        return Reply(304, b"", reply.content_type, headers)
    return attrs.evolve(reply, headers=headers)


def _matches(if_none_match: str, tag: str) -> bool:
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return "*" in candidates or tag in candidates


__all__ = [
    "INDEX_HEADER",
    "JSON",
    "KEY_PATTERN",
    "PREFIX",
    "SERVICE_LEAVES",
    "SHARED_NAMES",
    "PeerError",
    "WatchRequest",
    "check_quota",
    "entry_bytes",
    "etag",
    "jittered",
    "parse_entries",
    "parse_scope",
    "parse_watch",
    "render_service",
    "service_document",
    "service_members",
    "shared_document",
    "wants_json",
    "with_watch_headers",
]
