# -*- test-case-name: tests.app.test_reload -*-
"""SIGHUP: read the configuration file again, take the new static vendordata, and
forget every cached node lookup.  Listening sockets and connections are untouched.

Only ``[vendordata] static_file`` (and the file's content) takes effect this way; a
change anywhere else is named in the log as needing a restart.  A file that no
longer parses changes nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from metadatad.config import Config, ConfigError, load_config


@attrs.frozen
class ReloadPlan:
    """What a reload changes: the new vendordata (None: unchanged) and the sections
    whose changes wait for a restart."""

    vendordata: Any
    restart_sections: tuple[str, ...]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare two configurations (pure: no I/O)."""
    restart = []
    for field in attrs.fields(Config):
        if field.name in ("path", "vendordata"):
            continue
        if getattr(old, field.name) != getattr(new, field.name):
            restart.append(field.name)
    # Only the static document is reloaded; any other [vendordata] key waits too.
    rest = attrs.evolve(
        old.vendordata, static_file=new.vendordata.static_file, static=new.vendordata.static
    )
    if rest != new.vendordata:
        restart.append("vendordata")
    # ``static`` is compared by content (the attrs field has eq=False).
    changed = old.vendordata.static != new.vendordata.static
    return ReloadPlan(dict(new.vendordata.static) if changed else None, tuple(restart))


class ReloadService(Service):
    """The ``reload`` service: a SIGHUP handler while running.

    ``set_vendordata(document)`` installs new static vendordata; each of
    ``invalidate`` is called to drop cached lookups.
    """

    name = "reload"
    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactorFromThreads,
        *,
        set_vendordata: Callable[[Any], None],
        invalidate: Iterable[Callable[[], None]],
        load: Callable[[str], Config] = load_config,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._set_vendordata = set_vendordata
        self._invalidate = tuple(invalidate)
        self._load = load
        self._previous: Any = None
        self.reloads = 0

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._signalled)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the main thread was
        # doing: do the work from the reactor loop instead.
        self._reactor.callFromThread(self.reload)
        previous = self._previous
        if callable(previous):  # e.g. twistd's log rotation when logging to a file
            previous(signum, frame)

    def reload(self) -> bool:
        """Re-read the file; True if the new settings were taken."""
        try:
            new = self._load(self.config.path)
        except ConfigError as e:
            self.log.error("reload refused, nothing changed: {error}", error=str(e))
            return False
        plan = plan_reload(self.config, new)
        if plan.vendordata is not None:
            self._set_vendordata(plan.vendordata)
        for invalidate in self._invalidate:
            invalidate()
        self.config = attrs.evolve(
            self.config,
            vendordata=attrs.evolve(
                self.config.vendordata,
                static_file=new.vendordata.static_file,
                static=new.vendordata.static,
            ),
        )
        self.reloads += 1
        self.log.info(
            "reloaded {path}: node caches cleared, static vendordata {vendordata}",
            path=self.config.path,
            vendordata="replaced" if plan.vendordata is not None else "unchanged",
        )
        if plan.restart_sections:
            self.log.warn(
                "changes to {sections} take effect after a restart",
                sections=", ".join(f"[{s}]" for s in plan.restart_sections),
            )
        return True
