# -*- test-case-name: tests.web.test_renderers -*-
"""The OpenStack-format metadata tree (``/openstack/<date>/...``), as Nova serves it.

Pure: the site passes in the node, the version, the static vendordata and the random
seed; the password (mutable state) is the site's business.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from metadatad.core.nodes import Node
from metadatad.metadata.reply import Reply, text

VERSIONS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "2020-10-14",
)
_ORDER = {version: index for index, version in enumerate(VERSIONS)}
_ORDER["latest"] = len(VERSIONS) - 1

GRIZZLY, HAVANA, LIBERTY, NEWTON_ONE, NEWTON_TWO, VICTORIA = (
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2020-10-14",
)

PASSWORD_MAX_BYTES = 1020


def is_version(name: str) -> bool:
    """True for a version this tree serves."""
    return name in _ORDER


def since(version: str, first: str) -> bool:
    """True when ``version`` is ``first`` or newer."""
    return _ORDER[version] >= _ORDER[first]


def versions_listing() -> Reply:
    """``GET /openstack``: the dates, then ``latest``."""
    return text("\n".join((*VERSIONS, "latest")))


def files(node: Node, version: str) -> list[str]:
    """What ``/openstack/<version>/`` lists for ``node``."""
    names = ["meta_data.json"]
    if node.user_data is not None:
        names.append("user_data")
    if since(version, GRIZZLY):
        names.append("password")
    if since(version, HAVANA):
        names.append("vendor_data.json")
    if since(version, LIBERTY):
        names.append("network_data.json")
    if since(version, NEWTON_TWO):
        names.append("vendor_data2.json")
    return names


def meta_data(node: Node, version: str, random_seed: bytes) -> dict[str, Any]:
    """``meta_data.json``."""
    document: dict[str, Any] = {
        "uuid": node.uuid,
        "name": node.name,
        "hostname": node.hostname,
        "launch_index": node.launch_index,
        "availability_zone": node.availability_zone,
    }
    if node.meta:
        document["meta"] = dict(node.meta)
    if node.public_keys:
        document["public_keys"] = dict(node.public_keys)
        document["keys"] = [
            {"name": name, "type": "ssh", "data": key}
            for name, key in sorted(node.public_keys.items())
        ]
    if since(version, GRIZZLY):
        document["random_seed"] = base64.b64encode(random_seed).decode("ascii")
    if since(version, LIBERTY):
        document["project_id"] = node.project_id
    if since(version, NEWTON_ONE):
        document["devices"] = []
    if since(version, VICTORIA):
        document["dedicated_cpus"] = []
    return document


def network_data(node: Node) -> Mapping[str, Any]:
    """``network_data.json``: the imported document, else DHCP on every port."""
    if node.network_data is not None:
        return node.network_data
    links = []
    networks = []
    for index, port in enumerate(node.ports):
        link = f"port{index}"
        links.append({"id": link, "type": "phy", "ethernet_mac_address": port.mac, "mtu": None})
        kind = "ipv6_dhcp" if port.ip is not None and ":" in port.ip else "ipv4_dhcp"
        networks.append({"id": f"network{index}", "type": kind, "link": link, "network_id": link})
    return {"links": links, "networks": networks, "services": []}


def vendor_data2(static: Mapping[str, Any]) -> dict[str, Any]:
    """``vendor_data2.json``: the static document under ``static``."""
    return {"static": dict(static)} if static else {}
