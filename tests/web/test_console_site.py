"""The console's routes in memory (StubTreq) on a real SQLite database: login,
sessions, CSRF, escaping, and the dispatch between console and admin API."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from metadatad.admin.console import Console, ConsoleRoot, Sessions
from metadatad.admin.feed import ClusterFeed, merge
from metadatad.core.nodes import parse_node
from metadatad.db.console import ConsoleQueries
from metadatad.db.migrate import upgrade
from metadatad.db.schema import dhcp_pushes, node_claims
from metadatad.db.store import NodeRepository, make_engine
from tests.support.factories import node_document
from tests.support.sites import Client

TOKEN = "console-token-0123456789abcdef"
NODE = node_document(0)
EVIL = {**node_document(1), "name": '<script>alert("x")</script>'}
FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}


class AdminStandIn(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"admin api"


class SyncStore:
    """The Store's face the console uses, answering at once from a real database."""

    def __init__(self, repository: NodeRepository) -> None:
        self.repository = repository

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        return succeed(f(*args))

    def get_node(self, uuid: str) -> Deferred[Any]:
        return self.run(self.repository.get_node, uuid)

    def clear_password(self, uuid: str) -> Deferred[Any]:
        return self.run(self.repository.clear_password, uuid)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'console.sqlite'}"
        self.engine = make_engine(url, 1)
        upgrade(self.engine)
        NodeRepository(self.engine).upsert_nodes([parse_node(NODE), parse_node(EVIL)])
        with self.engine.begin() as connection:
            connection.execute(
                insert(node_claims).values(
                    node_uuid=NODE["uuid"],
                    owner="c1",
                    conductor_group="",
                    generation=1,
                    claimed_at=__import__("datetime").datetime(2026, 12, 6),
                )
            )
            connection.execute(
                insert(dhcp_pushes).values(
                    node_uuid=NODE["uuid"],
                    owner="c1",
                    generation=1,
                    desired="{}",
                    desired_digest="d",
                    pushed="{}",
                    pushed_digest="d",
                    attempts=0,
                    permanent=False,
                    desired_at=1.0,
                    pushed_at=2.0,
                )
            )
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.kicked = 0
        self.console = Console(
            TOKEN,
            self.clock,
            SyncStore(NodeRepository(self.engine)),
            ConsoleQueries(self.engine),
            conductor="c1",
            dhcp=self,
        )
        self.client = Client(
            ConsoleRoot(AdminStandIn(), self.console.resource()),
            base="http://127.0.0.1:8776",
        )

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.client.request("POST", path, allow_redirects=False, **kwargs)

    def nodes_changed(self) -> None:  # the DhcpPusher's kick
        self.kicked += 1

    def login(self) -> str:
        answer = self.post("/console/login", data=b"token=" + TOKEN.encode(), headers=FORM)
        assert answer.status == 303
        cookie = answer.header("Set-Cookie")
        assert cookie is not None
        return cookie.split(";")[0]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    built = Setup(tmp_path)
    yield built
    built.engine.dispose()


PAGES = [
    "/console/nodes",
    f"/console/nodes/{NODE['uuid']}",
    f"/console/nodes/{NODE['uuid']}/repush",
    "/console/whatif",
    "/console/events",
]


def test_index_is_the_login_form_and_pages_need_a_session(setup: Setup) -> None:
    answer = setup.client.get("/")
    assert answer.status == 200
    assert 'name="token"' in answer.text and "Log out" not in answer.text
    assert answer.header("Content-Security-Policy").startswith("default-src 'none'")
    for path in PAGES:
        assert setup.client.get(path).status == 401, path
    answer = setup.post(f"/console/nodes/{NODE['uuid']}/repush", headers=FORM)
    assert answer.status == 401
    assert setup.kicked == 0


def test_bad_token_refused_good_token_makes_a_session(setup: Setup) -> None:
    for bad in (b"token=wrong", b"token=", b"nothing=1", b"token=" + TOKEN.encode() + b"x"):
        answer = setup.post("/console/login", data=bad, headers=FORM)
        assert answer.status == 401 and "refused" in answer.text
        assert answer.header("Set-Cookie") is None
    answer = setup.post("/console/login", data=b"token=" + TOKEN.encode(), headers=FORM)
    assert answer.status == 303 and answer.header("Location") == "/"
    cookie = answer.header("Set-Cookie") or ""
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    page = setup.client.get("/", headers={"Cookie": session})
    assert page.status == 200 and "Log out" in page.text
    assert setup.client.get("/console/nodes", headers={"Cookie": session}).status == 200


