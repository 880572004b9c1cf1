# -*- test-case-name: tests.test_admin_site -*-
"""The operators' API: node registration and health, behind a bearer token."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from metadatad.db.store import ConflictError, NodeRecord, Store
from metadatad.db.vendordata import with_vendordata_errors
from metadatad.httputil import handle_failure
from metadatad.nodes import NodeValidationError, parse_node, parse_nodes, strip_read_only
from metadatad.telemetry import METRICS_CONTENT_TYPE, render_metrics

MAX_BODY_BYTES = 64 * 1024 * 1024


class BadRequest(Exception):
    """A request the admin API refuses; carries the status and the JSON body."""

    def __init__(self, status: int, body: dict[str, str]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


class AdminSite:
    """``/v1/nodes...``, ``/v1/conductors``, ``/v1/ring``, ``/healthz`` and ``/metrics``."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: Store,
        token: str,
        *,
        boot_events: Any = None,
        cluster: Any = None,
        vendordata_errors: Any = None,
        peers: Any = None,
        dhcp: Any = None,
    ) -> None:
        self._store = store
        self._token = token.encode("utf-8")
        # A BootEventStore (or its fake): ``recent(uuid) -> Deferred[list[BootEvent]]``.
        self._boot_events = boot_events
        # The MembershipService: ``conductors()``, ``ring()``, ``node_boot(uuid, group)``.
        self._cluster = cluster
        # A VendordataErrorStore: nodes then show ``vendordata_error`` (null or why).
        self._vendordata_errors = vendordata_errors
        # A PeerStore (or its fake): what nodes posted, shown in node documents.
        self._peers = peers
        # The DhcpPusher: ``state(uuid)`` (None when no provider is configured).
        self._dhcp = dhcp

    def resource(self) -> Any:
        """The twisted.web resource of this site."""
        return self.app.resource()

    # --- plumbing ----------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        # compare_digest on bytes of any length: no early exit that leaks the token.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _guarded(self, request: Request, handler: Callable[[], Any]) -> Any:
        request.setHeader(b"Content-Type", b"application/json")
        if not self._authorised(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="metadatad"')
            return _json(
                request, 401, {"error": "unauthorized", "message": "bearer token required"}
            )
        try:
            result = handler()
        except BadRequest as e:
            return _json(request, e.status, e.body)
        if isinstance(result, Deferred):
            return result.addErrback(self._refused, request)
        return result

    def _refused(self, failure: Failure, request: Request) -> bytes:
        failure.trap(BadRequest, ConflictError, SQLAlchemyError, ConnectionError)
        refusal = failure.value
        if isinstance(refusal, (SQLAlchemyError, ConnectionError)):
            # The database is down: the operator may retry; not a bug of ours.
            self.log.warn("admin request failed on the store: {error}", error=refusal)
            request.setHeader(b"Retry-After", b"5")
            return _json(
                request, 503, {"error": "unavailable", "message": "the database did not answer"}
            )
        if isinstance(refusal, ConflictError):
            return _json(request, 409, refusal.as_json())
        assert isinstance(refusal, BadRequest)
        return _json(request, refusal.status, refusal.body)

    @app.handle_errors(Exception)
    def failed(self, request: Request, failure: Failure) -> bytes:
        """Routing errors keep their status; anything else is a bug."""
        return handle_failure(request, failure, self.log)

    # --- routes ------------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> Deferred[bytes]:
        """Reachability of the store, and whether this conductor is a live member of
        the cluster; no token needed (load balancers probe it)."""
        request.setHeader(b"Content-Type", b"application/json")

        def ok(_: None) -> bytes:
            if self._cluster is None:
                return _json(request, 200, {"status": "ok", "database": "ok"})
            # "starting" until the first sync, "stale" when the others no longer count
            # this conductor live: not ready either way.
            membership = self._cluster.health()
            healthy = membership == "ok"
            age = self._cluster.heartbeat_age()
            return _json(
                request,
                200 if healthy else 503,
                {
                    "status": "ok" if healthy else "unhealthy",
                    "database": "ok",
                    "membership": membership,
                    "heartbeat_age": None if age is None else round(age, 3),
                    "heartbeat_timeout": self._cluster.heartbeat_timeout,
                },
            )

        def down(failure: Failure) -> bytes:
            self.log.warn("health check: database unreachable: {error}", error=failure.value)
            return _json(request, 503, {"status": "unhealthy", "database": "unreachable"})

        return self._store.ping().addCallbacks(ok, down)

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: Request) -> Any:
        """Prometheus text format of the daemon's registry (bearer token, like the
        rest of the API: scrapers send it with ``authorization: credentials_file``)."""

        def run() -> bytes:
            request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE.encode("ascii"))
            return render_metrics()

        return self._guarded(request, run)

    @app.route("/v1/nodes", methods=["GET", "HEAD"])
    def list_nodes(self, request: Request) -> Any:
        """Every node, without user-data (fetch one node for that)."""

        def listed(records: list[NodeRecord]) -> Deferred[bytes]:
            documents = []
            for record in records:
                document = record.to_document()
                document.pop("user_data")
                documents.append(document)
            return with_vendordata_errors(self._vendordata_errors, documents).addCallback(
                lambda documents: _json(request, 200, {"nodes": documents})
            )

        return self._guarded(request, lambda: self._store.list_nodes().addCallback(listed))

    @app.route("/v1/nodes", methods=["POST"])
    def import_nodes(self, request: Request) -> Any:
        """Create or replace one node or a list of them, all or nothing."""

        def run() -> Deferred[bytes]:
            document = _read_json(request)
            try:
                new_nodes = parse_nodes(strip_read_only(document))
            except NodeValidationError as e:
                raise BadRequest(400, e.as_json()) from None
            as_list = isinstance(document, list)

            def done(created: list[bool]) -> bytes:
                self.log.info("imported {count} nodes", count=len(new_nodes))
                outcome: dict[str, list[str]] = {"created": [], "updated": []}
                for node, was_created in zip(new_nodes, created, strict=True):
                    outcome["created" if was_created else "updated"].append(node.uuid)
                return _json(request, 200, outcome)

            return self._store.upsert_nodes(new_nodes, as_list).addCallback(done)

        return self._guarded(request, run)

    @app.route("/v1/nodes/<string:uuid>", methods=["GET", "HEAD"])
    def get_node(self, request: Request, uuid: str) -> Any:
        """One node, with its user-data."""

        def run() -> Deferred[bytes]:
            canonical = _check_uuid(uuid)

            def found(record: NodeRecord | None) -> Any:
                if record is None:
                    return _not_found(request, uuid)
                d: Deferred[Any] = (
                    succeed(record.to_document())
                    if self._peers is None
                    else with_peer_entries(self._peers, canonical, record)
                )
                d.addCallback(
                    lambda document: with_vendordata_errors(self._vendordata_errors, [document])
                )
                return d.addCallback(lambda documents: _json(request, 200, documents[0]))

            return self._store.get_node(canonical).addCallback(found)

        return self._guarded(request, run)

    @app.route("/v1/nodes/<string:uuid>/shared_keys", methods=["DELETE"])
    def delete_shared_keys(self, request: Request, uuid: str) -> Any:
        """Delete the keys the node shared with its project (it may post new ones)."""

        def run() -> Deferred[bytes]:
            if self._peers is None:
                raise BadRequest(503, {"error": "unavailable", "message": "no peer store"})

            def deleted(count: int | None) -> bytes:
                if count is None:
                    return _not_found(request, uuid)
                self.log.info("deleted {count} shared keys of node {uuid}", count=count, uuid=uuid)
                return _json(request, 200, {"deleted": count})

            return self._peers.delete_shared(_check_uuid(uuid)).addCallback(deleted)

        return self._guarded(request, run)

    @app.route("/v1/nodes/<string:uuid>", methods=["PUT"])
    def put_node(self, request: Request, uuid: str) -> Any:
        """Create or replace one node."""

        def run() -> Deferred[bytes]:
            canonical = _check_uuid(uuid)
            document = strip_read_only(_read_json(request))
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

            def stored(created: list[bool]) -> Deferred[bytes]:
                status = 201 if created[0] else 200
                return self._store.get_node(canonical).addCallback(
                    lambda record: _found(request, canonical, record, status)
                )

            return self._store.upsert_nodes([node], as_list=False).addCallback(stored)

        return self._guarded(request, run)

    @app.route("/v1/nodes/<string:uuid>/boot", methods=["GET", "HEAD"])
    def node_boot(self, request: Request, uuid: str) -> Any:
        """How the node boots: who holds it (owner, standbys by the ring, claim time
        and generation), its DHCP boot mapping and push state (status, attempts, last
        error), and its recent TFTP boot events, newest first."""

        def run() -> Deferred[bytes]:
            canonical = _check_uuid(uuid)

            def found(record: NodeRecord | None) -> Any:
                if record is None:
                    return _not_found(request, uuid)
                ownership = (
                    self._cluster.node_boot(canonical, record.node.conductor_group)
                    if self._cluster is not None
                    else succeed(dict(_NO_OWNER))
                )

                def with_dhcp(document: dict[str, Any]) -> Deferred[dict[str, Any]]:
                    state = self._dhcp.state(canonical) if self._dhcp is not None else succeed(None)
                    return state.addCallback(lambda push: {**document, **_dhcp_fields(push)})

                def with_events(document: dict[str, Any]) -> Deferred[bytes]:
                    events = (
                        self._boot_events.recent(canonical)
                        if self._boot_events is not None
                        else succeed([])
                    )
                    return events.addCallback(
                        lambda recent: _json(
                            request,
                            200,
                            {
                                "uuid": canonical,
                                "conductor_group": record.node.conductor_group,
                                **document,
                                "events": [e.to_document() for e in recent],
                            },
                        )
                    )

                return ownership.addCallback(with_dhcp).addCallback(with_events)

            return self._store.get_node(canonical).addCallback(found)

        return self._guarded(request, run)

    @app.route("/v1/conductors", methods=["GET", "HEAD"])
    def conductors(self, request: Request) -> Any:
        """Every registered conductor: group, addresses, heartbeat age by the
        database's clock, whether it is live, and how many nodes it holds."""

        def run() -> Deferred[bytes]:
            cluster = self._membership()
            return cluster.conductors().addCallback(
                lambda found: _json(
                    request,
                    200,
                    {"conductors": found, "heartbeat_timeout": cluster.heartbeat_timeout},
                )
            )

        return self._guarded(request, run)

    @app.route("/v1/ring", methods=["GET", "HEAD"])
    def ring(self, request: Request) -> Any:
        """The ring generation and its members, and per conductor the nodes the ring
        gives it and the nodes it holds; nodes unowned or not settled yet."""

        def run() -> Deferred[bytes]:
            return self._membership().ring().addCallback(lambda report: _json(request, 200, report))

        return self._guarded(request, run)

    def _membership(self) -> Any:
        if self._cluster is None:
            raise BadRequest(
                503, {"error": "unavailable", "message": "conductor membership is not running"}
            )
        return self._cluster

    @app.route("/v1/nodes/<string:uuid>", methods=["DELETE"])
    def delete_node(self, request: Request, uuid: str) -> Any:
        """Forget a node."""

        def run() -> Deferred[bytes]:
            def deleted(existed: bool) -> bytes:
                if not existed:
                    return _not_found(request, uuid)
                self.log.info("deleted node {uuid}", uuid=uuid)
                request.setResponseCode(204)
                return b""

            return self._store.delete_node(_check_uuid(uuid)).addCallback(deleted)

        return self._guarded(request, run)


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


