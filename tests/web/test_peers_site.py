"""The peer routes over HTTP, in memory: every status, isolation, ETags, watches."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from metadatad.core.identity import Identifier
from metadatad.db.cache import NodeCache
from metadatad.db.peers import PeerStore
from metadatad.metadata.peersite import PeerLimits, PeerRoutes
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.watch import WatchHub
from metadatad.testing import MemoryPeerRepository, MemoryStore
from tests.support.factories import make_node
from tests.support.sites import Answer, fired

# Callers come through a trusted proxy (StubTreq's peer is 127.0.0.1), so a test can
# speak as any node by its address.
A0 = make_node(0)  # 10.0.0.2, proj-a, service web, cardinal 0
A1 = make_node(1, launch_index=5)  # 10.0.0.3, proj-a, service web, cardinal 5
A2 = make_node(2, service={"name": "db", "port": 5432})  # 10.0.0.4, proj-a, service db
A3 = make_node(3, service=None)  # 10.0.0.5, proj-a, no service
B4 = make_node(4, project_id="proj-b")  # 10.0.0.6, proj-b, service web
ADDRESS = {n.uuid: n.local_ipv4 for n in (A0, A1, A2, A3, B4)}


class Site:
    """A metadata site over memory stores, with a Clock for the watches."""

    def __init__(self, limits: PeerLimits | None = None, jitter: float = 0.0) -> None:
        limits = limits or PeerLimits()
        self.store = MemoryStore()
        self.peers = MemoryPeerRepository(self.store.repository)
        self.store.repository.upsert_nodes([A0, A1, A2, A3, B4])
        self.clock = Clock()
        self.hub = WatchHub(self.clock)
        cache = NodeCache(
            self.store.node_by_ip,
            self.store.get_node,
            Clock(),
            15,
            generation=self.store.node_generation,
        )
        self.store.add_change_listener(cache.invalidate)
        self.peer_store = PeerStore(self.peers, self.store.run)
        routes = PeerRoutes(self.peer_store, self.hub, limits, jitter=lambda: jitter)
        site = MetadataSite(
            cache,  # type: ignore[arg-type]
            self.store,  # type: ignore[arg-type]
            Identifier([ipaddress.ip_network("127.0.0.1/32")]),
            peer_routes=routes,
        )
        self.treq = StubTreq(site.resource())

    def start(self, method: str, path: str, node: Any = A0, **kwargs: Any) -> Any:
        """Send a request; returns its (maybe unfired) response Deferred."""
        headers = {"X-Forwarded-For": ADDRESS[node.uuid], **kwargs.pop("headers", {})}
        d = self.treq.request(method, "http://169.254.169.254" + path, headers=headers, **kwargs)
        self.treq.flush()
        return d

    def finish(self, d: Any) -> Answer:
        self.treq.flush()
        response = fired(d)
        return Answer(response.code, response.headers, fired(response.content()))

    def request(self, method: str, path: str, node: Any = A0, **kwargs: Any) -> Answer:
        return self.finish(self.start(method, path, node, **kwargs))

    def get(self, path: str, node: Any = A0, **kwargs: Any) -> Answer:
        return self.request("GET", path, node, **kwargs)

    def post(self, entries: Any, node: Any = A0, query: str = "?shared=project") -> Answer:
        body = entries if isinstance(entries, bytes) else json.dumps(entries).encode()
        return self.request("POST", "/openstack/latest/metadata" + query, node, data=body)


def answered(d: Any) -> bool:
    """Whether a request's Deferred has its response (not waiting on a watch)."""
    return bool(d.called and not d.paused)


@pytest.fixture
def site() -> Site:
    return Site()


# --- posting -----------------------------------------------------------------------------


def test_post_then_read_shared_json(site: Site) -> None:
    """A shared post is 200 and shows in shared.json (and its alias peer_data) for every
    node of the project, itself included, keys prefixed ``from_server_``."""
    answer = site.post({"ip": "10.0.0.2", "port": "7000"})
    assert answer.status == 200
    assert json.loads(answer.body) == {"added": ["ip", "port"], "index": 2}
    assert answer.header("X-Metadatad-Index") == "2"
    meta = {"from_server_ip": "10.0.0.2", "from_server_port": "7000"}
    # A0 has made no metadata request yet: its liveness key is null.
    expected = [{"meta": meta, "uuid": A0.uuid, "last_seen_at": None}]
    for node in (A0, A1):
        for name in ("shared.json", "peer_data"):
            got = site.get(f"/openstack/latest/{name}", node)
            assert got.status == 200
            assert got.header("Content-Type") == "application/json"
            assert json.loads(got.body) == expected


