"""The watch machinery: the hub (Clock only), the index poll, and PostgreSQL LISTEN."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from metadatad.db.peers import CHANNEL, PeerRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.metadata.watch import PostgresListener, WatchHub, WatchService
from tests.support.databases import empty_database
from tests.support.factories import make_node


def results(d: Deferred[Any]) -> list[Any]:
    found: list[Any] = []
    d.addBoth(found.append)
    return found


def test_notify_wakes_only_watchers_below_the_index() -> None:
    """A watcher returns with the new index once its project passes its index."""
    clock = Clock()
    hub = WatchHub(clock)
    low = results(hub.wait("a", 3, 60, hub.mark()))
    high = results(hub.wait("a", 5, 60, hub.mark()))
    other = results(hub.wait("b", 3, 60, hub.mark()))
    assert hub.count() == 3
    hub.notify("a", 4)
    assert low == [4]
    assert high == [] and other == []
    hub.notify("a", 5)  # not past 5
    assert high == []
    hub.notify("a", 6)
    assert high == [6]
    assert hub.watched == ["b"]
    assert len(clock.getDelayedCalls()) == 1


def test_timeout_answers_none_and_leaves_nothing() -> None:
    """Without a change the watcher fires with None after its timeout."""
    clock = Clock()
    hub = WatchHub(clock)
    got = results(hub.wait("a", 1, 2.5, hub.mark()))
    clock.advance(2.4)
    assert got == []
    clock.advance(0.1)
    assert got == [None]
    assert hub.count() == 0
    assert clock.getDelayedCalls() == []


def test_cancel_forgets_the_watcher() -> None:
    """Cancelling (the client left) removes the watcher and its timer."""
    clock = Clock()
    hub = WatchHub(clock)
    d = hub.wait("a", 1, 60, hub.mark())
    got = results(d)
    d.cancel()
    assert got[0].check(CancelledError)
    assert hub.count() == 0
    assert clock.getDelayedCalls() == []
    hub.notify("a", 9)  # nothing left to wake


def test_a_change_between_read_and_wait_is_not_missed() -> None:
    """A notification after the reader's mark and before its wait answers at once; one
    from before the mark does not (it is what the reader already read)."""
    hub = WatchHub(Clock())
    hub.notify("a", 7)
    mark = hub.mark()
    assert results(hub.wait("a", 7, 60, mark)) == []
    mark = hub.mark()
    hub.notify("a", 8)  # committed while the reader's query was on its way back
    assert results(hub.wait("a", 7, 60, mark)) == [8]
    # After a restore the index went back to 2: old notifications are not a change.
    assert results(hub.wait("a", 2, 60, hub.mark())) == []


def test_close_answers_everyone() -> None:
    """Stopping answers every watcher at once (each then re-reads and returns)."""
    clock = Clock()
    hub = WatchHub(clock)
    got = [results(hub.wait(p, 1, 60, hub.mark())) for p in ("a", "a", "b")]
    hub.close()
    assert got == [[None], [None], [None]]
    assert clock.getDelayedCalls() == []


def test_thousands_of_watchers_are_just_deferreds() -> None:
    """A thousand watchers are a thousand Deferreds and timers; one notify wakes all."""
    clock = Clock()
    hub = WatchHub(clock)
    got = [results(hub.wait("a", 1, 300, hub.mark())) for _ in range(1_000)]
    assert hub.count() == 1_000
    hub.notify("a", 2)
    assert all(g == [2] for g in got)
    assert hub.count() == 0


# --- the poll ---------------------------------------------------------------------------


class Indexes:
    """A recorded ``indexes(projects)`` answering from a dict (or failing)."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.calls: list[list[str]] = []
        self.fail = False

    def __call__(self, projects: list[str]) -> Deferred[dict[str, int]]:
        self.calls.append(sorted(projects))
        if self.fail:
            return fail(ConnectionError("database away"))
        return succeed({p: self.values[p] for p in projects if p in self.values})


def test_poll_only_for_watched_projects_and_wakes_them() -> None:
    """No watcher, no query; a watched project's new index wakes its watchers within
    one poll interval."""
    clock = Clock()
    hub = WatchHub(clock)
    indexes = Indexes()
    service = WatchService(hub, indexes, clock, poll_interval=1.0)
    service.startService()
    clock.advance(5)
    assert indexes.calls == []
    got = results(hub.wait("a", 3, 60, hub.mark()))
    indexes.values["a"] = 3
    clock.advance(1)
    assert indexes.calls == [["a"]] and got == []
    indexes.values["a"] = 4  # written through another conductor
    clock.advance(1)
    assert got == [4]
    service.stopService()


def test_poll_failure_is_logged_and_the_loop_goes_on() -> None:
    """A failing poll never stops the LoopingCall."""
    clock = Clock()
    hub = WatchHub(clock)
    indexes = Indexes()
    service = WatchService(hub, indexes, clock, poll_interval=1.0)
    service.startService()
    got = results(hub.wait("a", 3, 60, hub.mark()))
    indexes.fail = True
    clock.advance(1)
    clock.advance(1)
    indexes.fail = False
    indexes.values["a"] = 9
    clock.advance(1)
    assert got == [9]
    assert len(indexes.calls) == 3
    service.stopService()


class ConnectedListener:
    connected = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_with_listen_the_poll_is_only_a_safety_net() -> None:
    """While LISTEN is up the poll runs every listening_poll_interval seconds."""
    clock = Clock()
    hub = WatchHub(clock)
    indexes = Indexes()
    service = WatchService(
        hub,
        indexes,
        clock,
        poll_interval=1.0,
        listening_poll_interval=15.0,
        listener=ConnectedListener(),  # type: ignore[arg-type]
    )
    service.startService()
    hub.wait("a", 3, 600, hub.mark())
    clock.pump([1.0] * 30)
    assert len(indexes.calls) == 2
    service.stopService()
    assert hub.count() == 0


# --- PostgreSQL LISTEN, for real ------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_postgres_listener_hears_bumps(tmp_path: Any, scratch_databases: Any) -> Any:
    """The listening connection sits in the reactor; a bump committed by anyone arrives
    as (project, index) without a poll."""
    url = empty_database("postgresql", tmp_path, scratch_databases)
    engine = make_engine(url, 1)
    heard: list[tuple[str, int]] = []
    states: list[bool] = []
    arrived: Deferred[None] = Deferred()

    def on_notify(project: str, index: int) -> None:
        heard.append((project, index))
        if len(heard) == 2 and not arrived.called:
            arrived.callback(None)

    conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    listener = PostgresListener(
        conninfo, CHANNEL, reactor, deferToThread, on_notify, states.append, retry=0.2
    )
    up: Deferred[None] = Deferred()
    listener._on_state = lambda state: (states.append(state), up.called or up.callback(None))
    listener.start()
    try:
        yield up
        assert listener.connected
        yield deferToThread(NodeRepository(engine).upsert_nodes, [make_node(0)])
        yield deferToThread(
            PeerRepository(engine).post, make_node(0).uuid, {"k": "v"}, True, 10, 1000
        )
        timeout = reactor.callLater(5, arrived.cancel)
        yield arrived
        timeout.cancel()
        assert heard == [("proj-a", 1), ("proj-a", 2)]
    finally:
        listener.stop()
        engine.dispose()
