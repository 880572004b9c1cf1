# -*- test-case-name: tests.db.test_threaded -*-
"""Synchronous repositories behind Deferreds: one facade for every store.

A repository (``NodeRepository``, ``PeerRepository`` ...) is plain blocking code the CLI
calls directly.  The daemon reaches it through a :class:`Facade`: ``run(f, *args)``
calls ``f`` through the facade's runner and answers with a Deferred, and
:func:`deferred` declares, in one line, a repository method the facade offers as a
Deferred-returning method of the same signature (mypy sees the types).

The runner is where the work happens: :class:`Threaded` is a Service owning a
ThreadPool (started with the service, stopped and joined with it, so in-flight work
finishes first); the fakes of :mod:`metadatad.testing` use :func:`run_now`, which calls
at once and answers with a fired Deferred.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, Self, TypeVar, overload

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from metadatad.core.records import utc_moment

__all__ = [
    "Batch",
    "BatchedWriter",
    "Facade",
    "Runner",
    "Threaded",
    "deferred",
    "private_pool",
    "run_now",
]

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")


class Runner(Protocol):
    """Calls ``f(*args, **kwargs)`` somewhere (a threadpool; at once in tests) and
    answers on the reactor thread."""

    def __call__(self, f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]: ...


def run_now(f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
    """Call ``f`` at once: a fired Deferred with its result or its exception."""
    try:
        return succeed(f(*args, **kwargs))
    except Exception:
        return fail()


def private_pool(
    reactor: Any, name: str, size: int = 2
) -> tuple[ThreadPool, Callable[..., Deferred[Any]]]:
    """A threadpool of a service's own (started and stopped by that service) and a
    ``run(f, *args)`` that calls ``f`` on it and answers on the reactor thread."""
    pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f, *args)

    return pool, run


class Facade(Generic[R]):
    """``repository``'s methods as Deferreds, called through ``run``.

    Subclasses list the methods they offer with :func:`deferred`; a method declared
    with ``changes=True`` calls every change listener (on the reactor thread) after
    it succeeded.
    """

    def __init__(self, repository: R, run: Runner) -> None:
        self.repository = repository
        self._runner = run
        self._change_listeners: list[Callable[[], None]] = []

    def run(self, f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run a synchronous ``f`` (of this or another repository) on this runner."""
        return self._runner(f, *args, **kwargs)

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on the reactor thread after every write declared with
        ``changes=True``."""
        self._change_listeners.append(listener)

    def _changed(self, result: T) -> T:
        for listener in self._change_listeners:
            listener()
        return result

    def _call(self, name: str, changes: bool, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d = self._runner(getattr(self.repository, name), *args, **kwargs)
        if changes:
            d.addCallback(self._changed)
        return d


class deferred(Generic[P, T]):
    """A repository method offered by a :class:`Facade` as a method returning a
    Deferred, with the same parameters: ``get_node = deferred(NodeQueries.get_node)``.

    The facade's repository is called by the method's name, so any repository
    satisfying the protocol the method comes from will do (the SQL one, a fake).
    """

    def __init__(self, method: Callable[Concatenate[Any, P], T], *, changes: bool = False) -> None:
        self._name = method.__name__
        self._attribute = method.__name__
        self._changes = changes
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._attribute = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, instance: Facade[Any], owner: type[Any]) -> Callable[P, Deferred[T]]: ...

    def __get__(self, instance: Facade[Any] | None, owner: type[Any]) -> Any:
        if instance is None:
            return self
        # Made once per facade and kept on it: the same object at every access (the
        # peer routes key shared reads by the method's name), and no descriptor call
        # on the next ones.
        method = functools.partial(instance._call, self._name, self._changes)
        method.__name__ = self._name  # type: ignore[attr-defined]
        method.__doc__ = self.__doc__
        instance.__dict__[self._attribute] = method
        return method


class Threaded(Facade[R], Service):
    """A :class:`Facade` whose runner is a ThreadPool this service owns.

    The pool starts with the service and is stopped (its threads joined: in-flight
    work finishes first) when the service stops.  Add the service to the daemon's
    MultiService before the services that use it: it then starts first and stops last.
    ``run`` replaces the pool (tests: :func:`run_now`).
    """

    def __init__(
        self,
        repository: R,
        reactor: Any,
        *,
        pool_name: str,
        size: int = 1,
        run: Runner | None = None,
    ) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=size, name=pool_name)
        super().__init__(repository, run or self._in_pool)

    def _in_pool(self, f: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stop_pool()
        return None

    def _stop_pool(self) -> None:
        # Joins the worker threads: in-flight work finishes first.
        self._pool.stop()


#: How often a :class:`BatchedWriter` deletes rows past its retention.
PRUNE_INTERVAL = 3600.0


@attrs.frozen
class Batch:
    """A batch taken from a :class:`BatchedWriter`'s buffer: ``write(*args)`` runs on
    the pool; ``restore()`` puts the batch back after a failed write."""

    write: Callable[..., Any]
    args: tuple[Any, ...]
    count: int
    restore: Callable[[], None]


class Prunable(Protocol):
    """A repository whose old rows can be deleted."""

    def prune(self, before: datetime) -> int: ...


W = TypeVar("W", bound=Prunable)


class BatchedWriter(Threaded[W]):
    """A :class:`Threaded` store that buffers what happens in memory and writes it in
    batches every ``flush_interval`` seconds, one batch at a time, keeping a batch that
    failed for the next try; rows older than ``retention_days`` are pruned hourly
    (``repository.prune(before)``).  Stopping writes the last batch, then stops the pool.

    Subclasses buffer as they like and say how to take a batch (:meth:`_take_batch`).
    """

    log = Logger()
    #: What the rows are, in log lines ("boot events").
    what = "rows"

    def __init__(
        self,
        repository: W,
        reactor: Any,
        *,
        pool_name: str,
        flush_interval: float = 1.0,
        retention_days: float = 7.0,
        run: Runner | None = None,
    ) -> None:
        super().__init__(repository, reactor, pool_name=pool_name, run=run)
        self._flush_interval = flush_interval
        self._retention = retention_days * 86400.0
        self._writing: Deferred[None] | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._last_prune = float("-inf")

    def _take_batch(self, everything: bool) -> Batch | None:
        """Take what is buffered (None when nothing is): all of it when ``everything``,
        else what the subclass is ready to write (the periodic flush)."""
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._flush_interval, now=False)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # the pool stops once the last batch is written
        if self._loop.running:
            self._loop.stop()

        def stop_pool(_: object) -> None:
            self._stop_pool()

        return self.flush().addBoth(stop_pool)

    def flush(self, everything: bool = True) -> Deferred[None]:
        """Write what is buffered (``everything``, or what is ready: the periodic
        flush); fires when done (a failure is logged and the batch is kept for the next
        try: callers never see it)."""
        if self._writing is not None:
            # One batch at a time: chain behind the running one.
            d: Deferred[None] = Deferred()
            self._writing.addBoth(lambda _: self.flush(everything).chainDeferred(d))
            return d
        batch = self._take_batch(everything)
        if batch is None:
            return succeed(None)
        writing = self.run(batch.write, *batch.args)
        self._writing = writing

        def done(result: object) -> None:
            self._writing = None
            if isinstance(result, Failure):
                self.log.warn(
                    "could not store {count} {what}, will retry: {error}",
                    count=batch.count,
                    what=self.what,
                    error=result.value,
                )
                batch.restore()

        writing.addBoth(done)
        result: Deferred[None] = Deferred()
        writing.addBoth(lambda _: result.callback(None))
        return result

    def _tick(self) -> Deferred[None]:
        # Never raises: a LoopingCall that fails stops for good.
        d = self.flush(everything=False)
        now = self._reactor.seconds()
        if self._retention > 0 and now - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = now
            cutoff = utc_moment(now) - timedelta(seconds=self._retention)

            def prune(_: object) -> Deferred[None]:
                return self.run(self.repository.prune, cutoff).addCallbacks(
                    lambda count: None,
                    lambda failure: self.log.warn(
                        "could not prune {what}: {error}", what=self.what, error=failure.value
                    ),
                )

            d.addCallback(prune)
        return d
