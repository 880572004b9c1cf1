"""``metadatad-manage conductor list`` and ``ring show [--without HOST]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from metadatad.core.conductors import ConductorInfo
from metadatad.core.placement import Placement
from metadatad.db.cluster import ClusterRepository, utc_ago
from metadatad.db.schema import conductors
from metadatad.db.store import NodeRepository, make_engine
from tests.app.test_cli import failed, manage, ok
from tests.support.databases import empty_database
from tests.support.factories import make_node


def seed(url: str, tmp_path: Path, heartbeat_timeout: float = 60) -> dict[str, Any]:
    """Three conductors (c3 stopped), 60 nodes of which 10 in a group nobody serves,
    claims by the two live ones; returns what was written."""
    engine = make_engine(url, 1)
    try:
        NodeRepository(engine).upsert_nodes(
            [make_node(i) for i in range(50)]
            + [make_node(i, conductor_group="rack-9") for i in range(50, 60)]
        )
        cluster = ClusterRepository(engine)
        cluster.heartbeat(ConductorInfo("c1", "", "10.0.0.1", "http://10.0.0.1:8775"), "i1")
        cluster.heartbeat(ConductorInfo("c2", "", "10.0.0.2"), "i2")
        cluster.heartbeat(ConductorInfo("c3"), "i3")
        cluster.heartbeat(ConductorInfo("c4"), "i4")
        cluster.mark_offline("c3", "i3")
        with engine.begin() as connection:
            connection.execute(
                update(conductors)
                .where(conductors.c.name == "c4")
                .values(heartbeat_at=utc_ago(600))
            )
        state = cluster.observe(heartbeat_timeout)
        placement = Placement.of(state)
        owners = placement.assign(cluster.node_groups())
        for name in ("c1", "c2"):
            mine = [u for u, o in owners.items() if o == name]
            cluster.claim(name, "", state.generation, mine)
        return {"state": state, "owners": owners}
    finally:
        engine.dispose()


def write_conf(tmp_path: Path, url: str, extra: str = "") -> Path:
    conf = tmp_path / "metadatad.conf"
    conf.write_text(f"[database]\nurl = {url}\n[conductor]\n{extra}", encoding="utf-8")
    return conf


@pytest.fixture
def sqlite_url(tmp_path: Path, scratch_databases: Any) -> str:
    return empty_database("sqlite", tmp_path, scratch_databases)


def test_conductor_list(tmp_path: Path, database_url: str) -> None:
    """One row per conductor: live, stopped (offline) or dead (no heartbeat), the age of
    its heartbeat by the database's clock, its nodes and addresses."""
    seed(database_url, tmp_path)
    lines = ok(manage(write_conf(tmp_path, database_url), "conductor", "list")).splitlines()
    assert lines[0].split() == ["NAME", "GROUP", "LIVE", "HEARTBEAT", "NODES", "TFTP", "HTTP"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == ["c1", "c2", "c3", "c4"]
    assert rows["c1"][1:3] == ["-", "yes"]
    assert rows["c1"][-2:] == ["10.0.0.1", "http://10.0.0.1:8775"]
    assert rows["c3"][2] == "stopped"
    assert rows["c4"][2] == "no"
    assert float(rows["c4"][3]) >= 599
    assert int(rows["c1"][6]) + int(rows["c2"][6]) == 50
    assert rows["c3"][6] == "0"


def test_conductor_list_json(tmp_path: Path, sqlite_url: str) -> None:
    """--json prints the documents the admin API serves."""
    seed(sqlite_url, tmp_path)
    documents = json.loads(
        ok(manage(write_conf(tmp_path, sqlite_url), "conductor", "list", "--json"))
    )
    assert [d["name"] for d in documents] == ["c1", "c2", "c3", "c4"]
    assert {d["name"]: d["live"] for d in documents} == {
        "c1": True,
        "c2": True,
        "c3": False,
        "c4": False,
    }
    assert set(documents[0]) >= {"group", "tftp_address", "heartbeat_age", "online", "nodes"}


def test_conductor_list_uses_the_configured_timeout(tmp_path: Path, sqlite_url: str) -> None:
    """Liveness follows [conductor] heartbeat_timeout of the configuration given."""
    seed(sqlite_url, tmp_path)
    conf = write_conf(tmp_path, sqlite_url, "heartbeat_interval = 100\nheartbeat_timeout = 700\n")
    documents = json.loads(ok(manage(conf, "conductor", "list", "--json")))
    assert {d["name"]: d["live"] for d in documents}["c4"] is True


def test_empty_conductor_list(tmp_path: Path, sqlite_url: str) -> None:
    """No conductor yet: the header alone."""
    out = ok(manage(write_conf(tmp_path, sqlite_url), "conductor", "list"))
    assert out.split() == ["NAME", "GROUP", "LIVE", "HEARTBEAT", "NODES", "TFTP", "HTTP"]


def test_ring_show(tmp_path: Path, database_url: str) -> None:
    """Per conductor what the ring gives it and what it holds; unowned groups."""
    seeded = seed(database_url, tmp_path)
    out = ok(manage(write_conf(tmp_path, database_url), "ring", "show"))
    lines = out.splitlines()
    assert lines[0].startswith(f"generation {seeded['state'].generation} (since ")
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert lines[1].split() == ["CONDUCTOR", "GROUP", "LIVE", "ASSIGNED", "CLAIMED"]
    for name in ("c1", "c2"):
        count = sum(1 for o in seeded["owners"].values() if o == name)
        assert rows[name] == [name, "-", "yes", str(count), str(count)]
    assert lines[-1] == "60 nodes, 10 unowned (rack-9: 10), 0 not claimed by their ring owner yet"


def test_ring_show_json(tmp_path: Path, sqlite_url: str) -> None:
    """--json is the report of GET /v1/ring, plus the recorded membership."""
    seeded = seed(sqlite_url, tmp_path)
    report = json.loads(ok(manage(write_conf(tmp_path, sqlite_url), "ring", "show", "--json")))
    assert report["generation"] == seeded["state"].generation
    assert report["groups"] == {"": ["c1", "c2"]}
    assert report["recorded_groups"] == {"": ["c1", "c2"]}
    assert (report["nodes"], report["unowned"], report["pending"]) == (60, 10, 0)


def test_ring_show_reads_liveness_now(tmp_path: Path, sqlite_url: str) -> None:
    """The ring is computed from the conductors live now; a difference from the
    recorded generation is pointed out."""
    seed(sqlite_url, tmp_path)
    engine = make_engine(sqlite_url, 1)
    ClusterRepository(engine).mark_offline("c2", "i2")
    engine.dispose()
    out = ok(manage(write_conf(tmp_path, sqlite_url), "ring", "show"))
    assert "differ from the generation's" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("c")}
    assert rows["c1"][3] == "50"
    assert rows["c2"][2:4] == ["no", "0"]


