"""Boot events: the repository on every backend and the memory fake, and the batching
store in front of it."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from metadatad.db.bootevents import BootEvent, BootEventRepository, BootEventStore
from metadatad.db.store import make_engine
from metadatad.testing import MemoryBootEventRepository
from tests.support.databases import BACKENDS, empty_database

UUID = "d8e02d56-2648-49a3-bf97-6be8f1204f00"
T0 = datetime(2026, 11, 22, 10, 0, 0)


def event(seconds: int = 0, **overrides: Any) -> BootEvent:
    fields: dict[str, Any] = {
        "node_uuid": UUID,
        "conductor": "c1",
        "client": "10.0.0.5",
        "server": "10.0.0.1",
        "filename": "pxelinux.cfg/01-52-54-00-12-00-00",
        "kind": "pxelinux",
        "outcome": "complete",
        "started_at": T0 + timedelta(seconds=seconds),
        "duration": 0.25,
        "bytes_sent": 464,
        "size": 464,
        "blksize": 1408,
        "windowsize": 1,
    }
    fields.update(overrides)
    return BootEvent(**fields)


@pytest.fixture(params=("memory", *BACKENDS))
def repository(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any):
    """Every implementation of the boot event repository."""
    if request.param == "memory":
        yield MemoryBootEventRepository()
        return
    url = empty_database(request.param, tmp_path, scratch_databases)
    engine = make_engine(url, 2)
    yield BootEventRepository(engine)
    engine.dispose()


def test_round_trip_newest_first(repository: Any) -> None:
    """Events come back equal, newest first, only the node's, at most ``limit``."""
    events = [event(i, bytes_sent=i) for i in range(5)]
    repository.add(events[:3])
    repository.add([*events[3:], event(9, node_uuid=None), event(9, node_uuid="other")])
    assert repository.recent(UUID) == list(reversed(events))
    assert repository.recent(UUID, limit=2) == [events[4], events[3]]
    assert repository.recent("nobody") == []


def test_all_fields_survive(repository: Any) -> None:
    """Optional fields, errors, big sizes and long names round-trip."""
    odd = event(
        outcome="client-error",
        error="User aborted the transfer",
        size=5 * 2**32,
        bytes_sent=0,
        blksize=None,
        windowsize=None,
        retransmits=7,
        filename="a/" * 200 + "b",
    )
    repository.add([odd])
    assert repository.recent(UUID) == [odd]


def test_same_second_keeps_insertion_order_reversed(repository: Any) -> None:
    """Two events in one second: the later insert is listed first."""
    first, second = event(0, filename="one"), event(0, filename="two")
    repository.add([first])
    repository.add([second])
    assert [e.filename for e in repository.recent(UUID)] == ["two", "one"]


def test_prune(repository: Any) -> None:
    """Events before the cutoff go; the count is returned."""
    repository.add([event(0), event(60), event(120)])
    assert repository.prune(T0 + timedelta(seconds=60)) == 1
    assert len(repository.recent(UUID)) == 2
    assert repository.add([]) is None


def test_document_form() -> None:
    """The admin API's form: ISO time with Z, every field."""
    document = event(0, duration=0.1234567).to_document()
    assert document["started_at"] == "2026-11-22T10:00:00Z"
    assert document["duration"] == 0.123457
    assert document["node_uuid"] == UUID


# --------------------------------------------------------------------------- the store


def now_runner(calls: list[str]) -> Any:
    """Run repository calls at once (no threads), counting them."""

    def run(f: Any, *args: Any) -> Deferred[Any]:
        calls.append(f.__name__)
        try:
            return succeed(f(*args))
        except Exception as e:
            return fail(e)

    return run


def test_batches_once_per_interval_and_flushes_on_stop() -> None:
    """Records are written together each interval, and on stop."""
    clock = Clock()
    clock.advance(1_800_000_000)
    repo = MemoryBootEventRepository()
    calls: list[str] = []
    store = BootEventStore(
        repo, clock, flush_interval=1.0, run=now_runner(calls), retention_days=0
    )
    store.startService()
    for i in range(50):
        store.record(event(i))
    assert repo.recent(UUID) == []
    clock.advance(1.0)
    assert len(repo.recent(UUID, 100)) == 50
    assert calls.count("add") == 1
    store.record(event(99))
    d = store.stopService()
    assert d.called
    assert repo.recent(UUID)[0].started_at == T0 + timedelta(seconds=99)


def test_database_outage_keeps_events_and_retries() -> None:
    """A failing write is logged and retried next interval; nothing is lost."""
    clock = Clock()
    repo = MemoryBootEventRepository()
    store = BootEventStore(repo, clock, run=now_runner([]), retention_days=0)
    store.startService()
    repo.available = False
    store.record(event(1))
    clock.advance(1.0)
    clock.advance(1.0)
    repo.available = True
    clock.advance(1.0)
    assert repo.recent(UUID) == [event(1)]
    store.stopService()


def test_recent_includes_waiting_events() -> None:
    """The admin view does not lag a flush interval behind."""
    clock = Clock()
    repo = MemoryBootEventRepository()
    store = BootEventStore(repo, clock, run=now_runner([]))
    repo.add([event(0)])
    store.record(event(5))
    result: list[list[BootEvent]] = []
    store.recent(UUID).addCallback(result.append)
    assert result == [[event(5), event(0)]]


def test_prunes_by_retention() -> None:
    """Old events are pruned on the first tick and then hourly."""
    clock = Clock()
    clock.advance(calendar.timegm(T0.timetuple()))
    repo = MemoryBootEventRepository()
    repo.add([event(-86400 * 8), event(-60)])
    store = BootEventStore(repo, clock, run=now_runner([]), retention_days=7)
    store.startService()
    clock.advance(1.0)
    assert repo.recent(UUID) == [event(-60)]
    store.stopService()


def test_buffer_is_bounded() -> None:
    """A long outage drops the oldest events, never memory without end."""
    store = BootEventStore(MemoryBootEventRepository(), Clock(), max_buffer=10)
    for i in range(25):
        store.record(event(i))
    assert len(store._buffer) <= 10
    assert store._buffer[-1] == event(24)
    assert store.dropped > 0