def _json(request: Request, status: int, document: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _not_found(request: Request, uuid: str) -> bytes:
    return _json(request, 404, {"error": "not found", "message": f"no node {uuid}"})


def _found(request: Request, uuid: str, record: NodeRecord | None, status: int = 200) -> bytes:
    if record is None:
        return _not_found(request, uuid)
    return _json(request, status, record.to_document())


def with_peer_entries(peers: Any, uuid: str, record: NodeRecord | None) -> Deferred[Any]:
    """The node's document with ``shared_keys`` and ``private_keys`` (None: no node)."""
    if record is None:
        return succeed(None)

    def merged(entries: dict[str, dict[str, str]]) -> dict[str, Any]:
        document = record.to_document()
        document["shared_keys"] = entries["shared"]
        document["private_keys"] = entries["private"]
        return document

    d: Deferred[Any] = peers.node_entries(uuid)
    return d.addCallback(merged)


def _found_document(request: Request, uuid: str, document: dict[str, Any] | None) -> bytes:
    if document is None:
        return _not_found(request, uuid)
    return _json(request, 200, document)


def _check_uuid(uuid: str) -> str:
    try:
        return parse_node({"uuid": uuid}).uuid
    except NodeValidationError as e:
        raise BadRequest(400, e.as_json()) from None


def _read_json(request: Request) -> Any:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(413, {"error": "too large", "message": f"at most {MAX_BODY_BYTES} bytes"})
    body = request.content.read(MAX_BODY_BYTES + 1) if request.content is not None else b""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(413, {"error": "too large", "message": f"at most {MAX_BODY_BYTES} bytes"})
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, {"error": "invalid JSON", "message": str(e)}) from None
