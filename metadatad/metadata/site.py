# -*- test-case-name: tests.web.test_metadata_site -*-
"""The metadata site: twisted.web glue around identity, the node cache and the renderers.

One leaf resource takes every request; :meth:`MetadataSite.handle` normalises the path
the way Nova does (a trailing slash never matters, no redirects) and dispatches to the
EC2 or OpenStack renderer.  The site does all of its own routing, so it is served by a
plain ``isLeaf`` resource rather than a Klein catch-all route: Klein's per-request
routing alone costs about as much as identity, lookup and rendering together
(docs/benchmarks-http.md).

Everything below :meth:`MetadataSite.handle` returns a :class:`Reply`, or a Deferred of
one when it waits on the store; ``handle`` alone writes it to the request.
"""

from __future__ import annotations

import binascii
import secrets
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from metadatad.core.identity import Caller, Identifier, IdentityError
from metadatad.core.records import NodeRecord
from metadatad.db.cache import CacheEntry, NodeCache
from metadatad.interfaces import Passwords
from metadatad.metadata import ec2, openstack
from metadatad.metadata.guard import Guard, Screened, audit_write
from metadatad.metadata.peers import SHARED_NAMES
from metadatad.metadata.peersite import Answer, PeerRoutes
from metadatad.metadata.reply import (
    BINARY,
    NOT_FOUND,
    Reply,
    error,
    failure_reply,
    json_reply,
    split_path,
    store_unavailable,
    text,
)

_READ_METHODS = (b"GET", b"HEAD")
_NOT_ALLOWED = error(405, "Method Not Allowed")
_READ_ONLY = attrs.evolve(_NOT_ALLOWED, headers=(("Allow", "GET, HEAD"),))
_PASSWORD_METHODS = attrs.evolve(_NOT_ALLOWED, headers=(("Allow", "GET, HEAD, POST"),))