def test_shared_json_is_empty_list_when_nobody_shared(site: Site) -> None:
    """``[]`` (not 404, not an empty body) before anyone shares."""
    answer = site.get("/openstack/2018-08-27/shared.json")
    assert (answer.status, answer.body) == (200, b"[]")


def test_same_value_again_is_200_other_value_is_409(site: Site) -> None:
    """Write-once: the same value again is 200 with nothing added; another is 409."""
    assert site.post({"ip": "1"}).status == 200
    again = site.post({"ip": "1"})
    assert again.status == 200
    assert json.loads(again.body)["added"] == []
    conflict = site.post({"ip": "2"})
    assert conflict.status == 409
    assert "already set" in conflict.text
    assert json.loads(site.get("/openstack/latest/shared.json").body)[0]["meta"] == {
        "from_server_ip": "1"
    }


def test_private_post_is_for_operators_only(site: Site) -> None:
    """Without ``shared`` the keys are private: 200, absent from shared.json."""
    assert site.post({"done": "yes"}, query="").status == 200
    assert site.get("/openstack/latest/shared.json").body == b"[]"
    assert site.peers.node_entries(A0.uuid)["private"] == {"done": "yes"}


@pytest.mark.parametrize(
    ("body", "query", "status"),
    [
        ({"k": "v"}, "?shared=world", 400),
        ({"k": "v"}, "?shared=", 400),
        ({"k": "v"}, "?shared=project&shared=project", 400),
        (b"{not json", "?shared=project", 400),
        (b"\xff\xfe", "?shared=project", 400),
        ([["k", "v"]], "?shared=project", 400),
        ({}, "?shared=project", 400),
        ({"k": 1}, "?shared=project", 400),
        ({"k": None}, "?shared=project", 400),
        ({"k": {"nested": "x"}}, "?shared=project", 400),
        ({"bad key": "v"}, "?shared=project", 400),
        ({"": "v"}, "?shared=project", 400),
        ({"k/../x": "v"}, "?shared=project", 400),
        ({"k" * 256: "v"}, "?shared=project", 400),
        ({f"k{i}": "v" for i in range(129)}, "?shared=project", 413),
        ({"k": "v" * 65536}, "?shared=project", 413),
        (b'{"k": "\\ud800"}', "?shared=project", 400),
        (b'{"meta": {"k": "x\\udfff"}}', "", 400),
        (b'{"\\udc00": "v"}', "?shared=project", 400),
        (b"[" * 5000, "?shared=project", 400),
        (b'{"meta": ' * 3000 + b"{}" + b"}" * 3000, "?shared=project", 400),
    ],
)
def test_bad_posts(site: Site, body: Any, query: str, status: int) -> None:
    """Bad scope, JSON, types or keys are 400; over quota is 413; nothing is stored."""
    answer = site.post(body, query=query)
    assert answer.status == status, answer.text
    assert answer.text.strip()
    assert site.peers.node_entries(A0.uuid) == {"shared": {}, "private": {}}


def test_nova_meta_wrapper_and_key_alphabet(site: Site) -> None:
    """Nova's ``{"meta": {...}}`` body is accepted; keys use A-Z a-z 0-9 _ . : -."""
    key = "Az09_.:-" + "x" * 247
    assert site.post({"meta": {key: "v"}}).status == 200
    assert site.peers.node_entries(A0.uuid)["shared"] == {key: "v"}


def test_quota_is_configurable(site: Site) -> None:
    """peer_max_keys and peer_max_bytes come from the configuration."""
    small = Site(PeerLimits(max_keys=2, max_bytes=10))
    assert small.post({"a": "1", "b": "2"}).status == 200
    assert small.post({"c": "3"}).status == 413
    assert small.post({"xxxxxxxxxx": "1"}, node=A1).status == 413


