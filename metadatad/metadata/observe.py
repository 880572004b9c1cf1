# -*- test-case-name: tests.web.test_console_activity -*-
"""What the metadata site and the vendordata caller tell the activity recorder."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.web.server import Request

__all__ = ["RecordingVendordataErrors", "request_observer"]

# The usual methods' names, not decoded again on every request.
_METHODS = {m: m.decode("ascii") for m in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE")}


class Recorder(Protocol):
    def note(self, node_uuid: str, kind: str, detail: str, imdsv2: bool = False) -> None: ...

    def metadata_request(self, node_uuid: str, method: str, imdsv2: bool) -> None: ...

    def vendordata(self, node_uuid: str, target: str, reason: str | None) -> None: ...


def request_observer(recorder: Recorder) -> Any:
    """``MetadataSite(observe=...)``: token PUTs, peer posts (with their status, once
    answered) and every other request, as the node's activity."""

    def observe(request: Request, node_uuid: str, imdsv2: bool, token_request: bool) -> None:
        method = _METHODS.get(request.method) or request.method.decode("ascii", "replace")
        if token_request:
            recorder.note(node_uuid, "token", "PUT /latest/api/token")
            return
        if method == "POST":
            what = "password" if request.path.rstrip(b"/").endswith(b"/password") else "metadata"

            def answered(_: object) -> None:
                recorder.note(node_uuid, "peer-post", f"{what}: HTTP {request.code}", imdsv2)

            request.notifyFinish().addBoth(answered)
            return
        # One row per crawl, not per path (the path is in the access log): nothing
        # about the path is worked out on this hot path.
        recorder.metadata_request(node_uuid, method, imdsv2)

    return observe


class RecordingVendordataErrors:
    """A vendordata error store that also tells ``recorder`` each target's result
    (the dynamic vendordata caller marks failures and clears on success)."""

    def __init__(self, errors: Any, recorder: Recorder) -> None:
        self._errors = errors
        self._recorder = recorder

    def mark(self, error: Any) -> Deferred[bool]:
        self._recorder.vendordata(error.node_uuid, error.target, error.reason)
        d: Deferred[bool] = self._errors.mark(error)
        return d

    def clear(self, node_uuid: str, target: str) -> Deferred[None]:
        self._recorder.vendordata(node_uuid, target, None)
        d: Deferred[None] = self._errors.clear(node_uuid, target)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self._errors, name)
