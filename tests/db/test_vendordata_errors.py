"""Stored vendordata failures: the repository on every backend and the memory fake."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from metadatad.db import schema
from metadatad.db.store import NodeRepository, make_engine
from metadatad.db.vendordata import (
    VendordataError,
    VendordataErrorRepository,
    summary,
    with_vendordata_errors,
)
from metadatad.testing import MemoryNodeRepository, MemoryVendordataErrorRepository
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node
from tests.support.sites import fired

NODE = make_node(0)
OTHER = make_node(1)
T0 = datetime(2026, 11, 30, 10, 0, 0)


def failure(node: Any = NODE, target: str = "testing", **overrides: Any) -> VendordataError:
    fields: dict[str, Any] = {
        "node_uuid": node.uuid,
        "target": target,
        "reason": "HTTP 500",
        "node_revision": 1,
        "conductor": "c1",
        "failed_at": T0,
    }
    fields.update(overrides)
    return VendordataError(**fields)


@pytest.fixture(params=("memory", *BACKENDS))
def repositories(request: pytest.FixtureRequest, tmp_path: Any, scratch_databases: Any):
    """(node repository, failure repository) for every implementation."""
    if request.param == "memory":
        nodes = MemoryNodeRepository()
        yield nodes, MemoryVendordataErrorRepository(nodes)
        return
    engine = make_engine(empty_database(request.param, tmp_path, scratch_databases), 2)
    yield NodeRepository(engine), VendordataErrorRepository(engine)
    engine.dispose()


def test_mark_replace_clear(repositories: Any) -> None:
    """A mark per (node, target); marking again replaces; clear removes one target."""
    nodes, errors = repositories
    nodes.upsert_nodes([NODE, OTHER])
    assert errors.mark(failure()) is True
    assert errors.mark(failure(target="ops", reason="timeout")) is True
    assert errors.mark(failure(OTHER)) is True
    newer = failure(reason="HTTP 503", node_revision=2, failed_at=datetime(2026, 11, 30, 11))
    assert errors.mark(newer) is True
    assert errors.for_node(NODE.uuid) == [failure(target="ops", reason="timeout"), newer]
    errors.clear(NODE.uuid, "testing")
    errors.clear(NODE.uuid, "nothing-there")
    assert errors.for_node(NODE.uuid) == [failure(target="ops", reason="timeout")]
    assert [e.node_uuid for e in errors.all()] == sorted([NODE.uuid, OTHER.uuid])


def test_unknown_node_and_cascade(repositories: Any) -> None:
    """Marking a node that does not exist stores nothing; deleting a node deletes its
    failures."""
    nodes, errors = repositories
    assert errors.mark(failure()) is False
    nodes.upsert_nodes([NODE])
    errors.mark(failure())
    nodes.delete_node(NODE.uuid)
    assert errors.all() == []
    assert errors.for_node(NODE.uuid) == []


def test_long_reason_is_cut(repositories: Any) -> None:
    nodes, errors = repositories
    nodes.upsert_nodes([NODE])
    errors.mark(failure(reason="x" * 2000))
    [stored] = errors.for_node(NODE.uuid)
    assert stored.reason == "x" * 512


def test_summary_and_admin_documents() -> None:
    """The admin API's vendordata_error: null, or every target's reason in one line."""
    assert summary([]) is None
    later = failure(target="a", reason="timeout", failed_at=datetime(2026, 11, 30, 12))
    shown = summary([failure(), later])
    assert shown is not None
    assert shown["reason"] == "a: timeout; testing: HTTP 500"
    assert shown["failed_at"] == "2026-11-30T12:00:00Z"
    assert [t["target"] for t in shown["targets"]] == ["a", "testing"]

    class Errors:
        def for_node(self, uuid: str) -> Any:
            from twisted.internet.defer import succeed

            return succeed([failure()] if uuid == NODE.uuid else [])

        def all(self) -> Any:
            from twisted.internet.defer import succeed

            return succeed([failure()])

    one = fired(with_vendordata_errors(Errors(), [{"uuid": OTHER.uuid}]))
    assert one == [{"uuid": OTHER.uuid, "vendordata_error": None}]
    many = fired(with_vendordata_errors(Errors(), [{"uuid": NODE.uuid}, {"uuid": OTHER.uuid}]))
    assert many[0]["vendordata_error"]["reason"] == "testing: HTTP 500"
    assert many[1]["vendordata_error"] is None
    untouched = fired(with_vendordata_errors(None, [{"uuid": NODE.uuid}]))
    assert untouched == [{"uuid": NODE.uuid}]


def test_table_matches_schema(tmp_path: Any) -> None:
    """The migrated table answers the schema module's query."""
    engine = make_engine(empty_database("sqlite", tmp_path, {}), 1)
    with engine.connect() as connection:
        assert connection.execute(select(schema.vendordata_errors)).all() == []
    engine.dispose()