def test_methods(site: Site) -> None:
    """GET on the post target is 405 (Allow: POST); POST on shared.json is 405."""
    answer = site.get("/openstack/latest/metadata")
    assert answer.status == 405
    assert answer.header("Allow") == "POST"
    assert site.request("POST", "/openstack/latest/shared.json", data=b"{}").status == 405
    assert site.request("PUT", "/openstack/latest/metadata", data=b"{}").status == 405


def test_unknown_caller_cannot_post_or_read(site: Site) -> None:
    """A caller no node has the address of gets 404 and nothing is stored."""
    stranger = make_node(9)
    ADDRESS[stranger.uuid] = "10.9.9.9"
    try:
        assert site.post({"k": "v"}, node=stranger).status == 404
        assert site.get("/openstack/latest/shared.json", stranger).status == 404
        assert site.get("/service/latest/", stranger).status == 404
    finally:
        del ADDRESS[stranger.uuid]


def test_database_down_is_503(site: Site) -> None:
    """The store failing is a 503 with Retry-After, for posts and reads alike."""
    site.get("/openstack/latest/shared.json")  # the node is cached
    site.store.repository.available = False
    for answer in (site.post({"k": "v"}), site.get("/openstack/latest/shared.json")):
        assert answer.status == 503
        assert answer.header("Retry-After") == "1"


# --- isolation ---------------------------------------------------------------------------


def test_projects_are_isolated(site: Site) -> None:
    """A node of project B sees nothing of A's entries and the reverse; the same key in
    two projects is two entries."""
    site.post({"ip": "a"}, node=A0)
    site.post({"ip": "b"}, node=B4)
    a = json.loads(site.get("/openstack/latest/shared.json", A1).body)
    b = json.loads(site.get("/openstack/latest/shared.json", B4).body)
    assert a == [{"meta": {"from_server_ip": "a"}, "uuid": A0.uuid, "last_seen_at": None}]
    assert b == [{"meta": {"from_server_ip": "b"}, "uuid": B4.uuid, "last_seen_at": None}]
    # B's service view has only B's node, though A's nodes share the service name.
    hosts = json.loads(
        site.get("/service/latest/all_hosts", B4, headers={"Accept": "application/json"}).body
    )
    assert [h["uuid"] for h in hosts] == [B4.uuid]


def test_watch_of_project_b_does_not_wake_on_project_a(site: Site) -> None:
    """A watcher in B is not answered by a write in A; it times out with B's data."""
    first = site.get("/openstack/latest/shared.json", B4)
    index = first.header("X-Metadatad-Index")
    d = site.start("GET", f"/openstack/latest/shared.json?index={index}&wait=30", B4)
    assert not answered(d)
    site.post({"ip": "a"}, node=A0)
    site.treq.flush()
    assert not answered(d)
    site.clock.advance(30)
    answer = site.finish(d)
    assert (answer.status, answer.body) == (200, b"[]")
    assert answer.header("X-Metadatad-Index") == index


# --- ETags and watches -------------------------------------------------------------------


def test_etag_and_if_none_match(site: Site) -> None:
    """Every read has a content ETag and the index; If-None-Match with it is a 304."""
    site.post({"ip": "1"})
    answer = site.get("/openstack/latest/shared.json")
    tag = answer.header("ETag")
    assert tag and tag.startswith('"')
    assert answer.header("X-Metadatad-Index") == "2"
    cached = site.get("/openstack/latest/shared.json", headers={"If-None-Match": tag})
    assert (cached.status, cached.body) == (304, b"")
    assert cached.header("ETag") == tag
    assert site.get("/openstack/latest/shared.json", headers={"If-None-Match": '"x"'}).status == 200
    site.post({"port": "2"})
    assert site.get("/openstack/latest/shared.json", headers={"If-None-Match": tag}).status == 200


def test_watch_returns_at_once_when_index_moved(site: Site) -> None:
    """An index other than the current one answers at once (newer data, or a reset)."""
    site.post({"ip": "1"})
    for index in ("0", "1", "99"):
        d = site.start("GET", f"/openstack/latest/shared.json?index={index}&wait=60")
        assert answered(d)
        assert site.finish(d).header("X-Metadatad-Index") == "2"


