# -*- test-case-name: tests.web.test_peers_site -*-
"""The metadata site's peer routes: thin glue between requests, the peer store, the
watch hub and the pure renderers of :mod:`metadatad.metadata.peers`.

``POST /openstack/<ver>/metadata[?shared=project]``, ``GET /openstack/<ver>/shared.json``
(alias ``peer_data``) and ``GET /service/latest/...``.  Reads carry ``ETag`` and
``X-Metadatad-Index``; ``?index=<n>[&wait=<s>]`` holds the answer while the project's
index is still ``n``: the request waits as a Deferred in the hub, nothing else.

Each route returns a :class:`~metadatad.metadata.reply.Reply`, or a Deferred of one
(of None when the caller hung up while it waited); the site writes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from metadatad.core import peers as rules
from metadatad.core.peers import OVER_QUOTA, PeerError
from metadatad.core.records import NodeRecord
from metadatad.core.services import ProjectView
from metadatad.interfaces import PeerBoard
from metadatad.metadata import peers
from metadatad.metadata.reply import Reply, error, json_reply, store_unavailable, text
from metadatad.metadata.services import render_service
from metadatad.metadata.watch import WatchHub

X = TypeVar("X")

# A route's answer: a Reply now, or a Deferred of one (None: the caller hung up).
Answer = Reply | Deferred[Any]

_POST_ONLY = attrs.evolve(error(405, "Method Not Allowed"), headers=(("Allow", "POST"),))
_READ_ONLY = attrs.evolve(error(405, "Method Not Allowed"), headers=(("Allow", "GET, HEAD"),))


@attrs.frozen
class PeerLimits:
    """``[metadata] peer_max_keys``, ``peer_max_bytes`` and ``watch_max_wait``."""

    max_keys: int = 128
    max_bytes: int = 65536
    max_wait: float = 300.0


class PeerRoutes:
    """Answers the peer and service paths for an identified node."""

    log = Logger()

    def __init__(
        self,
        store: PeerBoard,
        hub: WatchHub,
        limits: PeerLimits = PeerLimits(),
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._hub = hub
        self._limits = limits
        self._jitter = jitter
        # Reads shared by the watchers one notification woke (see _read_after_wake).
        self._woken_reads: dict[tuple[Any, str, int], list[Deferred[Any]]] = {}

    # --- posting -----------------------------------------------------------------

    def post(self, request: Request, record: NodeRecord) -> Answer:
        """``POST /openstack/<ver>/metadata``: store write-once entries."""
        if request.method != b"POST":
            return _POST_ONLY
        limit = self._limits.max_bytes + 64 * 1024  # room for JSON quoting and the wrapper
        body = request.content.read(limit + 1) if request.content is not None else b""
        try:
            if len(body) > limit:
                raise PeerError(OVER_QUOTA, f"over quota: the body is over {limit} bytes")
            shared = rules.parse_scope(_arg(request, "shared"))
            entries = rules.parse_entries(body)
        except PeerError as e:
            return peers.refusal(e)
        uuid = record.node.uuid
        project = record.node.project_id

        def stored(result: Any) -> Reply:
            if result is None:
                return error(404, "Not Found: no node for this caller")
            if result.added:
                self.log.info(
                    "node {uuid} posted {count} {scope} keys",
                    uuid=uuid,
                    count=len(result.added),
                    scope="shared" if shared else "private",
                )
                if shared:
                    self._hub.notify(project, result.index)
            reply = json_reply({"added": list(result.added), "index": result.index})
            return attrs.evolve(reply, headers=((peers.INDEX_HEADER, str(result.index)),))

        def refused(failure: Failure) -> Reply | Failure:
            if isinstance(failure.value, PeerError):
                return peers.refusal(failure.value)
            return store_unavailable(failure, self.log)

        d = self._store.post(uuid, entries, shared, self._limits.max_keys, self._limits.max_bytes)
        return d.addCallbacks(stored, refused)

    # --- reading -----------------------------------------------------------------

    def shared(self, request: Request, record: NodeRecord) -> Answer:
        """``GET /openstack/<ver>/shared.json``: the project's shared entries."""
        project = record.node.project_id

        def render(view: rules.SharedView) -> Reply:
            return json_reply(rules.shared_document(view.entries, view.seen))

        return self._watched(request, project, self._store.shared_view, render)

    def service(self, request: Request, record: NodeRecord, parts: list[str]) -> Answer:
        """``GET /service[/latest/...]``: the node's service view."""
        if not parts:
            return text("latest")
        if parts[0] != "latest":
            return error(404, "Not Found")
        node = record.node
        if node.service is None:
            return error(404, "Not Found: this node is not a member of a service")
        as_json = peers.wants_json(_header(request, b"accept"))

        def render(view: ProjectView) -> Reply:
            return render_service(node, view, parts[1:], as_json)

        return self._watched(request, node.project_id, self._store.project_services, render)

    def _watched(
        self,
        request: Request,
        project: str,
        read: Callable[[str], Deferred[tuple[int, X]]],
        render: Callable[[X], Reply],
    ) -> Answer:
        if request.method not in (b"GET", b"HEAD"):
            return _READ_ONLY
        try:
            watch = rules.parse_watch(_args(request), self._limits.max_wait)
        except PeerError as e:
            return peers.refusal(e)
        if_none_match = _header(request, b"if-none-match")

        def answer(result: tuple[int, X]) -> Reply:
            index, data = result
            self._hub.notify(project, index)
            # Both views carry when the project last changed (Last-Modified).
            return peers.with_watch_headers(
                render(data),
                index,
                if_none_match,
                getattr(data, "changed_at", None),
                _header(request, b"if-modified-since"),
            )

        mark = self._hub.mark()

        def first(result: tuple[int, X]) -> Any:
            index = result[0]
            # Hold only while the index is the caller's: a newer one (or an older one,
            # after a database restore) is an answer at once.
            if watch is None or index != watch.index:
                return answer(result)
            timeout = rules.jittered(watch.wait, self._jitter())
            waiting = self._hub.wait(project, index, timeout, mark)
            self.log.debug(
                "holding a watch of {project} at index {index}", project=project, index=index
            )
            return waiting.addCallback(lambda _: self._read_after_wake(read, project)).addCallback(
                answer
            )

        def broken(failure: Failure) -> Reply | Failure | None:
            if failure.check(CancelledError):
                return None  # the caller went away while it waited: nothing to answer
            return store_unavailable(failure, self.log)

        return read(project).addCallback(first).addErrback(broken)

    def _read_after_wake(
        self, read: Callable[[str], Deferred[tuple[int, X]]], project: str
    ) -> Deferred[tuple[int, X]]:
        """One read for all the watchers of a project that one notification woke:
        a thousand watchers cost one query, not a thousand.  They are woken in the
        same call, so they see the same mark; a read started after the wake sees the
        change that caused it."""
        key = (getattr(read, "__name__", read), project, self._hub.mark())
        mine: Deferred[tuple[int, X]] = Deferred()
        waiting = self._woken_reads.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine
        self._woken_reads[key] = [mine]

        def done(result: Any) -> None:
            for d in self._woken_reads.pop(key):
                if d.called:  # cancelled: its client went away
                    continue
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        read(project).addBoth(done)
        return mine


def _args(request: Request) -> dict[str, list[str]]:
    """The URI's query arguments only: twisted.web also merges a form-encoded body into
    ``request.args``, and ``curl --data`` labels a JSON body that way."""
    query = request.uri.partition(b"?")[2].decode("latin-1")
    return parse_qs(query, keep_blank_values=True)


def _arg(request: Request, name: str) -> list[str] | None:
    return _args(request).get(name)


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)
