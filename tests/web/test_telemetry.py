"""/metrics in memory: request counting around a Klein resource, the collector over a
real NodeCache, MembershipService and TFTPServer (clocks injected), the route's auth
and content type."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.admin.site import AdminSite
from metadatad.cluster.membership import MembershipService
from metadatad.core.conductors import ConductorInfo
from metadatad.db.cache import NodeCache
from metadatad.hardening import HardenedSite, Limits
from metadatad.metrics import REGISTRY
from metadatad.telemetry import (
    _MAX_KEYS,
    COLLECTOR,
    REQUESTS,
    DaemonCollector,
    MeasuredResource,
    MetricsService,
    RequestCollector,
    Sources,
)
from metadatad.testing import MemoryClusterRepository, MemoryNodeRepository, MemoryStore
from tests.support.factories import make_node
from tests.support.sites import Client
from tests.tftp.test_tftp_server import Harness, download

TOKEN = "t0ken-for-tests"


def samples(registry: Any = REGISTRY) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


class Slow:
    """A Klein app whose answer the test releases."""

    app = Klein()

    def __init__(self) -> None:
        self.pending: Deferred[bytes] = Deferred()

    @app.route("/slow")
    def slow(self, request: Any) -> Deferred[bytes]:
        return self.pending

    @app.route("/missing")
    def missing(self, request: Any) -> bytes:
        request.setResponseCode(404)
        return b"no"


def test_requests_are_counted_with_their_duration() -> None:
    """Each finished request counts once by site, method and code; its duration is the
    clock's time from arrival to the last byte."""
    clock = Clock()
    slow = Slow()
    resource = MeasuredResource(slow.app.resource(), "test-site", clock)
    stub, client = StubTreq(resource), Client(resource)
    labels = {"site": "test-site", "method": "GET", "code": "200"}
    before = samples()

    d = stub.get("http://169.254.169.254/slow")
    stub.flush()
    assert value(samples(), "metadatad_http_requests_total", **labels) == value(
        before, "metadatad_http_requests_total", **labels
    )
    clock.advance(0.3)
    slow.pending.callback(b"done")
    stub.flush()
    assert d.called
    client.get("/missing")
    client.request("BREW", "/missing")

    after = samples()
    counted = "metadatad_http_requests_total"
    assert value(after, counted, **labels) == value(before, counted, **labels) + 1
    for method in ("GET", "other"):
        code = {"site": "test-site", "method": method, "code": "404"}
        assert value(after, counted, **code) == value(before, counted, **code) + 1
    total = "metadatad_http_request_duration_seconds_sum"
    assert value(after, total, site="test-site") == pytest.approx(
        value(before, total, site="test-site") + 0.3
    )
    bucket = "metadatad_http_request_duration_seconds_bucket"
    slow_bucket = {"site": "test-site", "le": "0.25"}
    assert value(after, bucket, **slow_bucket) == value(before, bucket, **slow_bucket) + 2