def test_watch_wakes_on_a_post(site: Site) -> None:
    """A held watch returns as soon as a node of the project posts, with the new index
    and data; no thread, no timer but the watch's own."""
    current = site.get("/openstack/latest/shared.json", A1).header("X-Metadatad-Index")
    d = site.start("GET", f"/openstack/latest/shared.json?index={current}&wait=60", A1)
    assert not answered(d)
    assert site.hub.count() == 1
    assert len(site.clock.getDelayedCalls()) == 1
    site.post({"ip": "1"}, node=A0)
    answer = site.finish(d)
    assert answer.status == 200
    assert int(answer.header("X-Metadatad-Index") or 0) > int(current or 0)
    assert json.loads(answer.body)[0]["meta"] == {"from_server_ip": "1"}
    assert site.hub.count() == 0
    assert site.clock.getDelayedCalls() == []


def test_watch_times_out_with_jitter_and_cap(site: Site) -> None:
    """Without a change the watch answers after wait (capped by watch_max_wait) plus
    the jitter, with the same index."""
    capped = Site(PeerLimits(max_wait=10), jitter=0.5)
    index = capped.get("/openstack/latest/shared.json").header("X-Metadatad-Index")
    d = capped.start("GET", f"/openstack/latest/shared.json?index={index}&wait=3600")
    capped.clock.advance(10)
    assert not answered(d)
    capped.clock.advance(10 / 16 * 0.5)
    answer = capped.finish(d)
    assert answer.status == 200
    assert answer.header("X-Metadatad-Index") == index


def test_watch_without_wait_uses_the_cap(site: Site) -> None:
    """``index`` alone waits up to watch_max_wait (300 s by default)."""
    index = site.get("/openstack/latest/shared.json").header("X-Metadatad-Index")
    d = site.start("GET", f"/openstack/latest/shared.json?index={index}")
    site.clock.advance(299)
    assert not answered(d)
    site.clock.advance(1)
    assert site.finish(d).status == 200


def test_client_going_away_forgets_the_watch(site: Site) -> None:
    """Cancelling the request (the connection closed) removes the watcher and its timer."""
    index = site.get("/openstack/latest/shared.json").header("X-Metadatad-Index")
    d = site.start("GET", f"/openstack/latest/shared.json?index={index}&wait=60")
    assert site.hub.count() == 1
    d.cancel()
    site.treq.flush()
    assert site.hub.count() == 0
    assert site.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "query",
    [
        "?index=-1",
        "?index=abc",
        "?index=1&wait=soon",
        "?index=1&wait=-5",
        "?wait=10",
        "?index=1&index=2",
        "?index=1&wait=nan",
        "?index=99999999999999999999",
    ],
)
def test_bad_watch_arguments(site: Site, query: str) -> None:
    """Malformed index or wait (or wait without index) is a 400."""
    answer = site.get("/openstack/latest/shared.json" + query)
    assert answer.status == 400, query
    assert site.hub.count() == 0


def test_watch_wakes_on_node_changes_seen_by_poll(site: Site) -> None:
    """A change the hub hears of (from the poll or LISTEN) wakes the service watchers."""
    index = int(site.get("/service/latest/all_hosts", A0).header("X-Metadatad-Index") or 0)
    d = site.start("GET", f"/service/latest/all_hosts?index={index}&wait=60", A0)
    assert not answered(d)
    site.store.repository.upsert_nodes([make_node(7)])  # another conductor's import
    site.hub.notify("proj-a", site.peers.index("proj-a"))
    answer = site.finish(d)
    assert "7=web-7.example.org" in answer.text


# --- the service view --------------------------------------------------------------------


