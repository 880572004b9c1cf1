"""Token buckets per caller: pure, driven by ``now``."""

from __future__ import annotations

import pytest

from metadatad.core.ratelimit import RateLimiter, retry_after


def test_burst_then_rate() -> None:
    """A full bucket allows ``burst`` requests at once, then one per 1/rate seconds."""
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)
    assert limiter.take("a", 0.25) == pytest.approx(0.25)
    assert limiter.take("a", 0.5) == 0.0
    assert limiter.take("a", 0.5) == pytest.approx(0.5)


def test_keys_are_independent() -> None:
    """One caller's flood does not slow another."""
    limiter = RateLimiter(rate=1, burst=1)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0


def test_refused_requests_spend_nothing() -> None:
    """Hammering while limited does not push the next allowed request further away."""
    limiter = RateLimiter(rate=1, burst=1)
    limiter.take("a", 0.0)
    for _ in range(100):
        limiter.take("a", 0.5)
    assert limiter.take("a", 1.0) == 0.0


def test_refill_is_capped_at_burst() -> None:
    """A long quiet time gives at most ``burst`` requests."""
    limiter = RateLimiter(rate=10, burst=2)
    limiter.take("a", 0.0)
    assert [limiter.take("a", 1000.0) for _ in range(3)][-1] > 0


def test_clock_going_backwards_neither_refills_nor_crashes() -> None:
    """now earlier than the last request counts as no time passed."""
    limiter = RateLimiter(rate=1, burst=1)
    limiter.take("a", 100.0)
    assert limiter.take("a", 50.0) > 0


def test_zero_rate_means_unlimited() -> None:
    """rate 0 turns limiting off and keeps no state."""
    limiter = RateLimiter(rate=0, burst=1)
    assert all(limiter.take("a", 0.0) == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_memory_is_bounded() -> None:
    """Past max_keys, refilled buckets go first, then the least recently used."""
    limiter = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(1000):
        limiter.take(f"k{i}", float(i) / 1000)
        assert len(limiter) <= 100
    # A recently limited caller is still limited after others came and went.
    limiter = RateLimiter(rate=0.001, burst=1, max_keys=10)
    limiter.take("flooder", 0.0)
    for i in range(5):
        limiter.take(f"k{i}", 0.0)
    assert limiter.take("flooder", 0.0) > 0


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    """Retry-After rounds up and is never 0."""
    assert retry_after(0.01) == "1"
    assert retry_after(1.0) == "1"
    assert retry_after(1.2) == "2"


def test_bad_settings_are_refused() -> None:
    """Negative rates or empty buckets make no sense."""
    with pytest.raises(ValueError):
        RateLimiter(-1, 1)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)
