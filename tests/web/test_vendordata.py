"""Dynamic vendordata in memory: the pure pieces, the cache with a fake clock, shared
upstream calls, failures, and vendor_data2.json through the metadata site (StubTreq)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from metadatad.admin.site import AdminSite
from metadatad.core.identity import Identifier
from metadatad.core.records import NodeRecord
from metadatad.db.cache import NodeCache
from metadatad.db.vendordata import VendordataErrorStore
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.vendordata import _MISSING as MISSING
from metadatad.metadata.vendordata import (
    MAX_AGE_CAP,
    DynamicVendordata,
    ResponseCache,
    StaticToken,
    cache_lifetime,
    request_body,
)
from metadatad.metrics import REGISTRY
from metadatad.testing import MemoryStore, MemoryVendordataErrorRepository
from tests.support.factories import USER_DATA, make_node
from tests.support.sites import Client, fired
from tests.support.vendortargets import Target

NODE = make_node(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
T0 = datetime(2026, 11, 30, 10, 0, 0)
STATIC = {"cloud-init": "#cloud-config\n", "site": "r12"}


def record(node: Any = NODE, revision: int = 1) -> NodeRecord:
    return NodeRecord(node=node, revision=revision, created_at=T0, updated_at=T0)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- pure pieces -----------------------------------------------------------------------


def test_request_body_is_what_nova_sends() -> None:
    """The POSTed document: Nova's keys, user-data as stored (base64), roles joined."""
    node = make_node(0, boot_roles=["member", "reader"], meta={"role": "db"})
    assert request_body(node) == {
        "project-id": "proj-a",
        "instance-id": node.uuid,
        "image-id": "ami-00000001",
        "user-data": base64.b64encode(USER_DATA).decode("ascii"),
        "hostname": "web-0.example.org",
        "metadata": {"role": "db"},
        "boot-roles": "member,reader",
    }
    bare = make_node(1, user_data=None, image_id=None, boot_roles=[], meta={})
    body = request_body(bare)
    assert body["user-data"] is None
    assert body["image-id"] is None
    assert body["boot-roles"] == ""
    assert body["metadata"] == {}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], 60.0),
        (["max-age=5"], 5.0),
        (["public, max-age=120"], 120.0),
        (['max-age="30"'], 30.0),
        (["max-age=0"], 0.0),
        (["no-store"], 0.0),
        (["max-age=300, no-cache"], 0.0),
        (["No-Store"], 0.0),
        (["private"], 60.0),
        (["max-age=soon"], 60.0),
        (["max-age=-3"], 60.0),
        (["max-age=10", "max-age=20"], 10.0),
        (["max-age=99999999"], MAX_AGE_CAP),
    ],
)
def test_cache_lifetime(headers: list[str], expected: float) -> None:
    """max-age replaces the default; no-store/no-cache keep nothing; junk is ignored."""
    assert cache_lifetime(headers, 60.0) == expected


def test_response_cache_expires_and_evicts_least_recently_used() -> None:
    """Entries expire at their time; past the entry or byte bound the LRU goes."""
    cache = ResponseCache(max_entries=2, max_bytes=10_000)
    cache.put("a", {"a": 1}, 10, expires=100)
    cache.put("b", {"b": 1}, 10, expires=100)
    assert cache.get("a", now=99) == {"a": 1}  # a is now the most recently used
    cache.put("c", {"c": 1}, 10, expires=100)
    assert cache.get("b", now=0) is MISSING
    assert len(cache) == 2
    assert cache.get("c", now=99) == {"c": 1}
    # Expired at 100: gone, and its bytes with it.
    assert cache.get("c", now=100) is MISSING
    assert cache.get("a", now=100) is MISSING
    assert len(cache) == 0 and cache.bytes == 0
    bytes_cache = ResponseCache(max_entries=100, max_bytes=1000)
    for index in range(10):
        bytes_cache.put(index, index, 300, expires=10)
    assert bytes_cache.bytes <= 1000
    assert len(bytes_cache) == 2
    # An entry bigger than the whole budget is not kept at all.
    bytes_cache.put("huge", "x", 5000, expires=10)
    assert len(bytes_cache) == 2


