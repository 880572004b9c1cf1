"""Construction of the console for ``tap.py``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from metadatad.admin.console import Console, ConsoleRoot
from metadatad.admin.feed import ClusterFeed
from metadatad.config import Config
from metadatad.db.console import ConsoleQueries

__all__ = ["with_console"]


def with_console(
    admin: Any,
    config: Config,
    reactor: Any,
    *,
    engine: Engine,
    token: str,
    store: Any,
    membership: Any,
    **collaborators: Any,
) -> ConsoleRoot:
    """The admin listener's resource: the admin API ``admin`` plus the console."""
    conductor = config.conductor
    queries = ConsoleQueries(
        engine,
        {
            "replicas": conductor.replicas,
            "points": conductor.ring_points,
            "max_load_factor": conductor.max_load_factor,
        },
    )
    console = Console(
        token,
        reactor,
        store,
        queries,
        conductor=conductor.hostname,
        heartbeat_timeout=conductor.heartbeat_timeout,
        cluster=membership,
        feed=ClusterFeed(membership, reactor),
        **collaborators,
    )
    return ConsoleRoot(admin, console.resource())
