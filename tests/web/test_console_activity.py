"""Node activity: the recorder's aggregation and batching (task.Clock, no threads), the
metadata site's observer, and the timeline built from it all (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from metadatad.admin.timeline import timeline
from metadatad.db.activity import Activity, ActivityRecorder, BootStatus, fan_out
from metadatad.db.bootevents import BootEvent, utc_moment
from metadatad.metadata.observe import RecordingVendordataErrors, request_observer

T0 = 1_800_000_000.0


class MemoryRepository:
    def __init__(self) -> None:
        self.rows: list[Activity] = []
        self.statuses: dict[str, BootStatus] = {}
        self.down = False
        self.pruned: list[datetime] = []

    def add(self, rows: Sequence[Activity], statuses: Mapping[str, BootStatus]) -> None:
        if self.down:
            raise ConnectionError("database down")
        self.rows.extend(rows)
        self.statuses.update(statuses)

    def recent(self, node_uuid: str, limit: int = 100) -> list[Activity]:
        return [r for r in self.rows if r.node_uuid == node_uuid][:limit]

    def status(self, node_uuid: str) -> BootStatus | None:
        return self.statuses.get(node_uuid)

    def prune(self, before: datetime) -> int:
        self.pruned.append(before)
        return 0


def _now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    try:
        return succeed(f(*args))
    except Exception as e:
        return fail(e)


def _recorder(clock: Clock, repository: MemoryRepository, **kwargs: Any) -> ActivityRecorder:
    return ActivityRecorder(repository, clock, "c1", run=_now, **kwargs)  # type: ignore[arg-type]


def _started() -> tuple[Clock, MemoryRepository, ActivityRecorder]:
    """A recorder started at ``T0`` over an empty repository."""
    clock = Clock()
    clock.advance(T0)
    repository = MemoryRepository()
    recorder = _recorder(clock, repository)
    recorder.startService()
    return clock, repository, recorder


def test_a_crawl_is_one_row() -> None:
    clock, repository, recorder = _started()
    for _ in range(30):
        recorder.metadata_request("n1", "GET", imdsv2=True)
        clock.advance(0.01)
    recorder.metadata_request("n1", "GET", imdsv2=False)
    recorder.note("n1", "token", "PUT /latest/api/token")
    waiting = recorder.recent("n1")
    assert len(repository.rows) == 0 and len(_fired(waiting)) == 2
    clock.advance(1.0)
    metadata = [r for r in repository.rows if r.kind == "metadata"]
    assert len(metadata) == 1
    assert (metadata[0].requests, metadata[0].imdsv2) == (31, False)
    assert metadata[0].first_at == utc_moment(T0)
    assert repository.statuses["n1"].outcome == "metadata"
    recorder.stopService()


def test_rows_wait_for_their_node_to_go_quiet() -> None:
    """The periodic flush leaves a node's rows (of every kind, and its boot status) in
    the buffer while it keeps asking, writes them once it has been quiet a second, and
    writes a row open for ten seconds anyway (with the status); other nodes' rows and
    statuses go meanwhile; stopping writes everything."""
    clock, repository, recorder = _started()
    recorder.note("quiet", "peer-post", "password: HTTP 200")
    recorder.tftp(
        BootEvent(
            "booting", "c1", "10.0.0.5", "10.0.0.1", "a.ipxe", "ipxe", "complete", utc_moment(T0)
        )
    )
    recorder.note("busy", "token", "PUT /latest/api/token")
    for _ in range(10):
        recorder.metadata_request("busy", "GET", imdsv2=False)
        clock.advance(0.5)
    # Five ticks: "quiet" went at the second (quiet for a second), "busy" asked each time.
    assert [r.node_uuid for r in repository.rows] == ["quiet"]
    assert set(repository.statuses) == {"booting"}
    assert _fired(recorder.status("busy")).outcome == "metadata"  # from the buffer
    for _ in range(12):
        recorder.metadata_request("busy", "GET", imdsv2=False)
        clock.advance(0.5)
    # Open for ten seconds: written though still busy, with its status.
    busy = [r for r in repository.rows if r.node_uuid == "busy"]
    assert [(r.kind, r.requests) for r in busy] == [("token", 1), ("metadata", 20)]
    assert "busy" in repository.statuses
    assert busy[0].first_at == utc_moment(T0)
    recorder.metadata_request("busy", "GET", imdsv2=False)
    recorder.note("later", "token", "PUT /latest/api/token")
    recorder.stopService()
    assert [r.requests for r in repository.rows if r.node_uuid == "busy"] == [1, 20, 3]
    assert {"busy", "booting"} <= set(repository.statuses)
    assert [r.node_uuid for r in repository.rows][-1] == "later"


def test_a_node_that_never_stops_has_its_status_written() -> None:
    """Two rows of one busy node open at different times: each is written after ten
    seconds, and the node's boot status with it, never held for good."""
    clock, repository, recorder = _started()
    for step in range(60):
        recorder.metadata_request("n1", "GET", imdsv2=False)
        if step >= 10:
            recorder.note("n1", "vendordata", "a: ok")
        clock.advance(0.5)
    # 30 s of requests: rows opened at 0 s and 5 s, each written every ten seconds.
    kinds = ["metadata", "vendordata", "metadata", "vendordata", "metadata"]
    assert [r.kind for r in repository.rows] == kinds
    assert repository.statuses["n1"].outcome == "metadata"
    recorder.stopService()