# --- the service with StubTreq and a fake clock ----------------------------------------


class Harness:
    """DynamicVendordata over StubTreq targets, a fake clock and memory failures."""

    def __init__(self, targets: dict[str, Target], **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.targets = targets
        self.stubs = {name: StubTreq(target) for name, target in targets.items()}
        self.errors = MemoryVendordataErrorRepository()
        self.error_store = VendordataErrorStore(self.errors, None, run=_run_now)
        kwargs.setdefault("token_source", StaticToken("service-token"))
        self.service = DynamicVendordata(
            [(name, f"http://{name}.example.org/vd") for name in targets],
            _Router(self.stubs),
            self.clock,
            errors=self.error_store,
            conductor="c1",
            **kwargs,
        )

    def flush(self) -> None:
        for stub in self.stubs.values():
            stub.flush()

    def fetch(self, rec: NodeRecord | None = None) -> dict[str, Any]:
        d = self.service.render(rec or record(), STATIC)
        self.flush()
        reply = fired(d)
        return {"status": reply.status, "body": reply.body}

    def document(self, rec: NodeRecord | None = None) -> Any:
        answer = self.fetch(rec)
        assert answer["status"] == 200, answer
        return json.loads(answer["body"])


def _run_now(f: Any, *args: Any) -> Deferred[Any]:
    from twisted.internet.defer import fail, succeed

    try:
        return succeed(f(*args))
    except Exception as e:
        return fail(e)


class _Router:
    """An HTTPClient-like object sending each URL to its target's StubTreq."""

    def __init__(self, stubs: dict[str, StubTreq]) -> None:
        self._stubs = stubs

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        host = url.split("//", 1)[1].split(".", 1)[0]
        return self._stubs[host].post(url, **kwargs)


def test_posts_the_node_with_the_service_token() -> None:
    """Each target gets one POST with Nova's body, JSON headers and X-Auth-Token; its
    answer becomes its member of vendor_data2.json beside static."""
    harness = Harness({"testing": Target({"value1": 1}), "ops": Target(["a", "b"])})
    assert harness.document() == {
        "static": STATIC,
        "testing": {"value1": 1},
        "ops": ["a", "b"],
    }
    for target in harness.targets.values():
        [seen] = target.seen
        assert seen.method == b"POST"
        assert seen.path == b"/vd"
        assert seen.json() == request_body(NODE)
        assert seen.header("content-type") == "application/json"
        assert seen.header("accept") == "application/json"
        assert seen.header("x-auth-token") == "service-token"


def test_without_a_token_source_no_token_is_sent() -> None:
    """No service token configured: the request goes without X-Auth-Token."""
    harness = Harness({"testing": Target({"v": 1})}, token_source=None)
    assert harness.document()["testing"] == {"v": 1}
    assert harness.targets["testing"].seen[0].header("x-auth-token") is None


def test_cache_hit_miss_and_expiry_with_a_clock() -> None:
    """An answer is kept cache_ttl seconds per (target, node, revision): a hit calls
    nothing, expiry or a new node revision calls again."""
    target = Target({"n": 1})
    harness = Harness({"testing": target}, cache_ttl=30)
    hits = sample("metadatad_vendordata_cache_lookups_total", target="testing", result="hit")
    assert harness.document()["testing"] == {"n": 1}
    harness.clock.advance(29)
    target.body = b'{"n": 2}'
    assert harness.document()["testing"] == {"n": 1}
    assert len(target.seen) == 1
    assert (
        sample("metadatad_vendordata_cache_lookups_total", target="testing", result="hit")
        == hits + 1
    )
    harness.clock.advance(1)
    assert harness.document()["testing"] == {"n": 2}
    assert len(target.seen) == 2
    # Another node, and the same node at a new revision, are other entries.
    harness.document(record(make_node(1)))
    harness.document(record(NODE, revision=2))
    assert len(target.seen) == 4
    harness.document(record(NODE, revision=2))
    assert len(target.seen) == 4


def test_forget_drops_cached_answers() -> None:
    """SIGHUP's forget(): the next read asks the target again."""
    target = Target({"n": 1})
    harness = Harness({"testing": target}, cache_ttl=300)
    harness.document()
    harness.document()
    assert len(target.seen) == 1
    harness.service.forget()
    target.body = b'{"n": 2}'
    assert harness.document()["testing"] == {"n": 2}
    assert len(target.seen) == 2


def test_cache_control_max_age_and_no_store() -> None:
    """A target's max-age replaces cache_ttl; no-store answers are never kept."""
    target = Target({"n": 1}, headers={"Cache-Control": "max-age=5"})
    harness = Harness({"testing": target}, cache_ttl=3600)
    harness.document()
    harness.clock.advance(4)
    harness.document()
    assert len(target.seen) == 1
    harness.clock.advance(1)
    harness.document()
    assert len(target.seen) == 2
    target.headers = {"Cache-Control": "no-store"}
    harness.clock.advance(5)
    harness.document()
    harness.document()
    assert len(target.seen) == 4


def test_cache_ttl_zero_keeps_nothing() -> None:
    """cache_ttl = 0 and no max-age: every request calls the target."""
    target = Target({"n": 1})
    harness = Harness({"testing": target}, cache_ttl=0)
    harness.document()
    harness.document()
    assert len(target.seen) == 2


def test_concurrent_requests_share_one_call() -> None:
    """100 requests for one node while the target has not answered: one POST, and
    every request gets its answer."""
    target = Target({"shared": True})
    target.hold = True
    harness = Harness({"testing": target})
    pending = [harness.service.render(record(), STATIC) for _ in range(100)]
    harness.flush()
    assert len(target.seen) == 1
    assert harness.service.upstream_calls == 1
    target.release()
    harness.flush()
    bodies = {fired(d).body for d in pending}
    assert [json.loads(b) for b in bodies] == [{"static": STATIC, "testing": {"shared": True}}]


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (Target({"e": 1}, status=500), "http"),
        (Target({"e": 1}, status=404), "http"),
        (Target(raw=b"<html>not json</html>"), "invalid-json"),
        (Target(raw=b'{"a": ' + b'"x" ' * 100_000 + b"}"), "too-large"),
    ],
)
def test_failure_gives_empty_object_and_a_warning(target: Target, kind: str) -> None:
    """A failing target is {} in vendor_data2.json; the failure is counted, kept for
    failure_ttl seconds for that node (not called again meanwhile), and the node is
    not marked (failure_fatal is off)."""
    before = sample("metadatad_vendordata_upstream_requests_total", target="testing", outcome=kind)
    harness = Harness({"testing": target, "good": Target({"ok": 1})}, failure_ttl=5)
    assert harness.document() == {"static": STATIC, "testing": {}, "good": {"ok": 1}}
    assert (
        sample("metadatad_vendordata_upstream_requests_total", target="testing", outcome=kind)
        == before + 1
    )
    harness.clock.advance(4.9)
    assert harness.document()["testing"] == {}
    assert len(target.seen) == 1
    # Another node is its own entry: a node's bad answer says nothing of the target.
    harness.document(record(make_node(1)))
    assert len(target.seen) == 2
    harness.clock.advance(0.1)
    harness.document()
    assert len(target.seen) == 3
    assert harness.errors.all() == []


