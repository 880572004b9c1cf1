"""What a renderer answers: a status, a content type and a body."""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import unquote

import attrs

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
BINARY = "application/octet-stream"


@attrs.frozen
class Reply:
    """A complete answer; renderers return these and the site writes them out."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


def text(body: str | bytes, status: int = 200) -> Reply:
    """A text/plain answer."""
    return Reply(status, body.encode("utf-8") if isinstance(body, str) else body)


def json_reply(document: Any, status: int = 200) -> Reply:
    """An application/json answer."""
    return Reply(status, json.dumps(document, separators=(",", ":")).encode("utf-8"), JSON)


def error(status: int, message: str) -> Reply:
    """A short text error."""
    return Reply(status, (message + "\n").encode("utf-8"))


NOT_FOUND = error(404, "Not Found")


def split_path(raw_path: bytes) -> list[str]:
    """Nova-style path normalisation: decode, collapse ``//``, ``.``, ``..``; drop slashes.

    So a trailing slash never matters and ``/openstack`` equals ``/openstack/``.
    """
    path = unquote(raw_path.decode("latin-1"), errors="replace")
    normal = posixpath.normpath("/" + path)
    return [part for part in normal.split("/") if part]
