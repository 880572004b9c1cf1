"""A DHCP provider for tests that records what it is asked to push."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

__all__ = ["RecordingProvider"]


class RecordingProvider:
    """A DHCP provider that records pushes (``pushes``: ``(mapping, previous,
    generation)``) and answers from ``outcomes``: a queue of None (success),
    :class:`~metadatad.dhcp.provider.PushError` instances (failure) or ``"hold"``
    (an unfired Deferred, kept in ``held`` for the test to fire); success when empty."""

    name = "recording"

    def __init__(self) -> None:
        self.pushes: list[tuple[Any, Any, int]] = []
        self.outcomes: list[Any] = []
        self.held: list[Deferred[None]] = []
        self.started = False
        self.stopped = False
        self.flushes = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def flush(self) -> None:
        self.flushes += 1

    def push(self, mapping: Any, previous: Any, generation: int) -> Deferred[None]:
        self.pushes.append((mapping, previous, generation))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome == "hold":
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(None)

    def pushed_uuids(self) -> list[str]:
        """The node uuids pushed, in order."""
        return [mapping.node_uuid for mapping, _, _ in self.pushes]
