"""What operators see and do with posted keys: the admin node document and route, and
``metadatad-manage node show`` / ``node delete-shared-keys``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from metadatad.admin.site import AdminSite
from metadatad.core.nodes import parse_node
from metadatad.db.peers import PeerRepository, PeerStore
from metadatad.db.store import make_engine
from metadatad.testing import MemoryPeerRepository, MemoryStore
from tests.app.test_cli import failed, manage, ok, write_conf, write_json
from tests.support.factories import node_document
from tests.support.sites import Client

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UUID = node_document(0)["uuid"]


@pytest.fixture
def admin() -> tuple[Client, MemoryPeerRepository]:
    store = MemoryStore()
    peers = MemoryPeerRepository(store.repository)
    store.repository.upsert_nodes([parse_node(node_document(0))])
    peers.post(UUID, {"ip": "10.0.0.2"}, True, 128, 65536)
    peers.post(UUID, {"done": "yes"}, False, 128, 65536)
    site = AdminSite(store, TOKEN, peers=PeerStore(peers, store.run))  # type: ignore[arg-type]
    return Client(site.resource(), base="http://127.0.0.1:8776"), peers


def test_admin_node_document_shows_posted_keys(admin: Any) -> None:
    """GET /v1/nodes/<uuid> carries shared_keys and private_keys (read-only fields)."""
    client, _ = admin
    answer = client.get(f"/v1/nodes/{UUID}", headers=AUTH)
    assert answer.status == 200
    document = json.loads(answer.body)
    assert document["shared_keys"] == {"ip": "10.0.0.2"}
    assert document["private_keys"] == {"done": "yes"}
    # The document can be PUT back as it is (the posted keys are read-only there).
    again = client.request("PUT", f"/v1/nodes/{UUID}", data=answer.body, headers=AUTH)
    assert again.status == 200, again.text


def test_admin_deletes_shared_keys(admin: Any) -> None:
    """DELETE /v1/nodes/<uuid>/shared_keys: 200 with the count, private keys stay; 404
    for an unknown node; 401 without the token."""
    client, peers = admin
    path = f"/v1/nodes/{UUID}/shared_keys"
    assert client.request("DELETE", path).status == 401
    answer = client.request("DELETE", path, headers=AUTH)
    assert (answer.status, json.loads(answer.body)) == (200, {"deleted": 1})
    assert peers.node_entries(UUID) == {"shared": {}, "private": {"done": "yes"}}
    unknown = node_document(9)["uuid"]
    assert client.request("DELETE", f"/v1/nodes/{unknown}/shared_keys", headers=AUTH).status == 404
    assert client.request("DELETE", "/v1/nodes/not-a-uuid/shared_keys", headers=AUTH).status == 400


def test_cli_shows_and_deletes_shared_keys(tmp_path: Path, database_url: str) -> None:
    """``node show`` prints the posted keys; ``node delete-shared-keys`` removes the
    shared ones, and says so; an unknown node fails naming it."""
    conf = write_conf(tmp_path, database_url)
    ok(manage(conf, "node", "import", str(write_json(tmp_path, [node_document(0)], "n.json"))))
    engine = make_engine(database_url, 1)
    try:
        PeerRepository(engine).post(UUID, {"ip": "10.0.0.2"}, True, 128, 65536)
        PeerRepository(engine).post(UUID, {"done": "yes"}, False, 128, 65536)
    finally:
        engine.dispose()
    shown = json.loads(ok(manage(conf, "node", "show", UUID)))
    assert (shown["shared_keys"], shown["private_keys"]) == ({"ip": "10.0.0.2"}, {"done": "yes"})
    out = ok(manage(conf, "node", "delete-shared-keys", UUID))
    assert out == f"deleted 1 shared keys of node {UUID}\n"
    shown = json.loads(ok(manage(conf, "node", "show", UUID)))
    assert (shown["shared_keys"], shown["private_keys"]) == ({}, {"done": "yes"})
    unknown = node_document(9)["uuid"]
    assert f"no node {unknown}" in failed(manage(conf, "node", "delete-shared-keys", unknown))
