# -*- test-case-name: tests.web.test_telemetry -*-
"""What ``GET /metrics`` shows: HTTP requests and latency, node caches, heartbeat,
ring and TFTP, on :data:`metadatad.metrics.REGISTRY`.

HTTP requests are counted as they finish (each of the daemon's
:class:`~metadatad.hardening.HardenedSite` s measures its own; :class:`MeasuredResource`
wraps a resource served by a plain ``Site``), in plain integers (:class:`RequestTally`)
that become Prometheus families only when scraped: counting costs a request a few
dictionary and list operations.
Everything else already has a counter or a state somewhere in the daemon;
:class:`DaemonCollector` reads those at scrape time instead of keeping copies, so a
metric can never drift from what the daemon does.  The ``metrics`` service attaches
the daemon's parts to the collector while it runs.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from metadatad.metrics import REGISTRY

# The classic text format, which generate_latest() writes and every scraper reads.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Methods shown by name; any other is "other".
_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})

_REQUESTS_HELP = "HTTP requests answered, by site, method and status code."
_LATENCY_HELP = "Time from the request's arrival to its last byte, by site."
#: Upper bounds (seconds) of the latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
_LE = (*(floatToGoString(bound) for bound in LATENCY_BUCKETS), "+Inf")
# Distinct (method, code) pairs a tally keeps apart; past it, a scanner's odd methods
# are folded into their label at once.
_MAX_KEYS = 1000


class RequestTally:
    """One site's finished requests, counted with plain integers on the hot path (no
    labelled child, no lock: requests finish on the reactor thread) and turned into
    ``metadatad_http_requests`` and ``metadatad_http_request_duration_seconds`` only
    when ``/metrics`` is read."""

    def __init__(self, site: str) -> None:
        self.site = site
        self._counts: dict[tuple[bytes, int | None], int] = {}
        self._folded: dict[tuple[str, str], int] = {}
        # Per bucket, not cumulative; the last one is +Inf.
        self._buckets = [0] * len(_LE)
        self._sum = 0.0

    def observe(self, method: bytes, code: int | None, seconds: float) -> None:
        """Count one finished request (``code`` None: the caller went away first)."""
        key = (method, code)
        counts = self._counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < _MAX_KEYS:
            counts[key] = 1
        else:
            label = _labels(method, code)
            self._folded[label] = self._folded.get(label, 0) + 1
        # The first bucket whose bound is >= seconds (Prometheus' le), else +Inf.
        self._buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if seconds > 0:
            self._sum += seconds

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests by (method label, code label)."""
        found = dict(self._folded)
        for (method, code), count in self._counts.items():
            label = _labels(method, code)
            found[label] = found.get(label, 0) + count
        return found

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """The cumulative buckets (``le``, count) and the sum of seconds."""
        total = 0
        buckets = []
        for le, count in zip(_LE, self._buckets, strict=True):
            total += count
            buckets.append((le, float(total)))
        return buckets, self._sum


def _labels(method: bytes, code: int | None) -> tuple[str, str]:
    # Methods beyond _METHODS are one label value: a scanner cannot grow the series.
    shown = method.decode("ascii", "replace").upper()
    return (shown if shown in _METHODS else "other", str(code) if code else "aborted")


class RequestCollector(Collector):
    """The HTTP request families of every site's :class:`RequestTally`."""

    def __init__(self) -> None:
        self._tallies: dict[str, RequestTally] = {}

    def tally(self, site: str) -> RequestTally:
        """The tally of ``site`` (one per site name, shared by its resources)."""
        found = self._tallies.get(site)
        if found is None:
            found = self._tallies[site] = RequestTally(site)
        return found

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "metadatad_http_requests", _REQUESTS_HELP, labels=["site", "method", "code"]
        )
        latency = HistogramMetricFamily(
            "metadatad_http_request_duration_seconds", _LATENCY_HELP, labels=["site"]
        )
        for site, tally in sorted(self._tallies.items()):
            for (method, code), count in sorted(tally.counts().items()):
                requests.add_metric([site, method, code], count)
            buckets, seconds = tally.histogram()
            if buckets[-1][1]:
                latency.add_metric([site], buckets, seconds)
        yield requests
        yield latency


