"""Node documents for tests and benchmarks: complete, valid, unique by index."""

from __future__ import annotations

import base64
import uuid as uuidlib
from typing import Any

from metadatad.core.nodes import Node, parse_node

__all__ = ["USER_DATA", "make_node", "node_document"]

USER_DATA = b"#cloud-config\nruncmd: [echo hello]\n"


def node_document(index: int = 0, **overrides: Any) -> dict[str, Any]:
    """A complete, valid node document; ``index`` makes uuid, MAC and address unique."""
    document: dict[str, Any] = {
        "uuid": str(uuidlib.UUID(int=0xD8E02D56264849A3BF976BE8F1204F00 + index)),
        "name": f"web-{index}",
        "hostname": f"web-{index}.example.org",
        "project_id": "proj-a",
        "availability_zone": "az1a",
        "instance_type": "baremetal.large",
        "image_id": "ami-00000001",
        "kernel_id": None,
        "ramdisk_id": None,
        "reservation_id": "r-00000001",
        "launch_index": index,
        "root_device_name": "/dev/sda",
        "block_device_mapping": {"ami": "sda", "root": "/dev/sda", "ephemeral0": "sdb"},
        "ports": [
            {
                "mac": f"52:54:00:12:{index // 256:02x}:{index % 256:02x}",
                "ip": f"10.0.{index // 250}.{index % 250 + 2}",
                "pxe": True,
                "neutron_port_id": None,
            }
        ],
        "public_keys": {"mykey": "ssh-ed25519 AAAAC3Nza user@host"},
        "meta": {"role": "db"},
        "user_data": base64.b64encode(USER_DATA).decode("ascii"),
        "network_data": {"links": [], "networks": [], "services": []},
        "service": {"name": "web", "domain": "web.shop.example.org", "port": 8080},
        "boot_roles": ["member"],
        "conductor_group": "",
        "boot": {"arch": "x86_64", "firmware": "uefi"},
        "public_ipv4": None,
        "public_hostname": None,
        "security_groups": ["default"],
    }
    document.update(overrides)
    return document


def make_node(index: int = 0, **overrides: Any) -> Node:
    """A :class:`Node` from :func:`node_document`."""
    return parse_node(node_document(index, **overrides))
