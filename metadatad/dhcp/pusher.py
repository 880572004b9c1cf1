# -*- test-case-name: tests.dhcp.test_dhcp_pusher -*-
"""The ``dhcp`` service: keeps every owned node's boot mapping pushed, durably.

State lives in the database (:mod:`metadatad.db.dhcp`): per node the desired mapping,
the last pushed one, attempts, last error and next attempt.  The service

1. *refreshes* desired mappings from the nodes this conductor holds (their claims):
   all of them at start-up and every ``reconcile_interval`` (and after a node write
   through this daemon), only the claimed ones on a takeover (:class:`ClaimEvent`);
   deleted nodes' mappings become retractions.  On a takeover a batch provider
   (dnsmasq) is handed the new mappings while they are being recorded (written
   ahead: not recorded as pushed until the drain confirms them);
2. *drains*: takes the due mappings in batches, pushes each batch through the provider
   with at most ``concurrency`` pushes in flight, and records the outcomes in one
   transaction per batch (a provider with ``push_many`` gets the whole batch in one
   call); failures are retried after ``retry_min * 2**(n-1)`` seconds
   (at most ``retry_max``), permanent ones ``permanent_retries`` times, then only
   once the mapping changes.

Deleted nodes whose owner is dead (no claim is left to take over) are adopted by the
survivor the ring gives them, which retracts them; a retraction leaves out the MACs
another node has now (:mod:`metadatad.db.dhcp_fences`).

Fencing: a mapping is desired, due and recorded only while the claims table says this
conductor holds the node at the generation the mapping was made for, so a conductor that
lost a node cannot push or record it; the dnsmasq provider also refuses to overwrite a
file written under a newer generation.  A crash loses nothing: what was pushed but not
recorded is pushed again after the restart (pushes are idempotent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from metadatad.core.bootmapping import BootDefaults, BootMapping, MappingError, boot_mapping
from metadatad.core.conductors import ClaimEvent, ConductorInfo
from metadatad.core.ring import HashRing
from metadatad.db.dhcp import DhcpPushRepository, PushJob, PushResult
from metadatad.db.threaded import private_pool
from metadatad.dhcp.provider import Provider, PushError
from metadatad.metrics import REGISTRY

__all__ = ["DhcpPusher", "backoff"]

PUSHES = Counter(
    "metadatad_dhcp_pushes",
    "DHCP boot mapping pushes attempted, by provider.",
    ["provider"],
    registry=REGISTRY,
)
FAILURES = Counter(
    "metadatad_dhcp_push_failures",
    "DHCP boot mapping pushes that failed, by provider and kind (retry, permanent).",
    ["provider", "kind"],
    registry=REGISTRY,
)
QUEUE = Gauge(
    "metadatad_dhcp_queue_depth",
    "DHCP boot mappings of this conductor not pushed yet (permanent failures excluded).",
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "metadatad_dhcp_pushes_in_flight", "DHCP boot mapping pushes in flight.", registry=REGISTRY
)


def backoff(attempts: int, minimum: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failure in a row (1, 2, 4... capped)."""
    return float(min(maximum, minimum * 2 ** min(max(attempts - 1, 0), 40)))