REQUESTS = RequestCollector()
REGISTRY.register(REQUESTS)


class MeasuredResource(Resource):
    """A leaf resource that serves ``inner`` and counts each request and its duration
    under ``site`` once the response is finished.  For a plain ``Site``: the daemon's
    own sites are :class:`~metadatad.hardening.HardenedSite` s, which measure every
    request themselves (their ``measure``)."""

    isLeaf = True

    def __init__(self, inner: Any, site: str, clock: IReactorTime) -> None:
        super().__init__()
        self._inner = inner
        self._tally = REQUESTS.tally(site)
        self._clock = clock

    def render(self, request: Request) -> Any:
        started = self._clock.seconds()
        request.notifyFinish().addBoth(self._notified, request, started)
        return self._inner.render(request)

    def _notified(self, result: object, request: Request, started: float) -> None:
        # An errback here is the caller hanging up: count it, swallow it.
        code = None if isinstance(result, Failure) else request.code
        self._tally.observe(request.method, code, self._clock.seconds() - started)


@attrs.define
class Sources:
    """The parts of a running daemon that :class:`DaemonCollector` reads."""

    caches: Mapping[str, Any] = attrs.field(factory=dict)  # name -> NodeCache
    membership: Any = None  # MembershipService
    tftp: Any = None  # TFTPServer
    clock: IReactorTime | None = None
    # WorkerPool: its workers' latest snapshot() each, summed into /metrics.
    workers: Any = None


class DaemonCollector(Collector):
    """Reads counters and state of the attached daemon at scrape time."""

    def __init__(self) -> None:
        self.sources: Sources | None = None

    def collect(self) -> Iterator[Metric]:
        sources = self.sources
        if sources is None:
            return
        yield from _cache_metrics(sources.caches)
        if sources.membership is not None:
            yield from _membership_metrics(sources.membership)
        if sources.tftp is not None:
            yield from _tftp_metrics(sources.tftp)

    def describe(self) -> Iterator[Metric]:
        # Collected lazily: nothing to describe up front (the registry would call
        # collect() otherwise, before any daemon is attached).
        return iter(())


COLLECTOR = DaemonCollector()
REGISTRY.register(COLLECTOR)


def _cache_metrics(caches: Mapping[str, Any]) -> Iterator[Metric]:
    hits = CounterMetricFamily(
        "metadatad_node_cache_hits", "Node lookups answered from memory.", labels=["cache"]
    )
    misses = CounterMetricFamily(
        "metadatad_node_cache_misses", "Node lookups that went to the database.", labels=["cache"]
    )
    entries = GaugeMetricFamily(
        "metadatad_node_cache_entries", "Node lookups held in memory.", labels=["cache"]
    )
    memo = GaugeMetricFamily(
        "metadatad_node_cache_memo_bytes",
        "Estimated bytes of rendered answers held by the node cache (bounded).",
        labels=["cache"],
    )
    for name, cache in caches.items():
        hits.add_metric([name], cache.hits)
        misses.add_metric([name], cache.misses)
        entries.add_metric([name], len(cache))
        memo.add_metric([name], cache.memo_bytes)
    yield hits
    yield misses
    yield entries
    yield memo


_HEALTH_STATES = ("ok", "starting", "stale", "stopped")


