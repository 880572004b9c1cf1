"""Validation of node documents."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metadatad.core.nodes import USER_DATA_MAX_BYTES, NodeValidationError, parse_node, parse_nodes
from tests.support.factories import node_document


def test_full_document_round_trips() -> None:
    """The DESIGN.md document parses and renders back to itself."""
    document = node_document()
    node = parse_node(document)
    assert node.to_document() == document
    assert parse_node(node.to_document()) == node


def test_minimal_document_gets_defaults() -> None:
    """Only the uuid is required; the rest has sensible defaults."""
    node = parse_node({"uuid": "D8E02D56-2648-49A3-BF97-6BE8F1204F38".lower()})
    assert node.name == "d8e02d56-2648-49a3-bf97-6be8f1204f38"
    assert node.hostname == node.name
    assert node.reservation_id == "r-d8e02d56"
    assert node.block_device_mapping == {"ami": "sda", "root": "/dev/sda"}
    assert node.boot == {"arch": "x86_64", "firmware": "uefi"}
    assert node.user_data is None and node.ports == ()


def test_name_and_hostname_derive_from_each_other() -> None:
    """A host name gives the name its first label; a name that is a host name is used."""
    assert parse_node(node_document(hostname="a.b.c", name="")).name == "a"
    document = node_document()
    del document["hostname"]
    assert parse_node(document).hostname == "web-0"


def test_mac_is_normalised() -> None:
    """MACs are stored lower-case with colons."""
    node = parse_node(node_document(ports=[{"mac": "52-54-00-AB-CD-EF", "ip": "10.0.0.2"}]))
    assert node.ports[0].mac == "52:54:00:ab:cd:ef"


BAD_FIELDS: list[tuple[str, Any, str]] = [
    ("uuid", "not-a-uuid", "uuid"),
    ("uuid", 5, "uuid"),
    ("uuid", "D8E02D56264849A3BF976BE8F1204F38", "uuid"),
    ("hostname", "bad_host!", "hostname"),
    ("hostname", "", "hostname"),
    ("launch_index", -1, "launch_index"),
    ("launch_index", True, "launch_index"),
    ("launch_index", "1", "launch_index"),
    ("ports", {}, "ports"),
    ("ports", [{"mac": "zz:54:00:12:34:56"}], "ports[0].mac"),
    ("ports", [{"mac": "01:00:5e:00:00:01"}], "ports[0].mac"),
    ("ports", [{"mac": "52:54:00:12:34:56", "ip": "10.0.0.999"}], "ports[0].ip"),
    ("ports", [{"mac": "52:54:00:12:34:56", "ip": "224.0.0.1"}], "ports[0].ip"),
    ("ports", [{"mac": "52:54:00:12:34:56", "speed": 10}], "ports[0].speed"),
    ("ports", [{"ip": "10.0.0.1"}], "ports[0].mac"),
    ("ports", [{"mac": "52:54:00:12:34:56"}, {"mac": "52:54:00:12:34:56"}], "ports[1].mac"),
    ("public_keys", {"k": 5}, "public_keys.k"),
    ("meta", ["a"], "meta"),
    ("meta", {"k": "line\nbreak"}, "meta.k"),
    ("user_data", "%%%not base64", "user_data"),
    ("user_data", 12, "user_data"),
    ("network_data", {"links": []}, "network_data.networks"),
    ("network_data", {"links": [], "networks": [], "services": [], "x": []}, "network_data.x"),
    ("network_data", {"links": [1], "networks": [], "services": []}, "network_data.links[0]"),
    ("service", {"domain": "x"}, "service.name"),
    ("service", {"name": "web", "port": 70000}, "service.port"),
    ("boot", {"firmware": "coreboot"}, "boot.firmware"),
    ("boot_roles", "member", "boot_roles"),
    ("availability_zone", "", "availability_zone"),
    ("name", "x" * 256, "name"),
    ("colour", "blue", "colour"),
    # Lone surrogates: valid JSON escapes, but no text a database can store.
    ("name", "web\ud800", "name"),
    ("meta", {"k": "\udfff"}, "meta.k"),
    ("public_keys", {"k\ud800": "ssh-ed25519 AAAA"}, "public_keys.k\ud800"),
    (
        "ports",
        [{"mac": "52:54:00:12:34:56", "neutron_port_id": "\ud800"}],
        "ports[0].neutron_port_id",
    ),
    ("boot_roles", ["\udc00"], "boot_roles[0]"),
    (
        "network_data",
        {"links": [{"id": "\ud800"}], "networks": [], "services": []},
        "network_data",
    ),
    (
        "network_data",
        {"links": [{"x": [[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]}], "networks": [], "services": []},
        "network_data",
    ),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS)
def test_bad_field_is_named(field: str, value: Any, named: str) -> None:
    """Every bad or unknown field is a NodeValidationError naming that field."""
    with pytest.raises(NodeValidationError) as raised:
        parse_node(node_document(**{field: value}))
    assert raised.value.field == named
    body = raised.value.as_json()
    assert body["field"] == named and body["message"]


def test_missing_uuid() -> None:
    """The uuid is required."""
    with pytest.raises(NodeValidationError) as raised:
        parse_node({"name": "x"})
    assert raised.value.field == "uuid"


def test_user_data_size_limit() -> None:
    """User-data decodes to at most 64 KiB: the limit passes, one byte more fails."""
    at_limit = base64.b64encode(b"x" * USER_DATA_MAX_BYTES).decode()
    assert len(parse_node(node_document(user_data=at_limit)).user_data) == USER_DATA_MAX_BYTES
    over = base64.b64encode(b"x" * (USER_DATA_MAX_BYTES + 1)).decode()
    with pytest.raises(NodeValidationError, match="65536 bytes") as raised:
        parse_node(node_document(user_data=over))
    assert raised.value.field == "user_data"


def test_list_import_names_the_index() -> None:
    """In a list, errors carry the node's index; duplicates across nodes are caught."""
    with pytest.raises(NodeValidationError) as raised:
        parse_nodes([node_document(0), node_document(1, ports=[{"mac": "bad"}])])
    assert raised.value.field == "[1].ports[0].mac"
    with pytest.raises(NodeValidationError) as raised:
        parse_nodes([node_document(0), node_document(0)])
    assert raised.value.field == "[1].uuid"
    with pytest.raises(NodeValidationError) as raised:
        parse_nodes([node_document(0), node_document(1, ports=node_document(0)["ports"])])
    assert raised.value.field == "[1].ports[0].mac"


