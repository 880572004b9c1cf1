# -*- test-case-name: tests.db.test_cache -*-
"""In-memory node lookups for the metadata site's hot path.

A fresh entry is answered synchronously (no Deferred, no query).  Concurrent misses
for one key share one query.  Every node write through this process clears the cache;
writes through other conductors are seen within ``ttl`` seconds.  Unknown callers are
remembered for a shorter time, so a new node is found quickly but a flood from an
unknown address does not become a flood of queries.  An entry reloaded after its TTL
keeps the rendered answers of the one it replaces when the stored node is unchanged:
answers are rendered once per node revision, not once per TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.core.records import NodeRecord

NEGATIVE_TTL = 1.0


class CacheEntry:
    """A looked-up node (or None) with its expiry and memoised renderings."""

    __slots__ = ("expires", "memo", "record")

    def __init__(self, record: NodeRecord | None, expires: float) -> None:
        self.record = record
        self.expires = expires
        # Rendered replies by path, valid as long as this entry is.
        self.memo: dict[Any, Any] = {}


class NodeCache:
    """Node lookups by address and by uuid, cached for ``ttl`` seconds."""

    log = Logger()

    def __init__(
        self,
        by_ip: Callable[[str], Deferred[NodeRecord | None]],
        by_uuid: Callable[[str], Deferred[NodeRecord | None]],
        clock: IReactorTime,
        ttl: float,
        max_entries: int = 100_000,
    ) -> None:
        self._loaders = {"ip": by_ip, "uuid": by_uuid}
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
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

    def invalidate(self) -> None:
        """Forget everything, including lookups still in flight."""
        self._entries.clear()
        self._generation += 1

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
            if expired is not None and record is not None and expired.record == record:
                entry.memo = expired.memo
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = entry
        for d in waiting:
            d.callback(entry)
