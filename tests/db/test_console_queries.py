"""The console's queries and the node activity tables, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from metadatad.core.nodes import parse_node
from metadatad.db.activity import Activity, ActivityRepository, BootStatus
from metadatad.db.console import ConsoleQueries, NodeFilter
from metadatad.db.schema import dhcp_pushes, node_claims
from metadatad.db.store import NodeRepository, make_engine
from tests.support.factories import node_document

T0 = datetime(2026, 12, 6, 10, 0, 0)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, 2)
    yield engine
    engine.dispose()


def _nodes(engine: Engine, count: int) -> list[dict[str, Any]]:
    documents = [node_document(i) for i in range(count)]
    documents[3]["name"] = "<script>db-3</script>"
    documents[4]["ports"].append({"mac": "aa:bb:cc:dd:ee:ff", "ip": None, "pxe": False})
    NodeRepository(engine).upsert_nodes([parse_node(d) for d in documents])
    return documents


def _claim(engine: Engine, uuid: str, owner: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(node_claims).values(
                node_uuid=uuid, owner=owner, conductor_group="", generation=1, claimed_at=T0
            )
        )


def _push(engine: Engine, uuid: str, *, pushed: bool, permanent: bool = False) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(dhcp_pushes).values(
                node_uuid=uuid,
                owner="c1",
                generation=1,
                desired="{}",
                desired_digest="d1",
                pushed="{}" if pushed else None,
                pushed_digest="d1" if pushed else None,
                attempts=0 if pushed else 3,
                last_error=None if pushed else "no route",
                permanent=permanent,
                next_attempt=None if pushed else 99.0,
                desired_at=1.0,
                pushed_at=2.0 if pushed else None,
            )
        )


def _uuids(queries: ConsoleQueries, **wanted: Any) -> tuple[int, list[str]]:
    total, rows = queries.page(NodeFilter(**wanted))
    return total, [row.uuid for row in rows]


def test_search_by_name_uuid_mac_and_ip(engine: Engine) -> None:
    documents = _nodes(engine, 12)
    queries = ConsoleQueries(engine)
    uuid = [d["uuid"] for d in documents]
    assert _uuids(queries, search="WEB-11") == (1, [uuid[11]])
    assert _uuids(queries, search=uuid[7][:36]) == (1, [uuid[7]])
    # A MAC in upper case with dashes finds the same port; so does a second port's MAC.
    assert _uuids(queries, search="52-54-00-12-00-05".upper()) == (1, [uuid[5]])
    assert _uuids(queries, search="AA:BB:CC:DD:EE:FF") == (1, [uuid[4]])
    assert _uuids(queries, search="10.0.0.8") == (1, [uuid[6]])
    # Wildcards are text, not patterns.
    assert _uuids(queries, search="%") == (0, [])
    assert _uuids(queries, search="web_1") == (0, [])
    total, rows = queries.page(NodeFilter(search="<script>"))
    assert total == 1 and rows[0].name == "<script>db-3</script>"
    assert rows[0].macs == ("52:54:00:12:00:03",) and rows[0].ips == ("10.0.0.5",)


def test_paging_is_by_name_and_counts_every_match(engine: Engine) -> None:
    _nodes(engine, 12)
    queries = ConsoleQueries(engine)
    total, first = queries.page(NodeFilter(per_page=5, page=1))
    _, third = queries.page(NodeFilter(per_page=5, page=3))
    _, beyond = queries.page(NodeFilter(per_page=5, page=4))
    assert total == 12 and len(first) == 5 and len(third) == 2 and beyond == []
    names = [r.name for r in first]
    assert names == sorted(names)


def test_filters_owner_push_and_outcome(engine: Engine) -> None:
    documents = _nodes(engine, 6)
    uuid = [d["uuid"] for d in documents]
    for index in (0, 1, 2):
        _claim(engine, uuid[index], "c1")
    _claim(engine, uuid[3], "c2")
    _push(engine, uuid[0], pushed=True)
    _push(engine, uuid[1], pushed=False)
    _push(engine, uuid[2], pushed=False, permanent=True)
    ActivityRepository(engine).add(
        [], {uuid[0]: BootStatus("metadata", "read", T0), uuid[1]: BootStatus("timeout", "x", T0)}
    )
    queries = ConsoleQueries(engine)
    assert _uuids(queries, owner="c2")[1] == [uuid[3]]
    assert sorted(_uuids(queries, owner="-")[1]) == sorted(uuid[4:])
    assert _uuids(queries, push="pushed")[1] == [uuid[0]]
    assert _uuids(queries, push="pending")[1] == [uuid[1]]
    assert _uuids(queries, push="failed")[1] == [uuid[2]]
    assert sorted(_uuids(queries, push="none")[1]) == sorted(uuid[3:])
    assert _uuids(queries, outcome="timeout")[1] == [uuid[1]]
    assert len(_uuids(queries, outcome="none")[1]) == 4
    assert _uuids(queries, owner="c1", push="pushed", outcome="metadata")[1] == [uuid[0]]
    rows = {row.uuid: row for row in queries.page(NodeFilter())[1]}
    assert (rows[uuid[0]].owner, rows[uuid[0]].push, rows[uuid[0]].outcome) == (
        "c1",
        "pushed",
        "metadata",
    )
    assert rows[uuid[2]].push == "failed" and rows[uuid[5]].push == "none"
    assert queries.choices() == {"owners": ["c1", "c2"], "outcomes": ["metadata", "timeout"]}


def test_repush_makes_the_mapping_due_again(engine: Engine) -> None:
    documents = _nodes(engine, 6)
    uuid = documents[0]["uuid"]
    _claim(engine, uuid, "c1")
    _push(engine, uuid, pushed=False, permanent=True)
    queries = ConsoleQueries(engine)
    assert queries.repush(uuid) == "c1"
    assert queries.repush(documents[1]["uuid"]) is None
    with engine.connect() as connection:
        row = connection.execute(select(dhcp_pushes)).one()
    assert (row.pushed_digest, row.attempts, row.last_error, row.permanent, row.next_attempt) == (
        None,
        0,
        None,
        False,
        0.0,
    )


def _activity(uuid: str, kind: str, at: datetime, **changes: Any) -> Activity:
    values: dict[str, Any] = {
        "node_uuid": uuid,
        "conductor": "c1",
        "kind": kind,
        "detail": "GET",
        "requests": 3,
        "imdsv2": True,
        "first_at": at,
        "last_at": at + timedelta(seconds=1),
    }
    values.update(changes)
    return Activity(**values)


def test_activity_rows_newest_first_and_pruned(engine: Engine) -> None:
    repository = ActivityRepository(engine)
    uuid = node_document(0)["uuid"]
    rows = [_activity(uuid, "metadata", T0 + timedelta(minutes=i)) for i in range(3)]
    rows.append(_activity("other", "token", T0, detail="x" * 400))
    repository.add(rows, {})
    recent = repository.recent(uuid)
    assert [r.first_at for r in recent] == [T0 + timedelta(minutes=i) for i in (2, 1, 0)]
    assert recent[0] == rows[2]
    assert len(repository.recent("other")[0].detail) == 255
    assert repository.prune(T0 + timedelta(minutes=1)) == 2
    assert len(repository.recent(uuid)) == 2


def test_boot_status_only_moves_forward(engine: Engine) -> None:
    repository = ActivityRepository(engine)
    repository.add([], {"a": BootStatus("complete", "pxelinux.cfg/x", T0)})
    repository.add([], {"a": BootStatus("timeout", "older", T0 - timedelta(seconds=5))})
    assert repository.status("a") == BootStatus("complete", "pxelinux.cfg/x", T0)
    later = T0 + timedelta(seconds=5)
    repository.add([], {"a": BootStatus("metadata", "read", later), "b": BootStatus("x", "", T0)})
    assert repository.status("a") == BootStatus("metadata", "read", later)
    assert repository.status("b") == BootStatus("x", "", T0)
    assert repository.status("c") is None
