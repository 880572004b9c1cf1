# -*- test-case-name: tests.cluster.test_membership -*-
"""The ``membership`` service: heartbeats, the ring generation, and node takeovers.

Every ``poll`` seconds (one second, or ``heartbeat_interval`` if shorter) a conductor:

1. heartbeats, when one is due (every ``heartbeat_interval``): its row gets the
   database's current time and ``online = true``;
2. *observes*: reads which conductors are live by the database's clock (heartbeat newer
   than ``heartbeat_timeout``, and online) and, if that set differs from the membership
   recorded for the current generation, moves the generation forward by one and records
   the new set (compare-and-set, so all conductors agree on one membership per
   generation);
3. when the generation changed, and in any case every ``heartbeat_interval``, *syncs*:
   builds the rings of the recorded membership (one per conductor group), lists the
   nodes of its group the ring gives it whose claim is missing or someone else's, and
   claims them in one transaction fenced by the generation (see below).

So a conductor that dies is noticed ``heartbeat_timeout`` after its last heartbeat and
its nodes are claimed by the survivors on their next poll; one that stops cleanly
(SIGTERM: :meth:`MembershipService.stopService` marks it offline) within a poll; a new
node is claimed within ``heartbeat_interval``.  Start-up is a sync like any other, so
a restarted conductor reclaims what the ring gives it.

Fencing (the invariant)
-----------------------
*G* is the generation in ``ring_state``; *M(G)* the membership recorded with it.

1. G only increases, and each G names one M(G).
2. A conductor claims a node at G only if ring(M(G)) of the node's conductor group
   places the node on it, and only while G is still the current generation: the claim
   statement itself checks ``ring_state.generation = G``.
3. A claim replaces a stored one only if the stored generation is smaller than G (or
   the stored claim was made for another conductor group): a node's claim generation
   never decreases, and within a generation the first claim of a node stands.

Hence a conductor paused (SIGSTOP) with the view of generation G, while the others
moved to G' > G and took its nodes over at G', cannot overwrite anything when it
resumes: every claim it still tries carries G, which is no longer current (rule 2),
and is older than the takeover claims (rule 3).  It resumes heartbeating, which makes
it live again: the next observation records a new membership at G'' > G', and its
nodes come back to it only by claims at G''.  The claims converge on ring(M(G)) of the
current G within one poll of the generation settling, because every live conductor
claims what that ring gives it.  (Conductors that place a node differently under the
same membership, because their ring settings differ, do not fight over it: the first
claim stands and the others log the mismatch.)

Claims are reported to observers as :class:`ClaimEvent` (the DHCP pusher subscribes);
each takeover is logged as one summary line.  A conductor never judges itself dead:
failures are logged and retried on the next poll, and its own claims are never
released by it (a survivor's newer claim replaces them).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from metadatad.core.conductors import ClaimEvent, ConductorInfo, RingState
from metadatad.core.placement import ClaimPlan, Placement, plan_claims, ring_report
from metadatad.core.ring import DEFAULT_POINTS
from metadatad.db.threaded import private_pool
from metadatad.interfaces import ClusterRepositoryLike

__all__ = ["MembershipService"]

T = TypeVar("T")

# Longest wait between two looks at the membership: a clean stop is noticed this fast.
MAX_POLL_INTERVAL = 1.0
# While the database is unreachable, repeat the warning at most this often (seconds).
FAILURE_LOG_INTERVAL = 60.0


@attrs.frozen
class _Observed:
    state: RingState
    heartbeat: bool
    previous_instance: str | None


@attrs.frozen
class _Synced:
    placement: Placement
    plan: ClaimPlan
    held: frozenset[str]  # nodes of our group whose claim is ours (before claiming)
    others: Mapping[str, str]  # node uuid -> owner, for nodes we held and lost
    contested_owners: Mapping[str, str]  # node uuid -> owner, for plan.contested


@attrs.frozen
class _Claiming:
    plan: ClaimPlan
    state: RingState
    now: float
    held: frozenset[str]
    reason: str


class MembershipService(Service):
    """Heartbeat, observe the membership, and claim this conductor's nodes."""

    name = "membership"
    log = Logger()

    def __init__(
        self,
        repository: ClusterRepositoryLike,
        info: ConductorInfo,
        reactor: Any,
        *,
        heartbeat_interval: float = 10.0,
        heartbeat_timeout: float = 60.0,
        replicas: int = 2,
        points: int = DEFAULT_POINTS,
        max_load_factor: float | None = None,
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``reactor`` is the clock of the loop (and, without ``run``, runs the
        database work on a two-thread pool this service owns, on
        ``repository.engine``, which it disposes of when it stops).  ``run(f, *args)``
        replaces that pool in tests: call at once, return a fired Deferred."""
        self.repository = repository
        self.info = info
        self.instance = secrets.token_hex(16)
        self._clock = reactor
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.poll_interval = min(MAX_POLL_INTERVAL, heartbeat_interval)
        self._settings: dict[str, Any] = {
            "replicas": replicas,
            "points": points,
            "max_load_factor": max_load_factor,
        }
        self._pool: ThreadPool | None = None
        if run is None:
            self._pool, run = private_pool(reactor, "metadatad-membership")

        self._run = run
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._starting: Any = None  # the IDelayedCall of the first poll
        self._ticking = False
        self._idle_waiters: list[Deferred[None]] = []
        self._observers: list[Callable[[ClaimEvent], None]] = []

        # What this conductor knows; all of it changes on the reactor thread only.
        self.state: RingState | None = None  # the last generation observed
        self._placement: Placement | None = None
        self._placement_members: tuple[tuple[str, str], ...] | None = None
        self._synced_generation: int | None = None
        self._owned: frozenset[str] = frozenset()
        self._registered = False
        self._next_heartbeat = float("-inf")
        self._next_sync = float("-inf")
        self._last_heartbeat: float | None = None
        self._failures = 0
        self._last_failure_log = float("-inf")
        self._warned_stale = False
        self._contested_generation: int | None = None

    # --- the public face -----------------------------------------------------------

    def owns(self, node_uuid: str) -> bool:
        """Whether this conductor holds the node's claim (as of its last sync)."""
        return node_uuid in self._owned

    @property
    def owned(self) -> frozenset[str]:
        """The nodes this conductor holds (as of its last sync)."""
        return self._owned

    def health(self) -> str:
        """``ok``; ``starting`` before the first sync; ``stale`` when the last heartbeat
        that reached the database is older than ``heartbeat_timeout`` (the others count
        this conductor dead); ``stopped``."""
        if not self.running:
            return "stopped"
        if self._synced_generation is None:
            return "starting"
        if self._last_heartbeat is None or (
            self._clock.seconds() - self._last_heartbeat > self.heartbeat_timeout
        ):
            return "stale"
        return "ok"

    def heartbeat_age(self) -> float | None:
        """Seconds since the last heartbeat that reached the database (by this
        process's clock), or None before the first one."""
        if self._last_heartbeat is None:
            return None
        return max(0.0, self._clock.seconds() - self._last_heartbeat)

    def add_observer(self, observer: Callable[[ClaimEvent], None]) -> None:
        """Call ``observer(event)`` on the reactor thread after every successful claim."""
        self._observers.append(observer)

    def remove_observer(self, observer: Callable[[ClaimEvent], None]) -> None:
        self._observers.remove(observer)

    def conductors(self) -> Deferred[list[dict[str, Any]]]:
        """Every registered conductor, judged by the database's clock, with the number
        of nodes it holds (JSON documents)."""
        return self._run(self._conductors)

    def ring(self) -> Deferred[dict[str, Any]]:
        """The report of ``GET /v1/ring`` (see :func:`~.placement.ring_report`)."""
        return self._run(self._ring_report, self._placement_members, self._placement)

    def node_boot(self, node_uuid: str, group: str) -> Deferred[dict[str, Any]]:
        """Who holds the node, its standbys by the ring, and since when."""
        return self._run(
            self._node_boot, node_uuid, group, self._placement_members, self._placement
        )

    # --- start and stop ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._pool is not None:
            self._pool.start()
        # From the next reactor turn: startService returns at once, and a daemon that
        # fails to start its other services never heartbeats.
        self._starting = self._clock.callLater(0, self._begin)

    def _begin(self) -> None:
        self._starting = None
        self._loop.start(self.poll_interval, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop polling, let a running poll finish, then mark this conductor offline so
        the survivors take its nodes over at once."""
        super().stopService()
        if self._starting is not None and self._starting.active():
            self._starting.cancel()
        self._starting = None
        if self._loop.running:
            self._loop.stop()
        d = self._when_idle()
        d.addCallback(lambda _: self._leave())
        d.addBoth(self._close)
        return d

    def _when_idle(self) -> Deferred[None]:
        if not self._ticking:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _leave(self) -> Deferred[None] | None:
        if not self._registered:
            return None

        def left(marked: bool) -> None:
            if marked:
                self.log.info(
                    "conductor {name} is offline: the others take its nodes over",
                    name=self.info.name,
                )

        def failed(failure: Failure) -> None:
            self.log.warn(
                "could not mark conductor {name} offline ({error}); the others take its "
                "nodes over {timeout:g} s after its last heartbeat",
                name=self.info.name,
                error=_one_line(failure.value),
                timeout=self.heartbeat_timeout,
            )

        return self._run(self.repository.mark_offline, self.info.name, self.instance).addCallbacks(
            left, failed
        )

    def _close(self, result: object) -> None:
        if self._pool is not None:
            # Work still queued (a late admin read) runs first; then the threads end.
            self._pool.stop()
            engine = getattr(self.repository, "engine", None)
            if engine is not None:
                engine.dispose()
        if isinstance(result, Failure):
            self.log.failure("membership stopped with an error", result)

    # --- one poll ------------------------------------------------------------------

    def _tick(self) -> Deferred[None]:
        """One poll; never fails (a LoopingCall whose call fails stops for good)."""
        self._ticking = True
        d = maybeDeferred(self._poll)
        d.addCallbacks(self._succeeded, self._failed)
        d.addBoth(self._idle)
        return d

    def _idle(self, _: object) -> None:
        self._ticking = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _poll(self) -> Deferred[None]:
        now = self._clock.seconds()
        heartbeat = self._due(now, self._next_heartbeat)
        d = self._run(self._observe, heartbeat)
        d.addCallback(self._observed, now)
        return d

    def _due(self, now: float, deadline: float) -> bool:
        # Half a poll of slack: polls land on the deadline give or take float noise.
        return now + self.poll_interval / 2 >= deadline

    def _observe(self, heartbeat: bool) -> _Observed:
        """(On the pool.)  Heartbeat if due, then observe the generation."""
        previous = None
        if heartbeat:
            previous = self.repository.heartbeat(self.info, self.instance)
        return _Observed(self.repository.observe(self.heartbeat_timeout), heartbeat, previous)

    def _observed(self, observed: _Observed, now: float) -> Deferred[None] | None:
        if observed.heartbeat:
            self._heartbeat_done(observed.previous_instance, now)
        state = observed.state
        if self.state is None or state.generation != self.state.generation:
            self._log_generation(state)
        self.state = state
        if state.generation == self._synced_generation and not self._due(now, self._next_sync):
            return None
        if not self.running:
            return None
        d = self._run(self._sync, state, self._placement_members, self._placement)
        d.addCallback(self._synced, state, now)
        return d

    def _heartbeat_done(self, previous_instance: str | None, now: float) -> None:
        if self._registered and previous_instance != self.instance:
            self.log.error(
                "another daemon heartbeats as conductor {name} (instance {other}): give "
                "every conductor its own [conductor] hostname",
                name=self.info.name,
                other=previous_instance,
            )
        if not self._registered:
            self.log.info(
                "conductor {name} (group {group!r}) registered; heartbeat every "
                "{interval:g} s, live for {timeout:g} s",
                name=self.info.name,
                group=self.info.group,
                interval=self.heartbeat_interval,
                timeout=self.heartbeat_timeout,
            )
        self._registered = True
        self._last_heartbeat = now
        self._next_heartbeat = now + self.heartbeat_interval
        self._warned_stale = False

    def _sync(
        self,
        state: RingState,
        members: tuple[tuple[str, str], ...] | None,
        placement: Placement | None,
    ) -> _Synced:
        """(On the pool.)  Plan what to claim under the recorded membership."""
        if placement is None or members != state.members:
            placement = Placement.of(state, **self._settings)
        group = self.info.group
        node_groups = self.repository.node_groups(group)
        claims = self.repository.claims(group)
        plan = plan_claims(
            self.info.name, group, placement, node_groups, claims, generation=state.generation
        )
        held = frozenset(uuid for uuid, claim in claims.items() if claim.owner == self.info.name)
        others = {
            uuid: claim.owner
            for uuid, claim in claims.items()
            if uuid in self._owned and claim.owner != self.info.name
        }
        contested = {uuid: claims[uuid].owner for uuid in plan.contested}
        return _Synced(placement, plan, held, others, contested)

    def _synced(self, synced: _Synced, state: RingState, now: float) -> Deferred[None] | None:
        self._placement = synced.placement
        self._placement_members = state.members
        if synced.others:
            sources = Counter(synced.others.values())
            self.log.info(
                "{count} nodes are now held by other conductors ({sources})",
                count=len(synced.others),
                sources=_describe(sources),
            )
        plan = synced.plan
        if plan.contested and self._contested_generation != state.generation:
            self._contested_generation = state.generation
            self.log.warn(
                "{count} nodes the ring gives this conductor are held by others at the "
                "same generation {generation} ({sources}); unless the node set just "
                "changed (bounded-load mode), the conductors compute different rings: "
                "give them all the same [conductor] ring_points and max_load_factor, "
                "and the same metadatad version",
                count=len(plan.contested),
                generation=state.generation,
                sources=_describe(Counter(synced.contested_owners.values())),
            )
        if not plan.claim:
            self._settle(state, now, synced.held)
            return None
        if not self.running:
            return None
        if self._synced_generation is None:
            reason = "start-up"
        elif self._synced_generation != state.generation:
            reason = "membership change"
        else:
            reason = "reconcile"
        d = self._run(
            self.repository.claim, self.info.name, self.info.group, state.generation, plan.claim
        )
        d.addCallback(self._claimed, _Claiming(plan, state, now, synced.held, reason))
        return d

    def _claimed(self, claimed: list[str], claiming: _Claiming) -> None:
        plan, state, reason = claiming.plan, claiming.state, claiming.reason
        held = claiming.held
        refused = len(plan.claim) - len(claimed)
        if claimed:
            previous = {uuid: plan.previous.get(uuid) for uuid in claimed}
            self.log.info(
                "claimed {count} nodes at generation {generation} ({reason}): {sources}",
                count=len(claimed),
                generation=state.generation,
                reason=reason,
                sources=_describe(Counter(previous.values())),
            )
            self._emit(
                ClaimEvent(self.info.name, state.generation, tuple(claimed), previous, reason)
            )
        if refused:
            # The generation moved on, or another conductor claimed first: the next
            # poll plans again from what the database says then.
            self.log.info(
                "{refused} of {count} claims at generation {generation} were refused "
                "(fenced by a newer generation or claim); retrying",
                refused=refused,
                count=len(plan.claim),
                generation=state.generation,
            )
            self._owned = held | frozenset(claimed)
            return
        self._settle(state, claiming.now, held | frozenset(claimed))

    def _settle(self, state: RingState, now: float, owned: frozenset[str]) -> None:
        self._owned = owned
        # After a change, sync again at the next poll: by then the others have claimed
        # what the new ring gives them, and ``owned`` drops those nodes.
        changed = state.generation != self._synced_generation
        self._synced_generation = state.generation
        self._next_sync = now + (self.poll_interval if changed else self.heartbeat_interval)

    def _emit(self, event: ClaimEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                self.log.failure("a claim observer failed", observer=observer)

    # --- failures ------------------------------------------------------------------

    def _succeeded(self, _: object) -> None:
        if self._failures:
            self.log.info(
                "membership: the database answers again (after {count} failed polls)",
                count=self._failures,
            )
        self._failures = 0

    def _failed(self, failure: Failure) -> None:
        self._failures += 1
        now = self._clock.seconds()
        expected = failure.check(SQLAlchemyError, ConnectionError, OSError)
        if not expected:
            # A bug: show the traceback every time, and keep polling.
            self.log.failure("membership poll failed", failure)
        elif self._failures == 1 or now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            self.log.warn(
                "membership: database unavailable ({error}); retrying every {interval:g} s",
                error=_one_line(failure.value),
                interval=self.poll_interval,
            )
        silent = now - (self._last_heartbeat if self._last_heartbeat is not None else now)
        if self._registered and silent > self.heartbeat_timeout and not self._warned_stale:
            self._warned_stale = True
            self.log.warn(
                "no heartbeat for {seconds:.0f} s: the other conductors now take this "
                "conductor's nodes over; it rejoins when the database answers",
                seconds=silent,
            )

    def _log_generation(self, state: RingState) -> None:
        groups = state.by_group()
        self.log.info(
            "ring generation {generation}: {members}",
            generation=state.generation,
            members="; ".join(
                f"{group or '(no group)'}: {', '.join(names)}"
                for group, names in sorted(groups.items())
            )
            or "no live conductor",
        )
        if self.info.group not in groups and self._registered:
            self.log.warn(
                "conductor group {group!r} has no live conductor in generation "
                "{generation} (this one is not counted live yet)",
                group=self.info.group,
                generation=state.generation,
            )

    # --- reads for operators (on the pool) -----------------------------------------

    def _placement_for(
        self,
        state: RingState,
        members: tuple[tuple[str, str], ...] | None,
        placement: Placement | None,
    ) -> Placement:
        if placement is not None and members == state.members:
            return placement
        return Placement.of(state, **self._settings)

    def _conductors(self) -> list[dict[str, Any]]:
        counts = self.repository.claim_counts()
        return [
            {**record.to_document(), "nodes": counts.get(record.name, 0)}
            for record in self.repository.conductors(self.heartbeat_timeout)
        ]

    def _ring_report(
        self, members: tuple[tuple[str, str], ...] | None, placement: Placement | None
    ) -> dict[str, Any]:
        state = self.repository.ring_state()
        placement = self._placement_for(state, members, placement)
        return ring_report(
            state, placement, self.repository.node_groups(), self.repository.claims()
        )

    def _node_boot(
        self,
        node_uuid: str,
        group: str,
        members: tuple[tuple[str, str], ...] | None,
        placement: Placement | None,
    ) -> dict[str, Any]:
        state = self.repository.ring_state()
        placement = self._placement_for(state, members, placement)
        claim = self.repository.claim_of(node_uuid)
        ranked = placement.owners(node_uuid, group)
        owner = claim.owner if claim is not None else None
        return {
            "owner": owner,
            "ring_owner": ranked[0] if ranked else None,
            "standbys": [name for name in ranked if name != owner][: max(0, len(ranked) - 1)],
            "claimed_at": claim.to_document()["claimed_at"] if claim is not None else None,
            "generation": claim.generation if claim is not None else None,
            "ring_generation": state.generation,
        }


def _describe(sources: Mapping[str, int] | Mapping[str | None, int]) -> str:
    """``"97 from c3, 3 unclaimed"``."""
    ordered = sorted(sources.items(), key=lambda item: (item[0] is None, item[0] or ""))
    parts = [
        f"{count} {'unclaimed' if owner is None else 'from ' + owner}" for owner, count in ordered
    ]
    return ", ".join(parts)


def _one_line(error: object) -> str:
    """A database error's own message (not SQLAlchemy's statement dump), on one line."""
    return " ".join(str(getattr(error, "orig", None) or error).split())[:300]
