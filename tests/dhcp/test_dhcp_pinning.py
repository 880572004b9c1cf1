"""The DHCP providers pin the address the metadata site identifies a machine by: a
port's registered ``ip`` (and the node's host name) reach the dnsmasq host entry and
the script provider's JSON; a port without one keeps a plain tagged entry."""

from __future__ import annotations

from metadatad.core.bootmapping import BootDefaults, BootMapping, boot_mapping, retraction
from metadatad.dhcp.dnsmasq import host_entry, host_file
from tests.support.factories import make_node


def _mapping(
    ports: list[dict[str, object]], hostname: str = "db-7.rack.example.org"
) -> BootMapping:
    node = make_node(7, hostname=hostname, ports=ports)
    return boot_mapping(node, "10.0.0.5", "", BootDefaults())


def test_the_entry_pins_the_registered_ipv4_address_and_the_short_host_name() -> None:
    mapping = _mapping([{"mac": "52:54:00:aa:00:01", "ip": "10.0.0.71", "pxe": True}])
    assert mapping.addresses == ("10.0.0.71",) and mapping.hostname == "db-7.rack.example.org"
    assert host_entry(mapping, "52:54:00:aa:00:01") == (
        f"52:54:00:aa:00:01,set:node-{mapping.node_uuid},10.0.0.71,db-7"
    )


def test_ipv6_addresses_are_bracketed_as_dnsmasq_wants() -> None:
    mapping = _mapping([{"mac": "52:54:00:aa:00:02", "ip": "2001:db8::71", "pxe": True}])
    assert host_entry(mapping, "52:54:00:aa:00:02") == (
        f"52:54:00:aa:00:02,set:node-{mapping.node_uuid},[2001:db8::71],db-7"
    )


def test_a_port_without_an_address_keeps_the_plain_tagged_entry() -> None:
    mapping = _mapping(
        [
            {"mac": "52:54:00:aa:00:03", "pxe": True},
            {"mac": "52:54:00:aa:00:04", "ip": "10.0.0.72", "pxe": True},
        ]
    )
    assert mapping.addresses == ("", "10.0.0.72")
    assert host_entry(mapping, "52:54:00:aa:00:03") == (
        f"52:54:00:aa:00:03,set:node-{mapping.node_uuid}"
    )
    assert host_entry(mapping, "52:54:00:aa:00:04").endswith(",10.0.0.72,db-7")


def test_a_withdrawn_mac_is_ignored_whatever_its_address() -> None:
    mapping = _mapping([{"mac": "52:54:00:aa:00:05", "ip": "10.0.0.73", "pxe": True}])
    gone = retraction(mapping, mapping.node_uuid, ())
    assert host_file(gone, "52:54:00:aa:00:05", "a", 4).splitlines()[1] == (
        "52:54:00:aa:00:05,ignore"
    )


def test_the_document_carries_addresses_and_host_name_and_round_trips() -> None:
    mapping = _mapping([{"mac": "52:54:00:aa:00:06", "ip": "10.0.0.74", "pxe": True}])
    document = mapping.to_document()
    assert document["addresses"] == ["10.0.0.74"] and document["hostname"] == mapping.hostname
    assert BootMapping.from_document(document) == mapping
    # A document stored before addresses existed still loads (as unpinned).
    del document["addresses"], document["hostname"]
    old = BootMapping.from_document(document)
    assert old.addresses == () and old.address_of("52:54:00:aa:00:06") == ""
