"""Dynamic vendordata against real HTTP and HTTPS servers on loopback (real reactor):
the body and token sent, TLS verification against a CA made here, timeouts, errors,
one upstream call for 100 concurrent requests, a slow target while the metadata site
keeps answering, Keystone tokens, and hard failure stored in every database backend."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import Agent, HTTPConnectionPool

from metadatad.admin.site import AdminSite
from metadatad.clients.keystone import KeystoneTokenClient
from metadatad.config import KeystoneConfig
from metadatad.core.identity import Identifier
from metadatad.core.records import NodeRecord
from metadatad.db.cache import NodeCache
from metadatad.db.store import NodeRepository, Store, make_engine
from metadatad.db.vendordata import VendordataErrorRepository, VendordataErrorStore
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.vendordata import (
    DynamicVendordata,
    Outcome,
    StaticToken,
    make_http_client,
    request_body,
)
from metadatad.testing import MemoryStore
from metadatad.testing.keystone import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub
from tests.support.factories import make_node
from tests.support.vendortargets import CertificateAuthority, Target, listen

# Twisted's TLS glue hands pyOpenSSL objects to pyOpenSSL, which now warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

NODE = make_node(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
RECORD = NodeRecord(
    node=NODE, revision=3, created_at=datetime(2026, 1, 1), updated_at=datetime(2026, 1, 1)
)
STATIC = {"cloud-init": "#cloud-config\n"}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@asynccontextmanager
async def serving(target: Any, issued: Any = None) -> AsyncIterator[int]:
    """``target`` on a loopback port for the block."""
    port, number = listen(target, issued)
    try:
        yield number
    finally:
        await port.stopListening()


@asynccontextmanager
async def vendordata(
    targets: list[tuple[str, str]], ca_file: str = "", **kwargs: Any
) -> AsyncIterator[DynamicVendordata]:
    """A DynamicVendordata on the real reactor; its connections closed afterwards."""
    kwargs.setdefault("connect_timeout", 2.0)
    http, pool = make_http_client(reactor, ca_file, kwargs["connect_timeout"])
    kwargs.setdefault("token_source", StaticToken("svc-token"))
    service = DynamicVendordata(targets, http, reactor, pool=pool, **kwargs)
    try:
        yield service
    finally:
        await service.stopService()  # type: ignore[misc]


def arrivals(target: Target) -> Callable[[int], Deferred[None]]:
    """``wait(n)``: a Deferred fired when the target has seen ``n`` requests."""
    waiting: list[tuple[int, Deferred[None]]] = []

    def seen(_: Any) -> None:
        for n, d in list(waiting):
            if len(target.seen) >= n:
                waiting.remove((n, d))
                d.callback(None)

    target.on_request = seen

    def wait(n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(target.seen) >= n:
            d.callback(None)
        else:
            waiting.append((n, d))
        return d

    return wait


async def one(service: DynamicVendordata, record: NodeRecord = RECORD) -> Outcome:
    [outcome] = await service.fetch(record)
    return outcome


# --- HTTP -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_target_gets_the_body_and_the_token() -> None:
    """A real POST: Nova's body, JSON headers, the service token; the answer parsed."""
    target = Target({"value1": 1, "value2": "two"})
    async with serving(target) as port:
        async with vendordata([("testing", f"http://127.0.0.1:{port}/vendordata")]) as service:
            outcome = await one(service)
    assert outcome == Outcome("testing", {"value1": 1, "value2": "two"})
    [seen] = target.seen
    assert (seen.method, seen.path) == (b"POST", b"/vendordata")
    assert seen.json() == request_body(NODE)
    assert seen.header("x-auth-token") == "svc-token"
    assert seen.header("content-type") == "application/json"
    assert seen.header("user-agent") == "metadatad-vendordata"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("target", "kind", "reason"),
    [
        (Target({"e": 1}, status=500), "http", "HTTP 500"),
        (Target(raw=b"{not json"), "invalid-json", "answer is not JSON"),
    ],
)
async def test_http_error_and_invalid_json_give_empty(
    target: Target, kind: str, reason: str
) -> None:
    """A 500 and a body that is not JSON: {} for the target, the reason kept."""
    async with serving(target) as port:
        async with vendordata([("testing", f"http://127.0.0.1:{port}/")]) as service:
            outcome = await one(service)
    assert outcome.document == {}
    assert outcome.failure is not None
    assert outcome.failure.kind == kind
    assert reason in outcome.failure.reason