def test_empty_answer_is_an_empty_object() -> None:
    """An empty 2xx body (such as 204) counts as {} (Nova does the same)."""
    harness = Harness({"testing": Target(raw=b"", status=204)})
    assert harness.document()["testing"] == {}


def test_failure_fatal_answers_500_marks_and_counts() -> None:
    """With failure_fatal a failing target makes vendor_data2.json a 500, marks the
    node with the reason and counts it; the next good answer clears the mark."""
    target = Target({"e": 1}, status=503)
    harness = Harness({"testing": target, "good": Target({"ok": 1})}, failure_fatal=True)
    before = sample("metadatad_vendordata_fatal_failures_total", target="testing")
    answer = harness.fetch()
    assert answer["status"] == 500
    assert b"testing" in answer["body"] and b"good" not in answer["body"]
    assert sample("metadatad_vendordata_fatal_failures_total", target="testing") == before + 1
    [mark] = harness.errors.all()
    assert (mark.node_uuid, mark.target, mark.reason) == (NODE.uuid, "testing", "HTTP 503")
    assert (mark.node_revision, mark.conductor) == (1, "c1")
    assert mark.failed_at == datetime(2027, 1, 15, 8, 0, 0)
    target.status = 200
    # The failure is kept failure_ttl (5 s by default): still a 500 until then.
    assert harness.fetch()["status"] == 500
    harness.clock.advance(5)
    assert harness.document()["testing"] == {"e": 1}
    assert harness.errors.all() == []


