"""The metadata site over HTTP, in memory: identity, trees, password, errors."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from metadatad.core.identity import Identifier, sign_instance_id
from metadatad.core.records import NodeRecord
from metadatad.db.cache import CacheEntry, NodeCache
from metadatad.metadata import ec2
from metadatad.metadata.site import MetadataSite, RandomBytes
from metadatad.testing import MemoryStore
from tests.support.factories import USER_DATA, cache_with_pending_queries, make_node
from tests.support.sites import Client

SECRET = "proxy-secret"
HERE = make_node(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
OTHER = make_node(1, project_id="proj-b")  # 10.0.0.3
NEW_YEAR = datetime(2026, 1, 1, tzinfo=UTC)
HERE_RECORD = NodeRecord(HERE, 1, NEW_YEAR, NEW_YEAR)


def make_site(
    nodes: tuple[Any, ...] = (HERE, OTHER), trusted: str = "", secret: str = "", **kwargs: Any
) -> tuple[Client, MemoryStore, MetadataSite]:
    store = MemoryStore()
    if nodes:
        store.repository.upsert_nodes(list(nodes))
    cache = NodeCache.over(store, store.node_by_ip, Clock(), 15)
    proxies = [ipaddress.ip_network(trusted)] if trusted else []
    kwargs.setdefault("random_bytes", lambda n: b"\x01" * n)
    site = MetadataSite(cache, store, Identifier(proxies, secret), **kwargs)
    return Client(site.resource()), store, site


def test_version_listings_need_no_identity() -> None:
    """``/`` and ``/openstack`` answer 200 even for an unknown caller."""
    client, _, _ = make_site(nodes=())
    for path in ("/", "/openstack", "/openstack/", "//openstack//"):
        answer = client.get(path)
        assert answer.status == 200, path
        assert answer.body
    assert client.get("/").text.splitlines()[-1] == "latest"
    assert "2018-08-27" in client.get("/openstack").text


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/",
        "/latest/user-data",
        "/openstack/latest/meta_data.json",
        "/2009-04-04/meta-data/instance-id",
        "/openstack/latest/password",
    ],
)
def test_unknown_caller_gets_404(path: str) -> None:
    """Per-node paths are 404 for a caller no node has the address of."""
    client, _, _ = make_site(nodes=(OTHER,))
    assert client.get(path).status == 404


def test_direct_caller_reads_its_tree() -> None:
    """The node with the caller's address answers, EC2 and OpenStack alike."""
    client, _, _ = make_site()
    assert client.get("/latest/meta-data/instance-id").text == HERE.uuid
    assert client.get("/ec2/latest/meta-data/instance-id").text == HERE.uuid
    assert client.get("/latest/user-data").body == USER_DATA
    document = json.loads(client.get("/openstack/latest/meta_data.json").body)
    assert document["uuid"] == HERE.uuid


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data",
        "/latest/meta-data/",
        "/latest/meta-data/instance-id/",
        "/latest/meta-data/placement/availability-zone/",
        "/openstack/latest",
        "/openstack/latest/",
        "/openstack/latest/meta_data.json/",
        "//latest//meta-data//",
        "/latest/./meta-data/../meta-data",
    ],
)
def test_slashes_never_matter_and_nothing_redirects(path: str) -> None:
    """Trailing, doubled or dotted slashes answer 200 directly, never a redirect."""
    client, _, _ = make_site()
    answer = client.get(path)
    assert answer.status == 200, (path, answer.status, answer.text)


def test_unknown_versions_and_files_404() -> None:
    """Unknown versions, files and keys are 404."""
    client, _, _ = make_site()
    for path in (
        "/9999-99-99/meta-data",
        "/openstack/2099-01-01/meta_data.json",
        "/openstack/latest/nothing.json",
        "/openstack/latest/meta_data.json/x",
        "/latest/meta-data/nope",
    ):
        assert client.get(path).status == 404, path


