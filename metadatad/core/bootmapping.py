# -*- test-case-name: tests.core.test_bootmapping -*-
"""The DHCP boot mapping of a node (pure: no I/O).

A mapping says, for a node's PXE ports, which TFTP server and which boot file a
booting machine is offered:

* non-iPXE clients (``tag:!ipxe,67``): the boot file for the node's firmware — the
  node's ``boot.boot_file`` if set, else the configured default for BIOS or UEFI;
* iPXE clients (``tag:ipxe,67``): the iPXE script URL — the node's
  ``boot.ipxe_script_url`` if set, else the configured template;
* TFTP server (options 66 and 150) and dnsmasq's ``server-ip-address`` (siaddr, Ironic's
  option ``255``) = the owner's ``tftp_address``.

Neutron stores option values in 64... 255 characters and Ironic refuses boot files and
URLs over 64 characters ("internal limitation for Neutron"): so does :func:`check_length`,
at node import time for the node's own values and at configuration time for defaults.

The mapping has a canonical JSON document and a digest of it; the pusher stores the
desired and the last pushed document per node and compares digests.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from metadatad.core.nodes import Node

__all__ = [
    "MAX_OPTION_VALUE",
    "BootDefaults",
    "BootMapping",
    "DhcpOption",
    "MappingError",
    "boot_mapping",
    "check_length",
    "retraction",
]

# Ironic's limit for boot file names and URLs ("internal limitation for Neutron").
MAX_OPTION_VALUE = 64
# The placeholders of ``[dhcp] ipxe_script_url``.
URL_FIELDS = ("tftp_address", "http_address", "uuid")


class MappingError(ValueError):
    """A mapping that cannot be pushed (a value over the limits, no TFTP address)."""


def check_length(what: str, value: str) -> str:
    """``value`` if at most 64 characters, else a :class:`MappingError` naming ``what``."""
    if len(value) > MAX_OPTION_VALUE:
        raise MappingError(
            f"{what} must be at most {MAX_OPTION_VALUE} characters (Neutron's limit), "
            f"got {len(value)}: {value[:80]!r}"
        )
    return value


@attrs.frozen
class BootDefaults:
    """The configured defaults (``[dhcp]``): boot files by firmware, iPXE script URL
    template (``{tftp_address}``, ``{http_address}``, ``{uuid}``; empty: no iPXE)."""

    bios_boot_file: str = "undionly.kpxe"
    uefi_boot_file: str = "snponly.efi"
    ipxe_script_url: str = "tftp://{tftp_address}/{uuid}.ipxe"


@attrs.frozen
class DhcpOption:
    """One DHCP option as Neutron's ``extra_dhcp_opts`` names it."""

    name: str  # "66", "150", "255", "tag:!ipxe,67", "tag:ipxe,67"
    value: str
    ip_version: int = 4

    def to_document(self) -> dict[str, Any]:
        return {"opt_name": self.name, "opt_value": self.value, "ip_version": self.ip_version}


