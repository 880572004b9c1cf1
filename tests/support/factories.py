"""Node documents for tests (:mod:`metadatad.testing.factories`) and a node cache
whose queries wait."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from metadatad.db.cache import NodeCache
from metadatad.testing.factories import USER_DATA, make_node, node_document

__all__ = ["USER_DATA", "cache_with_pending_queries", "make_node", "node_document"]


def cache_with_pending_queries() -> tuple[NodeCache, list[Deferred[Any]]]:
    """A cache whose queries wait until the test fires them."""
    pending: list[Deferred[Any]] = []

    def slow(key: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    return NodeCache(slow, slow, Clock(), 10, generation=lambda: succeed(0)), pending
