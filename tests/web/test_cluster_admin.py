"""The admin API's cluster routes, in memory: /v1/conductors, /v1/ring, the ownership
part of /v1/nodes/<uuid>/boot, and membership in /healthz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger

from metadatad.admin.site import AdminSite
from metadatad.cluster.membership import MembershipService
from metadatad.core.conductors import ConductorInfo
from metadatad.testing import MemoryClusterRepository, MemoryNodeRepository, MemoryStore
from tests.support.factories import make_node
from tests.support.sites import Answer, Client

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.nodes = MemoryNodeRepository()
        self.nodes.upsert_nodes(
            [make_node(i) for i in range(30)]
            + [make_node(i, conductor_group="rack-9") for i in range(30, 40)]
        )
        self.repository = MemoryClusterRepository(self.nodes, now=self.clock.seconds)
        self.services = [self.service(name) for name in ("c1", "c2")]
        self.client = Client(
            AdminSite(MemoryStore(self.nodes), TOKEN, cluster=self.services[0]).resource(),  # type: ignore[arg-type]
            base="http://127.0.0.1:8776",
        )

    def service(self, name: str) -> MembershipService:
        service = MembershipService(
            self.repository,
            ConductorInfo(name, "", f"10.0.0.{name[-1]}", f"http://10.0.0.{name[-1]}:8775"),
            self.clock,
            heartbeat_interval=1,
            heartbeat_timeout=5,
            run=maybeDeferred,
            points=64,
        )
        service.log = Logger(observer=lambda event: None)  # type: ignore[misc]
        return service

    def start(self) -> None:
        for service in self.services:
            service.startService()
        self.clock.advance(0)
        for _ in range(30):
            self.clock.advance(0.1)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.client.get(path, headers=AUTH if headers is None else headers)


@pytest.fixture
def setup() -> Iterator[Setup]:
    built = Setup()
    yield built
    for service in built.services:
        if service.running:
            service.stopService()


def body(answer: Answer) -> Any:
    return json.loads(answer.body)


@pytest.mark.parametrize(
    "path", ["/v1/conductors", "/v1/ring", f"/v1/nodes/{make_node(0).uuid}/boot"]
)
def test_cluster_routes_need_the_token(setup: Setup, path: str) -> None:
    """Without the bearer token: 401."""
    setup.start()
    assert setup.get(path, headers={}).status == 401
    assert setup.get(path, headers={"Authorization": "Bearer wrong"}).status == 401


def test_conductors(setup: Setup) -> None:
    """Each conductor with its addresses, heartbeat age by the database's clock,
    liveness, and the number of nodes it holds."""
    setup.start()
    answer = setup.get("/v1/conductors")
    assert answer.status == 200
    assert answer.header("content-type") == "application/json"
    document = body(answer)
    assert document["heartbeat_timeout"] == 5
    by_name = {c["name"]: c for c in document["conductors"]}
    assert sorted(by_name) == ["c1", "c2"]
    c1 = by_name["c1"]
    assert (c1["group"], c1["tftp_address"], c1["http_address"]) == (
        "",
        "10.0.0.1",
        "http://10.0.0.1:8775",
    )
    assert c1["live"] is True and c1["online"] is True
    assert 0 <= c1["heartbeat_age"] <= 1
    assert c1["nodes"] + by_name["c2"]["nodes"] == 30
    setup.services[1].stopService()
    setup.clock.advance(0.5)
    by_name = {c["name"]: c for c in body(setup.get("/v1/conductors"))["conductors"]}
    assert by_name["c2"]["live"] is False and by_name["c2"]["online"] is False
    assert 0.4 <= by_name["c2"]["heartbeat_age"] <= 1.6


def test_ring(setup: Setup) -> None:
    """Generation, members, per-conductor counts, and the unowned group."""
    setup.start()
    report = body(setup.get("/v1/ring"))
    assert report["generation"] == setup.repository.ring_state().generation
    assert report["groups"] == {"": ["c1", "c2"]}
    assert report["nodes"] == 40
    assert report["unowned"] == 10
    assert report["unowned_groups"] == {"rack-9": 10}
    assert report["pending"] == 0
    counts = {c["name"]: (c["assigned"], c["claimed"]) for c in report["conductors"]}
    assert counts["c1"][0] == counts["c1"][1]
    assert sum(a for a, _ in counts.values()) == 30
    assert report["points"] == 64 and report["replicas"] == 2


def test_node_boot_names_owner_and_standbys(setup: Setup) -> None:
    """The owner holds the claim; the other conductor is its standby."""
    setup.start()
    uuid = make_node(3).uuid
    document = body(setup.get(f"/v1/nodes/{uuid}/boot"))
    claim = setup.repository.claim_of(uuid)
    assert document["uuid"] == uuid
    assert document["owner"] == claim.owner == document["ring_owner"]
    assert document["standbys"] == [{"c1": "c2", "c2": "c1"}[claim.owner]]
    assert document["generation"] == claim.generation
    assert document["ring_generation"] == setup.repository.ring_state().generation
    assert document["claimed_at"].endswith("Z")
    assert document["conductor_group"] == ""
    assert document["events"] == []


def test_node_boot_of_an_unowned_node(setup: Setup) -> None:
    """A node whose group has no live conductor has no owner and no standby."""
    setup.start()
    document = body(setup.get(f"/v1/nodes/{make_node(35).uuid}/boot"))
    assert (document["owner"], document["ring_owner"], document["standbys"]) == (None, None, [])
    assert document["conductor_group"] == "rack-9"
    assert setup.get("/v1/nodes/0badc0de-0000-4000-8000-000000000001/boot").status == 404


def test_database_down_is_503(setup: Setup) -> None:
    """A database error on a cluster route is a 503 with Retry-After."""
    setup.start()
    setup.repository.available = False
    for path in ("/v1/conductors", "/v1/ring"):
        answer = setup.get(path)
        assert answer.status == 503
        assert answer.header("retry-after") == "5"


def test_without_membership(setup: Setup) -> None:
    """An admin site without membership says so; the boot route still answers."""
    client = Client(AdminSite(MemoryStore(setup.nodes), TOKEN).resource(), "http://127.0.0.1:8776")  # type: ignore[arg-type]
    answer = client.get("/v1/ring", headers=AUTH)
    assert answer.status == 503
    assert "membership is not running" in body(answer)["message"]
    document = body(client.get(f"/v1/nodes/{make_node(0).uuid}/boot", headers=AUTH))
    assert document["owner"] is None and document["standbys"] == []
    assert body(client.get("/healthz")) == {"status": "ok", "database": "ok"}


def test_healthz_follows_membership(setup: Setup) -> None:
    """/healthz is 503 until the first sync, 200 while heartbeats land, 503 once the
    last heartbeat is older than the timeout, and after stopping."""
    service = setup.services[0]
    service.startService()
    answer = setup.client.get("/healthz")
    assert (answer.status, body(answer)["membership"]) == (503, "starting")
    setup.clock.advance(0)
    answer = setup.client.get("/healthz")
    assert answer.status == 200
    assert body(answer) == {
        "status": "ok",
        "database": "ok",
        "membership": "ok",
        "heartbeat_age": 0.0,
        "heartbeat_timeout": 5,
    }
    setup.repository.available = False  # the cluster tables fail; the store answers
    for _ in range(70):
        setup.clock.advance(0.1)
    answer = setup.client.get("/healthz")
    assert (answer.status, body(answer)["membership"]) == (503, "stale")
    assert body(answer)["heartbeat_age"] == pytest.approx(7.0, abs=0.01)
    service.stopService()
    assert body(setup.client.get("/healthz"))["membership"] == "stopped"
