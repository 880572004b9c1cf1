# -*- test-case-name: tests.test_console_site -*-
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

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from klein import Klein
from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from metadatad.admin import pages
from metadatad.admin.feed import ClusterFeed
from metadatad.admin.site import with_peer_entries
from metadatad.admin.timeline import timeline
from metadatad.db.console import ConsoleQueries, NodeFilter
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.httputil import handle_failure
from metadatad.nodes import NodeValidationError, parse_node

__all__ = ["Console", "ConsoleRoot", "Sessions"]

COOKIE = b"metadatad_console"
SESSION_LIFETIME = 12 * 3600.0
CHOICES_LIFETIME = 10.0
STATIC = {"console.css": b"text/css; charset=utf-8", "console.js": b"text/javascript"}
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    b"base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
}
_NO_OWNER: dict[str, Any] = {"owner": None, "ring_owner": None, "standbys": []}


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


class Console:
    """The console's routes.  Collaborators are the daemon's own services."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        token: str,
        clock: Any,
        store: Any,
        queries: ConsoleQueries,
        *,
        conductor: str = "",
        heartbeat_timeout: float = 60.0,
        cluster: Any = None,
        feed: ClusterFeed | None = None,
        boot_events: Any = None,
        activity: Any = None,
        vendordata_errors: Any = None,
        peers: Any = None,
        dhcp: Any = None,
    ) -> None:
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

    def _html(self, request: Request, status: int = 200) -> None:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)

    def _session(self, request: Request) -> str | None:
        """The CSRF token of the caller's session ("" for a bearer caller), or None."""
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token):
            return ""
        nonce = self._sessions.nonce(request.getCookie(COOKIE))
        return None if nonce is None else self._sessions.csrf(nonce)

    def _refuse(self, request: Request) -> bytes:
        self._html(request, 401)
        return pages.login_page("Log in first.")

    def _forged(self, request: Request, csrf: str) -> bool:
        """A POST that did not come from our own form."""
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host") or b""
            if origin.decode("latin-1") == "null" or urlsplit(
                origin.decode("latin-1")
            ).netloc != host.decode("latin-1"):
                return True
        if csrf == "":  # a bearer caller
            return False
        return not hmac.compare_digest(_arg(request, "csrf").encode(), csrf.encode())

    def _page(self, request: Request, render: Callable[[str], Any]) -> Any:
        csrf = self._session(request)
        if csrf is None:
            return self._refuse(request)
        self._html(request)
        result = render(csrf)
        if isinstance(result, Deferred):
            return result.addErrback(self._unavailable, request)
        return result

    def _unavailable(self, failure: Failure, request: Request) -> bytes:
        failure.trap(SQLAlchemyError, ConnectionError)
        self.log.warn("console request failed on the store: {error}", error=failure.value)
        self._html(request, 503)
        request.setHeader(b"Retry-After", b"5")
        return str(Markup("<p>The database did not answer; retry.</p>")).encode()

    @app.handle_errors(Exception)
    def failed(self, request: Request, failure: Failure) -> bytes:
        """Routing errors keep their status; anything else is a bug."""
        return handle_failure(request, failure, self.log)

    # --- login ---------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: Request) -> Any:
        """The cluster page, or the login form."""
        csrf = self._session(request)
        if csrf is None:
            self._html(request)
            return pages.login_page()
        return self._page(request, self._cluster_page)

    @app.route("/console/login", methods=["POST"])
    def login(self, request: Request) -> bytes:
        """Check the posted token; on success, a session cookie and back to ``/``."""
        if b"token" in parse_qs(urlsplit(request.uri).query):
            # A token in a URL lands in logs and histories: refused, even when right.
            self._html(request, 400)
            return pages.login_page("The token goes in the form, never in the URL.")
        offered = _arg(request, "token", 4096).strip().encode("utf-8")
        if not self._token or not hmac.compare_digest(offered, self._token):
            self.log.warn(
                "console login refused from {peer}",
                peer=getattr(request.getClientAddress(), "host", "?"),
            )
            self._html(request, 401)
            return pages.login_page("That token was refused.")
        request.addCookie(
            COOKIE,
            self._sessions.issue().encode("ascii"),
            path=b"/",
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
        )
        return self._see_other(request, b"/")

    @app.route("/console/logout", methods=["POST"])
    def logout(self, request: Request) -> bytes:
        """Forget the session cookie (a copy of it stays valid until it expires)."""
        csrf = self._session(request)
        if csrf is not None and self._forged(request, csrf):
            self._html(request, 403)
            return b"forbidden\n"
        request.addCookie(
            COOKIE,
            b"",
            path=b"/",
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
            max_age=b"0",
        )
        return self._see_other(request, b"/")

    def _see_other(self, request: Request, location: bytes) -> bytes:
        self._html(request, 303)
        request.setHeader(b"Location", location)
        return b""

    @app.route("/console/static/<string:name>", methods=["GET", "HEAD"])
    def static(self, request: Request, name: str) -> bytes:
        """The console's stylesheet and script (shipped in the package)."""
        if name not in self._static:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", STATIC[name])
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._static[name]

    # --- the cluster -----------------------------------------------------------------

    def _cluster_page(self, csrf: str) -> Deferred[bytes]:
        snapshot = self._feed.snapshot() if self._feed is not None else succeed({})
        return snapshot.addCallback(lambda found: pages.cluster_page(found, csrf))

    @app.route("/console/events", methods=["GET"])
    def events(self, request: Request) -> Any:
        """Server-sent events: the cluster page's live parts, twice a second."""
        if self._session(request) is None:
            request.setResponseCode(401)
            return b"log in first\n"
        if self._feed is None:
            request.setResponseCode(503)
            return b"conductor membership is not running\n"
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Accel-Buffering", b"no")

        def send(snapshot: dict[str, Any]) -> None:
            data = json.dumps(pages.cluster_fragments(snapshot), separators=(",", ":"))
            request.write(b"event: cluster\ndata: " + data.encode("utf-8") + b"\n\n")

        feed = self._feed
        unsubscribe = feed.subscribe(send)
        # Fires never: the stream ends when the browser leaves (Klein cancels it).
        return Deferred(lambda _: unsubscribe())

    # --- nodes -------------------------------------------------------------------------

    @app.route("/console/nodes", methods=["GET", "HEAD"])
    def nodes(self, request: Request) -> Any:
        """One page of the nodes table."""
        page = _arg(request, "page", 9)
        wanted = NodeFilter(
            search=_arg(request, "q"),
            owner=_arg(request, "owner"),
            push=_arg(request, "push", 16),
            outcome=_arg(request, "outcome", 32),
            page=int(page) if page.isdigit() and int(page) > 0 else 1,
        )

        def render(csrf: str) -> Deferred[bytes]:
            started = self._clock.seconds()
            d = gatherResults(
                [
                    self._store.run(self._queries.page, wanted),
                    self._filter_choices(),
                ],
                consumeErrors=True,
            )

            def done(results: list[Any]) -> bytes:
                (total, rows), choices = results
                elapsed = self._clock.seconds() - started
                return pages.nodes_page(
                    wanted, total, rows, choices=choices, csrf=csrf, elapsed=elapsed
                )

            return d.addCallback(done).addErrback(_first_failure)

        return self._page(request, render)

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
    def node(self, request: Request, uuid: str) -> Any:
        """One node: who holds it, its DHCP mapping, its boot timeline, its document."""
        notice = {
            "repush": "The mapping is due again: its owner pushes it at its next cycle.",
            "clear-vendordata": "The vendordata error was cleared.",
            "delete-shared-keys": "The shared keys were deleted.",
        }.get(_arg(request, "done", 32), "")
        return self._page(
            request,
            lambda csrf: Deferred.fromCoroutine(self._node_page(request, uuid, csrf, notice)),
        )

    async def _node_page(self, request: Request, uuid: str, csrf: str, notice: str) -> bytes:
        canonical = _uuid(uuid)
        record = None if canonical is None else await self._store.get_node(canonical)
        if canonical is None or record is None:
            request.setResponseCode(404)
            return str(Markup("<p>No node {}.</p>").format(uuid)).encode()
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
        return pages.node_page(
            document,
            ownership=ownership,
            push=push,
            vendordata_errors=[e.to_document() for e in errors],
            entries=timeline(push, events, activity),
            status=status,
            csrf=csrf,
            notice=notice,
        )

    @app.route("/console/nodes/<string:uuid>/<string:action>", methods=["GET", "HEAD"])
    def confirm(self, request: Request, uuid: str, action: str) -> Any:
        """The confirmation page of an action."""
        if action not in pages.ACTIONS:
            request.setResponseCode(404)
            return b"no such action\n"

        async def render(csrf: str) -> bytes:
            canonical = _uuid(uuid)
            record = None if canonical is None else await self._store.get_node(canonical)
            if canonical is None or record is None:
                request.setResponseCode(404)
                return str(Markup("<p>No node {}.</p>").format(uuid)).encode()
            return pages.confirm_page(
                canonical, record.node.name, action, _arg(request, "target", 64), csrf
            )

        return self._page(request, lambda csrf: Deferred.fromCoroutine(render(csrf)))

    @app.route("/console/nodes/<string:uuid>/<string:action>", methods=["POST"])
    def act(self, request: Request, uuid: str, action: str) -> Any:
        """Carry out a confirmed action, then back to the node's page."""
        csrf = self._session(request)
        if csrf is None:
            return self._refuse(request)
        if self._forged(request, csrf):
            self._html(request, 403)
            return b"forbidden: the form did not come from this console\n"
        canonical = _uuid(uuid)
        if action not in pages.ACTIONS or canonical is None:
            request.setResponseCode(404)
            return b"no such node or action\n"
        d = Deferred.fromCoroutine(self._act(canonical, action, _arg(request, "target", 64)))

        def done(_: object) -> bytes:
            self.log.info("console: {action} on node {uuid}", action=action, uuid=canonical)
            location = f"/console/nodes/{canonical}?done={action}"
            return self._see_other(request, location.encode("ascii"))

        return d.addCallback(done).addErrback(self._unavailable, request)

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
        else:
            if self._peers is not None:
                await self._peers.delete_shared(uuid)
            detail = "deleted the shared keys"
        if self._activity is not None:
            self._activity.note(uuid, "operator", detail)

    # --- what-if -----------------------------------------------------------------------

    @app.route("/console/whatif", methods=["GET", "HEAD"])
    def what_if(self, request: Request) -> Any:
        """Which nodes would move if a conductor died."""
        chosen = _arg(request, "conductor")

        async def render(csrf: str) -> bytes:
            live = await self._store.run(self._queries.live_conductors, self._timeout)
            total, moves = 0, None
            if chosen in live:
                total, moves = await self._store.run(self._queries.what_if, chosen, self._timeout)
            return pages.whatif_page(live, chosen, total=total, moves=moves, csrf=csrf)

        return self._page(request, lambda csrf: Deferred.fromCoroutine(render(csrf)))


def _first_failure(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError."""
    error = failure.value
    assert isinstance(error, FirstError)
    sub: Failure = error.subFailure
    return sub


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
