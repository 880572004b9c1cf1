# -*- test-case-name: tests.web.test_console_site -*-
"""The cluster as the console shows it, polled twice a second while someone watches.

One poll serves every open cluster page: :meth:`ClusterFeed.subscribe` adds a
listener, and the feed asks membership for the conductors (judged by the database's
clock) every ``interval`` seconds only while it has listeners.  The ring report (it
places every node) is asked for again only when this conductor has seen a new
generation, or ``ring_refresh`` seconds after the last one: the conductors' heartbeats
share membership's threads with these reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ClusterFeed", "merge"]

Listener = Callable[[dict[str, Any]], None]
TICK = 0.1


def merge(
    conductors: Sequence[Mapping[str, Any]], ring: Mapping[str, Any], timeout: float
) -> dict[str, Any]:
    """One snapshot: per conductor its group, heartbeat age and liveness (by the
    database's clock), what the ring assigns it and what it holds, and whether it is a
    member of the ring's current generation."""
    by_name: dict[str, dict[str, Any]] = {}
    for c in conductors:
        by_name[c["name"]] = {
            "name": c["name"],
            "group": c.get("group"),
            "live": bool(c.get("live")),
            "online": bool(c.get("online", True)),
            "heartbeat_age": c.get("heartbeat_age"),
            "assigned": 0,
            "claimed": c.get("nodes", 0),
            "in_ring": False,
        }
    for r in ring.get("conductors", []):
        entry = by_name.setdefault(
            r["name"],
            {
                "name": r["name"],
                "group": r.get("group"),
                "live": False,
                "online": False,
                "heartbeat_age": None,
                "claimed": 0,
            },
        )
        entry["assigned"] = r.get("assigned", 0)
        entry["claimed"] = r.get("claimed", entry.get("claimed", 0))
        entry["in_ring"] = bool(r.get("live"))
    return {
        "generation": ring.get("generation"),
        "changed_at": ring.get("changed_at"),
        "nodes": ring.get("nodes", 0),
        "unowned": ring.get("unowned", 0),
        "pending": ring.get("pending", 0),
        "heartbeat_timeout": timeout,
        "conductors": [by_name[name] for name in sorted(by_name)],
    }


class ClusterFeed:
    """Polls ``cluster`` (the membership service) for its listeners."""

    log = Logger()

    def __init__(
        self, cluster: Any, clock: Any, interval: float = 0.5, ring_refresh: float = 5.0
    ) -> None:
        self._cluster = cluster
        self._clock = clock
        self._interval = interval
        self._ring_refresh = ring_refresh
        # The last ring report: (the generation this conductor had seen, when, report).
        self._ring: tuple[int | None, float, dict[str, Any]] | None = None
        self._listeners: list[Listener] = []
        # Ticks ten times a second: a poll is due every ``interval``, and at once when
        # this conductor has seen a new generation (an in-memory check).
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._polling: Deferred[Any] | None = None
        self._next_poll = float("-inf")
        self._polled_generation: int | None = None
        self.latest: dict[str, Any] | None = None

    def snapshot(self) -> Deferred[dict[str, Any]]:
        """The cluster now (one poll)."""
        return gatherResults(
            [self._cluster.conductors(), self._ring_report()], consumeErrors=True
        ).addCallback(lambda both: merge(both[0], both[1], self._cluster.heartbeat_timeout))

    def _ring_report(self) -> Deferred[dict[str, Any]]:
        state = getattr(self._cluster, "state", None)
        seen = getattr(state, "generation", None)
        now = self._clock.seconds()
        if self._ring is not None:
            generation, at, report = self._ring
            if generation == seen and now - at < self._ring_refresh:
                return succeed(report)

        def keep(report: dict[str, Any]) -> dict[str, Any]:
            self._ring = (seen, now, report)
            return report

        d: Deferred[dict[str, Any]] = self._cluster.ring()
        return d.addCallback(keep)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(snapshot)`` now (when one is known) and after every poll;
        returns the function that stops it."""
        self._listeners.append(listener)
        if self.latest is not None:
            listener(self.latest)
        if not self._loop.running:
            self._next_poll = float("-inf")
            self._loop.start(min(TICK, self._interval), now=True)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
            if not self._listeners and self._loop.running:
                self._loop.stop()
                self.latest = None  # stale by the time someone watches again

        return unsubscribe

    def _seen_generation(self) -> int | None:
        return getattr(getattr(self._cluster, "state", None), "generation", None)

    def _tick(self) -> None:
        now = self._clock.seconds()
        if now >= self._next_poll or self._seen_generation() != self._polled_generation:
            self._next_poll = now + self._interval - 1e-9
            self._polled_generation = self._seen_generation()
            self._poll()

    def _poll(self) -> None:
        # Never raises (a LoopingCall that fails stops); one poll at a time.
        if self._polling is not None:
            return
        self._polling = self.snapshot()
        self._polling.addCallbacks(self._publish, self._failed)

    def _publish(self, snapshot: dict[str, Any]) -> None:
        self._polling = None
        self.latest = snapshot
        for listener in list(self._listeners):
            try:
                listener(snapshot)
            except Exception:
                # A browser that left mid-write: drop it, keep the others.
                self.log.failure("console listener failed")
                self._listeners.remove(listener)

    def _failed(self, failure: Failure) -> None:
        self._polling = None
        self.log.warn("console: cluster poll failed: {error}", error=failure.value)