def test_content_types() -> None:
    """JSON files are application/json; text is text/plain; user-data is binary."""
    client, _, _ = make_site(static_vendordata={"cloud-init": "#cloud-config\n"})
    assert client.get("/openstack/latest/meta_data.json").header("content-type") == (
        "application/json"
    )
    assert client.get("/openstack/latest/network_data.json").header("content-type") == (
        "application/json"
    )
    assert client.get("/latest/meta-data/").header("content-type").startswith("text/plain")
    assert client.get("/latest/user-data").header("content-type") == "application/octet-stream"


def test_json_files_are_never_empty() -> None:
    """vendor_data*.json and network_data.json are valid JSON even when there is none."""
    client, _, _ = make_site()
    for name in ("vendor_data.json", "vendor_data2.json", "network_data.json"):
        answer = client.get(f"/openstack/latest/{name}")
        assert answer.status == 200
        assert isinstance(json.loads(answer.body), dict)


def test_static_vendordata() -> None:
    """The static file is vendor_data.json and the static part of vendor_data2.json."""
    static = {"cloud-init": "#cloud-config\npackages: [htop]\n"}
    client, _, _ = make_site(static_vendordata=static)
    assert json.loads(client.get("/openstack/latest/vendor_data.json").body) == static
    assert json.loads(client.get("/openstack/latest/vendor_data2.json").body) == {"static": static}


def test_random_seed_is_fresh_per_request() -> None:
    """meta_data.json's random_seed comes from the entropy source on every read."""
    seeds = iter([b"\x01" * 512, b"\x02" * 512])
    client, _, _ = make_site(random_bytes=lambda n: next(seeds))
    first = json.loads(client.get("/openstack/latest/meta_data.json").body)["random_seed"]
    second = json.loads(client.get("/openstack/latest/meta_data.json").body)["random_seed"]
    assert first != second


def test_hot_path_does_not_query() -> None:
    """Repeated reads are answered from memory: one lookup (and the cache's first read
    of the node generation) for many requests."""
    client, store, _ = make_site()
    for _ in range(20):
        assert client.get("/latest/meta-data/instance-id").status == 200
        assert client.get("/openstack/latest/meta_data.json").status == 200
    assert store.calls == {"node_generation": 1, "node_by_ip": 1}


def test_admin_change_is_seen_at_once() -> None:
    """A node update through the store is visible on the next request."""
    client, store, _ = make_site()
    assert client.get("/latest/meta-data/hostname").text == "web-0.example.org"
    renamed = make_node(
        0, hostname="db-0.example.org", ports=list({"mac": p.mac, "ip": p.ip} for p in HERE.ports)
    )
    store.upsert_nodes([renamed])
    assert client.get("/latest/meta-data/hostname").text == "db-0.example.org"


def test_spoofed_forwarded_for_is_ignored() -> None:
    """An untrusted caller claiming another address still reads its own tree."""
    client, _, _ = make_site()
    answer = client.get("/latest/meta-data/instance-id", headers={"X-Forwarded-For": "10.0.0.3"})
    assert answer.text == HERE.uuid


def test_trusted_proxy_forwards_the_caller() -> None:
    """From a trusted proxy, X-Forwarded-For names the node."""
    client, _, _ = make_site(trusted="127.0.0.0/8")
    answer = client.get("/latest/meta-data/instance-id", headers={"X-Forwarded-For": "10.0.0.3"})
    assert answer.text == OTHER.uuid
    assert client.get("/latest/meta-data/instance-id").text == HERE.uuid
    bad = client.get("/latest/meta-data/instance-id", headers={"X-Forwarded-For": "nonsense"})
    assert bad.status == 400


def signed_headers(uuid: str = OTHER.uuid, tenant: str = "proj-b", secret: str = SECRET):  # type: ignore[no-untyped-def]
    return {
        "X-Instance-ID": uuid,
        "X-Tenant-ID": tenant,
        "X-Instance-ID-Signature": sign_instance_id(secret, uuid),
    }