def _fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0]


def test_a_failed_write_keeps_the_batch_and_the_buffer_is_bounded() -> None:
    clock = Clock()
    repository = MemoryRepository()
    repository.down = True
    recorder = _recorder(clock, repository, max_buffer=2)
    recorder.startService()
    recorder.note("a", "peer-post", "password: HTTP 200")
    recorder.note("b", "peer-post", "password: HTTP 200")
    recorder.note("c", "peer-post", "password: HTTP 200")
    assert recorder.dropped == 1
    clock.advance(1.0)
    assert repository.rows == []
    recorder.note("a", "peer-post", "password: HTTP 200")
    repository.down = False
    clock.advance(1.0)
    assert sorted((r.node_uuid, r.requests) for r in repository.rows) == [("a", 2), ("b", 1)]
    recorder.stopService()


def test_tftp_events_move_the_boot_status() -> None:
    clock = Clock()
    repository = MemoryRepository()
    recorder = _recorder(clock, repository)
    seen: list[BootEvent] = []
    record = fan_out(seen.append, recorder.tftp)
    event = BootEvent(
        "n1",
        "c1",
        "10.0.0.5",
        "10.0.0.1",
        "pxelinux.cfg/01-aa",
        "pxelinux",
        "timeout",
        utc_moment(T0),
        error="no ACK",
    )
    record(event)
    record(
        BootEvent(None, "c1", "10.0.0.9", "10.0.0.1", "x.efi", "static", "complete", utc_moment(T0))
    )
    assert len(seen) == 2
    status = _fired(recorder.status("n1"))
    assert (status.outcome, status.detail) == ("timeout", "pxelinux.cfg/01-aa: no ACK")


class FakeRequest:
    def __init__(self, method: bytes, path: bytes, code: int = 200) -> None:
        self.method = method
        self.path = path
        self.code = code
        self.finished: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self.finished


class Notes:
    def __init__(self) -> None:
        self.notes: list[tuple[Any, ...]] = []

    def note(self, *args: Any) -> None:
        self.notes.append(("note", *args))

    def metadata_request(self, *args: Any) -> None:
        self.notes.append(("metadata", *args))

    def vendordata(self, *args: Any) -> None:
        self.notes.append(("vendordata", *args))


