# -*- test-case-name: tests.app.test_logs -*-
"""``[logging] format``: twistd's text lines (the default), or one JSON object a line.

twistd asks the application for an ``ILogObserver`` component before it builds its
own observer (the ``.tac`` file idiom); :class:`RootService` sets that component on the
application it is attached to when the format is ``json``.  ``twistd --logger``, when
given, still wins.  The root also orders the daemon's stop: a listener given to
:meth:`RootService.drain_first` stops, and its site drains, before the other services.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import FileLogObserver, ILogObserver, formatEvent

FORMATS = ("text", "json")

# Event keys that are not the event's own fields.
_OWN_KEYS = frozenset({"message", "format", "isError", "system", "time"})


def event_as_json(event: dict[str, Any]) -> str:
    """One JSON line for a twisted.logger event: time (UTC, ISO 8601), level,
    namespace, the formatted message, the event's fields, and a failure's traceback.

    Fields that JSON cannot hold are shown as their ``repr``; nothing raises, so a
    strange field never loses the event.
    """
    level = event.get("log_level")
    when = event.get("log_time")
    document: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
            if isinstance(when, (int, float))
            else None
        ),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _OWN_KEYS or key in document:
            continue
        document[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        try:
            document["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot print itself still logs the event
            document["traceback"] = repr(failure)
    return json.dumps(document, default=repr, sort_keys=False) + "\n"


def json_observer(out: IO[str] | None = None) -> FileLogObserver:
    """An observer writing :func:`event_as_json` lines to ``out`` (standard output:
    journald under systemd)."""
    return FileLogObserver(out if out is not None else sys.stdout, event_as_json)


class RootService(MultiService):
    """The daemon's top service; sets the log observer of ``format`` on twistd's
    application when it is attached to it, and stops the listeners given to
    :meth:`drain_first` (and waits for their sites) before its other services."""

    def __init__(self, format: str = "text", out: IO[str] | None = None) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown log format {format!r}")
        self.log_format = format
        self._out = out
        self._drain_first: list[tuple[IService, Callable[[], Deferred[None]]]] = []
        self._stopping: Deferred[Any] | None = None

    def drain_first(self, listener: IService, drained: Callable[[], Deferred[None]]) -> None:
        """When the root stops, stop ``listener`` (a child: its site accepts no more
        connections) first, then wait for ``drained()`` (the site has answered what it
        accepted, or gave up: ``HardenedSite.drained``), and only then stop the other
        services.  Stopped all at once, a request waiting on the store lost its answer
        as the store's threadpool stopped under it."""
        self._drain_first.append((listener, drained))

    def startService(self) -> None:
        self._stopping = None
        super().startService()

    def stopService(self) -> Deferred[Any]:
        if self._stopping is not None:
            # Told again while draining: the same stop, not a second one.
            return self._stopping
        listeners = [listener for listener, _ in self._drain_first]
        stopped = [maybeDeferred(listener.stopService) for listener in listeners]
        # A DeferredList never fails (and maybeDeferred catches a drain that raises):
        # the services stop whatever a drain did.
        drains = DeferredList([maybeDeferred(drained) for _, drained in self._drain_first])
        drains.addCallback(lambda _: self._stop_the_others(listeners, stopped))
        self._stopping = drains
        return drains

    def _stop_the_others(
        self, listeners: list[IService], stopped: list[Deferred[Any]]
    ) -> Deferred[Any]:
        """``MultiService.stopService`` for the services not stopped already: all at
        once, in reverse order of their start; fires once they and the listeners have
        stopped."""
        Service.stopService(self)
        others = [service for service in reversed(list(self)) if service not in listeners]
        return DeferredList([*stopped, *(maybeDeferred(s.stopService) for s in others)])

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_format == "json" and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, json_observer(self._out))
        return super().setServiceParent(parent)