def test_ring_show_without_host(tmp_path: Path, database_url: str) -> None:
    """--without HOST lists exactly HOST's nodes, each with the survivor it would go to."""
    seeded = seed(database_url, tmp_path)
    out = ok(manage(write_conf(tmp_path, database_url), "ring", "show", "--without", "c2"))
    lines = out.splitlines()
    on_c2 = sorted(u for u, o in seeded["owners"].items() if o == "c2")
    assert lines[0] == f"if c2 failed, {len(on_c2)} of 60 nodes would move"
    assert lines[1].split() == ["NODE", "GROUP", "FROM", "TO"]
    assert [line.split() for line in lines[2:]] == [[u, "-", "c2", "c1"] for u in on_c2]


def test_ring_show_without_host_json(tmp_path: Path, sqlite_url: str) -> None:
    """The same moves as JSON."""
    seeded = seed(sqlite_url, tmp_path)
    moves = json.loads(
        ok(manage(write_conf(tmp_path, sqlite_url), "ring", "show", "--without", "c1", "--json"))
    )
    on_c1 = sorted(u for u, o in seeded["owners"].items() if o == "c1")
    assert [m["uuid"] for m in moves] == on_c1
    assert {(m["from"], m["to"], m["group"]) for m in moves} == {("c1", "c2", "")}


@pytest.mark.parametrize("host", ["c3", "c4", "nobody"])
def test_ring_show_without_a_conductor_that_is_not_live(
    tmp_path: Path, sqlite_url: str, host: str
) -> None:
    """Only a live conductor can fail: anything else is one line and status 1."""
    seed(sqlite_url, tmp_path)
    line = failed(manage(write_conf(tmp_path, sqlite_url), "ring", "show", "--without", host))
    assert line == f"metadatad-manage: {host} is not a live conductor (live: c1, c2)"


def test_ring_show_on_an_empty_database(tmp_path: Path, sqlite_url: str) -> None:
    """Before any daemon ran: generation 0, nothing live, nothing owned."""
    out = ok(manage(write_conf(tmp_path, sqlite_url), "ring", "show"))
    assert out.splitlines()[0] == "generation 0"
    assert out.splitlines()[-1] == "0 nodes, 0 unowned, 0 not claimed by their ring owner yet"
