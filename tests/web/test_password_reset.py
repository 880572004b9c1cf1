"""Clearing a node's password (Nova's ``clear-password``): the admin route with the
metadata site, and the CLI verb (the repository's part is in tests/test_store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from metadatad.admin.site import AdminSite
from metadatad.core.identity import Identifier
from metadatad.db.cache import NodeCache
from metadatad.db.store import NodeRepository, make_engine
from metadatad.metadata.site import MetadataSite
from metadatad.testing import MemoryStore
from tests.app.test_cli import failed, manage, ok, write_conf, write_json
from tests.support.factories import make_node
from tests.support.sites import Client

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODE = make_node(0, ports=[{"mac": "52:54:00:12:00:01", "ip": "127.0.0.1"}])
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def test_admin_route_clears_what_the_machine_reads() -> None:
    """The machine posts, the operator clears, the machine reads "" and posts again."""
    store = MemoryStore()
    store.repository.upsert_nodes([NODE])
    cache = NodeCache(
        store.node_by_ip, store.get_node, Clock(), 15, generation=store.node_generation
    )
    store.add_change_listener(cache.invalidate)
    machine = Client(MetadataSite(cache, store, Identifier([], "")).resource())  # type: ignore[arg-type]
    admin = Client(AdminSite(store, TOKEN).resource(), base="http://127.0.0.1:8776")  # type: ignore[arg-type]
    path = "/openstack/latest/password"
    route = f"/v1/nodes/{NODE.uuid}/password"
    assert machine.request("POST", path, data=b"encrypted-1").status == 200
    assert machine.request("POST", path, data=b"encrypted-2").status == 409
    assert json.loads(admin.get(f"/v1/nodes/{NODE.uuid}", headers=AUTH).body)["password_set"]
    assert admin.request("DELETE", route).status == 401
    answer = admin.request("DELETE", route, headers=AUTH)
    assert (answer.status, json.loads(answer.body)) == (200, {"cleared": True})
    assert machine.get(path).body == b""
    shown = json.loads(admin.get(f"/v1/nodes/{NODE.uuid}", headers=AUTH).body)
    assert shown["password_set"] is False
    assert machine.request("POST", path, data=b"encrypted-2").status == 200
    assert machine.get(path).body == b"encrypted-2"
    admin.request("DELETE", route, headers=AUTH)
    again = admin.request("DELETE", route, headers=AUTH)
    assert (again.status, json.loads(again.body)) == (200, {"cleared": False})
    assert admin.request("DELETE", f"/v1/nodes/{UNKNOWN}/password", headers=AUTH).status == 404
    assert admin.request("DELETE", "/v1/nodes/nope/password", headers=AUTH).status == 400


def test_admin_route_database_down_is_503() -> None:
    store = MemoryStore()
    store.repository.upsert_nodes([NODE])
    store.repository.available = False
    admin = Client(AdminSite(store, TOKEN).resource(), base="http://127.0.0.1:8776")  # type: ignore[arg-type]
    answer = admin.request("DELETE", f"/v1/nodes/{NODE.uuid}/password", headers=AUTH)
    assert answer.status == 503


def test_cli_clear_password(tmp_path: Path, database_url: str) -> None:
    conf = write_conf(tmp_path, database_url)
    ok(manage(conf, "node", "import", str(write_json(tmp_path, NODE.to_document()))))
    assert ok(manage(conf, "node", "clear-password", NODE.uuid)) == (
        f"no password was set for node {NODE.uuid}\n"
    )
    engine = make_engine(database_url, 1)
    try:
        assert NodeRepository(engine).set_password(NODE.uuid, "pw") is True
        assert ok(manage(conf, "node", "clear-password", NODE.uuid.upper())) == (
            f"cleared the password of node {NODE.uuid}\n"
        )
        assert NodeRepository(engine).get_password(NODE.uuid) is None
    finally:
        engine.dispose()
    assert failed(manage(conf, "node", "clear-password", UNKNOWN)) == (
        f"metadatad-manage: no node {UNKNOWN}"
    )
    assert "not a UUID" in failed(manage(conf, "node", "clear-password", "nope"))


@pytest.mark.parametrize("args", [("node", "clear-password"), ("node", "clear-password", "a", "b")])
def test_cli_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert manage(tmp_path / "none.conf", *args).status == 2