@pytest_twisted.ensureDeferred
async def test_connection_refused() -> None:
    """Nobody listening: a connect failure, {}."""
    port, number = listen(Target())
    await port.stopListening()
    async with vendordata([("testing", f"http://127.0.0.1:{number}/")]) as service:
        outcome = await one(service)
    assert outcome.failure is not None and outcome.failure.kind == "connect"


@pytest_twisted.ensureDeferred
async def test_timeout() -> None:
    """A target that never answers is abandoned after connect + read timeout."""
    target = Target({"late": 1})
    target.hold = True
    async with serving(target) as port:
        async with vendordata(
            [("testing", f"http://127.0.0.1:{port}/")], connect_timeout=0.2, read_timeout=0.3
        ) as service:
            started = time.monotonic()
            outcome = await one(service)
            elapsed = time.monotonic() - started
        target.release()
    assert outcome.failure is not None and outcome.failure.kind == "timeout"
    assert outcome.failure.reason == "no answer within 0.5 s"
    assert 0.45 <= elapsed < 5


@pytest_twisted.ensureDeferred
async def test_one_upstream_call_for_100_concurrent_requests() -> None:
    """100 requests for one node while the target holds its answer: one POST reaches
    it, and all 100 get the answer when it comes."""
    target = Target({"shared": "yes"})
    target.hold = True
    wait = arrivals(target)
    async with serving(target) as port:
        async with vendordata([("testing", f"http://127.0.0.1:{port}/")]) as service:
            pending = [service.fetch(RECORD) for _ in range(100)]
            await wait(1)
            assert service.upstream_calls == 1
            target.release()
            results = await gatherResults(pending)
    assert len(target.seen) == 1
    assert all(r == [Outcome("testing", {"shared": "yes"})] for r in results)


# --- HTTPS ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_https_verified_against_ca_file(
    ca: CertificateAuthority, tmp_path: Path, host: str
) -> None:
    """A certificate the CA issued for the name (or address) used is accepted."""
    target = Target({"secure": True})
    async with serving(target, ca.issue("localhost", "127.0.0.1")) as port:
        async with vendordata(
            [("testing", f"https://{host}:{port}/vd")], ca_file=ca.write(tmp_path / "ca.pem")
        ) as service:
            outcome = await one(service)
    assert outcome == Outcome("testing", {"secure": True})
    assert target.seen[0].header("x-auth-token") == "svc-token"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("issuer", "names", "detail"),
    [
        # A valid certificate for another name.
        ("ours", ("vendordata.example.org",), "does not match"),
        # The right name, from a CA that ca_file does not hold.
        ("stranger", ("127.0.0.1",), "certificate verify failed"),
    ],
)
async def test_https_refused(
    ca: CertificateAuthority, tmp_path: Path, issuer: str, names: tuple[str, ...], detail: str
) -> None:
    """A certificate that does not match the URL's host, or that the CA did not
    issue: refused before anything is sent."""
    signer = ca if issuer == "ours" else CertificateAuthority("someone else")
    target = Target({"secure": True})
    async with serving(target, signer.issue(*names)) as port:
        async with vendordata(
            [("testing", f"https://127.0.0.1:{port}/")], ca_file=ca.write(tmp_path / "ca.pem")
        ) as service:
            outcome = await one(service)
    assert outcome.failure is not None and outcome.failure.kind == "tls", outcome
    assert detail in outcome.failure.reason, outcome
    assert target.seen == []