def test_the_observer_sorts_requests() -> None:
    notes = Notes()
    observe = request_observer(notes)
    observe(FakeRequest(b"PUT", b"/latest/api/token"), "n1", False, True)
    observe(FakeRequest(b"GET", b"/latest/meta-data/"), "n1", True, False)
    post = FakeRequest(b"POST", b"/openstack/latest/password", code=409)
    observe(post, "n1", False, False)
    assert len(notes.notes) == 2
    post.finished.callback(None)
    assert notes.notes == [
        ("note", "n1", "token", "PUT /latest/api/token"),
        ("metadata", "n1", "GET", True),
        ("note", "n1", "peer-post", "password: HTTP 409", False),
    ]


def test_vendordata_results_are_noted_and_passed_on() -> None:
    notes = Notes()
    calls: list[str] = []

    class Errors:
        def mark(self, error: Any) -> Deferred[bool]:
            calls.append("mark")
            return succeed(True)

        def clear(self, uuid: str, target: str) -> Deferred[None]:
            calls.append("clear")
            return succeed(None)

        def for_node(self, uuid: str) -> str:
            return "passed through"

    errors = RecordingVendordataErrors(Errors(), notes)
    error = type("E", (), {"node_uuid": "n1", "target": "cmdb", "reason": "HTTP 500"})()
    errors.mark(error)
    errors.clear("n1", "cmdb")
    assert calls == ["mark", "clear"] and errors.for_node("n1") == "passed through"
    assert notes.notes == [
        ("vendordata", "n1", "cmdb", "HTTP 500"),
        ("vendordata", "n1", "cmdb", None),
    ]


def _row(kind: str, at: datetime, **changes: Any) -> Activity:
    values: dict[str, Any] = {
        "node_uuid": "n1",
        "conductor": "c1",
        "kind": kind,
        "detail": "GET",
        "requests": 10,
        "imdsv2": True,
        "first_at": at,
        "last_at": at + timedelta(seconds=1),
    }
    values.update(changes)
    return Activity(**values)


def test_timeline_in_time_order_with_crawls_joined() -> None:
    start = datetime(2026, 12, 6, 10, 0, 0)
    push = {
        "status": "pushed",
        "owner": "c1",
        "generation": 4,
        "attempts": 0,
        "last_error": None,
        "desired_at": (start - datetime(1970, 1, 1)).total_seconds(),
    }
    push["pushed_at"] = push["desired_at"] + 1
    tftp = BootEvent(
        "n1",
        "c1",
        "10.0.0.5",
        "10.0.0.1",
        "pxelinux.cfg/01-aa",
        "pxelinux",
        "complete",
        start + timedelta(seconds=30),
        bytes_sent=120,
        duration=0.01,
    )
    rows = [
        _row("metadata", start + timedelta(seconds=60)),
        _row("metadata", start + timedelta(seconds=62), imdsv2=False, requests=5),
        _row("token", start + timedelta(seconds=59), detail="PUT /latest/api/token", requests=1),
        _row("vendordata", start + timedelta(seconds=61), detail="cmdb: HTTP 500", requests=1),
        _row("metadata", start + timedelta(hours=2)),
    ]
    entries = timeline(push, [tftp], rows)
    assert [e.kind for e in entries] == [
        "dhcp",
        "dhcp",
        "tftp",
        "token",
        "metadata",
        "vendordata",
        "metadata",
    ]
    first_crawl = entries[4]
    assert first_crawl.summary == "metadata crawl: 15 requests, IMDSv1 requests"
    assert first_crawl.until == start + timedelta(seconds=63)
    assert entries[6].summary.endswith("IMDSv2 (every request with a token)")
    assert entries[5].problem and not entries[2].problem
    assert entries[1].summary == "DHCP mapping pushed"


def test_timeline_shows_a_failing_push() -> None:
    push = {
        "status": "failed",
        "owner": "c1",
        "generation": 1,
        "attempts": 3,
        "last_error": "port not found",
        "desired_at": T0,
        "pushed_at": None,
    }
    entries = timeline(push, [], [])
    assert entries[-1].problem and entries[-1].detail == "port not found"
    assert "failed after 3 attempts" in entries[-1].summary
