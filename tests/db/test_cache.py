"""The node lookup cache, driven by a fake clock: entries revalidated by one read of
the node generation per interval, memos, bounds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from metadatad.db.cache import (
    MEMO_OVERHEAD_BYTES,
    NEGATIVE_TTL,
    BatchedLookups,
    CacheEntry,
    NodeCache,
)
from metadatad.db.store import NodeRepository, make_engine
from metadatad.metadata.reply import Reply
from metadatad.testing import MemoryStore
from tests.support.factories import cache_with_pending_queries, make_node


def make_cache(ttl: float = 15.0) -> tuple[NodeCache, MemoryStore, Clock]:
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])
    cache = over(store, clock, ttl)
    return cache, store, clock


def over(store: MemoryStore, clock: Clock, ttl: float = 15.0, **kwargs: Any) -> NodeCache:
    """A cache over ``store`` as the daemon builds it (cleared by the store's writes)."""
    return NodeCache.over(store, store.node_by_ip, clock, ttl, **kwargs)


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
    """After the first lookup, the entry comes back as is, with no query, for the
    interval; after it, one read of the generation (unchanged) keeps it another."""
    cache, store, clock = make_cache()
    first = resolve(cache.by_ip("10.0.0.2"))
    assert first.record is not None and first.record.node.uuid == make_node().uuid
    assert store.calls == {"node_generation": 1, "node_by_ip": 1}
    clock.advance(14.9)
    assert cache.by_ip("10.0.0.2") is first
    assert store.calls == {"node_generation": 1, "node_by_ip": 1}
    clock.advance(0.2)
    assert resolve(cache.by_ip("10.0.0.2")) is first
    assert cache.by_ip("10.0.0.2") is first
    assert store.calls == {"node_generation": 2, "node_by_ip": 1}
    assert (cache.hits, cache.misses) == (3, 1)


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
    cache = NodeCache(
        lambda ip: succeed(None),
        lambda u: succeed(None),
        clock,
        10,
        generation=lambda: succeed(0),
        max_entries=50,
    )
    for i in range(500):
        resolve(cache.by_ip(f"10.1.{i // 250}.{i % 250}"))
    assert len(cache._entries) <= 50


def test_renderings_survive_a_reload_of_the_same_node() -> None:
    """An entry reloaded after a changed generation keeps the memo while its node is
    unchanged; a changed node, or a local write, starts an empty one."""
    cache, store, clock = make_cache()
    first = resolve(cache.by_ip("10.0.0.2"))
    first.memo["rendered"] = b"answer"
    # Another node written by another conductor: the generation changes, this node not.
    store.repository.upsert_nodes([make_node(7)])
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
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])
    cache = over(store, Clock(), max_entry_memo_bytes=4 * MEMO_OVERHEAD_BYTES)
    entry = resolve(cache.by_ip("10.0.0.2"))
    cache.remember(entry, ("ec2", "latest", "big"), answer(3 * MEMO_OVERHEAD_BYTES + 1))
    assert entry.memo == {} and entry.memo_bytes == 0
    cache.remember(entry, ("ec2", "latest", "a"), answer(MEMO_OVERHEAD_BYTES))
    cache.remember(entry, ("ec2", "latest", "b"), answer(0))
    cache.remember(entry, ("ec2", "latest", "c"), answer(0))
    cache.remember(entry, ("ec2", "latest", "d"), answer(0))
    assert set(entry.memo) == {("ec2", "latest", name) for name in "abc"}
    assert entry.memo_bytes == cache.memo_bytes == 4 * MEMO_OVERHEAD_BYTES


def test_a_kept_value_counts_the_size_it_is_given() -> None:
    """A derived value (the site keeps a node's meta-data tree) counts the size its
    keeper states, within the same bounds as rendered answers."""
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])
    cache = over(store, Clock(), max_entry_memo_bytes=3 * MEMO_OVERHEAD_BYTES)
    entry = resolve(cache.by_ip("10.0.0.2"))
    tree = {"instance-id": "x"}
    cache.keep(entry, ("ec2-tree", "latest"), tree, 2 * MEMO_OVERHEAD_BYTES + 1)
    assert entry.memo == {} and cache.memo_bytes == 0
    cache.keep(entry, ("ec2-tree", "latest"), tree, MEMO_OVERHEAD_BYTES)
    assert entry.memo == {("ec2-tree", "latest"): tree}
    assert entry.memo_bytes == cache.memo_bytes == 2 * MEMO_OVERHEAD_BYTES


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
    cache = over(store, clock, max_memo_bytes=5 * MEMO_OVERHEAD_BYTES)
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
    store.repository.upsert_nodes([make_node(7)])
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
    small = over(store, clock, max_entries=1)
    cache.remember(resolve(small.by_ip("10.0.0.2")), ("k",), answer(10))
    small.remember(resolve(small.by_ip("10.0.0.2")), ("k",), answer(10))
    resolve(small.by_ip("10.0.0.9"))
    assert small.memo_bytes == 0 and len(small) == 1