class MetadataSite:
    """What booting machines talk to.  Collaborators are passed in, for tests."""

    log = Logger()

    def __init__(
        self,
        cache: NodeCache,
        store: Passwords,
        identifier: Identifier,
        *,
        static_vendordata: Mapping[str, Any] | None = None,
        region: str = "",
        random_bytes: Callable[[int], bytes] | None = None,
        vendordata: Any = None,
        peer_routes: PeerRoutes | None = None,
        guard: Guard | None = None,
        observe: Callable[[Request, str, bool, bool], None] | None = None,
        seen: Callable[[str], None] | None = None,
    ) -> None:
        self._cache = cache
        if guard is None:
            from twisted.internet import reactor

            guard = Guard(reactor)
        # ``observe(request, node uuid, with an IMDSv2 token, is a token PUT)`` for every
        # request answered for a known node (the console's boot timeline).
        self._observe = observe
        # Tokens, rate, size and header rules: checked here for every path.
        self._guard = guard
        self._store = store
        self._identifier = identifier
        self._static_vendordata = dict(static_vendordata or {})
        self._region = region
        self._random_bytes = random_bytes or RandomBytes(ssl.RAND_bytes)
        # A DynamicVendordata (metadata/vendordata.py) when dynamic targets are set.
        self._vendordata = vendordata
        self._peers = peer_routes
        # SeenRecorder.note: each answered node's last request (shared.json liveness).
        self._seen = seen
        self._vendor_data = json_reply(self._static_vendordata)
        self._vendor_data2 = json_reply(openstack.vendor_data2(self._static_vendordata))

    def resource(self) -> Any:
        """The twisted.web resource of this site."""
        return MetadataResource(self)

    def set_static_vendordata(self, static_vendordata: Mapping[str, Any]) -> None:
        """Serve ``static_vendordata`` from now on (SIGHUP reloads it)."""
        self._static_vendordata = dict(static_vendordata)
        self._vendor_data = json_reply(self._static_vendordata)
        self._vendor_data2 = json_reply(openstack.vendor_data2(self._static_vendordata))

    def handle(self, request: Request) -> bytes | Deferred[bytes | None]:
        """Every request of the site: its answer, written to the request here only."""
        answer = self._reply(request)
        # Reply first: a plain class check, where Deferred's goes through its ABC.
        if isinstance(answer, Reply):
            return self._write(request, answer)
        return answer.addCallback(self._write_when_answered, request)

    def _reply(self, request: Request) -> Answer:
        parts = split_path(request.path)
        method = request.method
        screened = self._guard.screen(request, parts)
        if (
            screened.refusal is None
            and not screened.token_request
            and method not in _READ_METHODS
            and not (method == b"POST" and (_is_password(parts) or _is_peer_post(parts)))
        ):
            return _PASSWORD_METHODS if _is_password(parts) else _READ_ONLY
        listing = _listing(parts)
        if listing is not None and screened.token_node is None and screened.refusal is None:
            return listing
        peer = _peer(request)
        caller = self._identifier.remembered(peer)
        if caller is None:
            try:
                caller = self._identifier.identify(peer, _header_getter(request))
            except IdentityError as e:
                # Counted against the address it came from, and audit-logged sparingly.
                denied = self._guard.unidentified(peer, e.status, e.message)
                return self._guard.deny(request, denied, peer)
        refused = self._guard.admit(caller, screened)
        if refused is not None:
            return self._guard.deny(request, refused, peer)
        found = self._lookup(caller)
        # The entry first: a plain class check, where Deferred's goes through its ABC.
        if isinstance(found, CacheEntry):
            return self._checked(found, request, caller, parts, screened)
        return found.addCallbacks(
            self._checked,
            self._store_failed,
            callbackArgs=(request, caller, parts, screened),
        )

    def _checked(
        self,
        entry: CacheEntry,
        request: Request,
        caller: Caller,
        parts: list[str],
        screened: Screened,
    ) -> Answer:
        """The gate's node checks, then the token PUT or the trees."""
        record = entry.record
        visible = _visible(record, caller)
        denied = self._guard.authorise(screened, visible.node.uuid if visible else None)
        if denied is not None:
            node = visible.node.uuid if visible else None
            return self._guard.deny(request, denied, _peer(request), node)
        if self._observe is not None and visible is not None:
            self._observe(
                request, visible.node.uuid, screened.token_node is not None, screened.token_request
            )
        if screened.token_request:
            if visible is None:
                return error(404, "Not Found: no node for this caller")
            return self._guard.issue(request, screened, visible.node.uuid)
        listing = _listing(parts)
        if listing is not None:
            return listing
        if visible is None:
            return error(404, "Not Found: no node for this caller")
        return self._answer(entry, visible, request, parts)

    def _store_failed(self, failure: Failure) -> Reply | Failure:
        return store_unavailable(failure, self.log)

    def _lookup(self, caller: Caller) -> CacheEntry | Deferred[CacheEntry]:
        if caller.instance_id is not None:
            return self._cache.by_uuid(caller.instance_id)
        assert caller.ip is not None
        return self._cache.by_ip(caller.ip)

    def _answer(
        self, entry: CacheEntry, record: NodeRecord, request: Request, parts: list[str]
    ) -> Answer:
        """``record`` (the caller's, visible to it) answers ``parts``."""
        if self._seen is not None:
            self._seen(record.node.uuid)
        if parts[0] == "openstack":
            return self._openstack(entry, record, request, parts[1:])
        if parts[0] == "service" and self._peers is not None:
            return self._peers.service(request, record, parts[1:])
        if parts[0] == "ec2":
            parts = parts[1:]
        if not parts:
            return ec2.versions_listing()
        if not ec2.is_version(parts[0]):
            return NOT_FOUND
        key = ("ec2", *parts)
        reply = entry.memo.get(key)
        if reply is None:
            tree = None
            if len(parts) > 1 and parts[1] == "meta-data":
                tree = self._meta_data_tree(entry, record, parts[0])
            reply = ec2.render(
                record.node,
                parts[0],
                parts[1:],
                region=self._region,
                pending_time=record.created_at,
                tree=tree,
            )
            if reply.status == 200:
                self._cache.remember(entry, key, reply)
        return reply

    def _meta_data_tree(self, entry: CacheEntry, record: NodeRecord, version: str) -> ec2.Tree:
        """The node's ``meta-data/`` tree, built once per cache entry and version: a
        crawl reads some 40 paths of it, each one a first read (and, in a boot storm,
        the request of a new connection), which the reply memo does not spare."""
        key = ("ec2-tree", version)
        tree: ec2.Tree | None = entry.memo.get(key)
        if tree is None:
            tree = ec2.meta_data_tree(record.node, version)
            self._cache.keep(entry, key, tree, ec2.tree_bytes(tree))
        return tree

    def _openstack(
        self, entry: CacheEntry, record: NodeRecord, request: Request, parts: list[str]
    ) -> Answer:
        version = parts[0]
        if not openstack.is_version(version) or len(parts) > 2:
            return NOT_FOUND
        node = record.node
        if len(parts) == 1:
            return text("\n".join(openstack.files(node, version)))
        name = parts[1]
        if self._peers is not None and name == "metadata":
            return self._peers.post(request, record)
        if self._peers is not None and name in SHARED_NAMES:
            return self._peers.shared(request, record)
        if name == "meta_data.json":
            # Every version of every node lists it: no need to work the list out.
            return self._meta_data(entry, node, version)
        if name not in openstack.files(node, version):
            return NOT_FOUND
        if name == "password":
            return self._password(request, record)
        if name == "vendor_data2.json" and self._vendordata is not None:
            # Cached per node and target by the vendordata service, not memoised here.
            return self._vendordata.render(record, self._static_vendordata)
        key = ("openstack", version, name)
        reply = entry.memo.get(key)
        if reply is None:
            reply = self._openstack_file(node, name)
            self._cache.remember(entry, key, reply)
        return reply

    def _meta_data(self, entry: CacheEntry, node: Any, version: str) -> Reply:
        # random_seed is fresh on every read, as Nova does; the rest of the document is
        # serialised once per cache entry around an unguessable placeholder, and kept
        # as the bytes before and after it (None: a document without a seed).
        key = ("openstack", version, "meta_data.json")
        memo: tuple[Reply, bytes | None, bytes] | None = entry.memo.get(key)
        if memo is None:
            document = openstack.meta_data(node, version, b"")
            if "random_seed" in document:
                document["random_seed"] = _SEED_PLACEHOLDER
            rendered = json_reply(document)
            head, found, tail = rendered.body.partition(_SEED_PLACEHOLDER_BYTES)
            if found:
                # The two halves take the whole body's place (and its size in the bound).
                memo = (Reply(200, b"", rendered.content_type), head, tail)
            else:
                memo = (rendered, None, b"")
            self._cache.remember(entry, key, rendered, stored=memo)
        template, before, after = memo
        if before is None:
            return template
        seed = binascii.b2a_base64(self._random_bytes(512), newline=False)
        return Reply(200, b"".join((before, seed, after)), template.content_type)

    def _openstack_file(self, node: Any, name: str) -> Reply:
        if name == "user_data":
            return Reply(200, node.user_data, BINARY)
        if name == "vendor_data.json":
            return self._vendor_data
        if name == "vendor_data2.json":
            return self._vendor_data2
        assert name == "network_data.json"
        return json_reply(openstack.network_data(node))

    def _password(self, request: Request, record: NodeRecord) -> Answer:
        uuid = record.node.uuid
        if request.method in _READ_METHODS:
            return self._store.get_password(uuid).addCallbacks(
                lambda password: text(password or ""), self._store_failed
            )
        body = request.content.read(openstack.PASSWORD_MAX_BYTES + 1) if request.content else b""
        if len(body) > openstack.PASSWORD_MAX_BYTES:
            return error(400, f"Password too long (at most {openstack.PASSWORD_MAX_BYTES})")
        try:
            password = body.decode("utf-8")
        except UnicodeDecodeError:
            return error(400, "Password must be UTF-8 text")
        if not password:
            # An empty password would lock the write-once slot with nothing in it.
            return error(400, "Password must not be empty")

        def stored(result: bool | None) -> Reply:
            if result is None:
                return NOT_FOUND
            if not result:
                return error(409, "Password already set")
            audit_write("its password", uuid, _peer(request))
            return text("")

        return self._store.set_password(uuid, password).addCallbacks(stored, self._store_failed)

    def failed(self, request: Request, failure: Failure) -> bytes:
        """Anything raised while answering is a bug: logged, a short 500."""
        return self._write(request, failure_reply(request, failure, self.log))

    @classmethod
    def _write_when_answered(cls, reply: Reply | None, request: Request) -> bytes | None:
        # None: the caller hung up while its answer waited; nobody is left to answer.
        return None if reply is None else cls._write(request, reply)

    @staticmethod
    def _write(request: Request, reply: Reply) -> bytes:
        """The one place the site writes to a request: status, headers, body."""
        if reply.status != 200:  # a request's code is 200 until set
            request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", reply.content_type.encode("ascii"))
        # An explicit length spares clients chunked decoding.
        request.setHeader(b"Content-Length", b"%d" % len(reply.body))
        for name, value in reply.headers:
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return reply.body


