# -*- test-case-name: tests.tftp.test_tftp_hub -*-
"""One reactor reader for every TFTP transfer socket.

The reactor wraps every read event in ``log.callWithLogger`` (a logging context set
up and torn down per event) and ``_doReadOrWrite``.  For a lock-step transfer that
is per packet, and profiles of the daemon showed that wrapping as about a third of
its Python time on the per-block path.  :class:`ReaderHub` keeps the transfer
sockets in an epoll set of its own and registers only that set's descriptor with the
reactor: one wrapped event per reactor wake-up, however many transfers are ready,
then each ready transfer's ``doRead`` is called directly (one ``epoll_wait(0)`` extra).

A reactor iteration costs more than the hub's own dispatch, so after a wake-up the
hub keeps serving its sockets for up to ``budget`` seconds (2 ms by default),
waiting in its own epoll set for the next ACKs, and returns to the reactor when the
budget is spent or when no transfer had anything for ``idle`` (1 ms, epoll's
granularity).  A lock-step transfer then costs one ``epoll_wait`` per block instead
of a reactor iteration per block.  The price is bounded: the rest of the daemon
(HTTP, new TFTP requests, timers, database results) waits at most ``budget +
idle`` for its next turn, and gets one between every two hub rounds.

It offers the reactor's ``addReader``/``removeReader``, so the transfer code does not
know whether it is registered with the hub or directly with a (test) reactor.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["ReaderHub"]

_MAX_EVENTS = 256  # per wake-up; the rest stay ready for the next one (level-triggered)


@implementer(IReadDescriptor)
class ReaderHub:
    """Readers (``fileno()``, ``doRead()``, ``connectionLost()``) multiplexed behind
    one epoll descriptor that is itself a reader of ``reactor``."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        *,
        budget: float = 0.002,
        idle: float = 0.001,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reactor = reactor
        self._epoll = select.epoll()
        self._readers: dict[int, Any] = {}
        self._registered = False
        self._budget = budget
        self._idle = idle
        self._monotonic = monotonic

    def fileno(self) -> int:
        return self._epoll.fileno()

    def logPrefix(self) -> str:
        return "tftp-transfers"

    def addReader(self, reader: Any) -> None:
        """Watch ``reader`` for input (like ``IReactorFDSet.addReader``)."""
        fd = reader.fileno()
        if fd in self._readers:
            return
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = reader
        if not self._registered:
            self._registered = True
            self._reactor.addReader(self)

    def removeReader(self, reader: Any) -> None:
        """Stop watching ``reader``; call before closing its descriptor."""
        fd = reader.fileno()
        if self._readers.get(fd) is not reader:
            return
        del self._readers[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped it from the set
        if not self._readers and self._registered:
            # Idle: nothing for the reactor to watch (and no stray wake-ups).
            self._registered = False
            self._reactor.removeReader(self)

    def getReaders(self) -> list[Any]:
        return list(self._readers.values())

    def doRead(self) -> None:
        """Dispatch the ready readers, then keep at it (see the module docstring)
        while the budget lasts and there is something to do."""
        poll = self._epoll.poll
        events = poll(0, _MAX_EVENTS)
        if self._budget <= 0:
            self._dispatch(events)
            return
        now = self._monotonic
        end = now() + self._budget
        idle = self._idle
        while events:
            self._dispatch(events)
            if not self._readers:
                return
            left = end - now()
            if left <= 0:
                return
            events = poll(min(left, idle), _MAX_EVENTS)

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        """Call each ready reader once.  A reader that raises is a bug: it is logged
        and disconnected alone, so one transfer cannot take the others down (an
        exception escaping here would make the reactor drop the whole hub)."""
        readers = self._readers
        for fd, _events in events:
            reader = readers.get(fd)
            if reader is None:
                continue
            try:
                reader.doRead()
            except Exception:
                failure = Failure()
                self.log.failure("TFTP transfer reader failed", failure)
                self.removeReader(reader)
                try:
                    reader.connectionLost(failure)
                except Exception:
                    self.log.failure("TFTP transfer cleanup failed")

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the hub (shutdown): tell every reader."""
        self._registered = False
        readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            try:
                self._epoll.unregister(reader.fileno())
            except (OSError, ValueError):
                pass
            try:
                reader.connectionLost(reason)
            except Exception:
                self.log.failure("TFTP transfer cleanup failed")

    def close(self) -> None:
        """Release the epoll descriptor (the hub must be empty)."""
        self._epoll.close()
