# -*- test-case-name: tests.db.test_liveness -*-
"""When each node last made a metadata request (``node_seen``), synchronously.

Conductors note requests in memory and write them in batches
(:class:`metadatad.metadata.seen.SeenRecorder`); a time only ever moves forward, so
two conductors flushing the same node in either order keep the later time.  Nodes
deleted meanwhile are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from metadatad.db.schema import node_seen, nodes

__all__ = ["SeenRepository"]

_ATTEMPTS = 3
_CHUNK = 500


class SeenRepository:
    """Synchronous writes of last-seen times."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, seen: Mapping[str, datetime]) -> int:
        """Store each node's time (naive UTC) unless a later one is stored; returns how
        many rows changed.  A race with another conductor's first insert, or with a
        deletion, runs the batch again."""
        for attempt in range(_ATTEMPTS):
            try:
                return self._record_once(seen)
            except (IntegrityError, OperationalError):
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _record_once(self, seen: Mapping[str, datetime]) -> int:
        wanted = sorted(seen)
        changed = 0
        with self.engine.begin() as connection:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                live = set(
                    connection.execute(select(nodes.c.uuid).where(nodes.c.uuid.in_(chunk)))
                    .scalars()
                    .all()
                )
                stored = {
                    row.node_uuid: row.seen_at
                    for row in connection.execute(
                        select(node_seen.c.node_uuid, node_seen.c.seen_at).where(
                            node_seen.c.node_uuid.in_(chunk)
                        )
                    )
                }
                later = [
                    {"uuid": uuid, "moment": seen[uuid]}
                    for uuid in chunk
                    if uuid in live and uuid in stored and seen[uuid] > stored[uuid]
                ]
                if later:
                    connection.execute(
                        update(node_seen)
                        .where(
                            node_seen.c.node_uuid == bindparam("uuid"),
                            node_seen.c.seen_at < bindparam("moment"),
                        )
                        .values(seen_at=bindparam("moment")),
                        later,
                    )
                first = [
                    {"node_uuid": uuid, "seen_at": seen[uuid]}
                    for uuid in chunk
                    if uuid in live and uuid not in stored
                ]
                if first:
                    connection.execute(insert(node_seen), first)
                changed += len(later) + len(first)
        return changed

    def seen_at(self, node_uuid: str) -> datetime | None:
        """The node's stored time, or None."""
        with self.engine.connect() as connection:
            return connection.execute(
                select(node_seen.c.seen_at).where(node_seen.c.node_uuid == node_uuid)
            ).scalar()
