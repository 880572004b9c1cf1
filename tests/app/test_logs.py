"""[logging] format = json: the JSON line of an event, and the observer twistd gets; the
root service's stop, a site drained first."""

from __future__ import annotations

import io
import json
from functools import partial

import pytest
from twisted.application.service import Application, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from metadatad.hardening import DRAIN_SECONDS, HardenedSite
from metadatad.logs import RootService, event_as_json
from tests.web.test_hardening import LIMITS, Held, connect


def test_event_as_json_keeps_fields() -> None:
    """Time in UTC, level name, namespace, the formatted message and the fields; a
    field JSON cannot hold is shown by its repr; one line."""
    event = {
        "log_format": "imported {count} nodes from {where}",
        "log_level": LogLevel.warn,
        "log_namespace": "metadatad.admin",
        "log_time": 1_700_000_000.25,
        "log_logger": object(),
        "count": 3,
        "where": {"a", "set"} and ("tuple",),
        "odd": object(),
    }
    line = event_as_json(event)
    assert line.endswith("\n") and line.count("\n") == 1
    document = json.loads(line)
    assert document["time"] == "2023-11-14T22:13:20.250+00:00"
    assert document["level"] == "warn"
    assert document["namespace"] == "metadatad.admin"
    assert document["message"] == "imported 3 nodes from ('tuple',)"
    assert document["count"] == 3 and document["where"] == ["tuple"]
    assert document["odd"].startswith("<object object")
    assert not any(key.startswith("log_") for key in document)


def test_event_as_json_with_a_failure() -> None:
    """log.failure events carry the traceback as a field."""
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    out = io.StringIO()
    from metadatad.logs import json_observer

    Logger(namespace="t", observer=json_observer(out)).failure("it broke", failure)
    document = json.loads(out.getvalue())
    assert document["level"] == "critical"
    assert document["message"] == "it broke"
    assert "ZeroDivisionError" in document["traceback"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_root_service_sets_the_application_observer(log_format: str) -> None:
    """Attached to twistd's application, the root sets an ILogObserver component only
    for json (text keeps twistd's own observer)."""
    out = io.StringIO()
    application = Application("metadatad")  # what twistd makes for a plugin
    root = RootService(log_format, out)
    root.setServiceParent(application)
    observer = application.getComponent(ILogObserver, None)
    if log_format == "text":
        assert observer is None
        return
    assert observer is not None
    Logger(namespace="metadatad.test", observer=observer).info("hello {who}", who="you")
    assert json.loads(out.getvalue())["who"] == "you"


def test_root_service_refuses_unknown_formats() -> None:
    with pytest.raises(ValueError, match="xml"):
        RootService("xml")


class Recording(Service):
    """A service that notes its name in ``stopped`` when it is stopped."""

    def __init__(self, name: str, stopped: list[str]) -> None:
        self.setName(name)
        self._stopped = stopped

    def stopService(self) -> None:
        super().stopService()
        self._stopped.append(self.name)


def draining_root() -> tuple[RootService, HardenedSite, Held, Clock, list[str]]:
    """A root of store, metadata-http (drained first) and admin-http, started; the
    metadata site answers only when the test finishes a request."""
    clock = Clock()
    held = Held()
    site = HardenedSite(held, LIMITS, "metadata", reactor=clock)
    stopped: list[str] = []
    root = RootService()
    for name in ("store", "metadata-http", "admin-http"):
        Recording(name, stopped).setServiceParent(root)
    root.drain_first(root.getServiceNamed("metadata-http"), partial(site.drained, DRAIN_SECONDS))
    root.startService()
    return root, site, held, clock, stopped


def test_the_root_stops_the_rest_once_the_drained_site_answered() -> None:
    """Stopping loses no accepted request: the listener stops at once (no new
    connections), the other services (the store last) once the request in progress
    has been answered."""
    root, site, held, clock, stopped = draining_root()
    channel, transport = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    done = root.stopService()
    assert stopped == ["metadata-http"]
    clock.advance(1)
    assert stopped == ["metadata-http"]
    assert not done.called
    assert root.running
    held.pending[0].finish()
    clock.advance(0.05)
    assert stopped == ["metadata-http", "admin-http", "store"]
    assert done.called
    assert not root.running
    assert transport.value().startswith(b"HTTP/1.1 200")


def test_the_root_stops_the_rest_after_5_s_whatever_the_site_has_left() -> None:
    """The drain is bounded: a request that is never answered holds the other services
    up for DRAIN_SECONDS (5 s), no longer."""
    root, site, _held, clock, stopped = draining_root()
    channel, _ = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    done = root.stopService()
    clock.advance(4.99)
    assert stopped == ["metadata-http"]
    clock.advance(0.05)
    assert stopped == ["metadata-http", "admin-http", "store"]
    assert done.called


def test_an_idle_root_stops_everything_at_once_in_reverse_order() -> None:
    """Nothing in progress: the stop is what MultiService's is, the listener first."""
    root, _site, _held, _clock, stopped = draining_root()
    done = root.stopService()
    assert stopped == ["metadata-http", "admin-http", "store"]
    assert done.called


def test_a_root_told_to_stop_twice_stops_once() -> None:
    """A second stop while draining is the same stop: each service stops once."""
    root, site, held, clock, stopped = draining_root()
    channel, _ = connect(site)  # type: ignore[misc]
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    first = root.stopService()
    assert root.stopService() is first
    held.pending[0].finish()
    clock.advance(0.05)
    assert stopped == ["metadata-http", "admin-http", "store"]
    root.startService()
    assert root.stopService() is not first  # started again: a new stop


def test_a_drain_that_raises_still_stops_the_rest() -> None:
    """A bug in a drain must not leave the store running: the others stop at once."""
    stopped: list[str] = []
    root = RootService()
    for name in ("store", "metadata-http"):
        Recording(name, stopped).setServiceParent(root)

    def broken() -> Deferred[None]:
        raise RuntimeError("bug")

    root.drain_first(root.getServiceNamed("metadata-http"), broken)
    root.startService()
    done = root.stopService()
    assert stopped == ["metadata-http", "store"]
    assert done.called
    done.addErrback(lambda _: None)
