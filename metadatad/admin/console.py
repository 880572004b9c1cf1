# -*- test-case-name: tests.web.test_console_site -*-
"""The operator console: HTML pages on the admin listener, at ``/`` and ``/console/``.

Authentication: the login form posts the admin token once; the answer is a session
cookie (HttpOnly, SameSite=Strict, Secure on TLS) holding an issue time and a nonce
signed with a key derived from the token, so changing the token ends every session and
the token itself never leaves the login request.  Every state-changing request is a
POST carrying a CSRF token (an HMAC of the session's nonce), and a cross-origin
``Origin`` is refused.  A request with the admin API's bearer header is accepted too
(scripts, tests), without the CSRF token: no ambient credential is involved.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Coroutine
from importlib import resources
from typing import Any, Concatenate, ParamSpec
from urllib.parse import parse_qs, urlsplit

from klein import Klein
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from metadatad.admin import pages
from metadatad.admin.feed import ClusterFeed
from metadatad.admin.site import with_peer_entries
from metadatad.admin.timeline import timeline
from metadatad.core.nodes import NodeValidationError, parse_node
from metadatad.db.activity import ActivityRecorder
from metadatad.db.console import ConsoleQueries, NodeFilter
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.interfaces import BootEvents, ClusterView, PeerEntries, VendordataErrors
from metadatad.metadata.reply import Reply, failure_reply

__all__ = ["Console", "ConsoleRoot", "Sessions"]

COOKIE = b"metadatad_console"
SESSION_LIFETIME = 12 * 3600.0
CHOICES_LIFETIME = 10.0
HTML = "text/html; charset=utf-8"
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
_NO_OWNER: dict[str, Any] = {"owner": None, "ring_owner": None, "standbys": []}

P = ParamSpec("P")
Route = Callable[Concatenate["Console", Request, str | None, P], Coroutine[Any, Any, Reply]]
Served = Callable[Concatenate["Console", Request, P], Deferred[bytes]]


class Sessions:
    """Signed, stateless session cookies and their CSRF tokens."""

    def __init__(self, token: str, clock: Any, lifetime: float = SESSION_LIFETIME) -> None:
        self._key = hmac.new(
            token.encode("utf-8"), b"metadatad console session v1", hashlib.sha256
        ).digest()
        self._clock = clock
        self._lifetime = lifetime

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session's cookie value."""
        payload = f"{int(self._clock.seconds())}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{self._sign(payload)}"

    def nonce(self, cookie: bytes | None) -> str | None:
        """The session's nonce if ``cookie`` is a valid, unexpired session."""
        if not cookie:
            return None
        try:
            text = cookie.decode("ascii")
        except UnicodeDecodeError:
            return None
        payload, _, signature = text.rpartition(".")
        issued, _, nonce = payload.partition(".")
        if not (issued.isdigit() and nonce) or not hmac.compare_digest(
            signature, self._sign(payload)
        ):
            return None
        age = self._clock.seconds() - int(issued)
        return nonce if -60 <= age <= self._lifetime else None

    def csrf(self, nonce: str) -> str:
        """The CSRF token of the session with ``nonce``."""
        return self._sign("csrf:" + nonce)


def _arg(request: Request, name: str, limit: int = 256) -> str:
    values = (request.args or {}).get(name.encode("ascii")) or [b""]
    return values[0][:limit].decode("utf-8", errors="replace")