def _membership_metrics(membership: Any) -> Iterator[Metric]:
    age = membership.heartbeat_age()
    yield GaugeMetricFamily(
        "metadatad_heartbeat_age_seconds",
        "Seconds since this conductor's last heartbeat reached the database (NaN: none yet).",
        value=math.nan if age is None else age,
    )
    yield GaugeMetricFamily(
        "metadatad_heartbeat_timeout_seconds",
        "Heartbeat age past which the other conductors take this one's nodes over.",
        value=membership.heartbeat_timeout,
    )
    health = membership.health()
    state = GaugeMetricFamily(
        "metadatad_membership_state",
        "1 for the membership state this conductor is in.",
        labels=["state"],
    )
    for name in _HEALTH_STATES:
        state.add_metric([name], 1.0 if health == name else 0.0)
    yield state
    ring = membership.state
    yield GaugeMetricFamily(
        "metadatad_ring_generation",
        "Generation of the membership the ring was last built from.",
        value=ring.generation if ring is not None else 0,
    )
    members = GaugeMetricFamily(
        "metadatad_ring_members", "Live conductors on the ring, by group.", labels=["group"]
    )
    if ring is not None:
        for group, names in sorted(ring.by_group().items()):
            members.add_metric([group], len(names))
    yield members
    yield GaugeMetricFamily(
        "metadatad_owned_nodes",
        "Nodes this conductor holds the claim of.",
        value=len(membership.owned),
    )


# TFTPServer.counters keys that are not outcomes of a request or transfer.
_TFTP_TOTALS = {
    "bytes_sent": ("metadatad_tftp_sent_bytes", "Bytes of file data sent over TFTP."),
    "retransmits": ("metadatad_tftp_retransmits", "TFTP blocks sent again after a timeout."),
    "requests": ("metadatad_tftp_requests", "TFTP requests received at the listeners."),
}


def _tftp_metrics(server: Any) -> Iterator[Metric]:
    counters = dict(server.counters)
    for key, (name, documentation) in _TFTP_TOTALS.items():
        yield CounterMetricFamily(name, documentation, value=counters.pop(key, 0))
    events = CounterMetricFamily(
        "metadatad_tftp_events",
        "TFTP outcomes and drops (transfers started and finished, refusals, errors).",
        labels=["event"],
    )
    for key in sorted(counters):
        events.add_metric([key], counters[key])
    yield events
    yield GaugeMetricFamily(
        "metadatad_tftp_active_transfers", "TFTP transfers running now.", value=server.active
    )


class MetricsService(Service):
    """The ``metrics`` service: shows ``sources`` on ``/metrics`` while running."""

    name = "metrics"

    def __init__(self, sources: Sources, collector: DaemonCollector = COLLECTOR) -> None:
        self.sources = sources
        self._collector = collector

    def startService(self) -> None:
        super().startService()
        self._collector.sources = self.sources

    def stopService(self) -> Any:
        if self._collector.sources is self.sources:
            self._collector.sources = None
        return super().stopService()


def snapshot() -> list[Any]:
    """This process's metrics as JSON-ready lists, for the main process to add up:
    ``[name, type, help, unit, [[sample, labels, value], ...]]`` per family
    (``_created`` timestamps left out: they do not add up)."""
    return [
        [
            family.name,
            family.type,
            family.documentation,
            family.unit,
            [
                [sample.name, sample.labels, sample.value]
                for sample in family.samples
                if not sample.name.endswith("_created")
            ],
        ]
        for family in REGISTRY.collect()
    ]


class _Families:
    """What generate_latest() needs of a registry: collect()."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge(families: list[Metric], snapshots: list[list[Any]]) -> list[Metric]:
    """``families`` (this process's) with every snapshot's samples added in: counters,
    histogram buckets and gauges (watchers held, cached entries) are sums over the
    processes."""
    by_name = {family.name: family for family in families}
    for snap in snapshots:
        for name, kind, documentation, unit, samples in snap:
            family = by_name.get(name)
            if family is None:
                family = by_name[name] = Metric(name, documentation, kind, unit)
            index = {
                (s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(family.samples)
            }
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                found = index.get(key)
                if found is None:
                    index[key] = len(family.samples)
                    family.add_sample(sample_name, labels, value)
                else:
                    old = family.samples[found]
                    family.samples[found] = old._replace(value=old.value + value)
    return list(by_name.values())


def render_metrics() -> bytes:
    """The registry in Prometheus' text exposition format; with metadata workers, the
    sum of this process and every worker."""
    sources = COLLECTOR.sources
    if sources is None or sources.workers is None:
        return generate_latest(REGISTRY)
    merged = merge(list(REGISTRY.collect()), sources.workers.snapshots())
    return generate_latest(_Families(merged))