def test_a_token_in_the_url_is_refused(setup: Setup) -> None:
    answer = setup.post(f"/console/login?token={TOKEN}", data=b"", headers=FORM)
    assert answer.status == 400 and answer.header("Set-Cookie") is None
    assert "never in the URL" in answer.text


def test_sessions_expire_and_belong_to_their_token(setup: Setup) -> None:
    session = setup.login()
    other = Sessions("another-token", setup.clock).issue()
    assert (
        setup.client.get("/console/nodes", headers={"Cookie": f"metadatad_console={other}"}).status
        == 401
    )
    value = session.split("=", 1)[1]
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert (
        setup.client.get(
            "/console/nodes", headers={"Cookie": f"metadatad_console={tampered}"}
        ).status
        == 401
    )
    setup.clock.advance(12 * 3600 + 1)
    assert setup.client.get("/console/nodes", headers={"Cookie": session}).status == 401


def test_bearer_token_works_like_the_admin_api(setup: Setup) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert setup.client.get("/console/nodes", headers=bearer).status == 200
    wrong = {"Authorization": "Bearer nope"}
    assert setup.client.get("/console/nodes", headers=wrong).status == 401


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)


def test_actions_need_the_csrf_token_and_a_same_origin(setup: Setup) -> None:
    session = setup.login()
    cookie = {"Cookie": session, **FORM}
    confirm = setup.client.get(f"/console/nodes/{NODE['uuid']}/repush", headers=cookie)
    assert confirm.status == 200 and 'id="confirm"' in confirm.text
    csrf = _csrf(confirm.text)
    path = f"/console/nodes/{NODE['uuid']}/repush"
    assert setup.post(path, headers=cookie).status == 403
    assert setup.post(path, data=b"csrf=00", headers=cookie).status == 403
    cross = {**cookie, "Origin": "http://evil.example"}
    answer = setup.post(path, data=f"csrf={csrf}".encode(), headers=cross)
    assert answer.status == 403
    assert setup.kicked == 0
    same = {**cookie, "Origin": "http://127.0.0.1:8776"}
    answer = setup.post(path, data=f"csrf={csrf}".encode(), headers=same)
    assert answer.status == 303
    assert answer.header("Location") == f"/console/nodes/{NODE['uuid']}?done=repush"
    assert setup.kicked == 1  # c1 holds the node: its pusher was kicked
    page = setup.client.get(answer.header("Location") or "", headers=cookie)
    assert 'id="notice"' in page.text and "push-pending" in page.text


def test_reset_a_posted_password(setup: Setup) -> None:
    """The node page offers the reset only while a password is posted; the confirmed
    action clears it (Nova's clear-password), like DELETE /v1/nodes/<uuid>/password."""
    repository = NodeRepository(setup.engine)
    cookie = {"Cookie": setup.login(), **FORM, "Origin": "http://127.0.0.1:8776"}
    page = setup.client.get(f"/console/nodes/{NODE['uuid']}", headers=cookie)
    assert 'id="reset-password"' not in page.text
    assert repository.set_password(NODE["uuid"], "posted-secret") is True
    page = setup.client.get(f"/console/nodes/{NODE['uuid']}", headers=cookie)
    assert 'id="reset-password"' in page.text
    path = f"/console/nodes/{NODE['uuid']}/reset-password"
    confirm = setup.client.get(path, headers=cookie)
    answer = setup.post(path, data=f"csrf={_csrf(confirm.text)}".encode(), headers=cookie)
    assert answer.status == 303
    assert answer.header("Location") == f"/console/nodes/{NODE['uuid']}?done=reset-password"
    assert repository.get_password(NODE["uuid"]) is None
    page = setup.client.get(answer.header("Location") or "", headers=cookie)
    assert "The posted password was cleared." in page.text
    assert 'id="reset-password"' not in page.text


