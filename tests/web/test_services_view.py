"""The service view: the project's services and their hosts (Rancher style), image and
volumes, cardinal values from the store, and Last-Modified beside the ETag."""

from __future__ import annotations

import json
from datetime import datetime
from email.utils import format_datetime

import pytest

from metadatad.core.services import Member, ProjectView, service_members
from metadatad.metadata import peers
from metadatad.metadata.reply import json_reply
from metadatad.metadata.services import render_service
from tests.support.factories import make_node
from tests.web.test_peers_site import A0, A1, A2, A3, B4, Site

JSON = {"Accept": "application/json"}


def test_service_members_by_cardinal_value() -> None:
    """Members share project and service name, ordered by cardinal value then uuid;
    the caller is a member even when the store has not shown it yet."""
    me = Member(make_node(0), 3)
    view = ProjectView(
        (
            Member(make_node(1), 1),
            Member(make_node(2), 4),
            Member(make_node(3, service={"name": "db"}), 0),
            Member(make_node(4, project_id="proj-b"), 0),
        )
    )
    members = service_members(me, view)
    assert [(m.node.name, m.cardinal) for m in members] == [
        ("web-1", 1),
        ("web-0", 3),
        ("web-2", 4),
    ]
    assert service_members(Member(make_node(5, service=None)), view) == []


def test_the_store_view_of_the_caller_wins() -> None:
    """A cached record may be older than the view: the view's node and value count."""
    cached = make_node(0, hostname="old.example.org")
    view = ProjectView((Member(make_node(0), 7),))
    reply = render_service(cached, view, ["hostname"], as_json=False)
    assert reply.body == b"web-0.example.org"
    assert render_service(cached, view, ["cardinal_value"], False).body == b"7"


def test_image_and_volumes() -> None:
    node = make_node(0)
    view = ProjectView((Member(node, 0),))
    assert render_service(node, view, ["image"], False).body == b"ami-00000001"
    assert render_service(node, view, ["volumes"], False).body.decode().splitlines() == [
        "ami",
        "root",
        "ephemeral0",
    ]
    assert render_service(node, view, ["volumes", "ephemeral0"], False).body == b"sdb"
    assert json.loads(render_service(node, view, ["volumes"], True).body) == {
        "ami": "sda",
        "root": "/dev/sda",
        "ephemeral0": "sdb",
    }
    bare = make_node(1, image_id=None, block_device_mapping={})
    view = ProjectView((Member(bare, 0),))
    for leaf in ("image", "volumes"):
        assert render_service(bare, view, [leaf], False).status == 404


def test_site_lists_the_projects_services_with_their_hosts() -> None:
    site = Site()
    assert site.get("/service/latest/services", A0).text == "0=db\n1=web"
    for key in ("1", "web"):
        listing = site.get(f"/service/latest/services/{key}", A0).text.splitlines()
        assert listing == ["service_name", "service_domain", "port", "hosts"]
        hosts = site.get(f"/service/latest/services/{key}/hosts", A0).text
        assert hosts == "0=web-0.example.org\n5=web-1.example.org"
    db = site.get("/service/latest/services/db/hosts/2/virt_ip_address", A0)
    assert (db.status, db.text) == (200, A2.local_ipv4)
    assert site.get("/service/latest/services/db/port", A0).text == "5432"
    assert site.get("/service/latest/services/db/service_domain", A0).status == 404
    document = json.loads(site.get("/service/latest/services", A0, headers=JSON).body)
    assert [s["service_name"] for s in document] == ["db", "web"]
    assert [h["uuid"] for h in document[1]["hosts"]] == [A0.uuid, A1.uuid]
    # A3 (no service) is in no list; project B's web service is not A's.
    assert A3.uuid not in json.dumps(document) and B4.uuid not in json.dumps(document)
    b_services = json.loads(site.get("/service/latest/services", B4, headers=JSON).body)
    assert [[h["uuid"] for h in s["hosts"]] for s in b_services] == [[B4.uuid]]
    for path in ("services/2", "services/nope", "services/web/hosts/9", "services/web/x"):
        assert site.get(f"/service/latest/{path}", A0).status == 404, path


def test_site_cardinal_values_are_unique_within_a_service() -> None:
    """Two members with launch index 0: both listed, under distinct values."""
    site = Site()
    twin = make_node(9, launch_index=0)
    site.store.repository.upsert_nodes([twin])
    hosts = site.get("/service/latest/all_hosts", A0).text.splitlines()
    assert hosts == ["0=web-0.example.org", "1=web-9.example.org", "5=web-1.example.org"]
    assert site.get("/service/latest/all_hosts/1/uuid", A0).text == twin.uuid


def test_last_modified_beside_etag_and_if_modified_since() -> None:
    site = Site()
    first = site.get("/service/latest/all_hosts", A0)
    stamp = first.header("Last-Modified")
    assert stamp and first.header("ETag")
    assert stamp.endswith(" GMT")
    # Not modified since then: 304 (without If-None-Match, which takes precedence).
    again = site.get("/service/latest/all_hosts", A0, headers={"If-Modified-Since": stamp})
    assert (again.status, again.body) == (304, b"")
    assert again.header("Last-Modified") == stamp
    stale = site.get(
        "/service/latest/all_hosts",
        A0,
        headers={"If-Modified-Since": stamp, "If-None-Match": '"other"'},
    )
    assert stale.status == 200
    old = format_datetime(datetime(2001, 1, 1).astimezone(), usegmt=False)
    assert (
        site.get("/service/latest/all_hosts", A0, headers={"If-Modified-Since": old}).status == 200
    )
    bad = site.get("/service/latest/all_hosts", A0, headers={"If-Modified-Since": "yesterday"})
    assert bad.status == 200
    assert site.get("/openstack/latest/shared.json", A0).header("Last-Modified") == stamp


@pytest.mark.parametrize(
    ("changed", "shown", "status"),
    [
        (datetime(2026, 12, 6, 10, 0, 0), "Sun, 06 Dec 2026 10:00:00 GMT", 304),
        (datetime(2026, 12, 6, 10, 0, 1), "Sun, 06 Dec 2026 10:00:01 GMT", 200),
        (datetime(2026, 12, 6, 10, 0, 0, 900), "Sun, 06 Dec 2026 10:00:00 GMT", 304),
        (None, None, 200),
    ],
)
def test_with_watch_headers_dates(changed: datetime | None, shown: str | None, status: int) -> None:
    """Last-Modified is to the second; If-Modified-Since at or after it is a 304."""
    since = "Sun, 06 Dec 2026 10:00:00 GMT"
    reply = peers.with_watch_headers(json_reply([]), 3, None, changed, since)
    assert reply.status == status
    assert dict(reply.headers).get("Last-Modified") == shown
