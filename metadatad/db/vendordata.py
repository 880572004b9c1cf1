# -*- test-case-name: tests.db.test_vendordata_errors -*-
"""Stored dynamic vendordata failures: a node's ``vendordata_error``.

With ``[vendordata] failure_fatal`` a target that fails for a node marks the node (one
row per node and target); the target's next good answer for the node clears the row.
:class:`VendordataErrorRepository` holds the synchronous queries;
:class:`VendordataErrorStore` runs them on a one-thread pool of its own (writes are
rare, and never wait behind the metadata site's node queries).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import Deferred, succeed

from metadatad.db.schema import vendordata_errors
from metadatad.db.threaded import Runner, Threaded, deferred

__all__ = [
    "VendordataError",
    "VendordataErrorQueries",
    "VendordataErrorRepository",
    "VendordataErrorStore",
    "summary",
    "with_vendordata_errors",
]

REASON_MAX = 512


@attrs.frozen
class VendordataError:
    """Why a target's vendordata failed for a node."""

    node_uuid: str
    target: str
    reason: str
    node_revision: int
    conductor: str
    failed_at: datetime

    def to_document(self) -> dict[str, Any]:
        """The JSON form the admin API shows."""
        return {
            "target": self.target,
            "reason": self.reason,
            "node_revision": self.node_revision,
            "conductor": self.conductor,
            "failed_at": self.failed_at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
        }

    def row(self) -> dict[str, Any]:
        """The column values, texts cut to their column widths."""
        row = attrs.asdict(self)
        row["reason"] = self.reason[:REASON_MAX]
        row["conductor"] = self.conductor[:255]
        return row


def summary(errors: Sequence[VendordataError]) -> dict[str, Any] | None:
    """A node's ``vendordata_error`` in the admin API: None, or the reasons in one line
    (``target: reason; ...``), the newest failure time and each target's row."""
    if not errors:
        return None
    ordered = sorted(errors, key=lambda e: e.target)
    return {
        "reason": "; ".join(f"{e.target}: {e.reason}" for e in ordered),
        "failed_at": max(e.to_document()["failed_at"] for e in ordered),
        "targets": [e.to_document() for e in ordered],
    }


def with_vendordata_errors(
    errors: Any, documents: list[dict[str, Any]]
) -> Deferred[list[dict[str, Any]]]:
    """Add ``vendordata_error`` (see :func:`summary`) to node documents, from
    ``errors`` (a VendordataErrorStore); without one the documents stay as they are."""
    if errors is None or not documents:
        return succeed(documents)
    found = errors.for_node(documents[0]["uuid"]) if len(documents) == 1 else errors.all()

    def add(stored: list[VendordataError]) -> list[dict[str, Any]]:
        by_node: dict[str, list[VendordataError]] = {}
        for error in stored:
            by_node.setdefault(error.node_uuid, []).append(error)
        for document in documents:
            document["vendordata_error"] = summary(by_node.get(document["uuid"], []))
        return documents

    return found.addCallback(add)


def _error(row: Any) -> VendordataError:
    return VendordataError(**{f.name: getattr(row, f.name) for f in attrs.fields(VendordataError)})


class VendordataErrorRepository:
    """Synchronous queries on ``vendordata_errors``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def mark(self, error: VendordataError) -> bool:
        """Record ``error`` (replacing the target's previous one); False if the node is
        gone (deleted meanwhile)."""
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    delete(vendordata_errors).where(
                        vendordata_errors.c.node_uuid == error.node_uuid,
                        vendordata_errors.c.target == error.target,
                    )
                )
                connection.execute(insert(vendordata_errors), [error.row()])
        except IntegrityError:
            return False
        return True

    def clear(self, node_uuid: str, target: str) -> None:
        """Forget the target's failure for the node, if any."""
        with self.engine.begin() as connection:
            connection.execute(
                delete(vendordata_errors).where(
                    vendordata_errors.c.node_uuid == node_uuid,
                    vendordata_errors.c.target == target,
                )
            )

    def for_node(self, node_uuid: str) -> list[VendordataError]:
        """The node's failures, by target."""
        query = (
            select(vendordata_errors)
            .where(vendordata_errors.c.node_uuid == node_uuid)
            .order_by(vendordata_errors.c.target)
        )
        with self.engine.connect() as connection:
            return [_error(row) for row in connection.execute(query)]

    def all(self) -> list[VendordataError]:
        """Every failure, by node and target."""
        query = select(vendordata_errors).order_by(
            vendordata_errors.c.node_uuid, vendordata_errors.c.target
        )
        with self.engine.connect() as connection:
            return [_error(row) for row in connection.execute(query)]


class VendordataErrorQueries(Protocol):
    """What :class:`VendordataErrorStore` offers of a repository (the SQL one, its fake)."""

    def mark(self, error: VendordataError) -> bool: ...

    def clear(self, node_uuid: str, target: str) -> None: ...

    def for_node(self, node_uuid: str) -> list[VendordataError]: ...

    def all(self) -> list[VendordataError]: ...


class VendordataErrorStore(Threaded[VendordataErrorQueries]):
    """The repository's methods as Deferreds, on a one-thread pool this service owns
    (``run`` replaces it in tests)."""

    name = "vendordata-errors"

    def __init__(
        self,
        repository: VendordataErrorQueries,
        reactor: Any,
        *,
        run: Runner | None = None,
    ) -> None:
        super().__init__(repository, reactor, pool_name="metadatad-vendordata", run=run)

    mark = deferred(VendordataErrorQueries.mark)
    clear = deferred(VendordataErrorQueries.clear)
    for_node = deferred(VendordataErrorQueries.for_node)
    all = deferred(VendordataErrorQueries.all)