# --- one read of the node generation per interval -------------------------------------


def test_unchanged_generation_costs_no_query_per_node() -> None:
    """A hundred cached nodes over ten intervals: one generation read per interval and
    not one node query after the first loads."""
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node(i) for i in range(100)])
    cache = over(store, clock)
    first = [resolve(cache.by_ip(f"10.0.0.{i + 2}")) for i in range(100)]
    for interval in range(10):
        clock.advance(15)
        again = [resolve(cache.by_ip(f"10.0.0.{i + 2}")) for i in range(100)]
        assert all(a is b for a, b in zip(again, first, strict=True))
        assert store.calls == {"node_generation": 2 + interval, "node_by_ip": 100}


def test_another_conductors_write_is_seen_after_the_interval() -> None:
    """A write that bypasses this process (no invalidation) is seen at the first lookup
    after the interval, not before; then every node is reloaded once, on demand."""
    cache, store, clock = make_cache()
    assert resolve(cache.by_ip("10.0.0.2")).record.node.hostname != "renamed"
    store.repository.upsert_nodes([make_node(hostname="renamed")])
    clock.advance(14)
    assert resolve(cache.by_ip("10.0.0.2")).record.node.hostname != "renamed"
    clock.advance(1)
    assert resolve(cache.by_ip("10.0.0.2")).record.node.hostname == "renamed"
    assert resolve(cache.by_uuid(make_node().uuid)).record.node.hostname == "renamed"
    assert store.calls == {"node_generation": 2, "node_by_ip": 2, "get_node": 1}


@pytest.fixture
def two_conductors(database_url: str) -> Iterator[tuple[MemoryStore, NodeRepository]]:
    """This conductor's store and another conductor's repository, one database."""
    ours, theirs = make_engine(database_url, 1), make_engine(database_url, 1)
    # The facade of the fakes over the SQL repository: calls run at once.
    yield MemoryStore(NodeRepository(ours)), NodeRepository(theirs)
    ours.dispose()
    theirs.dispose()


def test_a_write_on_another_conductor_is_seen(two_conductors: Any) -> None:
    """On every backend: each of another conductor's writes reaches the cache after
    the interval; no write, no reload."""
    store, theirs = two_conductors
    theirs.upsert_nodes([make_node(0), make_node(1)])
    clock = Clock()
    cache = over(store, clock)
    uuid = make_node(0).uuid
    first = resolve(cache.by_uuid(uuid))
    clock.advance(15)
    assert resolve(cache.by_uuid(uuid)) is first
    steps = [
        lambda: theirs.set_password(uuid, "pw"),
        lambda: theirs.clear_password(uuid),
        lambda: theirs.upsert_nodes([make_node(0, hostname="renamed")]),
        lambda: theirs.delete_node(uuid),
    ]
    seen = []
    for step in steps:
        step()
        before = resolve(cache.by_uuid(uuid))
        clock.advance(15)
        after = resolve(cache.by_uuid(uuid))
        assert after is not before
        seen.append(after.record)
    assert [r.has_password for r in seen[:2]] == [True, False]
    assert seen[2].node.hostname == "renamed" and seen[3] is None
    assert store.calls["get_node"] == 1 + len(steps)


def test_lookups_during_the_read_wait_for_it() -> None:
    """Lookups arriving while the generation read is in flight (cached nodes, unknown
    ones) wait for that one read; unchanged, the cached ones are answered as they were."""
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node(i) for i in range(5)])
    reads: list[Deferred[int]] = []

    def generation() -> Deferred[int]:
        reads.append(Deferred())
        return reads[-1]

    cache = NodeCache(store.node_by_ip, store.get_node, clock, 15, generation=generation)
    assert isinstance(cache.by_ip("10.0.0.2"), Deferred)
    reads[0].callback(1)
    first = [resolve(cache.by_ip(f"10.0.0.{i + 2}")) for i in range(5)]
    clock.advance(15)
    waiting = [cache.by_ip(f"10.0.0.{i + 2}") for i in range(5)]
    unknown = cache.by_ip("10.0.9.9")
    assert len(reads) == 2
    assert all(isinstance(d, Deferred) and not d.called for d in [*waiting, unknown])
    reads[1].callback(1)
    assert [resolve(d) for d in waiting] == first
    assert resolve(unknown).record is None
    assert store.calls["node_by_ip"] == 6
    assert cache.by_ip("10.0.0.2") is first[0]


