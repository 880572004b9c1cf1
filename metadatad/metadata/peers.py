# -*- test-case-name: tests.web.test_peers_render -*-
"""Peer discovery as HTTP, and the watches of the project views: renderers over the
rules of :mod:`metadatad.core.peers`.

No I/O: the site hands in the request's parts and what the store read, and gets back
:class:`~metadatad.metadata.reply.Reply` objects.  ``shared.json`` and the service
view (:mod:`metadatad.metadata.services`) are watched alike: ``ETag``,
``Last-Modified``, ``X-Metadatad-Index``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

import attrs

from metadatad.core.peers import (
    BUSY,
    CONFLICT,
    INVALID,
    OVER_QUOTA,
    PeerError,
)
from metadatad.metadata.reply import Reply, error

INDEX_HEADER = "X-Metadatad-Index"
SHARED_NAMES = ("shared.json", "peer_data")


_STATUS = {INVALID: 400, OVER_QUOTA: 413, CONFLICT: 409, BUSY: 503}


def refusal(e: PeerError) -> Reply:
    """The answer for a refusal of the peer rules."""
    return error(_STATUS[e.kind], e.message)


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


def with_watch_headers(
    reply: Reply,
    index: int,
    if_none_match: str | None,
    last_modified: datetime | None = None,
    if_modified_since: str | None = None,
) -> Reply:
    """``reply`` with its ``ETag``, ``X-Metadatad-Index`` and, when the store knows
    when the project last changed (naive UTC), ``Last-Modified``; a 304 when the caller
    already holds this content: its ``If-None-Match`` names the tag, or, without one
    (RFC 9110 13.2.2), its ``If-Modified-Since`` is not older than that change."""
    headers = (*reply.headers, (INDEX_HEADER, str(index)))
    if reply.status != 200:
        return attrs.evolve(reply, headers=headers)
    tag = etag(reply)
    headers = (*headers, ("ETag", tag))
    changed = last_modified.replace(tzinfo=UTC, microsecond=0) if last_modified else None
    if changed is not None:
        headers = (*headers, ("Last-Modified", format_datetime(changed, usegmt=True)))
    if if_none_match is not None:
        if _matches(if_none_match, tag):
            return Reply(304, b"", reply.content_type, headers)
    elif changed is not None and if_modified_since is not None:
        since = _http_date(if_modified_since)
        if since is not None and since >= changed:
            return Reply(304, b"", reply.content_type, headers)
    return attrs.evolve(reply, headers=headers)


def _http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _matches(if_none_match: str, tag: str) -> bool:
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return "*" in candidates or tag in candidates