def test_signed_proxy_headers() -> None:
    """Good signature: that instance; bad: 403; missing/duplicate: 400; unknown: 404."""
    client, _, _ = make_site(secret=SECRET)
    path = "/openstack/latest/meta_data.json"
    good = client.get(path, headers=signed_headers())
    assert good.status == 200
    assert json.loads(good.body)["uuid"] == OTHER.uuid
    assert client.get(path, headers=signed_headers(secret="wrong")).status == 403
    missing = signed_headers()
    del missing["X-Tenant-ID"]
    answer = client.get(path, headers=missing)
    assert (answer.status, answer.text) == (400, "Missing header X-Tenant-ID\n")
    duplicate: dict[str, Any] = dict(signed_headers())
    duplicate["X-Instance-ID"] = [OTHER.uuid, OTHER.uuid]
    assert client.get(path, headers=duplicate).status == 400
    unknown = "00000000-0000-4000-8000-000000000000"
    assert client.get(path, headers=signed_headers(uuid=unknown)).status == 404
    assert client.get(path, headers=signed_headers(tenant="proj-a")).status == 404


def test_password_is_write_once() -> None:
    """GET is empty until a POST; a second POST is 409; oversize is 400."""
    client, _, _ = make_site()
    path = "/openstack/latest/password"
    assert (client.get(path).status, client.get(path).body) == (200, b"")
    assert client.request("POST", path, data=b"x" * 1021).status == 400
    assert client.request("POST", path, data=b"encrypted-pw").status == 200
    assert client.get(path).body == b"encrypted-pw"
    assert client.request("POST", path, data=b"other").status == 409
    assert client.get(path).body == b"encrypted-pw"
    assert client.request("POST", "/openstack/2012-08-10/password", data=b"x").status == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/latest/meta-data/"),
        ("PUT", "/openstack/latest/password"),
        ("DELETE", "/latest/meta-data/instance-id"),
        ("PATCH", "/"),
    ],
)
def test_other_methods_are_405(method: str, path: str) -> None:
    """Only GET and HEAD read, and only the password takes a POST."""
    client, store, _ = make_site()
    answer = client.request(method, path, data=b"x")
    assert answer.status == 405
    assert "GET" in (answer.header("allow") or "")
    assert store.calls.get("set_password") is None


def test_head_has_no_body() -> None:
    """HEAD answers like GET without the body."""
    client, _, _ = make_site()
    answer = client.request("HEAD", "/latest/meta-data/instance-id")
    assert answer.status == 200 and answer.body == b""


def test_store_down_is_503() -> None:
    """A lookup that fails on the database is a 503 the caller may retry, not a 500."""
    client, store, _ = make_site()
    store.repository.available = False
    answer = client.get("/latest/meta-data/instance-id")
    assert answer.status == 503
    assert answer.header("retry-after") == "1"
    store.repository.available = True
    assert client.get("/latest/meta-data/instance-id").status == 200


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "PROPFIND"])
def test_unlisted_methods_are_405_with_the_real_allow(method: str) -> None:
    """Methods no route lists get 405 naming only what the site takes."""
    client, _, _ = make_site()
    answer = client.request(method, "/latest/meta-data/")
    assert answer.status == 405
    assert answer.header("allow") == "GET, HEAD"


def test_ec2_listing_needs_no_identity() -> None:
    """``/ec2`` lists versions for anyone, like ``/``."""
    client, _, _ = make_site(nodes=())
    assert client.get("/ec2").status == 200
    assert client.get("/ec2/").text.splitlines()[-1] == "latest"


def test_empty_password_is_refused() -> None:
    """An empty POST does not lock the write-once password."""
    client, _, _ = make_site()
    path = "/openstack/latest/password"
    assert client.request("POST", path, data=b"").status == 400
    assert client.request("POST", path, data=b"pw").status == 200


