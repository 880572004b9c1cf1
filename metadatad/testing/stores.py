"""The node store without threads, for driving the Klein sites with ``StubTreq``."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from metadatad.db.store import NodeMethods, NodeQueries
from metadatad.db.threaded import Facade, run_now
from metadatad.testing.repositories import MemoryNodeRepository

__all__ = ["MemoryStore"]


class MemoryStore(NodeMethods, Facade[NodeQueries]):
    """The :class:`~metadatad.db.store.Store` facade over a repository (by default a
    :class:`MemoryNodeRepository`) with :func:`~metadatad.db.threaded.run_now` as its
    runner: calls run at once and return fired Deferreds; writes call the change
    listeners.  ``calls`` counts the store's own methods by name, so tests can assert
    that the hot path does not query (``run(f, *args)`` is not counted).
    """

    def __init__(self, repository: NodeQueries | None = None) -> None:
        super().__init__(repository if repository is not None else MemoryNodeRepository(), run_now)
        self.calls: dict[str, int] = {}

    def _call(self, name: str, changes: bool, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls[name] = self.calls.get(name, 0) + 1
        return super()._call(name, changes, *args, **kwargs)