# --- Keystone ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keystone_service_token_is_sent() -> None:
    """With Keystone as the token source, the target gets the token Keystone issued,
    and one token serves many requests."""
    keystone = KeystoneStub(time.time)
    target = Target({"k": 1})
    async with serving(keystone) as keystone_port, serving(target) as port:
        config = KeystoneConfig(
            auth_url=f"http://127.0.0.1:{keystone_port}/v3",
            username=KEYSTONE_USER["name"],
            password=KEYSTONE_USER["password"],
            project_name=KEYSTONE_PROJECT["name"],
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = KeystoneTokenClient(
            config,
            HTTPClient(Agent(reactor, pool=pool)),  # type: ignore[arg-type]
            reactor,
        )
        async with vendordata(
            [("testing", f"http://127.0.0.1:{port}/")], token_source=client
        ) as service:
            await one(service)
            await one(service, NodeRecord(make_node(1), 1, RECORD.created_at, RECORD.updated_at))
    assert keystone.issued == ["gAAAAA-test-token-0"]
    assert [s.header("x-auth-token") for s in target.seen] == ["gAAAAA-test-token-0"] * 2


# --- the metadata site stays responsive; hard failure stored -----------------------------


@asynccontextmanager
async def metadata_site(
    service: DynamicVendordata, store: Any = None
) -> AsyncIterator[tuple[str, Any]]:
    """The metadata site on loopback, knowing NODE at 127.0.0.1; yields (base, store)."""
    from twisted.web.server import Site

    if store is None:
        store = MemoryStore()
        store.repository.upsert_nodes([NODE])
    cache = NodeCache(
        store.node_by_ip, store.get_node, reactor, 15, generation=store.node_generation
    )
    site = MetadataSite(
        cache, store, Identifier([], ""), static_vendordata=STATIC, vendordata=service
    )
    port = reactor.listenTCP(0, Site(site.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port.getHost().port}", store
    finally:
        await port.stopListening()


async def get(url: str, **kwargs: Any) -> tuple[int, bytes]:
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))  # type: ignore[arg-type]
    response = await client.get(url, **kwargs)
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_slow_target_does_not_stall_the_site() -> None:
    """While a target holds vendor_data2.json, the site answers other requests; the
    held request completes when the target answers."""
    target = Target({"slow": True})
    target.hold = True
    wait = arrivals(target)
    async with serving(target) as port:
        async with vendordata(
            [("testing", f"http://127.0.0.1:{port}/")], read_timeout=30
        ) as service:
            async with metadata_site(service) as (base, _):
                held = Deferred.fromCoroutine(get(base + "/openstack/latest/vendor_data2.json"))
                await wait(1)
                for path in ("/openstack/latest/meta_data.json", "/latest/meta-data/hostname"):
                    status, _body = await get(base + path)
                    assert status == 200
                assert not held.called
                target.release()
                status, body = await held
    assert status == 200
    assert json.loads(body) == {"static": STATIC, "testing": {"slow": True}}


@pytest_twisted.ensureDeferred
async def test_hard_failure_is_stored_and_shown(database_url: str) -> None:
    """failure_fatal on a real store: the target's 500 makes vendor_data2.json a 500,
    the node's vendordata_error is stored and shown by the admin API; the next good
    answer clears it."""
    engine = make_engine(database_url, 2)
    store = Store(NodeRepository(engine), reactor)
    errors = VendordataErrorStore(VendordataErrorRepository(engine), reactor)
    store.startService()
    errors.startService()
    target = Target({"broken": True}, status=500)
    try:
        await store.upsert_nodes([NODE])
        async with serving(target) as port:
            async with vendordata(
                [("testing", f"http://127.0.0.1:{port}/")],
                failure_fatal=True,
                errors=errors,
                conductor="conductor-1",
                cache_ttl=0,
                failure_ttl=0,
            ) as service:
                async with metadata_site(service, store) as (base, _):
                    status, body = await get(base + "/openstack/latest/vendor_data2.json")
                    assert status == 500
                    assert b"testing" in body
                    stored = await errors.for_node(NODE.uuid)
                    admin = await _admin_node(store, errors)
                    assert [e.reason for e in stored] == ["HTTP 500"]
                    assert admin["vendordata_error"]["reason"] == "testing: HTTP 500"
                    assert admin["vendordata_error"]["targets"][0]["conductor"] == "conductor-1"
                    target.status = 200
                    status, body = await get(base + "/openstack/latest/vendor_data2.json")
                    assert status == 200
                    await _settled(errors)
                    assert (await errors.for_node(NODE.uuid)) == []
    finally:
        errors.stopService()
        store.stopService()


async def _admin_node(store: Store, errors: VendordataErrorStore) -> Any:
    from twisted.web.server import Site

    admin = AdminSite(store, "tok", vendordata_errors=errors)
    port = reactor.listenTCP(0, Site(admin.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        status, body = await get(
            f"http://127.0.0.1:{port.getHost().port}/v1/nodes/{NODE.uuid}",
            headers={"Authorization": "Bearer tok"},
        )
    finally:
        await port.stopListening()
    assert status == 200
    return json.loads(body)


async def _settled(errors: VendordataErrorStore) -> None:
    """Wait for writes queued on the one-thread pool: a read queued after them."""
    await errors.all()
