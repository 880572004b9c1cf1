# -*- test-case-name: tests.web.test_peers_render -*-
"""Peer discovery and the service view as HTTP: renderers over the rules of
:mod:`metadatad.core.peers`.

No I/O: the site hands in the request's parts and what the store read, and gets back
:class:`~metadatad.metadata.reply.Reply` objects.  Two designs
meet here: Nova's "first-discover-your-peers" blueprint (write-once entries posted to
``/openstack/latest/metadata?shared=project`` and read back from ``shared.json``, keys
prefixed ``from_server_``) and the cattle "Metadata Server" service view
(``/service/latest/...``, a leaf per fact, each with its own status code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import attrs

from metadatad.core.nodes import Node
from metadatad.core.peers import (
    BUSY,
    CONFLICT,
    INVALID,
    OVER_QUOTA,
    PeerError,
    service_document,
)
from metadatad.metadata.reply import Reply, error, json_reply, text

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


_STATUS = {INVALID: 400, OVER_QUOTA: 413, CONFLICT: 409, BUSY: 503}


def refusal(e: PeerError) -> Reply:
    """The answer for a refusal of the peer rules."""
    return error(_STATUS[e.kind], e.message)


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