def test_names_are_text_everywhere(setup: Setup) -> None:
    session = {"Cookie": setup.login()}
    listing = setup.client.get("/console/nodes?q=script", headers=session)
    node = setup.client.get(f"/console/nodes/{EVIL['uuid']}", headers=session)
    search = setup.client.get("/console/nodes?q=%3Cscript%3Ealert(1)", headers=session)
    for page in (listing.text, node.text, search.text):
        assert "<script>alert" not in page
        assert page.count("<script") == 1  # console.js only
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in listing.text
    assert "&lt;script&gt;alert(1)" in search.text


def test_unknown_nodes_actions_and_files(setup: Setup) -> None:
    session = {"Cookie": setup.login()}
    assert setup.client.get("/console/nodes/not-a-uuid", headers=session).status == 404
    missing = node_document(9)["uuid"]
    assert setup.client.get(f"/console/nodes/{missing}", headers=session).status == 404
    assert setup.client.get(f"/console/nodes/{NODE['uuid']}/explode", headers=session).status == 404
    assert setup.client.get("/console/static/console.js").status == 200
    assert setup.client.get("/console/static/secret.py").status == 404
    assert setup.client.get("/console/nope", headers=session).status == 404


def test_other_paths_go_to_the_admin_api(setup: Setup) -> None:
    assert setup.client.get("/v1/nodes").text == "admin api"
    assert setup.client.get("/healthz").text == "admin api"
    assert "token" in setup.client.get("/").text


class FakeCluster:
    heartbeat_timeout = 3.0

    def __init__(self) -> None:
        self.live = True
        self.rings = 0

    @property
    def state(self) -> Any:
        return type("State", (), {"generation": 2 if self.live else 3})()

    def conductors(self) -> Deferred[list[dict[str, Any]]]:
        return succeed(
            [
                {"name": "c1", "group": "", "live": True, "heartbeat_age": 0.2, "nodes": 3},
                {"name": "c2", "group": "", "live": self.live, "heartbeat_age": 0.4, "nodes": 1},
            ]
        )

    def ring(self) -> Deferred[dict[str, Any]]:
        self.rings += 1
        names = ["c1", "c2"] if self.live else ["c1"]
        return succeed(
            {
                "generation": 2 if self.live else 3,
                "nodes": 4,
                "conductors": [
                    {"name": n, "live": True, "assigned": 3 if n == "c1" else 1, "claimed": 1}
                    for n in names
                ],
            }
        )


def test_feed_polls_while_watched_and_merges() -> None:
    clock = Clock()
    cluster = FakeCluster()
    feed = ClusterFeed(cluster, clock, interval=1.0)
    seen: list[dict[str, Any]] = []
    stop = feed.subscribe(seen.append)
    assert len(seen) == 1 and [c["in_ring"] for c in seen[0]["conductors"]] == [True, True]
    clock.advance(1.0)
    clock.advance(1.0)
    assert (len(seen), cluster.rings) == (3, 1)  # the same generation: no new report
    cluster.live = False
    clock.advance(1.0)
    assert seen[-1]["generation"] == 3 and cluster.rings == 2
    c2 = seen[-1]["conductors"][1]
    assert (c2["live"], c2["in_ring"], c2["assigned"]) == (False, False, 0)
    clock.advance(5.0)
    assert cluster.rings == 3  # refreshed after 5 s anyway
    stop()
    count = len(seen)
    clock.advance(5.0)
    assert len(seen) == count and not clock.getDelayedCalls()


def test_feed_polls_at_once_on_a_new_generation() -> None:
    clock = Clock()
    cluster = FakeCluster()
    feed = ClusterFeed(cluster, clock, interval=0.5)
    seen: list[dict[str, Any]] = []
    stop = feed.subscribe(seen.append)
    clock.advance(0.1)
    assert len(seen) == 1  # not due yet, same generation
    cluster.live = False  # membership saw generation 3
    clock.advance(0.1)
    assert len(seen) == 2 and seen[-1]["generation"] == 3
    stop()


def test_merge_keeps_conductors_known_to_one_side() -> None:
    snapshot = merge(
        [{"name": "a", "live": True, "heartbeat_age": 1.0, "nodes": 2}],
        {"generation": 5, "conductors": [{"name": "b", "live": True, "assigned": 4}]},
        10.0,
    )
    assert [c["name"] for c in snapshot["conductors"]] == ["a", "b"]
    assert snapshot["conductors"][1]["heartbeat_age"] is None
    assert snapshot["heartbeat_timeout"] == 10.0