def test_unauthorised_answer_invalidates_the_token() -> None:
    """A 401 from a target makes the token source fetch a new token next time."""

    class Source:
        invalidated = 0

        def token(self) -> Deferred[str]:
            from twisted.internet.defer import succeed

            return succeed("t")

        def invalidate(self) -> None:
            self.invalidated += 1

    source = Source()
    harness = Harness({"testing": Target(status=401)}, token_source=source)
    assert harness.document()["testing"] == {}
    assert source.invalidated == 1


def test_token_failure_is_a_target_failure() -> None:
    """No token to be had: the target is not called and counts as failed (auth)."""

    class Broken:
        def token(self) -> Deferred[str]:
            from twisted.internet.defer import fail

            return fail(RuntimeError("keystone down"))

    target = Target({"x": 1})
    harness = Harness({"testing": target}, token_source=Broken())
    assert harness.document()["testing"] == {}
    assert target.seen == []


# --- through the metadata site and the admin API ----------------------------------------


def test_site_serves_dynamic_vendor_data2_and_admin_shows_the_failure() -> None:
    """vendor_data2.json from the site has static and dynamic members; with
    failure_fatal a failure is a 500 and the admin node API shows vendordata_error."""
    target = Target({"dyn": 1})
    harness = Harness({"testing": target}, failure_fatal=True)
    store = MemoryStore()
    store.repository.upsert_nodes([NODE])
    cache = NodeCache(
        store.node_by_ip, store.get_node, Clock(), 15, generation=store.node_generation
    )
    site = MetadataSite(
        cache,
        store,  # type: ignore[arg-type]
        Identifier([], ""),
        static_vendordata=STATIC,
        vendordata=harness.service,
    )

    class Flushing(Client):
        def request(self, method: str, path: str, **kwargs: Any) -> Any:
            d = self._treq.request(method, self._base + path, **kwargs)
            for _ in range(3):
                self._treq.flush()
                harness.flush()
            response = fired(d)
            return _answer(response)

    client = Flushing(site.resource())
    answer = client.get("/openstack/latest/vendor_data2.json")
    assert answer[0] == 200
    assert json.loads(answer[1]) == {"static": STATIC, "testing": {"dyn": 1}}
    # vendor_data.json stays the static document.
    assert json.loads(client.get("/openstack/latest/vendor_data.json")[1]) == STATIC
    admin = Client(
        AdminSite(store, "tok", vendordata_errors=harness.error_store).resource()  # type: ignore[arg-type]
    )
    shown = json.loads(admin.get(f"/v1/nodes/{NODE.uuid}", headers=_bearer()).body)
    assert shown["vendordata_error"] is None

    target.status = 500
    harness.clock.advance(3600)
    answer = client.get("/openstack/latest/vendor_data2.json")
    assert answer[0] == 500
    shown = json.loads(admin.get(f"/v1/nodes/{NODE.uuid}", headers=_bearer()).body)
    assert shown["vendordata_error"]["reason"] == "testing: HTTP 500"
    assert shown["vendordata_error"]["targets"][0]["node_revision"] == 1
    listed = json.loads(admin.get("/v1/nodes", headers=_bearer()).body)["nodes"]
    assert listed[0]["vendordata_error"]["reason"] == "testing: HTTP 500"


def _bearer() -> dict[str, str]:
    return {"Authorization": "Bearer tok"}


def _answer(response: Any) -> tuple[int, bytes]:
    return response.code, fired(response.content())


# --- bounded calls and cached failures ---------------------------------------------------


