"""The ``daemon_factory`` fixture: real daemons (:class:`metadatad.testing.daemon.Daemon`)
that are stopped when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest

from metadatad.testing.daemon import Daemon, DaemonError, free_port, http_request

__all__ = ["Daemon", "DaemonError", "DaemonFactory", "daemon_factory", "free_port", "http_request"]

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonFactory]:
    """Start real daemons: ``daemon_factory(nodes=[...], database_url=None, config=None,
    vendordata=None, start=True) -> Daemon``.  Every daemon is stopped at teardown."""
    daemons: list[Daemon] = []

    def make(
        nodes: Iterable[Mapping[str, Any]] = (),
        *,
        database_url: str | None = None,
        config: Mapping[str, Mapping[str, str]] | None = None,
        vendordata: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> Daemon:
        directory = tmp_path_factory.mktemp("metadatad")
        daemon = Daemon.create(
            directory,
            nodes=nodes,
            database_url=database_url,
            config=config,
            vendordata=vendordata,
        )
        daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    try:
        yield make
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
