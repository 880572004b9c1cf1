# -*- test-case-name: tests.dhcp.test_dhcp_service -*-
"""The interface every DHCP provider implements, and its error."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from metadatad.core.bootmapping import BootMapping

__all__ = ["Provider", "PushError"]


class PushError(Exception):
    """A push that failed.  ``permanent``: retrying the same mapping cannot help (a
    4xx from Neutron, a newer owner's file); otherwise it is retried with backoff."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class Provider(Protocol):
    """Pushes mappings to a network service.

    ``push(mapping, previous, generation)`` returns a Deferred that fires when the
    network service has the mapping, or fails with :class:`PushError` (any other
    exception is a bug, recorded as a retryable failure).  ``previous`` is what was last
    pushed for the node (None: never, or unknown); ``generation`` is the fencing
    generation of the claim the push is made under.  Pushes are idempotent: after a
    crash the same mapping may be pushed again.

    Optional: ``push_many(items)`` with ``(mapping, previous, generation)`` items,
    firing with one outcome per item (None or its :class:`PushError`).  The pusher
    then hands it a whole batch at once (the dnsmasq provider writes many nodes per
    thread job) instead of calling ``push`` ``concurrency`` at a time.
    """

    name: str

    def push(
        self, mapping: BootMapping, previous: BootMapping | None, generation: int
    ) -> Deferred[None]: ...

    def start(self) -> None:
        """Acquire resources (threads, connection pools)."""

    def flush(self) -> Deferred[None] | None:
        """Make every push done so far durable; the pusher calls it before recording
        a batch as pushed (optional: providers without it push durably)."""

    def stop(self) -> Deferred[None] | None:
        """Release them; in-flight pushes have finished."""