def test_calls_per_target_are_capped() -> None:
    """At most max_concurrent_calls calls to one target at once; the others wait for
    a turn and are served when one finishes."""
    target = Target({"n": 1})
    target.hold = True
    harness = Harness({"testing": target}, max_concurrent_calls=3)
    pending = [harness.service.render(record(make_node(i)), STATIC) for i in range(10)]
    harness.flush()
    assert len(target.seen) == 3
    target.release()
    harness.flush()
    assert len(target.seen) == 10
    assert {fired(d).status for d in pending} == {200}


def test_a_call_that_waits_longer_than_its_timeout_for_a_turn_is_busy() -> None:
    """One slot, five nodes at once: when the call in flight times out the next in
    line gets the slot; the rest waited a whole time-out and get {} (busy) without
    calling the target.  Busy is not cached: a later request gets its chance."""
    target = Target({"n": 1})
    target.hold = True
    harness = Harness(
        {"testing": target},
        max_concurrent_calls=1,
        connect_timeout=1,
        read_timeout=1,
        failure_ttl=0,  # the time-out would mark the target down: not the point here
    )
    pending = [harness.service.render(record(make_node(i)), STATIC) for i in range(5)]
    harness.flush()
    assert len(target.seen) == 1
    busy = sample("metadatad_vendordata_upstream_requests_total", target="testing", outcome="busy")
    harness.clock.advance(2)  # the call in flight times out, and so do the waits
    harness.flush()
    assert len(target.seen) == 2
    assert (
        sample("metadatad_vendordata_upstream_requests_total", target="testing", outcome="busy")
        == busy + 3
    )
    for d in (pending[0], *pending[2:]):
        assert json.loads(fired(d).body)["testing"] == {}
    target.release()
    harness.flush()
    assert json.loads(fired(pending[1]).body)["testing"] == {"n": 1}
    assert harness.document(record(make_node(4)))["testing"] == {"n": 1}


class _Dead:
    """An HTTPClient-like object whose target refuses every connection."""

    def __init__(self) -> None:
        self.calls = 0

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        self.calls += 1
        return fail(ConnectionRefusedError())


def _dead_service(**kwargs: Any) -> tuple[DynamicVendordata, _Dead, Clock]:
    clock = Clock()
    clock.advance(1_800_000_000)
    dead = _Dead()
    service = DynamicVendordata(
        [("dead", "http://dead.example.org/vd")],
        dead,
        clock,
        token_source=StaticToken("t"),
        **kwargs,
    )
    return service, dead, clock


def test_a_dead_target_is_called_once_per_failure_ttl() -> None:
    """A target that cannot be reached is not called by anyone for failure_ttl seconds:
    a thousand nodes booting cost one call, not a thousand; then it is tried again."""
    service, dead, clock = _dead_service(failure_ttl=5)
    for index in range(1000):
        reply = fired(service.render(record(make_node(index % 250), revision=1), STATIC))
        assert json.loads(reply.body)["dead"] == {}
    assert dead.calls == 1
    clock.advance(5)
    fired(service.render(record(), STATIC))
    assert dead.calls == 2
    service.forget()  # SIGHUP forgets failures too
    fired(service.render(record(), STATIC))
    assert dead.calls == 3


def test_failure_ttl_zero_caches_no_failure() -> None:
    """failure_ttl = 0: every request calls the target, as before."""
    service, dead, _ = _dead_service(failure_ttl=0)
    for _ in range(3):
        fired(service.render(record(), STATIC))
    assert dead.calls == 3


def test_a_dead_target_still_marks_every_node_under_failure_fatal() -> None:
    """With failure_fatal each node asking while the target is down gets its 500 and
    its mark, though the target was called once."""
    errors = MemoryVendordataErrorRepository()
    store = VendordataErrorStore(errors, None, run=_run_now)
    service, dead, _ = _dead_service(failure_ttl=5, failure_fatal=True, errors=store)
    for index in range(3):
        for _ in range(2):
            assert fired(service.render(record(make_node(index)), STATIC)).status == 500
    assert dead.calls == 1
    assert sorted(e.node_uuid for e in errors.all()) == sorted(make_node(i).uuid for i in range(3))
