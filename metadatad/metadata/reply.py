"""What a renderer answers: a status, a content type and a body; and what a failure
answers."""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from metadatad.httputil import routing_error

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
STORE_UNAVAILABLE = attrs.evolve(
    error(503, "Service Unavailable: the store did not answer, retry"),
    headers=(("Retry-After", "1"),),
)


def failure_reply(request: IRequest, failure: Failure, log: Logger) -> Reply:
    """The answer to a failed request: werkzeug's routing errors keep their status (404,
    405) and ``Allow`` header; any other exception is a bug, logged with its traceback
    and answered with a bare 500."""
    routing = routing_error(failure)
    if routing is not None:
        status, name, headers = routing
        return Reply(status, f"{name}\n".encode(), headers=headers)
    log.failure(
        "unhandled error answering {method} {path}",
        failure,
        method=request.method,
        path=request.path,
    )
    return error(500, "Internal Server Error")


def store_unavailable(failure: Failure, log: Logger) -> Reply | Failure:
    """The metadata site's answer when a store query failed: a 503 the caller may retry
    (the database is down or slow: not our bug).  A cancelled query stays a failure:
    its caller hung up and nobody is left to answer."""
    if failure.check(CancelledError):
        return failure
    log.warn("store query failed: {error}", error=failure.getErrorMessage())
    return STORE_UNAVAILABLE


# Paths seen lately, split: a crawl asks the same few dozen paths of every node.
_SPLIT: dict[bytes, list[str]] = {}
_SPLIT_MAX = 4096


def split_path(raw_path: bytes) -> list[str]:
    """Nova-style path normalisation: decode, collapse ``//``, ``.``, ``..``; drop slashes.

    So a trailing slash never matters and ``/openstack`` equals ``/openstack/``.  The
    list is shared by every request for the same raw path: read it, never change it.
    """
    parts = _SPLIT.get(raw_path)
    if parts is None:
        path = unquote(raw_path.decode("latin-1"), errors="replace")
        normal = posixpath.normpath("/" + path)
        parts = [part for part in normal.split("/") if part]
        if len(_SPLIT) >= _SPLIT_MAX:
            _SPLIT.clear()  # a scan of made-up paths: start again
        _SPLIT[raw_path] = parts
    return parts
