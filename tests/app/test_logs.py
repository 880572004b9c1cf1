"""[logging] format = json: the JSON line of an event, and the observer twistd gets."""

from __future__ import annotations

import io
import json

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from metadatad.logs import RootService, event_as_json


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