@attrs.frozen
class BootMapping:
    """What a node's PXE ports are offered; ``removed`` retracts a deleted node."""

    node_uuid: str
    macs: tuple[str, ...]
    neutron_ports: tuple[str, ...] = ()
    # The registered address of each MAC's port ("" when it has none), in ``macs``
    # order: what DHCP must lease, since the metadata site knows callers by it.
    addresses: tuple[str, ...] = ()
    hostname: str = ""
    tftp_server: str = ""
    boot_file: str = ""
    ipxe_script_url: str = ""
    ip_versions: tuple[int, ...] = (4,)
    removed: bool = False

    @property
    def options(self) -> tuple[DhcpOption, ...]:
        """The options, per IP version, in Ironic's order and names."""
        if self.removed:
            return ()
        found: list[DhcpOption] = []
        for version in self.ip_versions:
            if version == 4:
                if self.ipxe_script_url:
                    found.append(DhcpOption("tag:!ipxe,67", self.boot_file, 4))
                    found.append(DhcpOption("tag:ipxe,67", self.ipxe_script_url, 4))
                else:
                    found.append(DhcpOption("67", self.boot_file, 4))
                found.extend(DhcpOption(code, self.tftp_server, 4) for code in ("66", "150", "255"))
            else:
                # DHCPv6 has no siaddr: the boot file is a URL (option 59).
                host = f"[{self.tftp_server}]" if ":" in self.tftp_server else self.tftp_server
                url = f"tftp://{host}/{self.boot_file}"
                if self.ipxe_script_url:
                    found.append(DhcpOption("tag:!ipxe6,59", url, 6))
                    found.append(DhcpOption("tag:ipxe6,59", self.ipxe_script_url, 6))
                else:
                    found.append(DhcpOption("59", url, 6))
        return tuple(found)

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON form (stored, shown by the admin API, given to scripts)."""
        return {
            "node_uuid": self.node_uuid,
            "macs": list(self.macs),
            "neutron_ports": list(self.neutron_ports),
            "addresses": list(self.addresses),
            "hostname": self.hostname,
            "tftp_server": self.tftp_server,
            "boot_file": self.boot_file,
            "ipxe_script_url": self.ipxe_script_url,
            "ip_versions": list(self.ip_versions),
            "removed": self.removed,
            "options": [option.to_document() for option in self.options],
        }

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> BootMapping:
        """The inverse of :meth:`to_document` (``options`` are derived, so ignored)."""
        return cls(
            node_uuid=str(document["node_uuid"]),
            macs=tuple(document["macs"]),
            neutron_ports=tuple(document.get("neutron_ports", ())),
            addresses=tuple(str(a) for a in document.get("addresses", ())),
            hostname=str(document.get("hostname", "")),
            tftp_server=str(document.get("tftp_server", "")),
            boot_file=str(document.get("boot_file", "")),
            ipxe_script_url=str(document.get("ipxe_script_url", "")),
            ip_versions=tuple(int(v) for v in document.get("ip_versions", (4,))),
            removed=bool(document.get("removed", False)),
        )

    def address_of(self, mac: str) -> str:
        """The registered address of ``mac``'s port, or "" (none, or unknown MAC)."""
        for known, address in zip(self.macs, self.addresses, strict=False):
            if known == mac:
                return address
        return ""

    def to_json(self) -> str:
        """Canonical text: equal mappings give equal text."""
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """SHA-256 of :meth:`to_json`, hex (what the pusher compares)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def boot_mapping(
    node: Node, tftp_address: str, http_address: str, defaults: BootDefaults
) -> BootMapping:
    """The mapping of ``node`` when the conductor with ``tftp_address`` owns it.

    The PXE MACs are the ports flagged ``pxe`` (all ports when none is); the IP
    versions are those of the node's port addresses (IPv4 when it has none).
    """
    if not tftp_address:
        raise MappingError("the owner has no [conductor] tftp_address")
    pxe_ports = [p for p in node.ports if p.pxe] or list(node.ports)
    boot = node.boot
    firmware = boot.get("firmware", "uefi")
    boot_file = boot.get("boot_file") or (
        defaults.bios_boot_file if firmware == "bios" else defaults.uefi_boot_file
    )
    url = boot.get("ipxe_script_url")
    if url is None:
        url = expand_url(defaults.ipxe_script_url, tftp_address, http_address, node.uuid)
    versions = sorted({ipaddress.ip_address(p.ip).version for p in pxe_ports if p.ip}) or [4]
    return BootMapping(
        node_uuid=node.uuid,
        macs=tuple(p.mac for p in pxe_ports),
        neutron_ports=tuple(p.neutron_port_id for p in pxe_ports if p.neutron_port_id),
        addresses=tuple(p.ip or "" for p in pxe_ports),
        hostname=node.hostname,
        tftp_server=tftp_address,
        boot_file=check_length("boot file", boot_file),
        ipxe_script_url=check_length("iPXE script URL", url),
        ip_versions=tuple(versions),
    )


def expand_url(template: str, tftp_address: str, http_address: str, uuid: str) -> str:
    """``template`` with its placeholders filled in (an IPv6 address in brackets)."""
    if not template:
        return ""
    host = f"[{tftp_address}]" if ":" in tftp_address else tftp_address
    return template.format(tftp_address=host, http_address=http_address, uuid=uuid)


def longest_url(template: str, http_address: str) -> str:
    """The template filled with the longest IPv4 address and a uuid: what the config
    check measures against the 64-character limit."""
    return expand_url(template, "255.255.255.255", http_address, "0" * 36)


def retraction(previous: BootMapping | None, node_uuid: str, macs: Sequence[str]) -> BootMapping:
    """The mapping that withdraws a deleted node: its MACs are ignored from now on."""
    if previous is not None:
        return attrs.evolve(
            previous, removed=True, tftp_server="", boot_file="", ipxe_script_url=""
        )
    return BootMapping(node_uuid=node_uuid, macs=tuple(macs), removed=True)
