# -*- test-case-name: tests.web.test_vendordata -*-
"""What stands between the booting machines and a dynamic vendordata target: a cap on
the calls running at once, and the memory of a target that cannot be reached.

- :meth:`TargetGate.turn` waits for one of the target's ``max_calls`` slots, at most
  ``wait`` seconds; then the call is refused (``busy``) rather than queued for ever.
- :meth:`TargetGate.failed` records a failure: one that says the target itself is
  unusable (:data:`TARGET_WIDE_FAILURES`) marks it down for ``failure_ttl`` seconds,
  and :meth:`TargetGate.down` then answers for it without a call.

The clock is Twisted's IReactorTime, passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

# Failure kinds that say the target itself is unusable, not one node's request.
TARGET_WIDE_FAILURES = frozenset({"timeout", "connect", "tls", "auth"})


class TargetGate:
    """Slots and down-marks for a set of named targets."""

    def __init__(
        self, names: Iterable[str], clock: IReactorTime, max_calls: int, failure_ttl: float
    ) -> None:
        self._clock = clock
        self._slots = {name: DeferredSemaphore(max_calls) for name in names}
        self.max_calls = max_calls
        self.failure_ttl = failure_ttl
        # target -> (until, what it failed with)
        self._down: dict[str, tuple[float, Any]] = {}

    def turn(
        self,
        name: str,
        wait: float,
        call: Callable[[], Deferred[Any]],
        busy: Callable[[str], Exception],
    ) -> Deferred[Any]:
        """``call()`` once a slot of ``name`` is free (the slot is held until its
        Deferred fires); fails with ``busy(why)`` if none came free within ``wait``."""
        slots = self._slots[name]
        acquired: Deferred[Any] = slots.acquire()

        def granted(_: Any) -> Deferred[Any]:
            def release(result: Any) -> Any:
                slots.release()
                return result

            return call().addBoth(release)

        if acquired.called:
            return acquired.addCallback(granted)
        timer = self._clock.callLater(wait, acquired.cancel)

        def in_time(result: Any) -> Deferred[Any]:
            timer.cancel()
            return granted(result)

        def too_late(failure: Failure) -> NoReturn:
            failure.trap(CancelledError)
            raise busy(f"{self.max_calls} calls already in flight for {wait:g} s")

        return acquired.addCallbacks(in_time, too_late)

    def down(self, name: str) -> Any:
        """What ``name`` failed with, while it counts as down; else None."""
        found = self._down.get(name)
        if found is None:
            return None
        until, failure = found
        if self._clock.seconds() < until:
            return failure
        del self._down[name]
        return None

    def down_until(self, name: str) -> float:
        """When ``name`` stops counting as down (now if it is not)."""
        found = self._down.get(name)
        return found[0] if found is not None else self._clock.seconds()

    def failed(self, name: str, kind: str, failure: Any) -> float | None:
        """Record a failure of ``kind``; returns until when a failure that is not
        target-wide may be remembered for its entry (None: not at all)."""
        if self.failure_ttl <= 0 or kind == "busy":
            return None
        until = self._clock.seconds() + self.failure_ttl
        if kind in TARGET_WIDE_FAILURES:
            self._down[name] = (until, failure)
            return None
        return until

    def forget(self) -> None:
        """Every target counts as up again (SIGHUP)."""
        self._down.clear()