def _page(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """An HTML answer with the console's security headers."""
    return Reply(status, body, HTML, SECURITY_HEADERS + headers)


def _see_other(location: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return _page(303, b"", (("Location", location), *headers))


def _write(reply: Reply, request: IRequest) -> bytes:
    """The one place the console writes a reply to a request (the event stream, a
    stream rather than one reply, writes its events itself)."""
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
    for name, value in reply.headers:
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return reply.body


_LOG_IN_FIRST = _page(401, pages.login_page("Log in first."))
_FORGED = _page(403, b"forbidden: the form did not come from this console\n")


def _not_found(what: str) -> Reply:
    return _page(404, str(Markup("<p>No {}.</p>").format(what)).encode("utf-8"))


def _route(*, session: bool = True, post: bool = False) -> Callable[[Route[P]], Served[P]]:
    """Serve a console route: the session check (unless ``session`` is false), the
    CSRF and origin check of a ``post``, the route's coroutine as a Deferred (it gets
    the session's CSRF token, "" for a bearer caller, None without a session), a
    database failure as a 503 page, and the reply written out."""

    def decorate(route: Route[P]) -> Served[P]:
        @functools.wraps(route)
        def serve(
            console: Console, request: Request, *args: P.args, **kwargs: P.kwargs
        ) -> Deferred[bytes]:
            csrf = console._session(request)
            if session and csrf is None:
                answer = succeed(_LOG_IN_FIRST)
            elif post and csrf is not None and console._forged(request, csrf):
                answer = succeed(_FORGED)
            else:
                answer = ensureDeferred(route(console, request, csrf, *args, **kwargs))
                answer.addErrback(console._unavailable)
            return answer.addCallback(_write, request)

        return serve

    return decorate


class Console:
    """The console's routes.  Collaborators are the daemon's own services."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        token: str,
        clock: IReactorTime,
        store: Any,
        queries: ConsoleQueries,
        *,
        conductor: str = "",
        heartbeat_timeout: float = 60.0,
        cluster: ClusterView | None = None,
        feed: ClusterFeed | None = None,
        boot_events: BootEvents | None = None,
        activity: ActivityRecorder | None = None,
        vendordata_errors: VendordataErrors | None = None,
        peers: PeerEntries | None = None,
        dhcp: Any = None,
    ) -> None:
        """``store`` is the node store with ``run(f, *args)`` (its threadpool);
        ``dhcp`` the local DHCP pusher (``nodes_changed()``), None without one."""
        self._token = token.encode("utf-8")
        self._clock = clock
        self._sessions = Sessions(token, clock)
        self._store = store
        self._queries = queries
        self._pushes = DhcpPushRepository(queries.engine)
        self._conductor = conductor
        self._timeout = heartbeat_timeout
        self._cluster = cluster
        self._feed = feed
        self._boot_events = boot_events
        self._activity = activity
        self._vendordata_errors = vendordata_errors
        self._peers = peers
        self._dhcp = dhcp
        self._choices: tuple[float, Any] = (float("-inf"), None)
        self._static = {
            name: (resources.files("metadatad.admin") / "static" / name).read_bytes()
            for name in STATIC
        }

    def resource(self) -> Any:
        """The twisted.web resource of the console."""
        return self.app.resource()

    # --- plumbing ------------------------------------------------------------------

    def _session(self, request: Request) -> str | None:
        """The CSRF token of the caller's session ("" for a bearer caller), or None."""
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token):
            return ""
        nonce = self._sessions.nonce(request.getCookie(COOKIE))
        return None if nonce is None else self._sessions.csrf(nonce)

    def _forged(self, request: Request, csrf: str) -> bool:
        """A POST that did not come from our own form."""
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = (request.getHeader(b"host") or b"").decode("latin-1")
            claimed = origin.decode("latin-1")
            if claimed == "null" or urlsplit(claimed).netloc != host:
                return True
        if csrf == "":  # a bearer caller
            return False
        return not hmac.compare_digest(_arg(request, "csrf").encode(), csrf.encode())

    def _unavailable(self, failure: Failure) -> Reply:
        failure.trap(SQLAlchemyError, ConnectionError)
        self.log.warn("console request failed on the store: {error}", error=failure.value)
        body = str(Markup("<p>The database did not answer; retry.</p>")).encode()
        return _page(503, body, (("Retry-After", "5"),))

    def _cookie(self, request: Request, value: str, *, expire: bool = False) -> tuple[str, str]:
        attributes = "; Path=/; HttpOnly; SameSite=Strict"
        if request.isSecure():
            attributes += "; Secure"
        if expire:
            attributes += "; Max-Age=0"
        return ("Set-Cookie", f"{COOKIE.decode()}={value}{attributes}")

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Failure) -> bytes:
        """Routing errors keep their status; anything else is a bug."""
        return _write(failure_reply(request, failure, self.log), request)

    # --- login ---------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    @_route(session=False)
    async def index(self, request: Request, csrf: str | None) -> Reply:
        """The cluster page, or the login form."""
        if csrf is None:
            return _page(200, pages.login_page())
        snapshot = await self._feed.snapshot() if self._feed is not None else {}
        return _page(200, pages.cluster_page(snapshot, csrf))

    @app.route("/console/login", methods=["POST"])
    @_route(session=False)
    async def login(self, request: Request, csrf: str | None) -> Reply:
        """Check the posted token; on success, a session cookie and back to ``/``."""
        if b"token" in parse_qs(urlsplit(request.uri).query):
            # A token in a URL lands in logs and histories: refused, even when right.
            return _page(400, pages.login_page("The token goes in the form, never in the URL."))
        offered = _arg(request, "token", 4096).strip().encode("utf-8")
        if not self._token or not hmac.compare_digest(offered, self._token):
            self.log.warn(
                "console login refused from {peer}",
                peer=getattr(request.getClientAddress(), "host", "?"),
            )
            return _page(401, pages.login_page("That token was refused."))
        return _see_other("/", (self._cookie(request, self._sessions.issue()),))

    @app.route("/console/logout", methods=["POST"])
    @_route(post=True)
    async def logout(self, request: Request, csrf: str | None) -> Reply:
        """Forget the session cookie (a copy of it stays valid until it expires)."""
        return _see_other("/", (self._cookie(request, "", expire=True),))

    @app.route("/console/static/<string:name>", methods=["GET", "HEAD"])
    @_route(session=False)
    async def static(self, request: Request, csrf: str | None, name: str) -> Reply:
        """The console's stylesheet and script (shipped in the package)."""
        if name not in self._static:
            return _page(404, b"not found\n")
        headers = (("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-cache"))
        return Reply(200, self._static[name], STATIC[name], headers)

    # --- the cluster -----------------------------------------------------------------

    @app.route("/console/events", methods=["GET"])
    def events(self, request: Request) -> Any:
        """Server-sent events: the cluster page's live parts, twice a second.  A stream
        written event by event (not one reply); refusals are replies."""
        if self._session(request) is None:
            return _write(Reply(401, b"log in first\n"), request)
        if self._feed is None:
            return _write(Reply(503, b"conductor membership is not running\n"), request)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")

        def send(snapshot: dict[str, Any]) -> None:
            data = json.dumps(pages.cluster_fragments(snapshot), separators=(",", ":"))
            request.write(b"event: cluster\ndata: " + data.encode("utf-8") + b"\n\n")

        unsubscribe = self._feed.subscribe(send)
        # Fires never: the stream ends when the browser leaves (Klein cancels it).
        return Deferred(lambda _: unsubscribe())

    # --- nodes -------------------------------------------------------------------------

    @app.route("/console/nodes", methods=["GET", "HEAD"])
    @_route()
    async def nodes(self, request: Request, csrf: str | None) -> Reply:
        """One page of the nodes table."""
        page = _arg(request, "page", 9)
        wanted = NodeFilter(
            search=_arg(request, "q"),
            owner=_arg(request, "owner"),
            push=_arg(request, "push", 16),
            outcome=_arg(request, "outcome", 32),
            page=int(page) if page.isdigit() and int(page) > 0 else 1,
        )
        started = self._clock.seconds()
        found = self._store.run(self._queries.page, wanted)
        choices = await self._filter_choices()
        total, rows = await found
        elapsed = self._clock.seconds() - started
        body = pages.nodes_page(
            wanted, total, rows, choices=choices, csrf=csrf or "", elapsed=elapsed
        )
        return _page(200, body)

    def _filter_choices(self) -> Deferred[Any]:
        """The owners and outcomes the filters offer, read at most every 10 s."""
        expires, cached = self._choices
        now = self._clock.seconds()
        if cached is not None and now < expires:
            return succeed(cached)

        def keep(choices: Any) -> Any:
            self._choices = (now + CHOICES_LIFETIME, choices)
            return choices

        d: Deferred[Any] = self._store.run(self._queries.choices)
        return d.addCallback(keep)

    @app.route("/console/nodes/<string:uuid>", methods=["GET", "HEAD"])
    @_route()
    async def node(self, request: Request, csrf: str | None, uuid: str) -> Reply:
        """One node: who holds it, its DHCP mapping, its boot timeline, its document."""
        notice = {
            "repush": "The mapping is due again: its owner pushes it at its next cycle.",
            "clear-vendordata": "The vendordata error was cleared.",
            "delete-shared-keys": "The shared keys were deleted.",
            "reset-password": "The posted password was cleared.",
        }.get(_arg(request, "done", 32), "")
        canonical = _uuid(uuid)
        record = None if canonical is None else await self._store.get_node(canonical)
        if canonical is None or record is None:
            return _not_found(f"node {uuid}")
        document = (
            await with_peer_entries(self._peers, canonical, record)
            if self._peers is not None
            else record.to_document()
        )
        group = record.node.conductor_group
        ownership = (
            await self._cluster.node_boot(canonical, group)
            if self._cluster is not None
            else dict(_NO_OWNER)
        )
        state = await self._store.run(self._pushes.state, canonical)
        push = state.to_document() if state is not None else None
        errors = (
            await self._vendordata_errors.for_node(canonical)
            if self._vendordata_errors is not None
            else []
        )
        events = await self._boot_events.recent(canonical) if self._boot_events else []
        activity = await self._activity.recent(canonical) if self._activity else []
        status = await self._activity.status(canonical) if self._activity else None
        body = pages.node_page(
            document,
            ownership=ownership,
            push=push,
            vendordata_errors=[e.to_document() for e in errors],
            entries=timeline(push, events, activity),
            status=status,
            csrf=csrf or "",
            notice=notice,
        )
        return _page(200, body)

    @app.route("/console/nodes/<string:uuid>/<string:action>", methods=["GET", "HEAD"])
    @_route()
    async def confirm(self, request: Request, csrf: str | None, uuid: str, action: str) -> Reply:
        """The confirmation page of an action."""
        if action not in pages.ACTIONS:
            return _not_found(f"action {action}")
        canonical = _uuid(uuid)
        record = None if canonical is None else await self._store.get_node(canonical)
        if canonical is None or record is None:
            return _not_found(f"node {uuid}")
        target = _arg(request, "target", 64)
        return _page(
            200, pages.confirm_page(canonical, record.node.name, action, target, csrf or "")
        )

    @app.route("/console/nodes/<string:uuid>/<string:action>", methods=["POST"])
    @_route(post=True)
    async def act(self, request: Request, csrf: str | None, uuid: str, action: str) -> Reply:
        """Carry out a confirmed action, then back to the node's page."""
        canonical = _uuid(uuid)
        if action not in pages.ACTIONS or canonical is None:
            return _not_found("such node or action")
        await self._act(canonical, action, _arg(request, "target", 64))
        self.log.info("console: {action} on node {uuid}", action=action, uuid=canonical)
        return _see_other(f"/console/nodes/{canonical}?done={action}")

    async def _act(self, uuid: str, action: str, target: str) -> None:
        if action == "repush":
            owner = await self._store.run(self._queries.repush, uuid)
            if owner is not None and owner == self._conductor and self._dhcp is not None:
                self._dhcp.nodes_changed()  # we hold it: push now, not at the next cycle
            detail = "re-push of the DHCP mapping"
        elif action == "clear-vendordata":
            if self._vendordata_errors is not None:
                await self._vendordata_errors.clear(uuid, target)
            detail = f"cleared the vendordata error of {target}"
        elif action == "reset-password":
            await self._store.clear_password(uuid)
            detail = "reset the posted password"
        else:
            if self._peers is not None:
                await self._peers.delete_shared(uuid)
            detail = "deleted the shared keys"
        if self._activity is not None:
            self._activity.note(uuid, "operator", detail)

    # --- what-if -----------------------------------------------------------------------

    @app.route("/console/whatif", methods=["GET", "HEAD"])
    @_route()
    async def what_if(self, request: Request, csrf: str | None) -> Reply:
        """Which nodes would move if a conductor died."""
        chosen = _arg(request, "conductor")
        live = await self._store.run(self._queries.live_conductors, self._timeout)
        total, moves = 0, None
        if chosen in live:
            total, moves = await self._store.run(self._queries.what_if, chosen, self._timeout)
        body = pages.whatif_page(live, chosen, total=total, moves=moves, csrf=csrf or "")
        return _page(200, body)


def _uuid(text: str) -> str | None:
    try:
        return parse_node({"uuid": text}).uuid
    except NodeValidationError:
        return None


class ConsoleRoot(Resource):
    """The admin listener's resource: ``/`` and ``/console/...`` to the console, every
    other path to the admin API."""

    isLeaf = True

    def __init__(self, admin: Any, console: Any) -> None:
        super().__init__()
        self._admin = admin
        self._console = console

    def render(self, request: Request) -> Any:
        path = request.postpath or []
        first = path[0] if path else b""
        if first == b"console" or (first == b"" and len(path) <= 1):
            return self._console.render(request)
        return self._admin.render(request)
