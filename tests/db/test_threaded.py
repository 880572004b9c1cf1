"""The thread-pool facade of the synchronous repositories (metadatad.db.threaded):
methods declared once and offered as Deferreds, change listeners after writes, a pool
that lives and dies with its service, and the immediate runner the fakes use."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from metadatad.db.threaded import Facade, Threaded, deferred, run_now
from metadatad.testing import MemoryStore
from tests.support.factories import make_node
from tests.support.sites import fired


class Counter:
    """A synchronous repository: a number that can be read, added to, and broken."""

    def __init__(self) -> None:
        self.value = 0

    def read(self) -> int:
        """The value."""
        return self.value

    def add(self, by: int, *, times: int = 1) -> int:
        if by < 0:
            raise ValueError("only up")
        self.value += by * times
        return self.value


class Counting(Facade[Counter]):
    read = deferred(Counter.read)
    add = deferred(Counter.add, changes=True)


def test_methods_are_deferreds_with_the_repository_signature() -> None:
    """Each declared method calls the repository's method of that name through the
    runner, with positional and keyword arguments; exceptions become failures."""
    facade = Counting(Counter(), run_now)
    assert fired(facade.add(2, times=3)) == 6
    assert fired(facade.read()) == 6
    with pytest.raises(ValueError, match="only up"):
        fired(facade.add(-1))
    assert fired(facade.run(lambda a, b: a + b, 1, 2)) == 3


def test_writes_call_the_change_listeners_after_success_only() -> None:
    """A method declared with changes=True calls every listener once it succeeded;
    reads and failed writes call none."""
    facade = Counting(Counter(), run_now)
    changes: list[int] = []
    facade.add_change_listener(lambda: changes.append(1))
    facade.add_change_listener(lambda: changes.append(2))
    fired(facade.read())
    assert changes == []
    fired(facade.add(1))
    assert changes == [1, 2]
    facade.add(-1).addErrback(lambda _: None)
    assert changes == [1, 2]


def test_a_method_is_one_object_named_like_the_repository_method() -> None:
    """The same callable at every access, named and documented like the repository's
    (the peer routes share reads by that name); on the class, the declaration."""
    facade = Counting(Counter(), run_now)
    assert facade.read is facade.read
    assert facade.read.__name__ == "read"
    assert facade.read.__doc__ == "The value."
    assert isinstance(Counting.read, deferred)
    other = Counting(Counter(), run_now)
    assert other.read is not facade.read


def test_the_runner_is_looked_up_at_each_call() -> None:
    """Replacing the runner after construction (a test queueing calls) takes effect."""
    facade = Counting(Counter(), run_now)
    facade.read()
    queued: list[Any] = []
    facade._runner = lambda f, *args, **kwargs: queued.append(f.__name__)  # type: ignore[assignment,misc]
    facade.read()
    assert queued == ["read"]


@pytest_twisted.inlineCallbacks
def test_threaded_runs_on_a_pool_that_lives_with_the_service() -> Any:
    """Calls run on the service's own pool threads and answer on the reactor thread;
    stopping the service joins the pool."""

    class ThreadedCounting(Threaded[Counter]):
        read = deferred(Counter.read)

    service = ThreadedCounting(Counter(), reactor, pool_name="test-counter", size=2)
    service.startService()
    try:
        answered: list[str] = []
        d = service.run(lambda: threading.current_thread().name)
        d.addCallback(lambda name: answered.append(threading.current_thread().name) or name)
        name = yield d
        assert name.startswith("PoolThread-test-counter-")
        assert answered == [threading.current_thread().name]
        assert (yield service.read()) == 0
    finally:
        service.stopService()
    assert service._pool.joined


def test_threaded_with_a_runner_uses_no_thread() -> None:
    """``run=run_now`` replaces the pool: calls answer at once, on this thread."""

    class ThreadedCounting(Threaded[Counter]):
        read = deferred(Counter.read)

    service = ThreadedCounting(Counter(), None, pool_name="unused", run=run_now)
    assert fired(service.run(lambda: threading.current_thread().name)) == (
        threading.current_thread().name
    )
    assert fired(service.read()) == 0


def test_memory_store_counts_its_own_methods() -> None:
    """The fake store is the Store's facade with the immediate runner; ``calls``
    counts its methods by name, not ``run``."""
    store = MemoryStore()
    changes: list[None] = []
    store.add_change_listener(lambda: changes.append(None))
    node = make_node()
    assert fired(store.upsert_nodes([node])) == [True]
    assert fired(store.node_by_ip(node.ips[0])).node == node
    fired(store.run(store.repository.list_nodes))
    assert store.calls == {"upsert_nodes": 1, "node_by_ip": 1}
    assert changes == [None]