class DhcpPusher(Service):
    """Refresh desired mappings, push what is due, record the outcomes."""

    name = "dhcp"
    log = Logger()

    def __init__(
        self,
        repository: DhcpPushRepository,
        provider: Provider,
        info: ConductorInfo,
        defaults: BootDefaults,
        reactor: Any,
        *,
        concurrency: int = 50,
        retry_min: float = 1.0,
        retry_max: float = 300.0,
        permanent_retries: int = 8,
        reconcile_interval: float = 300.0,
        batch: int = 1000,
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``reactor`` is the clock (and, without ``run``, runs the database work on
        a two-thread pool this service owns, on ``repository.engine``).  ``run(f,
        *args)`` replaces that pool in tests.  A permanent failure is retried
        ``permanent_retries`` times with the same backoff, then left failed until the
        mapping changes."""
        self.repository = repository
        self.provider = provider
        self.info = info
        self.defaults = defaults
        self._clock = reactor
        self.concurrency = concurrency
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.permanent_retries = permanent_retries
        self.reconcile_interval = reconcile_interval
        self.batch = batch
        self._pool: ThreadPool | None = None
        if run is None:
            self._pool, run = private_pool(reactor, "metadatad-dhcp")

        self._run = run
        self._loop = LoopingCall(self._reconcile)
        self._loop.clock = reactor
        self._cycle: Deferred[None] | None = None
        self._want_full = False
        self._want_nodes: set[str] = set()
        self._want_generations: set[int] = set()  # of the claim events in _want_nodes
        self._timer: Any = None
        self._starting: Any = None
        self._in_flight = 0
        self.pushed = 0  # pushes that succeeded since start (tests, logs)
        self.failed = 0

    # --- inputs --------------------------------------------------------------------

    def claimed(self, event: ClaimEvent) -> None:
        """Observer of :class:`MembershipService`: push the nodes just claimed."""
        if event.conductor == self.info.name:
            self._want_generations.add(event.generation)
            self._kick(nodes=event.nodes)

    def nodes_changed(self) -> None:
        """Store change listener: a node was written through this daemon."""
        self._kick(full=True)

    def state(self, node_uuid: str) -> Deferred[dict[str, Any] | None]:
        """The node's mapping and push state (None: no mapping recorded)."""

        def found(state: Any) -> dict[str, Any] | None:
            return state.to_document() if state is not None else None

        return self._run(self.repository.state, node_uuid).addCallback(found)

    # --- start and stop ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._pool is not None:
            self._pool.start()
        self.provider.start()
        self._starting = self._clock.callLater(0, self._begin)

    def _begin(self) -> None:
        self._starting = None
        # now=True: the start-up reconcile (what a crash left unpushed is due again).
        self._loop.start(self.reconcile_interval, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop scheduling; let in-flight pushes finish and be recorded."""
        super().stopService()
        for call in (self._starting, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._starting = self._timer = None
        if self._loop.running:
            self._loop.stop()
        d = self._cycle if self._cycle is not None else succeed(None)
        waiter: Deferred[None] = Deferred()

        def idle(result: object) -> object:
            waiter.callback(None)
            return result

        d.addBoth(idle)
        waiter.addCallback(lambda _: self.provider.stop())
        waiter.addBoth(self._close)
        return waiter

    def _close(self, result: object) -> None:
        if self._pool is not None:
            self._pool.stop()
            engine = getattr(self.repository, "engine", None)
            if engine is not None:
                engine.dispose()
        if isinstance(result, Failure):
            self.log.failure("dhcp pusher stopped with an error", result)

    # --- the cycle -----------------------------------------------------------------

    def _reconcile(self) -> None:
        """The periodic call: never fails (a LoopingCall that fails stops for good)."""
        self._kick(full=True)

    def _kick(self, full: bool = False, nodes: Iterable[str] = ()) -> None:
        self._want_full = self._want_full or full
        self._want_nodes.update(nodes)
        if self._cycle is not None or not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cycle = self._run_cycle()
        self._cycle.addErrback(lambda f: self.log.failure("dhcp push cycle failed", f))
        self._cycle.addBoth(self._cycle_done)

    def _cycle_done(self, _: object) -> None:
        self._cycle = None

    def _due_again(self) -> None:
        self._timer = None
        self._kick()

    @inlineCallbacks
    def _run_cycle(self) -> Any:
        retry_in: float | None = None
        first = True
        while self.running and (first or self._want_full or self._want_nodes):
            first = False
            full, nodes, generations = self._want_full, self._want_nodes, self._want_generations
            self._want_full, self._want_nodes, self._want_generations = False, set(), set()
            try:
                if full or nodes:
                    yield self._refresh(full, nodes, generations)
                yield self._drain()
                next_due = yield self._run(self.repository.next_due, self.info.name)
                depth = yield self._run(self.repository.pending_count, self.info.name)
                QUEUE.set(depth)
            except Exception as e:
                self._database_failed(e)
                # Nothing is lost: what was asked for is asked again.
                self._want_full = self._want_full or full
                self._want_nodes.update(nodes)
                self._want_generations.update(generations)
                retry_in = self.retry_min
                break
            if next_due is not None:
                retry_in = max(0.0, next_due - self._clock.seconds())
        if self.running and retry_in is not None:
            self._timer = self._clock.callLater(max(retry_in, 0.01), self._due_again)

    @inlineCallbacks
    def _refresh(self, full: bool, nodes: set[str], generations: set[int]) -> Any:
        now = self._clock.seconds()
        wanted = yield self._run(
            self._mappings_on_pool, full, frozenset(nodes), frozenset(generations)
        )
        ahead = None if full else self._write_ahead(wanted)
        try:
            yield self._run(self._record_desired_on_pool, full, wanted, now)
        finally:
            if ahead is not None:
                yield ahead

    def _write_ahead(self, wanted: list[tuple[BootMapping, int]]) -> Deferred[Any] | None:
        """A takeover: hand the claimed nodes' new mappings to a batch provider
        (dnsmasq) at once, while their desired state is being recorded.  Nothing is
        recorded from this: the drain that follows pushes the same mappings from the
        database (files already right are not rewritten), flushes, and records.  A
        crash in between loses nothing (the start-up reconcile pushes them again);
        the provider's own generation fence applies as always."""
        push_many = getattr(self.provider, "push_many", None)
        if push_many is None or not wanted:
            return None
        d: Deferred[Any] = maybeDeferred(
            push_many, [(mapping, None, generation) for mapping, generation in wanted]
        )
        # Outcomes (a fenced node) come again, and are recorded, in the drain.
        d.addErrback(lambda f: self.log.warn("dhcp: write-ahead failed: {error}", error=f.value))
        return d

    def _mappings_on_pool(
        self, full: bool, nodes: frozenset[str], generations: frozenset[int]
    ) -> list[tuple[BootMapping, int]]:
        """(On the pool.)  Desired mappings of the nodes this conductor holds (all of
        them, or those just claimed: at the claim events' generations)."""
        if full:
            owned = self.repository.owned_nodes(self.info.name)
        else:
            owned = self.repository.owned_nodes(self.info.name, nodes, generations or None)
        wanted: list[tuple[BootMapping, int]] = []
        problems: list[str] = []
        for node, generation in owned:
            try:
                mapping = boot_mapping(
                    node, self.info.tftp_address, self.info.http_address, self.defaults
                )
            except MappingError as e:
                problems.append(f"{node.uuid}: {e}")
                continue
            if mapping.macs:
                wanted.append((mapping, generation))
        if problems:
            self.log.warn(
                "{count} nodes have no DHCP boot mapping; first: {first}",
                count=len(problems),
                first=problems[0],
            )
        return wanted

    def _record_desired_on_pool(
        self, full: bool, wanted: list[tuple[BootMapping, int]], now: float
    ) -> None:
        """(On the pool.)  Record ``wanted`` as desired; retract deleted nodes (ours
        on a full reconcile, and those dead conductors left us)."""
        changed = self.repository.set_desired(self.info.name, wanted, now)
        retracted = self.repository.retract_deleted(self.info.name, now) if full else 0
        retracted += self._adopt_orphans(now)
        if changed or retracted:
            self.log.info(
                "{changed} DHCP boot mappings to push, {retracted} to retract ({kind})",
                changed=changed,
                retracted=retracted,
                kind="reconcile" if full else "claimed",
            )

    def _adopt_orphans(self, now: float) -> int:
        """(On the pool.)  Retract the deleted nodes a dead conductor of our group
        left behind, those the ring over the live conductors gives us (see
        :mod:`metadatad.db.dhcp_fences`).  Returns how many were adopted."""
        scan = self.repository.orphaned_retractions(self.info.group)
        if not scan.orphans or self.info.name not in scan.live:
            return 0
        ring = HashRing(scan.live)
        mine = [o for o in scan.orphans if ring.owner(o.node_uuid) == self.info.name]
        if not mine:
            return 0
        adopted = self.repository.adopt(self.info.name, scan.generation, mine, now)
        if adopted:
            self.log.info(
                "adopted {count} retractions of deleted nodes from dead conductors "
                "({owners}) at generation {generation}",
                count=len(adopted),
                owners=", ".join(sorted({o.owner for o in mine if o.node_uuid in adopted})),
                generation=scan.generation,
            )
        return len(adopted)

    @inlineCallbacks
    def _drain(self) -> Any:
        semaphore = DeferredSemaphore(self.concurrency)
        while self.running:
            now = self._clock.seconds()
            jobs = yield self._run(self.repository.due, self.info.name, now, self.batch)
            if not jobs:
                return
            if getattr(self.provider, "push_many", None) is not None:
                results = yield self._push_many(jobs)
            else:
                pushes = [semaphore.run(self._push, job) for job in jobs]
                outcomes = yield DeferredList(pushes, consumeErrors=True)
                results = [result for ok, result in outcomes if ok]
            # Durable before recorded (a provider may defer its syncs to here).
            yield self.provider.flush()
            yield self._run(self.repository.record, self.info.name, results, self._clock.seconds())

    def _push_many(self, jobs: list[PushJob]) -> Deferred[list[PushResult]]:
        """The batch in one call of a provider that writes many nodes per job."""
        provider = self.provider.name
        PUSHES.labels(provider).inc(len(jobs))
        self._in_flight += len(jobs)
        IN_FLIGHT.set(self._in_flight)
        items = [(job.desired, job.previous, job.generation) for job in jobs]
        push_many: Callable[..., Any] = self.provider.push_many  # type: ignore[attr-defined]
        d: Deferred[list[PushError | None]] = maybeDeferred(push_many, items)

        def done(errors: list[PushError | None]) -> list[PushResult]:
            return [
                self._succeeded(job) if error is None else self._failed(job, Failure(error))
                for job, error in zip(jobs, errors, strict=True)
            ]

        def failed(failure: Failure) -> list[PushResult]:
            # The whole batch failed: one traceback, every job retried.
            return [self._failed(job, failure, show=i == 0) for i, job in enumerate(jobs)]

        def finished(result: list[PushResult]) -> list[PushResult]:
            self._in_flight -= len(jobs)
            IN_FLIGHT.set(self._in_flight)
            return result

        return d.addCallbacks(done, failed).addBoth(finished)

    def _push(self, job: PushJob) -> Deferred[PushResult]:
        provider = self.provider.name
        PUSHES.labels(provider).inc()
        self._in_flight += 1
        IN_FLIGHT.set(self._in_flight)
        d = maybeDeferred(self.provider.push, job.desired, job.previous, job.generation)

        def done(_: object) -> PushResult:
            return self._succeeded(job)

        def failed(failure: Failure) -> PushResult:
            return self._failed(job, failure)

        def finished(result: PushResult) -> PushResult:
            self._in_flight -= 1
            IN_FLIGHT.set(self._in_flight)
            return result

        return d.addCallbacks(done, failed).addBoth(finished)

    def _succeeded(self, job: PushJob) -> PushResult:
        self.pushed += 1
        return PushResult(job.node_uuid, job.generation, job.digest)

    def _failed(self, job: PushJob, failure: Failure, show: bool = True) -> PushResult:
        """The job's failed result (``show``: log a provider's bug)."""
        provider = self.provider.name
        self.failed += 1
        error = failure.value
        if isinstance(error, PushError):
            message, permanent = error.message, error.permanent
        else:
            # A bug in a provider: show it, and retry like any failure.
            if show:
                self.log.failure("DHCP provider {provider} failed", failure, provider=provider)
            message, permanent = f"{type(error).__name__}: {error}", False
        FAILURES.labels(provider, "permanent" if permanent else "retry").inc()
        wait = backoff(job.attempts + 1, self.retry_min, self.retry_max)
        retry = not permanent or job.attempts < self.permanent_retries
        if not permanent:
            kind = f"retry in {wait:g} s"
        elif retry:
            # Bounded: the Neutron port may appear, the node be fixed, a newer
            # owner's file be rewritten; the row shows ``failed`` meanwhile.
            kind = f"permanent, retry {job.attempts + 1} of {self.permanent_retries} in {wait:g} s"
        else:
            kind = "permanent, not retried until the mapping changes"
        if job.attempts == 0 or permanent:
            self.log.warn(
                "DHCP push of node {uuid} failed ({kind}): {error}",
                uuid=job.node_uuid,
                kind=kind,
                error=message,
            )
        return PushResult(
            job.node_uuid,
            job.generation,
            job.digest,
            error=message,
            permanent=permanent,
            next_attempt=self._clock.seconds() + wait if retry else None,
        )

    def _database_failed(self, error: Exception) -> None:
        if isinstance(error, SQLAlchemyError | OSError):
            self.log.warn(
                "dhcp: database unavailable ({error}); retrying in {seconds:g} s",
                error=" ".join(str(getattr(error, "orig", None) or error).split())[:300],
                seconds=self.retry_min,
            )
        else:
            self.log.failure("dhcp push cycle failed", Failure(error))
