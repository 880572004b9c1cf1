"""The admin API over HTTP, in memory: auth, node registration, bad input, health."""

from __future__ import annotations

import json
from typing import Any

import pytest

from metadatad.admin.site import AdminSite
from metadatad.testing import MemoryStore
from tests.support.factories import node_document
from tests.support.sites import Client

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> Client:
    return Client(AdminSite(store, TOKEN).resource(), base="http://127.0.0.1:8776")  # type: ignore[arg-type]


def send(  # noqa: PLR0917 (a test helper read like a request line)
    client: Client,
    method: str,
    path: str,
    document: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
):  # type: ignore[no-untyped-def]
    data = (
        raw
        if raw is not None
        else (json.dumps(document).encode() if document is not None else None)
    )
    return client.request(method, path, data=data, headers=headers if headers is not None else AUTH)


def stored(store: MemoryStore) -> list[str]:
    return [r.node.uuid for r in store.repository.list_nodes()]


ROUTES = [
    ("GET", "/v1/nodes"),
    ("POST", "/v1/nodes"),
    ("GET", f"/v1/nodes/{node_document()['uuid']}"),
    ("PUT", f"/v1/nodes/{node_document()['uuid']}"),
    ("DELETE", f"/v1/nodes/{node_document()['uuid']}"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_every_node_route_needs_the_token(
    client: Client, store: MemoryStore, method: str, path: str, headers: dict[str, str]
) -> None:
    """Without the exact bearer token: 401 with WWW-Authenticate, and nothing changes."""
    store.repository.upsert_nodes([])
    answer = send(client, method, path, node_document(), headers=headers)
    assert answer.status == 401
    assert answer.header("www-authenticate") == 'Bearer realm="metadatad"'
    assert stored(store) == []
    assert set(store.calls) <= set()


def test_import_list_show_delete(client: Client, store: MemoryStore) -> None:
    """POST a list, GET it back (list without user-data), DELETE one."""
    documents = [node_document(0), node_document(1)]
    answer = send(client, "POST", "/v1/nodes", documents)
    assert answer.status == 200
    assert json.loads(answer.body) == {"created": [d["uuid"] for d in documents], "updated": []}
    again = json.loads(send(client, "POST", "/v1/nodes", documents[0]).body)
    assert again == {"created": [], "updated": [documents[0]["uuid"]]}
    listed = json.loads(send(client, "GET", "/v1/nodes").body)["nodes"]
    assert [n["uuid"] for n in listed] == [d["uuid"] for d in documents]
    assert "user_data" not in listed[0]
    shown = json.loads(send(client, "GET", f"/v1/nodes/{documents[0]['uuid']}").body)
    assert {k: shown[k] for k in documents[0]} == documents[0]
    assert shown["revision"] == 2 and shown["password_set"] is False
    assert send(client, "DELETE", f"/v1/nodes/{documents[0]['uuid']}").status == 204
    assert send(client, "DELETE", f"/v1/nodes/{documents[0]['uuid']}").status == 404
    assert stored(store) == [documents[1]["uuid"]]


def test_put_creates_then_replaces(client: Client, store: MemoryStore) -> None:
    """PUT answers 201 then 200 with the stored document; GET output can be PUT back."""
    document = node_document()
    path = f"/v1/nodes/{document['uuid']}"
    first = send(client, "PUT", path, document)
    assert first.status == 201
    body = json.loads(first.body)
    body["name"] = "renamed"
    second = send(client, "PUT", path, body)
    assert second.status == 200
    assert json.loads(second.body)["name"] == "renamed"
    without_uuid = dict(document)
    del without_uuid["uuid"]
    assert send(client, "PUT", path, without_uuid).status == 200


BAD_IMPORTS: list[tuple[Any, str]] = [
    ([node_document(0), node_document(1, ports=[{"mac": "nope"}])], "[1].ports[0].mac"),
    ([node_document(0), node_document(1, colour="red")], "[1].colour"),
    ([node_document(0), node_document(1, uuid="x")], "[1].uuid"),
    ([node_document(0), node_document(1, user_data="!!")], "[1].user_data"),
    (node_document(launch_index="3"), "launch_index"),
    ([node_document(0), node_document(0)], "[1].uuid"),
    ([], ""),
    ("a string", ""),
]


@pytest.mark.parametrize(("document", "field"), BAD_IMPORTS)
def test_bad_imports_are_400_and_write_nothing(
    client: Client, store: MemoryStore, document: Any, field: str
) -> None:
    """Validation errors name the field; not one node of the import is stored."""
    answer = send(client, "POST", "/v1/nodes", document)
    assert answer.status == 400
    body = json.loads(answer.body)
    assert body["field"] == field and body["message"]
    assert stored(store) == []


def test_conflicting_import_is_409_and_writes_nothing(client: Client, store: MemoryStore) -> None:
    """A port owned by another node makes the whole import a 409."""
    send(client, "POST", "/v1/nodes", node_document(0))
    clash = node_document(2, ports=node_document(0)["ports"])
    answer = send(client, "POST", "/v1/nodes", [node_document(1), clash])
    assert answer.status == 409
    assert json.loads(answer.body)["field"] == "[1].ports[0].mac"
    assert stored(store) == [node_document(0)["uuid"]]
    single = send(client, "PUT", f"/v1/nodes/{clash['uuid']}", clash)
    assert single.status == 409
    assert json.loads(single.body)["field"] == "ports[0].mac"


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"{not json", "invalid JSON"), (b"\xff\xfe", "invalid JSON"), (b"", "invalid JSON")],
)
def test_malformed_bodies(client: Client, store: MemoryStore, raw: bytes, message: str) -> None:
    """Bodies that are not JSON are 400 on POST and PUT."""
    for method, path in (("POST", "/v1/nodes"), ("PUT", f"/v1/nodes/{node_document()['uuid']}")):
        answer = send(client, method, path, raw=raw)
        assert answer.status == 400
        assert json.loads(answer.body)["error"] == message
    assert stored(store) == []


