# -*- test-case-name: tests.web.test_admin_site -*-
"""The operators' API: node registration and health, behind a bearer token.

Every route is a coroutine that returns a :class:`~metadatad.metadata.reply.Reply`;
:func:`_route` checks the token, turns refusals into replies and hands the reply to
:func:`_write`, the one place that writes to the request.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec

from klein import Klein
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from metadatad.core.jsoninput import JSONInputError, parse_json
from metadatad.core.nodes import NodeValidationError, parse_node, parse_nodes, strip_read_only
from metadatad.core.records import ConflictError, NodeRecord
from metadatad.db.vendordata import with_vendordata_errors
from metadatad.interfaces import (
    BootEvents,
    ClusterView,
    NodeStore,
    PeerEntries,
    PushStates,
    VendordataErrors,
    WorkerStatus,
)
from metadatad.metadata.reply import JSON, Reply, failure_reply
from metadatad.telemetry import METRICS_CONTENT_TYPE, render_metrics

MAX_BODY_BYTES = 64 * 1024 * 1024

P = ParamSpec("P")
Route = Callable[Concatenate["AdminSite", Request, P], Coroutine[Any, Any, Reply]]
Served = Callable[Concatenate["AdminSite", Request, P], Deferred[bytes]]


class BadRequest(Exception):
    """A request the admin API refuses; carries the status and the JSON body."""

    def __init__(self, status: int, body: dict[str, str]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def _route(*, guarded: bool = True) -> Callable[[Route[P]], Served[P]]:
    """Serve a route: the token check (unless ``guarded`` is false), the route's
    coroutine as a Deferred, refusals as replies, and the reply written out."""

    def decorate(route: Route[P]) -> Served[P]:
        @functools.wraps(route)
        def serve(
            site: AdminSite, request: Request, *args: P.args, **kwargs: P.kwargs
        ) -> Deferred[bytes]:
            if guarded and not site._authorised(request):
                answer = succeed(_UNAUTHORISED)
            else:
                answer = ensureDeferred(route(site, request, *args, **kwargs))
                answer.addErrback(site._refused)
            return answer.addCallback(_write, request)

        return serve

    return decorate


class AdminSite:
    """``/v1/nodes...``, ``/v1/conductors``, ``/v1/ring``, ``/healthz`` and ``/metrics``."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: NodeStore,
        token: str,
        *,
        boot_events: BootEvents | None = None,
        cluster: ClusterView | None = None,
        vendordata_errors: VendordataErrors | None = None,
        peers: PeerEntries | None = None,
        dhcp: PushStates | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        workers: WorkerStatus | None = None,
    ) -> None:
        self._store = store
        # ``[admin] max_body_bytes``: the largest import document.
        self._max_body = max_body_bytes
        self._token = token.encode("utf-8")
        # Without these the routes answer without what they tell (see each route).
        self._boot_events = boot_events
        self._cluster = cluster
        # With it, nodes show ``vendordata_error`` (null or why).
        self._vendordata_errors = vendordata_errors
        # What nodes posted, shown in node documents.
        self._peers = peers
        # None when no DHCP provider is configured.
        self._dhcp = dhcp
        # None when the metadata site runs in this process ([metadata] workers = 1).
        self._workers = workers

    def resource(self) -> Any:
        """The twisted.web resource of this site."""
        return self.app.resource()

    # --- plumbing ----------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        # compare_digest on bytes of any length: no early exit that leaks the token.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _refused(self, failure: Failure) -> Reply:
        failure.trap(BadRequest, ConflictError, SQLAlchemyError, ConnectionError)
        refusal = failure.value
        if isinstance(refusal, (SQLAlchemyError, ConnectionError)):
            # The database is down: the operator may retry; not a bug of ours.
            self.log.warn("admin request failed on the store: {error}", error=refusal)
            return _json(
                503,
                {"error": "unavailable", "message": "the database did not answer"},
                headers=(("Retry-After", "5"),),
            )
        if isinstance(refusal, ConflictError):
            return _json(409, refusal.as_json())
        assert isinstance(refusal, BadRequest)
        return _json(refusal.status, refusal.body)

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        """Routing errors keep their status; anything else is a bug."""
        return _write(failure_reply(request, failure, self.log), request)

    # --- routes ------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    @_route(guarded=False)
    async def healthz(self, request: Request) -> Reply:
        """Reachability of the store, and whether this conductor is a live member of
        the cluster; no token needed (load balancers probe it)."""
        try:
            await self._store.ping()
        except Exception as e:  # whatever the store raised: unreachable
            self.log.warn("health check: database unreachable: {error}", error=e)
            return _json(503, {"status": "unhealthy", "database": "unreachable"})
        report: dict[str, Any] = {"status": "ok", "database": "ok"}
        healthy = True
        if self._workers is not None:
            # One worker being started again still serves the site: healthy while
            # any runs.
            workers = report["workers"] = self._workers.status()
            healthy = workers["running"] > 0
        if self._cluster is not None:
            # "starting" until the first sync, "stale" when the others no longer count
            # this conductor live: not ready either way.
            membership = self._cluster.health()
            healthy = healthy and membership == "ok"
            age = self._cluster.heartbeat_age()
            report["membership"] = membership
            report["heartbeat_age"] = None if age is None else round(age, 3)
            report["heartbeat_timeout"] = self._cluster.heartbeat_timeout
        report["status"] = "ok" if healthy else "unhealthy"
        return _json(200 if healthy else 503, report)

    @app.route("/metrics", methods=["GET", "HEAD"])
    @_route()
    async def metrics(self, request: Request) -> Reply:
        """Prometheus text format of the daemon's registry (bearer token, like the
        rest of the API: scrapers send it with ``authorization: credentials_file``)."""
        return Reply(200, render_metrics(), METRICS_CONTENT_TYPE)

    @app.route("/v1/nodes", methods=["GET", "HEAD"])
    @_route()
    async def list_nodes(self, request: Request) -> Reply:
        """Every node, without user-data (fetch one node for that)."""
        documents = []
        for record in await self._store.list_nodes():
            document = record.to_document()
            document.pop("user_data")
            documents.append(document)
        documents = await with_vendordata_errors(self._vendordata_errors, documents)
        return _json(200, {"nodes": documents})

    @app.route("/v1/nodes", methods=["POST"])
    @_route()
    async def import_nodes(self, request: Request) -> Reply:
        """Create or replace one node or a list of them, all or nothing."""
        document = _read_json(request, self._max_body)
        try:
            new_nodes = parse_nodes(strip_read_only(document))
        except NodeValidationError as e:
            raise BadRequest(400, e.as_json()) from None
        created = await self._store.upsert_nodes(new_nodes, isinstance(document, list))
        self.log.info("imported {count} nodes", count=len(new_nodes))
        outcome: dict[str, list[str]] = {"created": [], "updated": []}
        for node, was_created in zip(new_nodes, created, strict=True):
            outcome["created" if was_created else "updated"].append(node.uuid)
        return _json(200, outcome)

    @app.route("/v1/nodes/<string:uuid>", methods=["GET", "HEAD"])
    @_route()
    async def get_node(self, request: Request, uuid: str) -> Reply:
        """One node, with its user-data."""
        canonical = _check_uuid(uuid)
        record = await self._store.get_node(canonical)
        if record is None:
            return _not_found(uuid)
        document = (
            record.to_document()
            if self._peers is None
            else await with_peer_entries(self._peers, canonical, record)
        )
        documents = await with_vendordata_errors(self._vendordata_errors, [document])
        return _json(200, documents[0])

    @app.route("/v1/nodes/<string:uuid>/shared_keys", methods=["DELETE"])
    @_route()
    async def delete_shared_keys(self, request: Request, uuid: str) -> Reply:
        """Delete the keys the node shared with its project (it may post new ones)."""
        if self._peers is None:
            raise BadRequest(503, {"error": "unavailable", "message": "no peer store"})
        count = await self._peers.delete_shared(_check_uuid(uuid))
        if count is None:
            return _not_found(uuid)
        self.log.info("deleted {count} shared keys of node {uuid}", count=count, uuid=uuid)
        return _json(200, {"deleted": count})

    @app.route("/v1/nodes/<string:uuid>/password", methods=["DELETE"])
    @_route()
    async def clear_password(self, request: Request, uuid: str) -> Reply:
        """Forget the password the machine posted (Nova's ``clear-password``): the
        machine reads an empty password and may post a new one."""
        cleared = await self._store.clear_password(_check_uuid(uuid))
        if cleared is None:
            return _not_found(uuid)
        self.log.info("cleared the password of node {uuid}", uuid=uuid)
        return _json(200, {"cleared": cleared})

    @app.route("/v1/nodes/<string:uuid>", methods=["PUT"])
    @_route()
    async def put_node(self, request: Request, uuid: str) -> Reply:
        """Create or replace one node."""
        canonical = _check_uuid(uuid)
        document = strip_read_only(_read_json(request, self._max_body))
        if isinstance(document, dict):
            document.setdefault("uuid", canonical)
            named = document["uuid"]
            if not isinstance(named, str) or named.lower() != canonical:
                raise BadRequest(
                    400,
                    NodeValidationError("uuid", "does not match the URL").as_json(),
                )
        try:
            node = parse_node(document)
        except NodeValidationError as e:
            raise BadRequest(400, e.as_json()) from None
        created = await self._store.upsert_nodes([node], as_list=False)
        record = await self._store.get_node(canonical)
        if record is None:
            return _not_found(canonical)
        return _json(201 if created[0] else 200, record.to_document())

    @app.route("/v1/nodes/<string:uuid>/boot", methods=["GET", "HEAD"])
    @_route()
    async def node_boot(self, request: Request, uuid: str) -> Reply:
        """How the node boots: who holds it (owner, standbys by the ring, claim time
        and generation), its DHCP boot mapping and push state (status, attempts, last
        error), and its recent TFTP boot events, newest first."""
        canonical = _check_uuid(uuid)
        record = await self._store.get_node(canonical)
        if record is None:
            return _not_found(uuid)
        group = record.node.conductor_group
        ownership = (
            await self._cluster.node_boot(canonical, group)
            if self._cluster is not None
            else dict(_NO_OWNER)
        )
        push = await self._dhcp.state(canonical) if self._dhcp is not None else None
        recent = await self._boot_events.recent(canonical) if self._boot_events is not None else []
        return _json(
            200,
            {
                "uuid": canonical,
                "conductor_group": group,
                **ownership,
                **_dhcp_fields(push),
                "events": [e.to_document() for e in recent],
            },
        )

    @app.route("/v1/conductors", methods=["GET", "HEAD"])
    @_route()
    async def conductors(self, request: Request) -> Reply:
        """Every registered conductor: group, addresses, heartbeat age by the
        database's clock, whether it is live, and how many nodes it holds."""
        cluster = self._membership()
        found = await cluster.conductors()
        return _json(200, {"conductors": found, "heartbeat_timeout": cluster.heartbeat_timeout})

    @app.route("/v1/ring", methods=["GET", "HEAD"])
    @_route()
    async def ring(self, request: Request) -> Reply:
        """The ring generation and its members, and per conductor the nodes the ring
        gives it and the nodes it holds; nodes unowned or not settled yet."""
        return _json(200, await self._membership().ring())

    def _membership(self) -> ClusterView:
        if self._cluster is None:
            raise BadRequest(
                503, {"error": "unavailable", "message": "conductor membership is not running"}
            )
        return self._cluster

    @app.route("/v1/nodes/<string:uuid>", methods=["DELETE"])
    @_route()
    async def delete_node(self, request: Request, uuid: str) -> Reply:
        """Forget a node."""
        if not await self._store.delete_node(_check_uuid(uuid)):
            return _not_found(uuid)
        self.log.info("deleted node {uuid}", uuid=uuid)
        return Reply(204, b"", JSON)