def test_signed_instance_id_in_upper_case() -> None:
    """An upper-case X-Instance-ID (signed as sent) finds the node."""
    client, _, _ = make_site(secret=SECRET)
    answer = client.get(
        "/openstack/latest/meta_data.json", headers=signed_headers(uuid=OTHER.uuid.upper())
    )
    assert answer.status == 200
    assert json.loads(answer.body)["uuid"] == OTHER.uuid


def test_generated_network_data_is_served_as_json() -> None:
    """Without imported network data, the ports' DHCP config is served."""
    node = make_node(0, network_data=None, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
    client, _, _ = make_site(nodes=(node,))
    document = json.loads(client.get("/openstack/latest/network_data.json").body)
    assert document["networks"][0]["type"] == "ipv4_dhcp"
    assert document["links"][0]["ethernet_mac_address"] == "52:54:00:00:00:01"


def _held_site() -> tuple[MetadataSite, list[Deferred[Any]]]:
    """A site whose node lookups wait until the test fires them."""
    cache, held = cache_with_pending_queries()
    return MetadataSite(cache, MemoryStore(), Identifier([], "")), held


def _dummy_request(path: bytes) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.path = path
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    request.content = io.BytesIO(b"")
    return request


def test_a_caller_that_hangs_up_gets_nothing_written() -> None:
    """A caller gone while its lookup is pending gets nothing written and no error is
    logged; the lookup's late result is dropped."""
    site, held = _held_site()
    request = _dummy_request(b"/latest/meta-data/instance-id")
    assert site.resource().render(request) == NOT_DONE_YET
    request.processingFailed(Failure(ConnectionDone()))
    with capturedLogs() as events:
        held[0].callback(HERE_RECORD)
    assert request.written == [] and request.finished == 0
    assert not events


def test_a_pending_answer_is_written_when_the_lookup_fires() -> None:
    """A lookup that completes later answers the waiting caller and finishes it."""
    site, held = _held_site()
    request = _dummy_request(b"/latest/meta-data/instance-id")
    assert site.resource().render(request) == NOT_DONE_YET
    held[0].callback(HERE_RECORD)
    assert b"".join(request.written) == HERE.uuid.encode()
    assert request.finished == 1


@pytest.mark.parametrize("later", [False, True])
def test_a_bug_is_a_logged_500_without_a_traceback(later: bool) -> None:
    """An exception in the site, at once or after a lookup, is a bare 500 and logged."""
    site, held = _held_site()

    def broken(*_: Any) -> Any:
        raise RuntimeError("renderer bug")

    site._answer = broken  # type: ignore[method-assign]
    if not later:
        site.handle = broken  # type: ignore[method-assign]
    request = _dummy_request(b"/latest/meta-data/instance-id")
    with capturedLogs() as events:
        rendered = site.resource().render(request)
        if later:
            held[0].callback(HERE_RECORD)
    body = b"".join(request.written) if later else rendered
    assert request.responseCode == 500
    assert body == b"Internal Server Error\n"
    assert any("log_failure" in event for event in events)


def test_meta_data_json_seed_is_spliced_into_the_cached_document() -> None:
    """The serialised document is reused, with a fresh seed each time, and a node's own
    data that looks like a seed placeholder is left alone."""
    sneaky = make_node(
        0,
        ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}],
        meta={"random_seed": "x", "note": '"random_seed":"'},
    )
    seeds = iter([b"\x01" * 512, b"\x02" * 512])
    client, _, _ = make_site(nodes=(sneaky,), random_bytes=lambda n: next(seeds))
    first = json.loads(client.get("/openstack/latest/meta_data.json").body)
    second = json.loads(client.get("/openstack/latest/meta_data.json").body)
    assert first["random_seed"] == base64.b64encode(b"\x01" * 512).decode()
    assert second["random_seed"] == base64.b64encode(b"\x02" * 512).decode()
    assert first["meta"] == second["meta"] == {"random_seed": "x", "note": '"random_seed":"'}
    old = json.loads(client.get("/openstack/2012-08-10/meta_data.json").body)
    assert "random_seed" not in old and old["uuid"] == sneaky.uuid


