"""The EC2 network interface tree and the per-node public fields, rendered purely."""

from __future__ import annotations

from datetime import datetime

import pytest

from metadatad.core.nodes import NodeValidationError, parse_node
from metadatad.metadata import ec2
from metadatad.metadata.ec2net import network_tree, primary_port
from metadatad.metadata.reply import split_path
from tests.support.factories import make_node, node_document

PENDING = datetime(2026, 11, 22, 4, 0, 0)
MAC0, MAC1 = "52:54:00:aa:00:01", "52:54:00:aa:00:02"
TWO_PORTS = [
    {"mac": MAC0, "ip": "2001:db8::5", "pxe": False, "neutron_port_id": None},
    {"mac": MAC1, "ip": "10.1.0.7", "pxe": True, "neutron_port_id": "port-1"},
]
NETWORK_DATA = {
    "links": [
        {"id": "l0", "type": "phy", "ethernet_mac_address": MAC0.upper()},
        {"id": "l1", "type": "phy", "ethernet_mac_address": MAC1},
    ],
    "networks": [
        {
            "id": "n0",
            "type": "ipv4",
            "link": "l1",
            "ip_address": "10.1.0.7",
            "netmask": "255.255.255.0",
        },
        {
            "id": "n1",
            "type": "ipv4",
            "link": "l1",
            "ip_address": "10.1.0.8",
            "netmask": "255.255.255.0",
        },
        {"id": "n2", "type": "ipv6", "link": "l0", "ip_address": "2001:db8::5/64"},
        {"id": "n3", "type": "ipv4_dhcp", "link": "l0"},
        {"id": "n4", "type": "ipv4", "link": "nowhere", "ip_address": "192.0.2.1"},
        {"id": "n5", "type": "ipv4", "link": "l0", "ip_address": "not an address"},
    ],
    "services": [],
}


def get(node, path: str, version: str = "latest"):  # type: ignore[no-untyped-def]
    return ec2.render(node, version, split_path(path.encode()), pending_time=PENDING)


def text(node, path: str, version: str = "latest") -> str:  # type: ignore[no-untyped-def]
    reply = get(node, path, version)
    assert reply.status == 200, (path, reply.body)
    return reply.body.decode()


def test_mac_is_the_port_of_local_ipv4() -> None:
    node = make_node(ports=TWO_PORTS)
    assert node.local_ipv4 == "10.1.0.7"
    assert text(node, "meta-data/mac") == MAC1
    assert primary_port(make_node(ports=[])) is None


def test_primary_port_without_ipv4_is_the_pxe_port_then_the_first() -> None:
    v6 = [{"mac": MAC0, "ip": "2001:db8::5"}, {"mac": MAC1, "pxe": True}]
    assert primary_port(make_node(ports=v6)).mac == MAC1  # type: ignore[union-attr]
    v6[1]["pxe"] = False
    assert primary_port(make_node(ports=v6)).mac == MAC0  # type: ignore[union-attr]


def test_interfaces_listing_and_leaves() -> None:
    node = make_node(ports=TWO_PORTS, network_data=NETWORK_DATA, public_ipv4="203.0.113.9")
    assert text(node, "meta-data/network/") == "interfaces/"
    assert text(node, "meta-data/network/interfaces/macs/").splitlines() == [
        MAC0 + "/",
        MAC1 + "/",
    ]
    tree = network_tree(node)["interfaces"]["macs"]
    assert tree[MAC0] == {
        "device-number": "0",
        "interface-id": "eni-525400aa0001",
        "local-hostname": node.hostname,
        "mac": MAC0,
        "owner-id": "proj-a",
        "security-groups": "default",
        "ipv6s": "2001:db8::5",
        "subnet-ipv6-cidr-blocks": "2001:db8::/64",
    }
    assert tree[MAC1] == {
        "device-number": "1",
        "interface-id": "port-1",
        "local-hostname": node.hostname,
        "mac": MAC1,
        "owner-id": "proj-a",
        "security-groups": "default",
        "local-ipv4s": "10.1.0.7\n10.1.0.8",
        "subnet-ipv4-cidr-block": "10.1.0.0/24",
        "public-ipv4s": "203.0.113.9",
        "public-hostname": node.hostname,
        "ipv4-associations": {"203.0.113.9": "10.1.0.7"},
    }
    base = f"meta-data/network/interfaces/macs/{MAC1}/"
    assert text(node, base + "local-ipv4s") == "10.1.0.7\n10.1.0.8"
    assert text(node, base + "ipv4-associations/203.0.113.9") == "10.1.0.7"
    assert get(node, f"meta-data/network/interfaces/macs/{MAC1.replace(':', '-')}/").status == 404


def test_no_network_data_no_subnet() -> None:
    node = make_node(network_data=None)
    (interface,) = network_tree(node)["interfaces"]["macs"].values()
    assert interface["local-ipv4s"] == node.local_ipv4
    assert "subnet-ipv4-cidr-block" not in interface and "public-ipv4s" not in interface


def test_network_tree_before_2016_is_absent() -> None:
    node = make_node()
    for version in ("2009-04-04", "1.0"):
        listing = text(node, "meta-data/", version).splitlines()
        assert "mac" not in listing and "network/" not in listing
        assert get(node, "meta-data/mac", version).status == 404
    assert "network/" in text(node, "meta-data/", "2016-09-02").splitlines()


def test_public_fields_and_security_groups() -> None:
    node = make_node(
        public_ipv4="203.0.113.9",
        public_hostname="www.example.com",
        security_groups=["web", "ssh"],
    )
    assert text(node, "meta-data/public-ipv4") == "203.0.113.9"
    assert text(node, "meta-data/public-hostname") == "www.example.com"
    assert text(node, "meta-data/security-groups") == "web\nssh"
    plain = make_node()
    assert plain.security_groups == ("default",)
    assert text(plain, "meta-data/public-ipv4") == ""
    assert text(plain, "meta-data/public-hostname") == plain.hostname


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"public_ipv4": "2001:db8::1"}, "public_ipv4"),
        ({"public_ipv4": "nope"}, "public_ipv4"),
        ({"public_ipv4": 5}, "public_ipv4"),
        ({"public_hostname": "bad host"}, "public_hostname"),
        ({"security_groups": "web"}, "security_groups"),
        ({"security_groups": ["web", ""]}, "security_groups[1]"),
        ({"security_groups": ["web", "web"]}, "security_groups[1]"),
        ({"security_groups": ["a\nb"]}, "security_groups[0]"),
        ({"security_groups": [str(i) for i in range(65)]}, "security_groups"),
    ],
)
def test_bad_public_fields_are_refused(overrides: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(NodeValidationError) as raised:
        parse_node(node_document(**overrides))
    assert raised.value.field == field


def test_new_fields_round_trip() -> None:
    node = make_node(
        public_ipv4="203.0.113.9", public_hostname="www.example.com", security_groups=[]
    )
    again = parse_node(node.to_document())
    assert again == node
    assert node.to_document()["security_groups"] == []