# What /v1/nodes/<uuid>/boot says about ownership when membership is not running.
_NO_OWNER: dict[str, Any] = {
    "owner": None,
    "ring_owner": None,
    "standbys": [],
    "claimed_at": None,
    "generation": None,
    "ring_generation": None,
}


def _dhcp_fields(push: dict[str, Any] | None) -> dict[str, Any]:
    """The DHCP part of /v1/nodes/<uuid>/boot: the desired mapping, and its push state
    (``status`` pushed, pending or failed; attempts, last error, next attempt)."""
    if push is None:
        return {"mapping": None, "push": None}
    push = dict(push)
    return {"mapping": push.pop("mapping"), "push": push}


def _write(reply: Reply, request: IRequest) -> bytes:
    """The one place the admin site writes to a request: status, headers, body."""
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
    for name, value in reply.headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return reply.body


def _json(status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    body = json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"
    return Reply(status, body, JSON, headers)


_UNAUTHORISED = _json(
    401,
    {"error": "unauthorized", "message": "bearer token required"},
    headers=(("WWW-Authenticate", 'Bearer realm="metadatad"'),),
)


def _not_found(uuid: str) -> Reply:
    return _json(404, {"error": "not found", "message": f"no node {uuid}"})


def with_peer_entries(
    peers: PeerEntries, uuid: str, record: NodeRecord
) -> Deferred[dict[str, Any]]:
    """The node's document with ``shared_keys`` and ``private_keys``."""

    def merged(entries: dict[str, dict[str, str]]) -> dict[str, Any]:
        document = record.to_document()
        document["shared_keys"] = entries["shared"]
        document["private_keys"] = entries["private"]
        return document

    return peers.node_entries(uuid).addCallback(merged)


def _check_uuid(uuid: str) -> str:
    try:
        return parse_node({"uuid": uuid}).uuid
    except NodeValidationError as e:
        raise BadRequest(400, e.as_json()) from None


def _read_json(request: Request, limit: int) -> Any:
    too_large = BadRequest(413, {"error": "too large", "message": f"at most {limit} bytes"})
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = request.content.read(limit + 1) if request.content is not None else b""
    if len(body) > limit:
        raise too_large
    try:
        return parse_json(body)
    except JSONInputError as e:
        raise BadRequest(400, {"error": "invalid JSON", "message": str(e)}) from None
