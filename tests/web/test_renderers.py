"""The pure EC2 and OpenStack renderers."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metadatad.metadata import ec2, openstack, reply
from metadatad.metadata.reply import split_path
from tests.support.factories import USER_DATA, make_node

PENDING = datetime(2026, 11, 22, 4, 0, 0)


def render(node, path: str, version: str = "latest", region: str = ""):  # type: ignore[no-untyped-def]
    parts = split_path(path.encode())
    return ec2.render(node, version, parts, region=region, pending_time=PENDING)


def body(node, path: str, version: str = "latest") -> str:  # type: ignore[no-untyped-def]
    reply = render(node, path, version)
    assert reply.status == 200, path
    return reply.body.decode()


def crawl(node, version: str, path: str = "meta-data/") -> dict:  # type: ignore[no-untyped-def]
    """Walk a listing the way cloud-init's MetadataMaterializer does."""
    found = {}
    for line in body(node, path, version).splitlines():
        if line.endswith("/"):
            found[line[:-1]] = crawl(node, version, path + line)
        elif "=" in line and path.endswith("public-keys/"):
            index, name = line.split("=", 1)
            found[name] = body(node, f"{path}{index}/openssh-key", version)
        else:
            found[line] = body(node, path + line, version)
    return found


def test_versions_listing() -> None:
    """``/`` lists Nova's versions, the dated ones cloud-init probes, then latest."""
    lines = ec2.versions_listing().body.decode().splitlines()
    assert lines[0] == "1.0" and lines[-1] == "latest"
    for version in ("2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23"):
        assert version in lines


@pytest.mark.parametrize("version", [*ec2.VERSIONS, "latest"])
def test_every_listed_key_answers(version: str) -> None:
    """A crawl of each version never meets a listed key that does not answer 200."""
    node = make_node(kernel_id="aki-1", ramdisk_id="ari-1")
    tree = crawl(node, version)
    assert tree["instance-id"] == node.uuid
    assert tree["ami-launch-index"] == "0"


def test_latest_meta_data_values() -> None:
    """The latest tree carries every DESIGN.md key with the node's values."""
    node = make_node(3, public_keys={"b": "ssh-rsa BBB", "a": "ssh-ed25519 AAA"})
    tree = crawl(node, "latest")
    assert tree == {
        "ami-id": "ami-00000001",
        "ami-launch-index": "3",
        "ami-manifest-path": "FIXME",
        "block-device-mapping": {"ami": "sda", "ephemeral0": "sdb", "root": "/dev/sda"},
        "hostname": "web-3.example.org",
        "instance-action": "none",
        "instance-id": node.uuid,
        "instance-type": "baremetal.large",
        "local-hostname": "web-3.example.org",
        "local-ipv4": "10.0.0.5",
        "mac": "52:54:00:12:00:03",
        "network": {
            "interfaces": {
                "macs": {
                    "52:54:00:12:00:03": {
                        "device-number": "0",
                        "interface-id": "eni-525400120003",
                        "local-hostname": "web-3.example.org",
                        "local-ipv4s": "10.0.0.5",
                        "mac": "52:54:00:12:00:03",
                        "owner-id": "proj-a",
                        "security-groups": "default",
                    }
                }
            }
        },
        "placement": {"availability-zone": "az1a"},
        "public-hostname": "web-3.example.org",
        "public-ipv4": "",
        "public-keys": {"a": "ssh-ed25519 AAA", "b": "ssh-rsa BBB"},
        "reservation-id": "r-00000001",
        "security-groups": "default",
    }
    assert body(node, "meta-data/public-keys") == "0=a\n1=b"
    assert body(node, "meta-data/public-keys/1/") == "openssh-key"


def test_version_gating() -> None:
    """Keys appear from the version Nova introduced them in."""
    node = make_node(kernel_id="aki-1")
    assert "instance-type" not in body(node, "meta-data", "1.0").splitlines()
    assert "local-hostname" not in body(node, "meta-data", "1.0").splitlines()
    assert "instance-type" in body(node, "meta-data", "2007-08-29").splitlines()
    assert "kernel-id" not in body(node, "meta-data", "2007-10-10").splitlines()
    assert "kernel-id" in body(node, "meta-data", "2007-12-15").splitlines()
    assert "placement/" in body(node, "meta-data", "2008-02-01").splitlines()
    assert "instance-action" in body(node, "meta-data", "2008-09-01").splitlines()
    assert "kernel-id" not in body(make_node(), "meta-data").splitlines()


def test_no_public_keys_no_listing() -> None:
    """Without keys, public-keys is neither listed nor served."""
    node = make_node(public_keys={})
    assert "public-keys/" not in body(node, "meta-data").splitlines()
    assert render(node, "meta-data/public-keys").status == 404


def test_version_root_and_user_data() -> None:
    """The version root lists user-data only when there is some; it is served raw."""
    node = make_node()
    assert body(node, "") == "dynamic/\nmeta-data/\nuser-data"
    assert body(node, "", "2008-09-01") == "meta-data/\nuser-data"
    assert render(node, "user-data").body == USER_DATA
    assert render(node, "user-data/").body == USER_DATA
    bare = make_node(user_data=None)
    assert body(bare, "") == "dynamic/\nmeta-data/"
    assert render(bare, "user-data").status == 404