def test_service_listing_and_leaves(site: Site) -> None:
    """``/service/latest/`` lists the leaves; each answers text with its own status."""
    listing = site.get("/service/latest/")
    assert listing.status == 200
    assert listing.text.splitlines() == [
        "cardinal_value",
        "hostname",
        "virt_ip_address",
        "service_domain",
        "service_name",
        "port",
        "all_hosts",
        "image",
        "volumes",
        "services",
    ]
    assert site.get("/service").text == "latest"
    expected = {
        "cardinal_value": "5",
        "hostname": "web-1.example.org",
        "virt_ip_address": "10.0.0.3",
        "service_domain": "web.shop.example.org",
        "service_name": "web",
        "port": "8080",
        "all_hosts": "0=web-0.example.org\n5=web-1.example.org",
    }
    for leaf, value in expected.items():
        answer = site.get(f"/service/latest/{leaf}", A1)
        assert (answer.status, answer.text) == (200, value), leaf
        assert answer.header("ETag")
        assert answer.header("X-Metadatad-Index")


def test_service_json(site: Site) -> None:
    """``Accept: application/json`` gives the whole structure, or a leaf as JSON."""
    accept = {"Accept": "application/json"}
    document = json.loads(site.get("/service/latest", A0, headers=accept).body)
    assert document["service_name"] == "web"
    assert document["port"] == 8080
    assert [(h["cardinal_value"], h["uuid"]) for h in document["all_hosts"]] == [
        (0, A0.uuid),
        (5, A1.uuid),
    ]
    assert json.loads(site.get("/service/latest/port", A0, headers=accept).body) == 8080
    host = json.loads(site.get("/service/latest/all_hosts/5", A0, headers=accept).body)
    assert host["hostname"] == "web-1.example.org"
    assert site.get("/service/latest/all_hosts/5/virt_ip_address", A0).text == "10.0.0.3"


def test_service_missing_facts_are_404_each(site: Site) -> None:
    """A service without domain has a 404 service_domain, the rest is 200; a node
    outside any service is 404 everywhere; unknown leaves are 404."""
    assert site.get("/service/latest/service_domain", A2).status == 404
    assert site.get("/service/latest/port", A2).text == "5432"
    assert site.get("/service/latest/all_hosts", A2).text == "2=web-2.example.org"
    for path in ("/service/latest/", "/service/latest/hostname"):
        assert site.get(path, A3).status == 404
    for path in (
        "/service/latest/nope",
        "/service/2015-01-01/",
        "/service/latest/all_hosts/9",
        "/service/latest/hostname/x",
        "/service/latest/all_hosts/0/nope",
    ):
        assert site.get(path, A0).status == 404, path


def test_existing_trees_are_untouched(site: Site) -> None:
    """The OpenStack listing and files still answer as before; password POST still works."""
    assert site.get("/openstack/latest/").status == 200
    assert site.get("/openstack/latest/meta_data.json").status == 200
    assert site.request("POST", "/openstack/latest/password", data=b"pw").status == 200


def test_watchers_woken_together_share_one_read(site: Site) -> None:
    """One notification waking many watchers costs one query, not one per watcher."""
    index = site.get("/openstack/latest/shared.json").header("X-Metadatad-Index")
    pending = [
        site.start("GET", f"/openstack/latest/shared.json?index={index}&wait=60") for _ in range(10)
    ]
    assert site.hub.count() == 10
    queued: list[tuple[Any, tuple[Any, ...], Any]] = []

    def later(f: Any, *args: Any) -> Any:  # the threadpool, answering when drained
        from twisted.internet.defer import Deferred

        d: Any = Deferred()
        queued.append((f, args, d))
        return d

    site.peer_store._runner = later
    site.start("POST", "/openstack/latest/metadata?shared=project", data=b'{"ip": "1"}')
    queries = []
    while queued:
        f, args, d = queued.pop(0)
        queries.append(f.__name__)
        d.callback(f(*args))
    site.treq.flush()
    assert queries == ["post", "shared_view"]
    answers = [site.finish(d) for d in pending]
    assert all(a.status == 200 and b"from_server_ip" in a.body for a in answers)


def test_a_form_encoded_json_body_is_still_json(site: Site) -> None:
    """``curl --data`` sends JSON labelled form-encoded: the body stays the body, and
    ``shared`` is read from the query string only."""
    body = json.dumps({"note": "a&shared=world"}).encode()
    answer = site.request(
        "POST",
        "/openstack/latest/metadata?shared=project",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status == 200, answer.text
    assert site.peers.node_entries(A0.uuid)["shared"] == {"note": "a&shared=world"}