def test_put_body_must_match_url(client: Client, store: MemoryStore) -> None:
    """A PUT whose body names another uuid is refused."""
    answer = send(client, "PUT", f"/v1/nodes/{node_document(1)['uuid']}", node_document(0))
    assert answer.status == 400
    assert json.loads(answer.body)["field"] == "uuid"
    assert (
        send(client, "PUT", f"/v1/nodes/{node_document()['uuid']}", [node_document()]).status == 400
    )
    assert stored(store) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_malformed_uuid_in_url(client: Client, method: str) -> None:
    """A URL uuid that is no uuid is a 400 naming the field."""
    answer = send(client, method, "/v1/nodes/not-a-uuid", node_document())
    assert answer.status == 400
    assert json.loads(answer.body)["field"] == "uuid"


def test_unknown_node_404(client: Client) -> None:
    """GET of a node that does not exist is a 404 with a JSON body."""
    answer = send(client, "GET", f"/v1/nodes/{node_document(9)['uuid']}")
    assert answer.status == 404
    assert "no node" in json.loads(answer.body)["message"]


def test_oversize_body_is_413(store: MemoryStore) -> None:
    """Bodies over the limit ([admin] max_body_bytes) are refused before parsing."""
    client = Client(
        AdminSite(store, TOKEN, max_body_bytes=100).resource(),  # type: ignore[arg-type]
        base="http://127.0.0.1:8776",
    )
    answer = send(client, "POST", "/v1/nodes", [node_document(0), node_document(1)])
    assert answer.status == 413
    assert stored(store) == []


def test_unknown_routes_and_methods(client: Client) -> None:
    """Unknown paths are 404, wrong methods 405, neither a traceback."""
    assert send(client, "GET", "/v2/nodes").status == 404
    answer = send(client, "PATCH", "/v1/nodes")
    assert answer.status == 405
    assert b"Traceback" not in answer.body