class RandomBytes:
    """``source``'s random bytes, drawn ``draw`` bytes at a time and each handed out
    once, for every ``meta_data.json`` read's seed.  The site draws from OpenSSL's
    CSPRNG (``ssl.RAND_bytes``, seeded by the kernel), not the kernel's: 64 KiB took 9
    us against ``os.urandom``'s 164 us here, 0.07 us per 512-byte seed, where a
    512-byte draw of its own took 0.84 us.  Not to be shared across a fork (the workers
    are started afresh, not forked)."""

    def __init__(self, source: Callable[[int], bytes], draw: int = 65536) -> None:
        self._source = source
        self._draw = draw
        self._pool = b""
        self._at = 0

    def __call__(self, count: int) -> bytes:
        at = self._at
        if at + count > len(self._pool):
            if count > self._draw:
                return self._source(count)
            self._pool, at = self._source(self._draw), 0
        self._at = at + count
        return self._pool[at : at + count]


_SEED_PLACEHOLDER = secrets.token_hex(16)
_SEED_PLACEHOLDER_BYTES = _SEED_PLACEHOLDER.encode("ascii")


class MetadataResource(Resource):
    """Every request of the site, whatever its path or method, to one handler."""

    isLeaf = True

    def __init__(self, site: MetadataSite) -> None:
        super().__init__()
        self._site = site

    def render(self, request: Request) -> Any:
        try:
            result = self._site.handle(request)
        except Exception:
            return self._site.failed(request, Failure())
        if isinstance(result, bytes):  # not Deferred: its isinstance goes through an ABC
            return result
        hung_up: list[bool] = []

        def answer(body: bytes | None) -> None:
            if not hung_up and body is not None:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if hung_up and failure.check(CancelledError):
                return  # called off below: nobody is left to answer
            answer(self._site.failed(request, failure))

        def leave(_: Failure) -> None:
            # As Klein does: a caller that hangs up calls off what its answer waits for
            # (a held watch, a lookup); collaborators shield what other callers share.
            hung_up.append(True)
            result.cancel()

        request.notifyFinish().addErrback(leave)
        result.addCallbacks(answer, failed)
        return NOT_DONE_YET


def _is_peer_post(parts: list[str]) -> bool:
    return len(parts) == 3 and parts[0] == "openstack" and parts[2] == "metadata"


def _listing(parts: list[str]) -> Reply | None:
    """The public version listings, which need no node."""
    if len(parts) > 1:
        return None
    if not parts or parts[0] == "ec2":
        return ec2.versions_listing()
    if parts[0] == "openstack":
        return openstack.versions_listing()
    return None


def _visible(record: NodeRecord | None, caller: Caller) -> NodeRecord | None:
    """The caller's node, unless a signing proxy named another project."""
    if record is None or (
        caller.tenant_id is not None and record.node.project_id != caller.tenant_id
    ):
        return None
    return record


def _is_password(parts: list[str]) -> bool:
    return len(parts) == 3 and parts[0] == "openstack" and parts[2] == "password"


def _peer(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "") or "")


def _header_getter(request: Request) -> Callable[[str], list[str] | None]:
    headers = request.requestHeaders

    def get(name: str) -> list[str] | None:
        # A bytes name: with a str name Twisted decodes values as UTF-8, which may fail.
        values = headers.getRawHeaders(name.encode("ascii"))
        return [v.decode("latin-1") for v in values] if values else None

    return get