def test_requests_on_a_hardened_site_are_counted_without_a_deferred() -> None:
    """The daemon's HardenedSite counts every request itself (no resource around the
    site's, no notifyFinish Deferred): a finished request by its code after its
    duration, a caller that hangs up as "aborted"."""
    clock = Clock()
    slow = Slow()
    site = HardenedSite(
        slow.app.resource(),
        Limits(),
        "hardened",
        reactor=clock,
        measure=REQUESTS.tally("hardened").observe,
    )
    before = samples()
    address = IPv4Address("TCP", "10.0.0.9", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /missing HTTP/1.1\r\nHost: a\r\n\r\n")
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(0.3)
    channel.connectionLost(Failure(ConnectionDone()))

    after = samples()
    counted = "metadatad_http_requests_total"
    for code in ("404", "aborted"):
        labels = {"site": "hardened", "method": "GET", "code": code}
        assert value(after, counted, **labels) == value(before, counted, **labels) + 1
    total = "metadatad_http_request_duration_seconds_sum"
    assert value(after, total, site="hardened") == pytest.approx(
        value(before, total, site="hardened") + 0.3
    )


def test_a_tally_folds_odd_methods_and_keeps_cumulative_buckets() -> None:
    """Counted in plain integers, exported as Prometheus counts them: a scanner's many
    odd methods are one "other" label (and stop growing the tally's keys), buckets are
    cumulative with ``le`` bounds, an aborted request is "aborted"."""
    registry = CollectorRegistry()
    collector = RequestCollector()
    registry.register(collector)
    tally = collector.tally("probe")
    assert collector.tally("probe") is tally
    assert samples(registry) == {}
    for i in range(_MAX_KEYS + 50):
        tally.observe(b"X%d" % i, 405, 0.0001)
    tally.observe(b"get", 200, 0.3)
    tally.observe(b"GET", None, 100.0)
    found = samples(registry)
    counted = "metadatad_http_requests_total"
    assert value(found, counted, site="probe", method="other", code="405") == _MAX_KEYS + 50
    assert value(found, counted, site="probe", method="GET", code="200") == 1
    assert value(found, counted, site="probe", method="GET", code="aborted") == 1
    assert len(tally._counts) <= _MAX_KEYS
    bucket = "metadatad_http_request_duration_seconds_bucket"
    assert value(found, bucket, site="probe", le="0.0005") == _MAX_KEYS + 50
    assert value(found, bucket, site="probe", le="0.25") == _MAX_KEYS + 50
    assert value(found, bucket, site="probe", le="0.5") == _MAX_KEYS + 51
    assert value(found, bucket, site="probe", le="60.0") == _MAX_KEYS + 51
    assert value(found, bucket, site="probe", le="+Inf") == _MAX_KEYS + 52
    count = "metadatad_http_request_duration_seconds_count"
    assert value(found, count, site="probe") == _MAX_KEYS + 52
    total = "metadatad_http_request_duration_seconds_sum"
    assert value(found, total, site="probe") == pytest.approx(100.3 + 0.0001 * (_MAX_KEYS + 50))


def membership(clock: Clock) -> MembershipService:
    nodes = MemoryNodeRepository()
    nodes.upsert_nodes([make_node(i) for i in range(10)])
    service = MembershipService(
        MemoryClusterRepository(nodes, now=clock.seconds),
        ConductorInfo("c1", "", "10.0.0.1", "http://10.0.0.1:8775"),
        clock,
        heartbeat_interval=1,
        heartbeat_timeout=5,
        run=maybeDeferred,
        points=64,
    )
    service.log = Logger(observer=lambda event: None)  # type: ignore[misc]
    return service


def empty_cache(clock: Clock) -> NodeCache:
    """A node cache whose store knows no node (and whose generation never moves)."""
    return NodeCache(
        lambda ip: succeed(None),
        lambda uuid: succeed(None),
        clock,
        ttl=10,
        generation=lambda: succeed(0),
    )


def test_collector_reads_the_daemon_parts(tmp_path: Path) -> None:
    """Cache hits and misses, heartbeat age, membership state, ring and TFTP counters
    come from the parts themselves, at scrape time."""
    clock = Clock()
    clock.advance(1_700_000_000)
    registry = CollectorRegistry()
    collector = DaemonCollector()
    registry.register(collector)
    assert samples(registry) == {}

    cache = empty_cache(clock)
    member = membership(clock)
    tftp = Harness(tmp_path)
    collector.sources = Sources({"metadata": cache}, member, tftp.server, clock)
    found = samples(registry)
    assert value(found, "metadatad_node_cache_misses_total", cache="metadata") == 0
    assert math.isnan(value(found, "metadatad_heartbeat_age_seconds"))
    assert value(found, "metadatad_membership_state", state="stopped") == 1

    cache.by_ip("10.0.0.2")
    cache.by_ip("10.0.0.2")
    member.startService()
    clock.advance(0)
    clock.advance(2.5)
    tftp.request("small.bin")
    download(tftp, tftp.sockets[0])
    found = samples(registry)
    assert value(found, "metadatad_node_cache_misses_total", cache="metadata") == 1
    assert value(found, "metadatad_node_cache_hits_total", cache="metadata") == 1
    assert value(found, "metadatad_node_cache_entries", cache="metadata") == 1
    assert value(found, "metadatad_node_cache_memo_bytes", cache="metadata") == 0
    assert 0 <= value(found, "metadatad_heartbeat_age_seconds") <= 1
    assert value(found, "metadatad_heartbeat_timeout_seconds") == 5
    assert value(found, "metadatad_membership_state", state="ok") == 1
    assert value(found, "metadatad_ring_generation") >= 1
    assert value(found, "metadatad_ring_members", group="") == 1
    assert value(found, "metadatad_owned_nodes") == 10
    assert value(found, "metadatad_tftp_requests_total") == 1
    assert value(found, "metadatad_tftp_sent_bytes_total") == 1000
    assert value(found, "metadatad_tftp_events_total", event="transfers_complete") == 1
    assert value(found, "metadatad_tftp_active_transfers") == 0
    member.stopService()


def test_metrics_service_attaches_while_running() -> None:
    """The ``metrics`` service shows its parts only while it runs."""
    clock = Clock()
    cache = empty_cache(clock)
    service = MetricsService(Sources({"probe": cache}), collector=COLLECTOR)
    assert ("metadatad_node_cache_hits_total", (("cache", "probe"),)) not in samples()
    service.startService()
    try:
        assert ("metadatad_node_cache_hits_total", (("cache", "probe"),)) in samples()
    finally:
        service.stopService()
    assert ("metadatad_node_cache_hits_total", (("cache", "probe"),)) not in samples()


def test_metrics_route_needs_the_token() -> None:
    """GET /metrics is the registry in the classic text format, behind the token."""
    client = Client(
        AdminSite(MemoryStore(), TOKEN).resource(),  # type: ignore[arg-type]
        base="http://127.0.0.1:8776",
    )
    answer = client.get("/metrics")
    assert answer.status == 401
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200
    assert answer.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    names = {family.name for family in text_string_to_metric_families(answer.text)}
    assert "metadatad_http_requests" in names
