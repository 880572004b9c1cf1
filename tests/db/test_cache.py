"""The node lookup cache, driven by a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from metadatad.db.cache import MEMO_OVERHEAD_BYTES, NEGATIVE_TTL, CacheEntry, NodeCache
from metadatad.metadata.reply import Reply
from metadatad.testing import MemoryStore
from tests.support.factories import cache_with_pending_queries, make_node


def make_cache(ttl: float = 15.0) -> tuple[NodeCache, MemoryStore, Clock]:
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])
    cache = NodeCache(store.node_by_ip, store.get_node, clock, ttl)
    store.add_change_listener(cache.invalidate)
    return cache, store, clock


def resolve(found: CacheEntry | Deferred[CacheEntry]) -> CacheEntry:
    if isinstance(found, Deferred):
        results: list[Any] = []
        found.addBoth(results.append)
        assert results, "lookup did not fire"
        result = results[0]
        if not isinstance(result, CacheEntry):
            result.raiseException()
        return result
    return found


def test_hit_is_synchronous_and_does_not_query() -> None:
    """After the first lookup, the entry comes back as is, with no query, until the TTL."""
    cache, store, clock = make_cache()
    first = resolve(cache.by_ip("10.0.0.2"))
    assert first.record is not None and first.record.node.uuid == make_node().uuid
    assert store.calls["node_by_ip"] == 1
    clock.advance(14.9)
    assert cache.by_ip("10.0.0.2") is first
    assert store.calls["node_by_ip"] == 1
    clock.advance(0.2)
    assert resolve(cache.by_ip("10.0.0.2")) is not first
    assert store.calls["node_by_ip"] == 2
    assert (cache.hits, cache.misses) == (1, 2)


def test_unknown_callers_are_remembered_briefly() -> None:
    """A miss is cached for NEGATIVE_TTL, not the full TTL."""
    cache, store, clock = make_cache()
    assert resolve(cache.by_ip("10.9.9.9")).record is None
    assert resolve(cache.by_ip("10.9.9.9")).record is None
    assert store.calls["node_by_ip"] == 1
    clock.advance(NEGATIVE_TTL)
    resolve(cache.by_ip("10.9.9.9"))
    assert store.calls["node_by_ip"] == 2


def test_local_write_invalidates() -> None:
    """A write through the store clears the cache at once."""
    cache, store, _ = make_cache()
    assert resolve(cache.by_ip("10.0.0.7")).record is None
    store.upsert_nodes([make_node(5)])
    assert resolve(cache.by_ip("10.0.0.7")).record.node.uuid == make_node(5).uuid


def test_concurrent_misses_share_one_query() -> None:
    """Many lookups while a query is in flight wait for that one query."""
    cache, pending = cache_with_pending_queries()
    waiting = [cache.by_ip("10.0.0.2") for _ in range(100)]
    assert len(pending) == 1
    assert all(isinstance(d, Deferred) for d in waiting)
    pending[0].callback(None)
    entries = {id(resolve(d)) for d in waiting}
    assert len(entries) == 1


def test_invalidation_during_a_query_is_not_undone() -> None:
    """A result that left before an invalidation is handed out but not cached."""
    cache, pending = cache_with_pending_queries()
    first = cache.by_ip("10.0.0.2")
    cache.invalidate()
    pending[0].callback(None)
    resolve(first)
    cache.by_ip("10.0.0.2")
    assert len(pending) == 2


def test_failures_reach_every_waiter_and_are_not_cached() -> None:
    """A failed query fails its waiters; the next lookup queries again."""
    cache, store, _ = make_cache()
    store.repository.available = False
    failed = cache.by_ip("10.0.0.2")
    errors: list[Any] = []
    assert isinstance(failed, Deferred)
    failed.addErrback(errors.append)
    assert errors and errors[0].check(ConnectionError)
    store.repository.available = True
    assert resolve(cache.by_ip("10.0.0.2")).record is not None


def test_zero_ttl_disables_caching() -> None:
    """cache_ttl = 0: every lookup queries."""
    cache, store, _ = make_cache(ttl=0)
    resolve(cache.by_ip("10.0.0.2"))
    resolve(cache.by_ip("10.0.0.2"))
    assert store.calls["node_by_ip"] == 2


def test_size_is_bounded() -> None:
    """The cache never holds more than max_entries entries."""
    clock = Clock()
    cache = NodeCache(lambda ip: succeed(None), lambda u: succeed(None), clock, 10, max_entries=50)
    for i in range(500):
        resolve(cache.by_ip(f"10.1.{i // 250}.{i % 250}"))
    assert len(cache._entries) <= 50


def test_renderings_survive_a_reload_of_the_same_node() -> None:
    """An entry reloaded after the TTL keeps the memo while the node is unchanged; a
    changed node, or a local write, starts an empty one."""
    cache, store, clock = make_cache()
    first = resolve(cache.by_ip("10.0.0.2"))
    first.memo["rendered"] = b"answer"
    clock.advance(16)
    second = resolve(cache.by_ip("10.0.0.2"))
    assert second is not first and store.calls["node_by_ip"] == 2
    assert second.memo == {"rendered": b"answer"}
    # Changed behind the cache's back (another conductor's write): new memo.
    store.repository.upsert_nodes([make_node(hostname="renamed")])
    clock.advance(16)
    third = resolve(cache.by_ip("10.0.0.2"))
    assert third.record is not None and third.record.node.hostname == "renamed"
    assert third.memo == {}
    third.memo["rendered"] = b"renamed"
    store.upsert_nodes([make_node(hostname="renamed-again")])
    assert resolve(cache.by_ip("10.0.0.2")).memo == {}


def answer(size: int) -> Reply:
    return Reply(200, b"x" * size)


def test_one_entrys_memo_is_bounded() -> None:
    """Answers past an entry's memo budget are not memoised (rendered again next time);
    smaller ones still are, and the entry's count says what it holds."""
    cache, _, _ = make_cache()
    cache = NodeCache(
        cache._loaders["ip"],
        cache._loaders["uuid"],
        Clock(),
        15,
        max_entry_memo_bytes=4 * MEMO_OVERHEAD_BYTES,
    )
    entry = resolve(cache.by_ip("10.0.0.2"))
    cache.remember(entry, ("ec2", "latest", "big"), answer(3 * MEMO_OVERHEAD_BYTES + 1))
    assert entry.memo == {} and entry.memo_bytes == 0
    cache.remember(entry, ("ec2", "latest", "a"), answer(MEMO_OVERHEAD_BYTES))
    cache.remember(entry, ("ec2", "latest", "b"), answer(0))
    cache.remember(entry, ("ec2", "latest", "c"), answer(0))
    cache.remember(entry, ("ec2", "latest", "d"), answer(0))
    assert set(entry.memo) == {("ec2", "latest", name) for name in "abc"}
    assert entry.memo_bytes == cache.memo_bytes == 4 * MEMO_OVERHEAD_BYTES


