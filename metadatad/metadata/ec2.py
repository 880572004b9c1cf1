# -*- test-case-name: tests.web.test_renderers -*-
"""The EC2-format metadata tree, as Nova serves it plus the pieces AWS clients need.

Pure: a node and a path in, a :class:`Reply` out.  Listings follow Nova's rules (a
dict renders as its sorted keys, sub-directories with a trailing ``/``); every key a
listing names can be fetched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Union

from metadatad.core.nodes import Node
from metadatad.metadata.ec2net import network_tree, primary_port
from metadatad.metadata.reply import BINARY, JSON, NOT_FOUND, Reply, text

# Nova's versions plus the dated ones cloud-init probes before falling back to 2009-04-04.
VERSIONS = (
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2016-09-02",
    "2018-09-24",
    "2021-03-23",
)
_ORDER = {version: index for index, version in enumerate(VERSIONS)}
_ORDER["latest"] = len(VERSIONS) - 1

# A tree is nested dicts; a leaf is text or bytes.  A sub-tree may carry a "_name",
# the line its parent lists for it (public-keys lists "0=mykey", not "0/").
Tree = dict[str, Union["Tree", str, bytes]]


def versions_listing() -> Reply:
    """``GET /``: every version, newest last, then ``latest``."""
    return text("\n".join((*VERSIONS, "latest")))


def is_version(name: str) -> bool:
    """True for a version this tree serves."""
    return name in _ORDER


def region_of(availability_zone: str, configured: str = "") -> str:
    """The region: configured, else the zone minus its trailing zone letter (AWS convention)."""
    if configured:
        return configured
    # Only a zone letter after a number is cut (us-east-1a): "nova" stays "nova".
    if (
        len(availability_zone) > 1
        and availability_zone[-1].isalpha()
        and (availability_zone[-2].isdigit())
    ):
        return availability_zone[:-1]
    return availability_zone


def _since(version: str, first: str) -> bool:
    return _ORDER[version] >= _ORDER[first]


def meta_data_tree(node: Node, version: str) -> Tree:
    """The ``meta-data/`` tree of ``node`` for ``version``, gated as Nova gates it."""
    tree: Tree = {
        "ami-id": node.image_id or "",
        "ami-launch-index": str(node.launch_index),
        "ami-manifest-path": "FIXME",
        "hostname": node.hostname,
        "instance-id": node.uuid,
        "local-ipv4": node.local_ipv4,
        "reservation-id": node.reservation_id,
        "security-groups": "\n".join(node.security_groups),
    }
    if node.public_keys:
        tree["public-keys"] = {
            str(index): {"_name": f"{index}={name}", "openssh-key": node.public_keys[name]}
            for index, name in enumerate(sorted(node.public_keys))
        }
    if _since(version, "2007-01-19"):
        tree["local-hostname"] = node.hostname
        # Nova's answers when no public address is set: the host name, and empty.
        tree["public-hostname"] = node.public_hostname or node.hostname
        tree["public-ipv4"] = node.public_ipv4 or ""
    if _since(version, "2007-08-29"):
        tree["instance-type"] = node.instance_type
    if _since(version, "2007-12-15"):
        tree["block-device-mapping"] = dict(node.block_device_mapping)
        if node.kernel_id:
            tree["kernel-id"] = node.kernel_id
        if node.ramdisk_id:
            tree["ramdisk-id"] = node.ramdisk_id
    if _since(version, "2008-02-01"):
        tree["placement"] = {"availability-zone": node.availability_zone}
    if _since(version, "2008-09-01"):
        tree["instance-action"] = "none"
    # AWS added these in 2011-01-01; the first of our versions after that is 2016-09-02.
    primary = primary_port(node)
    if _since(version, "2016-09-02") and primary is not None:
        tree["mac"] = primary.mac
        tree["network"] = network_tree(node)
    return tree


def identity_document(node: Node, region: str, pending_time: datetime) -> dict[str, Any]:
    """``dynamic/instance-identity/document``: what AWS SDKs read region and ids from."""
    return {
        "accountId": node.project_id,
        "architecture": node.boot.get("arch", "x86_64"),
        "availabilityZone": node.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "imageId": node.image_id,
        "instanceId": node.uuid,
        "instanceType": node.instance_type,
        "kernelId": node.kernel_id,
        "marketplaceProductCodes": None,
        "pendingTime": pending_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "privateIp": node.local_ipv4 or None,
        "ramdiskId": node.ramdisk_id,
        "region": region,
        "version": "2017-09-30",
    }


def render(
    node: Node,
    version: str,
    parts: Sequence[str],
    *,
    region: str = "",
    pending_time: datetime,
    tree: Tree | None = None,
) -> Reply:
    """Answer ``/<version>/<parts...>`` for ``node`` (the version already checked).

    ``tree``: the node's :func:`meta_data_tree` for ``version``, when the caller
    keeps it (built here otherwise)."""
    with_dynamic = _since(version, "2009-04-04")
    if not parts:
        listing = ["meta-data/"]
        if with_dynamic:
            listing.insert(0, "dynamic/")
        if node.user_data is not None:
            listing.append("user-data")
        return text("\n".join(listing))
    head, rest = parts[0], parts[1:]
    if head == "user-data":
        if rest or node.user_data is None:
            return NOT_FOUND
        return Reply(200, node.user_data, BINARY)
    if head == "meta-data":
        return _walk(tree if tree is not None else meta_data_tree(node, version), rest)
    if head == "dynamic" and with_dynamic:
        if not rest:
            return text("instance-identity/")
        if rest[0] != "instance-identity" or len(rest) > 2:
            return NOT_FOUND
        if len(rest) == 1:
            return text("document")
        if rest[1] != "document":
            return NOT_FOUND
        document = identity_document(node, region_of(node.availability_zone, region), pending_time)
        return Reply(200, json.dumps(document, indent=2).encode("utf-8"), JSON)
    return NOT_FOUND


def tree_bytes(tree: Tree) -> int:
    """About the memory ``tree`` holds: its dictionaries and strings (those it shares
    with the node counted too)."""
    size = sys.getsizeof(tree)
    for key, value in tree.items():
        size += sys.getsizeof(key)
        size += tree_bytes(value) if isinstance(value, dict) else sys.getsizeof(value)
    return size


def _walk(tree: Tree, parts: Sequence[str]) -> Reply:
    here: Tree | str | bytes = tree
    for part in parts:
        if not isinstance(here, dict) or part.startswith("_") or part not in here:
            return NOT_FOUND
        here = here[part]
    if isinstance(here, dict):
        return text(_listing(here))
    return text(here)


def _listing(tree: Mapping[str, Any]) -> str:
    lines = []
    keys = (k for k in tree if not k.startswith("_"))
    # Numbered entries (public-keys/0, 1, ... 10) in numeric order.
    for key in sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        child = tree[key]
        if isinstance(child, dict):
            lines.append(child.get("_name", key + "/"))
        else:
            lines.append(key)
    return "\n".join(lines)