def test_a_read_slower_than_the_interval_still_answers() -> None:
    """Lookups that waited for a read are answered from it, even when the interval it
    began is over by the time it returns (no endless re-reading)."""
    clock = Clock()
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])
    reads: list[Deferred[int]] = []

    def generation() -> Deferred[int]:
        reads.append(Deferred())
        return reads[-1]

    cache = NodeCache(store.node_by_ip, store.get_node, clock, 1, generation=generation)
    waiting = cache.by_ip("10.0.0.2")
    clock.advance(5)
    reads[0].callback(3)
    assert resolve(waiting).record is not None
    assert len(reads) == 1


def test_a_local_write_during_the_read_is_not_undone() -> None:
    """A write through this process while a read is in flight: that read does not make
    the cache fresh again, the next lookup reads the generation anew."""
    cache_store = MemoryStore()
    cache_store.repository.upsert_nodes([make_node()])
    clock = Clock()
    reads: list[Deferred[int]] = []

    def generation() -> Deferred[int]:
        reads.append(Deferred())
        return reads[-1]

    cache = NodeCache(
        cache_store.node_by_ip, cache_store.get_node, clock, 15, generation=generation
    )
    cache_store.add_change_listener(cache.invalidate)
    waiting = cache.by_ip("10.0.0.2")
    cache_store.upsert_nodes([make_node(hostname="renamed")])
    reads[0].callback(1)
    assert resolve(waiting).record.node.hostname == "renamed"
    assert isinstance(cache.by_ip("10.0.0.2"), Deferred)
    assert len(reads) == 2


def test_a_failed_read_reloads_as_asked_and_logs_once() -> None:
    """While the generation cannot be read, each interval every node is reloaded when
    next asked for (as if its entry had expired), one warning says so, and lookups
    never hang; once it can be read again, an unchanged generation reloads nothing."""
    cache, store, clock = make_cache()
    events: list[dict[str, Any]] = []
    cache.log = Logger(observer=events.append)  # type: ignore[misc]
    first = resolve(cache.by_ip("10.0.0.2"))
    first.memo["rendered"] = b"answer"
    broken = {"on": True}
    real = store.repository.node_generation

    def node_generation() -> int:
        if broken["on"]:
            raise ConnectionError("generation unreadable")
        return real()

    store.repository.node_generation = node_generation  # type: ignore[method-assign]
    for interval in range(3):
        clock.advance(15)
        entry = resolve(cache.by_ip("10.0.0.2"))
        assert entry is not first and entry.memo == {"rendered": b"answer"}
        assert cache.by_ip("10.0.0.2") is entry
        assert store.calls["node_by_ip"] == 2 + interval
    assert [e["log_level"].name for e in events] == ["warn"]
    assert "generation unreadable" in str(events[0]["error"])
    broken["on"] = False
    clock.advance(15)
    settled = resolve(cache.by_ip("10.0.0.2"))
    clock.advance(15)
    assert resolve(cache.by_ip("10.0.0.2")) is settled
    assert [e["log_level"].name for e in events] == ["warn", "info"]


def test_a_reader_that_raises_does_not_wedge_the_cache() -> None:
    """A generation reader raising instead of failing its Deferred: lookups still end."""
    store = MemoryStore()
    store.repository.upsert_nodes([make_node()])

    def generation() -> Deferred[int]:
        raise RuntimeError("broken reader")

    cache = NodeCache(store.node_by_ip, store.get_node, Clock(), 15, generation=generation)
    cache.log = Logger(observer=lambda event: None)  # type: ignore[misc]
    assert resolve(cache.by_ip("10.0.0.2")).record is not None
    assert resolve(cache.by_ip("10.0.0.2")).record is not None


def test_unknown_callers_do_not_wait_for_the_generation() -> None:
    """A remembered unknown caller is answered at once even when the interval is over
    (its own short expiry applies), with no generation read."""
    cache, store, clock = make_cache()
    resolve(cache.by_ip("10.0.0.2"))
    clock.advance(14.5)
    unknown = resolve(cache.by_ip("10.9.9.9"))
    clock.advance(0.7)
    assert cache.by_ip("10.9.9.9") is unknown
    assert store.calls == {"node_generation": 1, "node_by_ip": 2}


def test_zero_ttl_reads_no_generation() -> None:
    """cache_ttl = 0: nothing cached, so nothing to revalidate."""
    cache, store, _ = make_cache(ttl=0)
    resolve(cache.by_ip("10.0.0.2"))
    resolve(cache.by_uuid(make_node().uuid))
    assert "node_generation" not in store.calls


