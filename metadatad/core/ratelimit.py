# -*- test-case-name: tests.core.test_ratelimit -*-
"""Token buckets per caller: ``rate`` requests a second, bursts up to ``burst``.

Pure: :meth:`RateLimiter.take` takes ``now``.  Memory is bounded: past ``max_keys``
buckets, the ones that have refilled (which behave exactly like a new bucket) are
dropped, then the least recently used, down to 90% of ``max_keys``.
"""

from __future__ import annotations

import math


class RateLimiter:
    """Per-key token buckets.  ``rate = 0`` turns limiting off."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        # key -> (tokens left, time of that count); dicts keep insertion order.
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if allowed, else the seconds to
        wait until a token is available (nothing is spent then)."""
        if self.rate == 0:
            return 0.0
        buckets = self._buckets
        tokens, then = buckets.pop(key, (self.burst, now))
        # A clock that went backwards refills nothing (and never drains either).
        if now > then:
            tokens += (now - then) * self.rate
        tokens = min(tokens, self.burst)
        if tokens >= 1.0:
            buckets[key] = (tokens - 1.0, now)
            if len(buckets) > self._max_keys:
                self._bound(now)
            return 0.0
        buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _bound(self, now: float) -> None:
        full = [
            key
            for key, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        # Down to 90%: the scan above then runs once per many new keys, not per request.
        while len(self._buckets) > self._max_keys * 0.9:
            del self._buckets[next(iter(self._buckets))]


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
