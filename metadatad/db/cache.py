# -*- test-case-name: tests.db.test_cache -*-
"""In-memory node lookups for the metadata site's hot path.

A fresh entry is answered synchronously (no Deferred, no query).  Concurrent misses
for one key share one query.  Every node write through this process clears the cache;
writes through other conductors are seen within ``ttl`` seconds.  Unknown callers are
remembered for a shorter time, so a new node is found quickly but a flood from an
unknown address does not become a flood of queries.  An entry reloaded after its TTL
keeps the rendered answers of the one it replaces when the stored node is unchanged:
answers are rendered once per node revision, not once per TTL.

Bounded (docs/configuration.md, "The node cache's memory"): at most ``max_entries``
entries (all dropped when full); each entry's memo at most ``max_entry_memo_bytes``
(answers past it are rendered per request), and the memos of all entries together at
most ``max_memo_bytes`` (all memos dropped when full, the records kept).  A memoised
answer counts its body, unless that is the node's own user data (shared, not copied),
plus ``MEMO_OVERHEAD_BYTES`` for its key, reply and slot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
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


class CacheEntry:
    """A looked-up node (or None) with its expiry and memoised renderings."""

    __slots__ = ("expires", "memo", "memo_bytes", "record")

    def __init__(self, record: NodeRecord | None, expires: float) -> None:
        self.record = record
        self.expires = expires
        # Rendered replies by path, valid as long as this entry is; filled through
        # NodeCache.remember, which keeps it within its bounds.
        self.memo: dict[Any, Any] = {}
        self.memo_bytes = 0


class NodeCache:
    """Node lookups by address and by uuid, cached for ``ttl`` seconds."""

    log = Logger()

    def __init__(
        self,
        by_ip: Callable[[str], Deferred[NodeRecord | None]],
        by_uuid: Callable[[str], Deferred[NodeRecord | None]],
        clock: IReactorTime,
        ttl: float,
        *,
        max_entries: int = MAX_ENTRIES,
        max_entry_memo_bytes: int = MAX_ENTRY_MEMO_BYTES,
        max_memo_bytes: int = MAX_MEMO_BYTES,
    ) -> None:
        self._loaders = {"ip": by_ip, "uuid": by_uuid}
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
        self._generation = 0
        self.hits = 0
        self.misses = 0

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
        cost = MEMO_OVERHEAD_BYTES + (0 if shared else len(body))
        if entry.memo_bytes + cost > self._max_entry_memo:
            return
        if self.memo_bytes + cost > self._max_memo:
            self._forget_memos()
        # Interned: the same few path names in every entry's keys are stored once.
        entry.memo[tuple(map(sys.intern, key))] = reply if stored is None else stored
        entry.memo_bytes += cost
        self.memo_bytes += cost

    def invalidate(self) -> None:
        """Forget everything, including lookups still in flight."""
        self._entries.clear()
        self.memo_bytes = 0
        self._generation += 1

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

    def _get(self, key: tuple[str, str]) -> CacheEntry | Deferred[CacheEntry]:
        entry = self._entries.get(key)
        if entry is not None and entry.expires > self._clock.seconds():
            self.hits += 1
            return entry
        self.misses += 1
        waiting = self._waiting.get(key)
        result: Deferred[CacheEntry] = Deferred()
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[key] = [result]
        generation = self._generation
        kind, value = key
        self._loaders[kind](value).addBoth(self._loaded, key, generation)
        return result

    def _loaded(self, record: Any, key: tuple[str, str], generation: int) -> None:
        waiting = self._waiting.pop(key)
        if isinstance(record, Failure):
            # A failed query: every waiter gets the failure, nothing is cached.
            for d in waiting:
                d.errback(record)
            return
        ttl = self._ttl if record is not None else min(self._ttl, NEGATIVE_TTL)
        entry = CacheEntry(record, self._clock.seconds() + ttl)
        if ttl > 0 and generation == self._generation:
            expired = self._entries.get(key)
            # Only an expired entry survives here: invalidate() drops every entry.
            if expired is not None:
                if record is not None and expired.record == record:
                    entry.memo, entry.memo_bytes = expired.memo, expired.memo_bytes
                else:
                    self.memo_bytes -= expired.memo_bytes
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
                self.memo_bytes = 0
            self._entries[key] = entry
        for d in waiting:
            d.callback(entry)