class HeldQueries:
    """A many-address loader whose queries wait until the test answers them."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self._answers: list[Deferred[Any]] = []

    def __call__(self, ips: list[str]) -> Deferred[Any]:
        self.asked.append(ips)
        d: Deferred[Any] = Deferred()
        self._answers.append(d)
        return d

    @property
    def running(self) -> bool:
        return bool(self._answers)

    def answer(self, found: Any) -> None:
        self._answers.pop(0).callback(found)

    def answer_last(self, found: Any) -> None:
        self._answers.pop().callback(found)

    def fail(self, error: Exception) -> None:
        self._answers.pop(0).errback(error)


def test_batched_lookups_send_the_first_alone_and_the_rest_together() -> None:
    """A lookup while no query runs is sent at once; those asked for meanwhile wait for
    it and go in one query (an address asked twice, once), never in one already sent:
    an address asked again while its query runs goes in the next, with that query's
    answer; each lookup gets its address's node, or None."""
    queries = HeldQueries()
    lookups = BatchedLookups(queries, concurrency=1)
    first = lookups("10.0.0.1")
    assert queries.asked == [["10.0.0.1"]]
    later = [lookups(ip) for ip in ("10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.1")]
    assert queries.asked == [["10.0.0.1"]]
    a, b, moved = make_node(0), make_node(1), make_node(2)
    queries.answer({"10.0.0.1": a})
    assert queries.asked == [["10.0.0.1"], ["10.0.0.2", "10.0.0.3", "10.0.0.1"]]
    assert resolve_value(first) is a
    assert not later[0].called
    queries.answer({"10.0.0.2": b, "10.0.0.1": moved})
    assert [resolve_value(d) for d in later] == [b, None, b, moved]
    assert lookups.queries == 2
    lookups("10.0.0.4")
    assert queries.asked[-1] == ["10.0.0.4"]


def test_batched_lookups_run_up_to_concurrency_queries_at_once() -> None:
    """Two queries may run (the default): the first two lookups go alone, the rest wait
    for either; one slow query does not hold the others up."""
    queries = HeldQueries()
    lookups = BatchedLookups(queries)
    slow, quick = lookups("10.0.0.1"), lookups("10.0.0.2")
    waiting = [lookups(f"10.0.1.{i}") for i in range(3)]
    assert queries.asked == [["10.0.0.1"], ["10.0.0.2"]]
    queries.answer_last({})
    assert resolve_value(quick) is None and not slow.called
    assert queries.asked[-1] == ["10.0.1.0", "10.0.1.1", "10.0.1.2"]
    queries.answer_last({})
    assert [resolve_value(d) for d in waiting] == [None] * 3
    assert not slow.called


def test_batched_lookups_send_at_most_max_batch_addresses_a_query() -> None:
    queries = HeldQueries()
    lookups = BatchedLookups(queries, max_batch=2, concurrency=1)
    waiting = [lookups(f"10.0.0.{i}") for i in range(6)]
    for _ in range(4):
        queries.answer({})
    assert queries.asked == [
        ["10.0.0.0"],
        ["10.0.0.1", "10.0.0.2"],
        ["10.0.0.3", "10.0.0.4"],
        ["10.0.0.5"],
    ]
    assert [resolve_value(d) for d in waiting] == [None] * 6


def test_batched_lookups_fail_every_lookup_of_a_failed_query_only() -> None:
    """A failed query fails each lookup it carried; the next query still goes; a
    loader that raises fails its lookups instead of leaving them waiting."""
    queries = HeldQueries()
    lookups = BatchedLookups(queries, concurrency=1)
    first = lookups("10.0.0.1")
    second, third = lookups("10.0.0.2"), lookups("10.0.0.2")
    queries.fail(ConnectionError("database unreachable"))
    failures: list[Any] = []
    first.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionError)
    node = make_node(0)
    queries.answer({"10.0.0.2": node})
    assert resolve_value(second) is resolve_value(third) is node

    def broken(ips: list[str]) -> Deferred[Any]:
        raise RuntimeError("bug")

    failed = BatchedLookups(broken)("10.0.0.1")
    failed.addErrback(failures.append)
    assert failures[-1].check(RuntimeError)


def test_a_cache_over_batched_lookups_loads_a_burst_in_three_queries() -> None:
    """As the daemon builds it: 100 new callers at once cost three queries (the first
    two callers' alone, then the other 98 together), each caller its own node."""
    store = MemoryStore()
    nodes = [
        make_node(i, ports=[{"mac": f"52:54:00:00:01:{i:02x}", "ip": f"10.2.0.{i}"}])
        for i in range(100)
    ]
    store.repository.upsert_nodes(nodes)
    queries = HeldQueries()
    cache = NodeCache.over(store, BatchedLookups(queries), Clock(), 15)
    found = [cache.by_ip(f"10.2.0.{i}") for i in range(100)]
    answered = 0
    while queries.running:
        queries.answer(store.repository.nodes_by_ip(queries.asked[answered]))
        answered += 1
    assert [len(ips) for ips in queries.asked] == [1, 1, 98]
    assert [resolve(entry).record.node.uuid for entry in found] == [n.uuid for n in nodes]


def resolve_value(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "lookup did not fire"
    return results[0]