def test_identity_document() -> None:
    """The identity document carries the ids and the region AWS SDKs read."""
    node = make_node()
    assert body(node, "dynamic") == "instance-identity/"
    assert body(node, "dynamic/instance-identity/") == "document"
    document = json.loads(body(node, "dynamic/instance-identity/document"))
    assert document["instanceId"] == node.uuid
    assert document["availabilityZone"] == "az1a"
    assert document["region"] == "az1"
    assert document["privateIp"] == "10.0.0.2"
    assert document["pendingTime"] == "2026-11-22T04:00:00Z"
    assert render(node, "dynamic", "2008-09-01").status == 404
    configured = ec2.render(
        node,
        "latest",
        ["dynamic", "instance-identity", "document"],
        region="eu-west",
        pending_time=PENDING,
    )
    assert json.loads(configured.body)["region"] == "eu-west"


@pytest.mark.parametrize(
    ("zone", "region"),
    [("az1a", "az1"), ("nova", "nova"), ("us-east-1b", "us-east-1"), ("z9", "z9")],
)
def test_region_derivation(zone: str, region: str) -> None:
    """The region is the zone minus a trailing letter, as botocore derives it."""
    assert ec2.region_of(zone) == region


@pytest.mark.parametrize(
    "path",
    [
        "meta-data/nonexistent",
        "meta-data/instance-id/extra",
        "meta-data/public-keys/0/_name",
        "meta-data/public-keys/7",
        "dynamic/instance-identity/document/x",
        "dynamic/other",
        "nothing",
    ],
)
def test_unknown_paths_404(path: str) -> None:
    """Paths outside the tree (and internal names) are 404s."""
    assert render(make_node(), path).status == 404


@pytest.mark.parametrize(
    ("raw", "parts"),
    [
        ("/", []),
        ("//openstack//latest/", ["openstack", "latest"]),
        ("/latest/meta-data/../user-data", ["latest", "user-data"]),
        ("/../../etc/passwd", ["etc", "passwd"]),
        ("/latest/%6Deta-data/", ["latest", "meta-data"]),
        ("/./latest/.", ["latest"]),
    ],
)
def test_split_path(raw: str, parts: list[str]) -> None:
    """Paths normalise like Nova's: slashes, dots and escapes never matter; the second
    time from memory."""
    assert split_path(raw.encode()) == parts
    assert split_path(raw.encode()) == parts


def test_split_path_memory_is_bounded() -> None:
    """Made-up paths do not grow the memory of split paths past its bound."""
    for i in range(reply._SPLIT_MAX + 10):
        assert split_path(b"/scan/%d" % i) == ["scan", str(i)]
    assert len(reply._SPLIT) <= reply._SPLIT_MAX


@given(st.lists(st.text(min_size=1, max_size=12), max_size=5))
def test_any_path_renders_without_error(parts: list[str]) -> None:
    """No path makes the renderer raise."""
    reply = ec2.render(make_node(), "latest", parts, pending_time=PENDING)
    assert reply.status in (200, 404)


# --- OpenStack -------------------------------------------------------------------


def test_openstack_versions() -> None:
    """``/openstack`` lists dates up to and beyond 2018-08-27, then latest."""
    lines = openstack.versions_listing().body.decode().splitlines()
    assert "2018-08-27" in lines and lines[-1] == "latest" and lines[0] == "2012-08-10"


def test_openstack_files_by_version() -> None:
    """Files appear from the version Nova introduced them in; user_data only if set."""
    node = make_node()
    assert openstack.files(node, "2012-08-10") == ["meta_data.json", "user_data"]
    assert openstack.files(node, "latest") == [
        "meta_data.json",
        "user_data",
        "password",
        "vendor_data.json",
        "network_data.json",
        "vendor_data2.json",
    ]
    assert "user_data" not in openstack.files(make_node(user_data=None), "latest")


def test_meta_data_json() -> None:
    """meta_data.json carries what cloud-init reads, gated by version."""
    node = make_node(2)
    document = openstack.meta_data(node, "2018-08-27", b"\0" * 512)
    assert document["uuid"] == node.uuid
    assert document["hostname"] == "web-2.example.org"
    assert document["name"] == "web-2"
    assert document["launch_index"] == 2
    assert document["availability_zone"] == "az1a"
    assert document["public_keys"] == {"mykey": "ssh-ed25519 AAAAC3Nza user@host"}
    assert document["keys"] == [
        {"name": "mykey", "type": "ssh", "data": "ssh-ed25519 AAAAC3Nza user@host"}
    ]
    assert document["meta"] == {"role": "db"}
    assert document["project_id"] == "proj-a"
    assert document["devices"] == []
    assert len(document["random_seed"]) == 684
    assert "dedicated_cpus" not in document
    old = openstack.meta_data(node, "2012-08-10", b"")
    assert "random_seed" not in old and "project_id" not in old
    bare = openstack.meta_data(make_node(public_keys={}, meta={}), "latest", b"")
    assert "public_keys" not in bare and "keys" not in bare and "meta" not in bare


def test_network_data_generated_from_ports() -> None:
    """Without imported network data, every port gets DHCP."""
    node = make_node(network_data=None)
    assert openstack.network_data(node) == {
        "links": [
            {"id": "port0", "type": "phy", "ethernet_mac_address": "52:54:00:12:00:00", "mtu": None}
        ],
        "networks": [
            {"id": "network0", "type": "ipv4_dhcp", "link": "port0", "network_id": "port0"}
        ],
        "services": [],
    }
    imported = {"links": [{"id": "x"}], "networks": [], "services": []}
    assert openstack.network_data(make_node(network_data=imported)) == imported


def test_vendor_data2() -> None:
    """vendor_data2.json nests the static document; nothing configured is {}."""
    assert openstack.vendor_data2({"a": 1}) == {"static": {"a": 1}}
    assert openstack.vendor_data2({}) == {}
