# -*- test-case-name: tests.db.test_cache -*-
"""In-memory node lookups for the metadata site's hot path.

A fresh entry is answered synchronously (no Deferred, no query).  Concurrent misses
for one key share one query.  Every node write through this process clears the cache.
Writes through other conductors are seen within ``ttl`` seconds (plus a query's time):
once per ``ttl`` interval, on the first lookup after it ends, the cache reads the node
generation (one query; every node write on every conductor bumps it), and lookups
arriving meanwhile wait for that one read.  Unchanged, every entry stays fresh for
another interval with no query per node; changed, each entry is reloaded when next
asked for.  A reloaded entry keeps the rendered answers of the one it replaces when the
stored node is unchanged: answers are rendered once per node revision.  A failed
generation read counts as a change (logged once until a read succeeds again; the next
read is an interval later, so an outage costs no more queries than the reloads).
Unknown callers are remembered for ``NEGATIVE_TTL`` each, so a new node is found
quickly but a flood from an unknown address does not become a flood of queries.
``ttl`` 0 caches nothing.

Bounded (docs/configuration.md, "The node cache's memory"): at most ``max_entries``
entries (all dropped when full); each entry's memo at most ``max_entry_memo_bytes``
(answers past it are rendered per request), and the memos of all entries together at
most ``max_memo_bytes`` (all memos dropped when full, the records kept).  A memoised
answer counts its body, unless that is the node's own user data (shared, not copied),
plus ``MEMO_OVERHEAD_BYTES`` for its key, reply and slot.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.core.records import NodeRecord

NEGATIVE_TTL = 1.0
MAX_ENTRIES = 100_000
# One node's answers: cloud-init's whole crawl of a typical node is about 4 KiB; the
# largest node validation accepts would need over 40 MiB for every path of every
# version (bench/memory.py entry).
MAX_ENTRY_MEMO_BYTES = 64 * 1024
MAX_MEMO_BYTES = 256 * 1024 * 1024
# What a memoised answer holds besides its body: key tuple, Reply, body header, dict
# slot (tracemalloc, bench/memory.py entry; key strings are interned).
MEMO_OVERHEAD_BYTES = 256


class WatchedStore(Protocol):
    """A node store a cache can be built over: uuid lookups, the node generation, and
    a listener called on every write through it (a ``Store`` or its fake)."""

    def get_node(self, uuid: str) -> Deferred[NodeRecord | None]: ...

    def node_generation(self) -> Deferred[int]: ...

    def add_change_listener(self, listener: Callable[[], None]) -> None: ...


class BatchedLookups:
    """Single-address lookups (a :class:`NodeCache` loader) answered by many-address
    queries (``load``, the store's ``nodes_by_ip``).  A lookup is sent at once while
    fewer than ``concurrency`` queries run; otherwise it waits with every lookup asked
    for meanwhile, and they go together in the next query (at most ``max_batch``
    addresses), never in one already sent: a query never starts before the lookups it
    answers were asked for, as the cache's revalidation requires.  So a burst of new
    callers costs a few queries instead of one each, nothing waits for a timer, and one
    slow query does not hold every new caller up.  Measured in a boot storm (1,000
    machines, SQLite, one process): with a query per caller, queued on the store's
    threads, a machine's first request waited 240 ms (median) to 410 ms for its lookup."""

    def __init__(
        self,
        load: Callable[[list[str]], Deferred[dict[str, NodeRecord]]],
        *,
        max_batch: int = 500,
        concurrency: int = 2,
    ) -> None:
        self._load = load
        self._max_batch = max_batch
        self._concurrency = concurrency
        # Lookups not yet sent, by address (dicts keep order: first asked, first sent).
        self._pending: dict[str, list[Deferred[NodeRecord | None]]] = {}
        self._running = 0
        self.queries = 0

    def __call__(self, ip: str) -> Deferred[NodeRecord | None]:
        """The node with a port at ``ip``, or None."""
        result: Deferred[NodeRecord | None] = Deferred()
        waiting = self._pending.get(ip)
        if waiting is None:
            self._pending[ip] = [result]
        else:
            waiting.append(result)
        if self._running < self._concurrency:
            self._send()
        return result

    def _send(self) -> None:
        batch = {}
        for ip in list(itertools.islice(self._pending, self._max_batch)):
            batch[ip] = self._pending.pop(ip)
        self._running += 1
        self.queries += 1
        # maybeDeferred: a loader that raises must not leave the lookups waiting forever.
        maybeDeferred(self._load, list(batch)).addBoth(self._answered, batch)

    def _answered(
        self,
        found: Mapping[str, NodeRecord] | Failure,
        batch: dict[str, list[Deferred[NodeRecord | None]]],
    ) -> None:
        self._running -= 1
        # Answered first: a lookup asked for by an answer's callbacks joins the next query.
        for ip, waiting in batch.items():
            for d in waiting:
                if isinstance(found, Failure):
                    d.errback(found)
                else:
                    d.callback(found.get(ip))
        if self._pending and self._running < self._concurrency:
            self._send()


class CacheEntry:
    """A looked-up node (or None) with its expiry and memoised renderings.

    A found node's entry is fresh while its ``epoch`` is the cache's (and the cache's
    interval runs); an unknown caller's until ``expires``."""

    __slots__ = ("epoch", "expires", "memo", "memo_bytes", "record")

    def __init__(self, record: NodeRecord | None, expires: float, epoch: int = 0) -> None:
        self.record = record
        self.expires = expires
        self.epoch = epoch
        # Rendered replies by path, valid as long as this entry is; filled through
        # NodeCache.remember, which keeps it within its bounds.
        self.memo: dict[Any, Any] = {}
        self.memo_bytes = 0


class NodeCache:
    """Node lookups by address and by uuid, revalidated every ``ttl`` seconds with one
    read of ``generation()`` (the store's ``node_generation``)."""

    log = Logger()

    def __init__(
        self,
        by_ip: Callable[[str], Deferred[NodeRecord | None]],
        by_uuid: Callable[[str], Deferred[NodeRecord | None]],
        clock: IReactorTime,
        ttl: float,
        *,
        generation: Callable[[], Deferred[int]],
        max_entries: int = MAX_ENTRIES,
        max_entry_memo_bytes: int = MAX_ENTRY_MEMO_BYTES,
        max_memo_bytes: int = MAX_MEMO_BYTES,
    ) -> None:
        self._loaders = {"ip": by_ip, "uuid": by_uuid}
        self._read_generation = generation
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_entry_memo = max_entry_memo_bytes
        self._max_memo = max_memo_bytes
        # The memo bytes of every entry that can still grow: an entry dropped while a
        # request holds it may add to this count, never subtract (an overestimate).
        self.memo_bytes = 0
        self._entries: dict[tuple[str, str], CacheEntry] = {}
        self._waiting: dict[tuple[str, str], list[Deferred[CacheEntry]]] = {}
        # Found nodes' entries of this epoch are fresh until ``_fresh_until``; a changed
        # generation or a local write starts a new epoch (older entries are stale, kept
        # only to pass their memo on), and a load is cached only if no new epoch began
        # while it ran.  ``_known`` is the generation last read: every load of this
        # epoch started after that read, so the next read equal to it proves them current.
        self._epoch = 0
        self._known: int | None = None
        self._fresh_until = float("-inf")
        # Lookups waiting for the generation read in flight (None: none in flight).
        self._checking: list[tuple[tuple[str, str], Deferred[CacheEntry]]] | None = None
        self._check_failing = False
        self.hits = 0
        self.misses = 0

    @classmethod
    def over(
        cls,
        store: WatchedStore,
        by_address: Callable[[str], Deferred[NodeRecord | None]],
        clock: IReactorTime,
        ttl: float,
        **bounds: int,
    ) -> NodeCache:
        """A cache of ``store``'s nodes found by ``by_address`` (a port's IP or MAC) and
        by uuid, revalidated with the store's generation and cleared by its writes."""
        cache = cls(
            by_address, store.get_node, clock, ttl, generation=store.node_generation, **bounds
        )
        store.add_change_listener(cache.invalidate)
        return cache

    def by_ip(self, ip: str) -> CacheEntry | Deferred[CacheEntry]:
        """The entry for the node with port address ``ip``."""
        return self._get(("ip", ip))

    def by_uuid(self, uuid: str) -> CacheEntry | Deferred[CacheEntry]:
        """The entry for the node ``uuid``."""
        return self._get(("uuid", uuid))

    def __len__(self) -> int:
        return len(self._entries)

    def remember(
        self, entry: CacheEntry, key: tuple[str, ...], reply: Any, *, stored: Any = None
    ) -> None:
        """Memoise ``reply`` (a :class:`~metadatad.metadata.reply.Reply`) as ``entry``'s
        answer to ``key`` if the bounds allow; otherwise it is rendered again next time.
        ``stored``, when given, is kept in its place (a form of the same bytes)."""
        body = reply.body
        record = entry.record
        shared = record is not None and body is record.node.user_data
        self.keep(entry, key, reply if stored is None else stored, 0 if shared else len(body))

    def keep(self, entry: CacheEntry, key: tuple[str, ...], value: Any, size: int) -> None:
        """Memoise ``value``, which holds about ``size`` bytes, under ``key`` in ``entry``
        if the bounds allow (a derived form of the node, not only rendered answers)."""
        cost = MEMO_OVERHEAD_BYTES + size
        if entry.memo_bytes + cost > self._max_entry_memo:
            return
        if self.memo_bytes + cost > self._max_memo:
            self._forget_memos()
        # Interned: the same few path names in every entry's keys are stored once.
        entry.memo[tuple(map(sys.intern, key))] = value
        entry.memo_bytes += cost
        self.memo_bytes += cost

    def invalidate(self) -> None:
        """Forget everything, including lookups still in flight; the next lookup reads
        the generation again (it includes the write that called this)."""
        self._entries.clear()
        self.memo_bytes = 0
        self._epoch += 1
        self._fresh_until = float("-inf")

    def _forget_memos(self) -> None:
        self.log.info(
            "node cache: {bytes} bytes of rendered answers in {entries} entries, forgetting them",
            bytes=self.memo_bytes,
            entries=len(self._entries),
        )
        for entry in self._entries.values():
            entry.memo = {}
            entry.memo_bytes = 0
        self.memo_bytes = 0

    def _get(
        self, key: tuple[str, str], checked: bool = False
    ) -> CacheEntry | Deferred[CacheEntry]:
        # ``checked``: a lookup that waited for a generation read, answered with that
        # read's outcome even if the interval is over again (a read slower than ttl).
        now = self._clock.seconds()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.record is None:
                if entry.expires > now:
                    self.hits += 1
                    return entry
            elif entry.epoch == self._epoch and (checked or now < self._fresh_until):
                self.hits += 1
                return entry
        if not checked and self._ttl > 0 and now >= self._fresh_until:
            return self._after_check(key)
        self.misses += 1
        waiting = self._waiting.get(key)
        result: Deferred[CacheEntry] = Deferred()
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[key] = [result]
        epoch = self._epoch
        kind, value = key
        self._loaders[kind](value).addBoth(self._loaded, key, epoch)
        return result

    def _after_check(self, key: tuple[str, str]) -> Deferred[CacheEntry]:
        result: Deferred[CacheEntry] = Deferred()
        if self._checking is not None:
            self._checking.append((key, result))
            return result
        self._checking = [(key, result)]
        # Before the read is sent: a write committed after it is seen a ttl from now.
        started = self._clock.seconds()
        # maybeDeferred: a reader that raises must not leave the lookups waiting forever.
        maybeDeferred(self._read_generation).addBoth(self._checked, started, self._epoch)
        return result

    def _checked(self, generation: Any, started: float, epoch: int) -> None:
        waiting, self._checking = self._checking or [], None
        if isinstance(generation, Failure):
            if not self._check_failing:
                self._check_failing = True
                self.log.warn(
                    "node cache: cannot read the node generation, reloading nodes as they "
                    "are asked for until it can be read: {error}",
                    error=generation.value,
                )
            # Like a change; ``_known`` stays the last generation read.
            changed = True
        else:
            if self._check_failing:
                self._check_failing = False
                self.log.info("node cache: the node generation can be read again")
            changed = generation != self._known
            self._known = generation
        # A local write during the read (a new epoch) left the cache to be checked again.
        if epoch == self._epoch:
            if changed:
                self._epoch += 1
            self._fresh_until = started + self._ttl
        for key, d in waiting:
            found = self._get(key, checked=True)
            if isinstance(found, Deferred):
                found.chainDeferred(d)
            else:
                d.callback(found)

    def _loaded(self, record: Any, key: tuple[str, str], epoch: int) -> None:
        waiting = self._waiting.pop(key)
        if isinstance(record, Failure):
            # A failed query: every waiter gets the failure, nothing is cached.
            for d in waiting:
                d.errback(record)
            return
        if record is None:
            ttl = min(self._ttl, NEGATIVE_TTL)
            entry = CacheEntry(None, self._clock.seconds() + ttl, epoch)
        else:
            ttl = self._ttl
            entry = CacheEntry(record, float("inf"), epoch)
        if ttl > 0 and epoch == self._epoch:
            if len(self._entries) >= self._max_entries and key not in self._entries:
                self._entries.clear()
                self.memo_bytes = 0
            # Only a stale entry survives here (a current one would not have been loaded
            # again; invalidate() drops every entry).
            stale = self._entries.get(key)
            if stale is not None:
                if record is not None and stale.record == record:
                    entry.memo, entry.memo_bytes = stale.memo, stale.memo_bytes
                else:
                    self.memo_bytes -= stale.memo_bytes
            self._entries[key] = entry
        for d in waiting:
            d.callback(entry)
