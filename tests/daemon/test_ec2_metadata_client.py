"""The PyPI ``ec2-metadata`` library reads the EC2 network tree and the per-node public
fields from the real daemon (``twistd metadatad`` on loopback), with IMDSv2 tokens.

The library always asks ``http://169.254.169.254/latest/``; its URLs are attributes, so
the test points them at the daemon, and its urllib3 pool connects from the node's
address (127.0.0.7) and nowhere else.
"""

from __future__ import annotations

from typing import Any

import pytest
import urllib3
from ec2_metadata import EC2Metadata

from tests.support.daemon import DaemonFactory

pytestmark = pytest.mark.slow

SOURCE = "127.0.0.7"
MAC0, MAC1 = "fa:16:3e:00:07:01", "fa:16:3e:00:07:02"
NODE: dict[str, Any] = {
    "uuid": "3e5f7a9b-1c2d-4e6f-8a0b-c1d2e3f4a5b6",
    "hostname": "lib-node.example.org",
    "project_id": "proj-lib",
    "ports": [
        {"mac": MAC0, "ip": SOURCE, "pxe": True, "neutron_port_id": "0b6e4c8a-port"},
        {"mac": MAC1, "ip": "2001:db8::7"},
    ],
    "public_ipv4": "203.0.113.7",
    "public_hostname": "lib.example.com",
    "security_groups": ["web", "ssh"],
}


def client(metadata_url: str) -> EC2Metadata:
    pool = urllib3.PoolManager(source_address=(SOURCE, 0), retries=False)
    md = EC2Metadata(pool_manager=pool)
    md.service_url = metadata_url + "/latest/"
    md.dynamic_url = md.service_url + "dynamic/"
    md.metadata_url = md.service_url + "meta-data/"
    md.userdata_url = md.service_url + "user-data/"
    return md


def test_ec2_metadata_library_reads_network_and_public_fields(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory(nodes=[NODE])
    md = client(daemon.metadata_url)
    assert md.instance_id == NODE["uuid"]
    assert md.mac == MAC0
    assert md.public_ipv4 == "203.0.113.7"
    assert md.public_hostname == "lib.example.com"
    assert md.security_groups == ["web", "ssh"]
    interfaces = md.network_interfaces
    assert sorted(interfaces) == [MAC0, MAC1]
    first, second = interfaces[MAC0], interfaces[MAC1]
    assert first.device_number == 0
    assert first.interface_id == "0b6e4c8a-port"
    assert first.private_ipv4s == [SOURCE]
    assert first.private_hostname == "lib-node.example.org"
    assert first.public_ipv4s == ["203.0.113.7"]
    assert first.ipv4_associations == {"203.0.113.7": [SOURCE]}
    assert first.security_groups == ["web", "ssh"]
    assert first.owner_id == "proj-lib"
    assert first.ipv6s == []
    assert first.subnet_ipv4_cidr_block is None  # no network_data: not known
    assert second.device_number == 1
    assert second.interface_id == "eni-fa163e000702"
    assert second.ipv6s == ["2001:db8::7"]
    assert second.public_ipv4s == []
    # A node without public fields: Nova's empty public-ipv4, and the "default" group.
    plain = {**NODE, "public_ipv4": None, "public_hostname": None}
    del plain["security_groups"]
    # Through the admin API, which clears the daemon's node cache at once.
    status, _ = daemon.admin("PUT", f"/v1/nodes/{NODE['uuid']}", plain)
    assert status == 200
    md = client(daemon.metadata_url)
    assert md.security_groups == ["default"]
    assert md.public_ipv4 == ""
    assert md.public_hostname == "lib-node.example.org"
    assert md.network_interfaces[MAC0].public_ipv4s == []