def test_answers_past_the_memo_bound_are_rendered_each_time() -> None:
    """A node whose answers outgrow its entry's memo budget gets the same answers (a
    fresh random_seed included), rendered per request; the memo stays within bounds."""
    big_keys = {f"key{i}": "ssh-rsa " + "A" * 4000 for i in range(8)}
    node = make_node(
        0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}], public_keys=big_keys
    )
    paths = [
        "/openstack/latest/meta_data.json",
        "/latest/meta-data/public-keys/7/openssh-key",
        "/2009-04-04/meta-data/public-keys/7/openssh-key",
        "/latest/user-data",
        "/latest/meta-data/instance-id",
    ]
    seeds = iter(bytes([i]) * 512 for i in range(100))
    answers = []
    for bound in (None, 4096):
        store = MemoryStore()
        store.repository.upsert_nodes([node])
        kwargs = {} if bound is None else {"max_entry_memo_bytes": bound}
        cache = NodeCache(
            store.node_by_ip,
            store.get_node,
            Clock(),
            15,
            generation=store.node_generation,
            **kwargs,
        )
        site = MetadataSite(cache, store, Identifier([], ""), random_bytes=lambda n: next(seeds))
        client = Client(site.resource())
        answers.append([client.get(path).body for path in paths + paths])
        entry = cache.by_ip("127.0.0.1")
        assert isinstance(entry, CacheEntry)
        if bound is not None:
            assert entry.memo_bytes <= bound
            assert ("openstack", "latest", "meta_data.json") not in entry.memo
            assert ("ec2", "latest", "meta-data", "instance-id") in entry.memo
    unbounded, bounded = answers
    for plain, capped in zip(unbounded, bounded, strict=True):
        if plain.startswith(b"{"):
            documents = json.loads(plain), json.loads(capped)
            assert documents[0].pop("random_seed") != documents[1].pop("random_seed")
            assert documents[0] == documents[1]
        else:
            assert plain == capped
    assert json.loads(bounded[0])["random_seed"] != json.loads(bounded[5])["random_seed"]


def test_a_versions_meta_data_tree_is_built_once_per_entry() -> None:
    """The first read of each meta-data path is answered from one memoised tree per
    version (a crawl's paths are each read once), with the answers of a fresh render."""
    client, _, site = make_site()
    paths = [
        "/latest/meta-data/",
        "/latest/meta-data/instance-id",
        "/latest/meta-data/network/interfaces/macs/",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/no-such-key",
        "/2009-04-04/meta-data/",
    ]
    answers = [client.get(path) for path in paths]
    entry = site._cache.by_ip("127.0.0.1")
    assert isinstance(entry, CacheEntry)
    tree = entry.memo[("ec2-tree", "latest")]
    assert ("ec2-tree", "2009-04-04") in entry.memo
    for path, answer in zip(paths, answers, strict=True):
        parts = path.strip("/").split("/")
        fresh = ec2.render(HERE, parts[0], parts[1:], pending_time=NEW_YEAR)
        assert (answer.status, answer.body) == (fresh.status, fresh.body), path
    client.get("/latest/meta-data/hostname")
    assert entry.memo[("ec2-tree", "latest")] is tree


def test_random_bytes_hands_each_drawn_byte_out_once() -> None:
    """Seeds come from draws of the source, each byte handed out once, in order; a
    share larger than a draw is read from the source alone."""
    draws: list[int] = []
    counter = iter(range(1, 1000))

    def source(count: int) -> bytes:
        draws.append(count)
        return bytes([next(counter)]) * count

    pool = RandomBytes(source, draw=10)
    assert [pool(4), pool(4)] == [b"\x01" * 4, b"\x01" * 4]
    assert pool(4) == b"\x02" * 4  # two bytes left in the first draw: not enough
    assert pool(11) == b"\x03" * 11
    assert pool(6) == b"\x02" * 6
    assert draws == [10, 10, 11]