def test_a_nodes_own_user_data_costs_no_copy() -> None:
    """An answer whose body is the node's user data (shared, not copied) counts only its
    overhead."""
    cache, _, _ = make_cache()
    entry = resolve(cache.by_ip("10.0.0.2"))
    assert entry.record is not None and entry.record.node.user_data
    cache.remember(entry, ("ec2", "latest", "user-data"), Reply(200, entry.record.node.user_data))
    assert entry.memo_bytes == MEMO_OVERHEAD_BYTES


def test_all_memos_together_are_bounded() -> None:
    """Past the cache's memo budget every memo is dropped (the records stay cached and
    are answered without a query), and memoising starts again."""
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node(i) for i in range(10)])
    cache = NodeCache(
        store.node_by_ip, store.get_node, clock, 15, max_memo_bytes=5 * MEMO_OVERHEAD_BYTES
    )
    entries = [resolve(cache.by_ip(f"10.0.0.{i + 2}")) for i in range(10)]
    for entry in entries[:5]:
        cache.remember(entry, ("k",), answer(0))
    assert cache.memo_bytes == 5 * MEMO_OVERHEAD_BYTES
    cache.remember(entries[5], ("k",), answer(0))
    assert [len(e.memo) for e in entries[:6]] == [0, 0, 0, 0, 0, 1]
    assert cache.memo_bytes == entries[5].memo_bytes == MEMO_OVERHEAD_BYTES
    assert cache.by_ip("10.0.0.2") is entries[0]
    assert store.calls["node_by_ip"] == 10


def test_memo_count_follows_the_entries() -> None:
    """Dropping entries (a write, the cache full, a changed node on reload) drops their
    bytes from the count; an unchanged node's reload keeps them."""
    cache, store, clock = make_cache()
    entry = resolve(cache.by_ip("10.0.0.2"))
    cache.remember(entry, ("k",), answer(10))
    clock.advance(16)
    assert (
        resolve(cache.by_ip("10.0.0.2")).memo_bytes
        == cache.memo_bytes
        == (MEMO_OVERHEAD_BYTES + 10)
    )
    store.repository.upsert_nodes([make_node(hostname="renamed")])
    clock.advance(16)
    assert resolve(cache.by_ip("10.0.0.2")).memo == {}
    assert cache.memo_bytes == 0
    cache.remember(resolve(cache.by_ip("10.0.0.2")), ("k",), answer(10))
    cache.invalidate()
    assert cache.memo_bytes == 0
    small = NodeCache(store.node_by_ip, store.get_node, clock, 15, max_entries=1)
    cache.remember(resolve(small.by_ip("10.0.0.2")), ("k",), answer(10))
    small.remember(resolve(small.by_ip("10.0.0.2")), ("k",), answer(10))
    resolve(small.by_ip("10.0.0.9"))
    assert small.memo_bytes == 0 and len(small) == 1
