"""The pure boot mapping: options, defaults, limits (no I/O, no reactor)."""

from __future__ import annotations

import pytest

from metadatad.core.bootmapping import (
    BootDefaults,
    BootMapping,
    DhcpOption,
    MappingError,
    boot_mapping,
    retraction,
)
from metadatad.core.nodes import NodeValidationError, parse_node
from tests.support.factories import make_node, node_document

DEFAULTS = BootDefaults()


def test_uefi_node_with_ipxe_gets_ironics_options() -> None:
    """A UEFI node: snponly.efi for non-iPXE clients, the iPXE script on the owner's
    TFTP server for iPXE clients, and options 66, 150 and 255 = the owner's address."""
    node = make_node(3)
    mapping = boot_mapping(node, "10.0.0.5", "http://10.0.0.5:8775", DEFAULTS)
    assert mapping.macs == ("52:54:00:12:00:03",)
    assert mapping.ip_versions == (4,)
    assert mapping.options == (
        DhcpOption("tag:!ipxe,67", "snponly.efi"),
        DhcpOption("tag:ipxe,67", f"tftp://10.0.0.5/{node.uuid}.ipxe"),
        DhcpOption("66", "10.0.0.5"),
        DhcpOption("150", "10.0.0.5"),
        DhcpOption("255", "10.0.0.5"),
    )


def test_bios_node_without_ipxe_gets_plain_option_67() -> None:
    """BIOS picks the BIOS default; no iPXE template gives a plain boot file option."""
    node = make_node(0, boot={"firmware": "bios"})
    defaults = BootDefaults(bios_boot_file="pxelinux.0", ipxe_script_url="")
    mapping = boot_mapping(node, "10.0.0.6", "", defaults)
    assert mapping.options[0] == DhcpOption("67", "pxelinux.0")
    assert [o.name for o in mapping.options] == ["67", "66", "150", "255"]


def test_node_overrides_and_pxe_ports() -> None:
    """The node's own boot file and URL win; only PXE ports are mapped; an IPv6 port
    adds option 59 as a TFTP URL."""
    node = make_node(
        1,
        boot={"boot_file": "grubx64.efi", "ipxe_script_url": "http://h/boot.ipxe"},
        ports=[
            {"mac": "52:54:00:00:00:01", "ip": "fd00::5", "pxe": True, "neutron_port_id": "p1"},
            {"mac": "52:54:00:00:00:02", "ip": "10.1.0.5", "pxe": False},
        ],
    )
    mapping = boot_mapping(node, "fd00::1", "", DEFAULTS)
    assert mapping.macs == ("52:54:00:00:00:01",)
    assert mapping.neutron_ports == ("p1",)
    assert mapping.ip_versions == (6,)
    assert mapping.options == (
        DhcpOption("tag:!ipxe6,59", "tftp://[fd00::1]/grubx64.efi", 6),
        DhcpOption("tag:ipxe6,59", "http://h/boot.ipxe", 6),
    )


def test_limits_and_missing_address() -> None:
    """A template that expands past 64 characters, or no TFTP address, is refused."""
    node = make_node(0)
    with pytest.raises(MappingError, match="at most 64"):
        boot_mapping(node, "fd00:1234:5678:9abc:def0:1234:5678:9abc", "", DEFAULTS)
    with pytest.raises(MappingError, match="tftp_address"):
        boot_mapping(node, "", "", DEFAULTS)


@pytest.mark.parametrize(
    ("boot", "field"),
    [
        ({"boot_file": "x" * 65}, "boot.boot_file"),
        ({"ipxe_script_url": "http://e/" + "y" * 60}, "boot.ipxe_script_url"),
        ({"boot_file": ""}, "boot.boot_file"),
        ({"boot_file": "a,b"}, "boot.boot_file"),
    ],
)
def test_import_refuses_long_or_unsafe_boot_options(boot: dict[str, str], field: str) -> None:
    """The 64-character limit is checked when the node is imported."""
    with pytest.raises(NodeValidationError) as caught:
        parse_node(node_document(0, boot=boot))
    assert caught.value.field == field


def test_document_round_trip_digest_and_retraction() -> None:
    """The stored document gives the same mapping back; a retraction keeps the MACs
    and drops every option; digests differ."""
    mapping = boot_mapping(make_node(2), "10.0.0.5", "", DEFAULTS)
    again = BootMapping.from_document(mapping.to_document())
    assert again == mapping and again.digest == mapping.digest
    gone = retraction(mapping, mapping.node_uuid, ())
    assert gone.removed and gone.macs == mapping.macs and gone.options == ()
    assert gone.digest != mapping.digest
