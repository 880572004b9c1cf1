# -*- test-case-name: tests.web.test_ec2_network -*-
"""The EC2 ``meta-data/mac`` and ``meta-data/network/interfaces/macs/`` tree, from a
node's ports.

Pure: a node in, a tree of text leaves out (see :mod:`metadatad.metadata.ec2`).  One
interface per port, ``device-number`` its place in ``ports``.  A port's own address
comes first in ``local-ipv4s`` or ``ipv6s``; static addresses that ``network_data``
gives the same MAC follow (cloud-init's EC2 datasource configures those as secondary
addresses), and the subnet of the first of them with a netmask is
``subnet-ipv4-cidr-block`` / ``subnet-ipv6-cidr-blocks``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from metadatad.core.nodes import Node, Port

__all__ = ["interface_id", "network_tree", "primary_port"]


def primary_port(node: Node) -> Port | None:
    """The interface ``meta-data/mac`` names: the port of ``local-ipv4``, else the
    first PXE port, else the first port."""
    local = node.local_ipv4
    for port in node.ports:
        if local and port.ip == local:
            return port
    for port in node.ports:
        if port.pxe:
            return port
    return node.ports[0] if node.ports else None


def interface_id(port: Port) -> str:
    """``interface-id``: the Neutron port id when known, else ``eni-`` and the MAC's
    hex digits (stable, and unique as the MAC is)."""
    return port.neutron_port_id or "eni-" + port.mac.replace(":", "")


def network_tree(node: Node) -> dict[str, Any]:
    """``network/``: ``{"interfaces": {"macs": {<mac>: {...}}}}``."""
    primary = primary_port(node)
    static = _static_addresses(node.network_data)
    macs: dict[str, Any] = {}
    for number, port in enumerate(node.ports):
        extra = static.get(port.mac, [])
        v4 = _ordered(port.ip, [(ip, net) for ip, net in extra if ip.version == 4], 4)
        v6 = _ordered(port.ip, [(ip, net) for ip, net in extra if ip.version == 6], 6)
        interface: dict[str, Any] = {
            "device-number": str(number),
            "interface-id": interface_id(port),
            "local-hostname": node.hostname,
            "mac": port.mac,
            "owner-id": node.project_id,
            "security-groups": "\n".join(node.security_groups),
        }
        if v4:
            interface["local-ipv4s"] = "\n".join(ip for ip, _ in v4)
            cidr = next((net for _, net in v4 if net), None)
            if cidr:
                interface["subnet-ipv4-cidr-block"] = cidr
        if v6:
            interface["ipv6s"] = "\n".join(ip for ip, _ in v6)
            cidrs = sorted({net for _, net in v6 if net})
            if cidrs:
                interface["subnet-ipv6-cidr-blocks"] = "\n".join(cidrs)
        if port is primary and node.public_ipv4:
            interface["public-ipv4s"] = node.public_ipv4
            interface["public-hostname"] = node.public_hostname or node.hostname
            if v4:
                interface["ipv4-associations"] = {node.public_ipv4: v4[0][0]}
        macs[port.mac] = interface
    return {"interfaces": {"macs": macs}}


def _ordered(
    own: str | None, extra: list[tuple[Any, str | None]], version: int
) -> list[tuple[str, str | None]]:
    """The port's own address of ``version`` first, then the others, each once."""
    found: list[tuple[str, str | None]] = []
    subnets = {str(ip): net for ip, net in extra}
    if own is not None and ipaddress.ip_address(own).version == version:
        found.append((own, subnets.get(own)))
    for ip, net in extra:
        if str(ip) not in (address for address, _ in found):
            found.append((str(ip), net))
    if found and found[0][1] is None:
        # The port's own address has no netmask of its own: a subnet network_data
        # gives this MAC, that holds it, is its subnet.
        own_ip = ipaddress.ip_address(found[0][0])
        for _, net in extra:
            if net and own_ip in ipaddress.ip_network(net):
                found[0] = (found[0][0], net)
                break
    return found


def _static_addresses(
    network_data: Mapping[str, Any] | None,
) -> dict[str, list[tuple[Any, str | None]]]:
    """MAC -> [(address, subnet CIDR or None)] of the static networks of
    ``network_data`` (type ``ipv4`` or ``ipv6``), in document order.  Its contents
    are free-form: anything malformed is skipped."""
    if not network_data:
        return {}
    link_macs: dict[str, str] = {}
    for link in network_data.get("links", []):
        mac = link.get("ethernet_mac_address")
        if isinstance(link.get("id"), str) and isinstance(mac, str):
            link_macs[link["id"]] = mac.lower().replace("-", ":")
    found: dict[str, list[tuple[Any, str | None]]] = {}
    for network in network_data.get("networks", []):
        mac = link_macs.get(network.get("link")) if isinstance(network.get("link"), str) else None
        if mac is None or network.get("type") not in ("ipv4", "ipv6"):
            continue
        try:
            address = ipaddress.ip_address(str(network.get("ip_address", "")).split("/")[0])
        except ValueError:
            continue
        found.setdefault(mac, []).append((address, _subnet(address, network)))
    return found


def _subnet(address: Any, network: Mapping[str, Any]) -> str | None:
    raw = str(network.get("ip_address", ""))
    netmask = network.get("netmask")
    spec = raw if "/" in raw else (f"{address}/{netmask}" if netmask else None)
    if spec is None:
        return None
    try:
        return str(ipaddress.ip_network(spec, strict=False))
    except ValueError:
        return None