@pytest.mark.parametrize("document", [[], "nodes", 5, None])
def test_import_must_be_nodes(document: Any) -> None:
    """An import is one object or a non-empty list of them."""
    with pytest.raises(NodeValidationError):
        parse_nodes(document)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(list(node_document())), json_values, max_size=6))
def test_arbitrary_documents_never_crash(overrides: dict[str, Any]) -> None:
    """Any JSON either parses or raises NodeValidationError, nothing else."""
    try:
        node = parse_node(node_document(**overrides))
    except NodeValidationError:
        return
    assert parse_node(node.to_document()) == node


def test_hostname_falls_back_when_name_is_not_one() -> None:
    """A display name that is no host name gives host-<uuid prefix>."""
    document = node_document(name="Web Server #1")
    del document["hostname"]
    assert parse_node(document).hostname == "host-d8e02d56"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::FFFF:10.0.0.2", "10.0.0.2"),
        ("fe80::1%eth0", "fe80::1"),
        ("FE80::0001%2", "fe80::1"),
        ("2001:db8::5", "2001:db8::5"),
    ],
)
def test_port_addresses_take_the_form_identity_uses(given: str, stored: str) -> None:
    """IPv4-mapped addresses are stored as IPv4 and zones are dropped: the form a
    caller's address has after identity normalised it, so uniqueness holds and the
    port can match a caller."""
    node = parse_node(node_document(ports=[{"mac": "52:54:00:12:34:56", "ip": given}]))
    assert node.ips == (stored,)


def test_a_mapped_twin_of_another_port_is_a_duplicate() -> None:
    """``::ffff:10.0.0.2`` and ``10.0.0.2`` in one import are one address twice."""
    nodes = [
        node_document(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "10.0.0.2"}]),
        node_document(1, ports=[{"mac": "52:54:00:00:00:02", "ip": "::ffff:10.0.0.2"}]),
    ]
    with pytest.raises(NodeValidationError) as raised:
        parse_nodes(nodes)
    assert raised.value.field == "[1].ports[0].ip"


def test_an_unknown_field_with_a_line_break_is_named_escaped() -> None:
    """A key that is not printable text is named quoted and escaped: the error stays one
    line (found by the node import fuzz test: ``{"\\r": ""}``)."""
    with pytest.raises(NodeValidationError) as raised:
        parse_node({**node_document(), "\r": ""})
    assert raised.value.field == "'\\r'"
    with pytest.raises(NodeValidationError) as raised:
        parse_node(node_document(network_data={"bad\nkey": []}))
    assert raised.value.field == "network_data.'bad\\nkey'"
    assert "\n" not in str(raised.value) and "\r" not in str(raised.value)