def test_healthz(client: Client, store: MemoryStore) -> None:
    """/healthz needs no token; 200 while the database answers, 503 when not."""
    answer = send(client, "GET", "/healthz", headers={})
    assert answer.status == 200
    assert json.loads(answer.body)["database"] == "ok"
    store.repository.available = False
    answer = send(client, "GET", "/healthz", headers={})
    assert answer.status == 503
    assert json.loads(answer.body)["status"] == "unhealthy"


def test_database_down_is_503_json(client: Client, store: MemoryStore) -> None:
    """Node routes answer 503 in JSON with Retry-After while the database is down."""
    store.repository.available = False
    for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/nodes")):
        answer = send(client, method, path, node_document())
        assert answer.status == 503
        assert answer.header("retry-after") == "5"
        assert json.loads(answer.body)["error"] == "unavailable"


def test_put_accepts_upper_case_uuid_in_body(client: Client, store: MemoryStore) -> None:
    """The body may name the URL's uuid in upper case."""
    document = node_document()
    shouted = dict(document, uuid=document["uuid"].upper())
    assert send(client, "PUT", f"/v1/nodes/{document['uuid']}", shouted).status == 201
    assert stored(store) == [document["uuid"]]


_UUID5 = node_document(5)["uuid"]
_HOSTILE_BODIES = [
    pytest.param(
        json.dumps({**node_document(5), "name": "\ud800"}).encode(), id="lone-surrogate-value"
    ),
    pytest.param(
        json.dumps({**node_document(5), "meta": {"\udc00": "x"}}).encode(), id="lone-surrogate-key"
    ),
    pytest.param(
        json.dumps(
            {
                **node_document(5),
                "network_data": {"links": [{"id": "\ud83d"}], "networks": [], "services": []},
            }
        ).encode(),
        id="lone-surrogate-network-data",
    ),
    pytest.param(b"[" * 5000, id="deep-list"),
    pytest.param(b'{"network_data": ' * 5000 + b"null" + b"}" * 5000, id="deep-object"),
]


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/nodes"), ("PUT", f"/v1/nodes/{_UUID5}")]
)
@pytest.mark.parametrize("body", _HOSTILE_BODIES)
def test_lone_surrogates_and_deep_nesting_are_400(
    client: Client, store: MemoryStore, method: str, path: str, body: bytes
) -> None:
    """Valid JSON a database cannot store, or nested past any sane depth: 400 naming
    the problem, nothing stored, nothing logged as a failure."""
    from twisted.logger import capturedLogs

    with capturedLogs() as events:
        answer = send(client, method, path, raw=body)
    assert answer.status == 400, answer.body
    assert json.loads(answer.body)["error"] in ("invalid JSON", "invalid node")
    assert stored(store) == []
    assert not [e for e in events if "log_failure" in e]


def test_a_mapped_or_zoned_port_address_is_stored_as_identity_sees_it(
    client: Client, store: MemoryStore
) -> None:
    """``::ffff:127.0.0.1`` is 127.0.0.1: another node's port, so 409; a zone is
    dropped, so the port matches callers (whose addresses never carry one)."""
    first = node_document(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
    assert send(client, "POST", "/v1/nodes", first).status == 200
    twin = node_document(1, ports=[{"mac": "52:54:00:00:00:02", "ip": "::ffff:127.0.0.1"}])
    assert send(client, "POST", "/v1/nodes", twin).status == 409
    zoned = node_document(2, ports=[{"mac": "52:54:00:00:00:03", "ip": "fe80::1%eth0"}])
    answer = send(client, "POST", "/v1/nodes", zoned)
    assert answer.status == 200
    assert store.repository.node_by_ip("fe80::1") is not None
    assert stored(store) == [node_document(0)["uuid"], node_document(2)["uuid"]]
