"""The ``dhcp`` service in the daemon's composition, the script provider with real
processes, and the DHCP fields of the admin boot route."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet.defer import succeed

from metadatad.admin.site import AdminSite
from metadatad.core.bootmapping import BootDefaults, boot_mapping
from metadatad.dhcp.dnsmasq import DnsmasqProvider
from metadatad.dhcp.provider import PushError
from metadatad.dhcp.pusher import DhcpPusher
from metadatad.dhcp.script import ScriptProvider
from metadatad.testing import MemoryStore
from tests.app.test_tap import build, write_conf
from tests.support.factories import make_node, node_document
from tests.support.sites import Client

TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def services() -> Any:
    built: list[MultiService] = []
    yield built
    for root in built:
        root.getServiceNamed("store").repository.engine.dispose()
        root.getServiceNamed("membership").repository.engine.dispose()
        if "dhcp" in root.namedServices:
            root.getServiceNamed("dhcp").repository.engine.dispose()


def test_dhcp_service_follows_membership_and_has_its_own_engine(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """provider dnsmasq adds the "dhcp" service right after membership (stopped before
    it), observing its claims and the store's changes; provider none adds nothing."""
    conf = write_conf(tmp_path, migrated_url)
    with open(conf, "a", encoding="utf-8") as f:
        f.write(
            f"[conductor]\nhostname = c1\ntftp_address = 10.0.0.5\n[dhcp]\nprovider = dnsmasq\n"
            f"dnsmasq_hostsdir = {tmp_path}\ndnsmasq_optsdir = {tmp_path}\nconcurrency = 7\n"
        )
    root = build(conf, services)
    names = [service.name for service in root]
    assert names[:3] == ["store", "membership", "dhcp"]
    dhcp = root.getServiceNamed("dhcp")
    membership = root.getServiceNamed("membership")
    assert isinstance(dhcp, DhcpPusher) and isinstance(dhcp.provider, DnsmasqProvider)
    assert dhcp.concurrency == 7 and dhcp.info.tftp_address == "10.0.0.5"
    assert dhcp.claimed in membership._observers
    assert dhcp.nodes_changed in root.getServiceNamed("store")._change_listeners
    assert dhcp.repository.engine is not root.getServiceNamed("store").repository.engine


@pytest.fixture
def migrated_url(tmp_path: Path, scratch_databases: Any) -> str:
    from tests.support.databases import empty_database

    return empty_database("sqlite", tmp_path, scratch_databases)


def _script(tmp_path: Path, body: str) -> str:
    script = tmp_path / "push.py"
    script.write_text("import json, sys\n" + body)
    return f"{sys.executable} {script}"


@pytest_twisted.inlineCallbacks
def test_script_gets_the_mapping_on_stdin(tmp_path: Path) -> Any:
    """The command reads the mapping, owner and generation as JSON; exit 0 = pushed."""
    from twisted.internet import reactor

    out = tmp_path / "got.json"
    command = _script(tmp_path, f"open({str(out)!r}, 'w').write(sys.stdin.read())\n")
    provider = ScriptProvider(command, "c1", reactor)
    mapping = boot_mapping(make_node(0), "10.0.0.5", "", BootDefaults())
    yield provider.push(mapping, None, 4)
    got = json.loads(out.read_text())
    assert (got.pop("owner"), got.pop("generation")) == ("c1", 4)
    assert got == mapping.to_document()
    assert (got["addresses"], got["hostname"]) == (["10.0.0.2"], "web-0.example.org")


@pytest_twisted.inlineCallbacks
def test_script_failure_records_stderr_and_timeout_kills(tmp_path: Path) -> Any:
    """A non-zero exit is a retryable PushError with the end of stderr; a command over
    its timeout is killed."""
    from twisted.internet import reactor

    mapping = boot_mapping(make_node(0), "10.0.0.5", "", BootDefaults())
    failing = ScriptProvider(
        _script(
            tmp_path, "sys.stdin.read(); sys.stderr.write('no route to omapi\\n'); sys.exit(3)"
        ),
        "c1",
        reactor,
    )
    with pytest.raises(PushError) as caught:
        yield failing.push(mapping, None, 1)
    assert not caught.value.permanent
    assert "exited 3" in caught.value.message and "no route to omapi" in caught.value.message
    slow = ScriptProvider(_script(tmp_path, "import time; time.sleep(30)"), "c1", reactor, 0.5)
    with pytest.raises(PushError) as caught:
        yield slow.push(mapping, None, 1)
    assert "timed out" in caught.value.message


def test_admin_boot_route_shows_mapping_and_push_state() -> None:
    """GET /v1/nodes/<uuid>/boot adds "mapping" and "push" (null without a provider)."""
    store = MemoryStore()
    node = node_document(0)
    store.repository.upsert_nodes([make_node(0)])

    class Dhcp:
        def state(self, uuid: str) -> Any:
            assert uuid == node["uuid"]
            return succeed(
                {
                    "mapping": {"tftp_server": "10.0.0.5"},
                    "status": "failed",
                    "attempts": 2,
                    "last_error": "PUT ...: 404 Port p could not be found.",
                }
            )

    site = AdminSite(store, TOKEN, dhcp=Dhcp())  # type: ignore[arg-type]
    client = Client(site.resource(), base="http://127.0.0.1:8776")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer = client.get(f"/v1/nodes/{node['uuid']}/boot", headers=headers)
    assert answer.status == 200, answer.text
    document = json.loads(answer.body)
    assert document["mapping"] == {"tftp_server": "10.0.0.5"}
    assert document["push"]["status"] == "failed"
    assert "could not be found" in document["push"]["last_error"]
    bare = Client(AdminSite(store, TOKEN).resource(), base="http://127.0.0.1:8776")  # type: ignore[arg-type]
    document = json.loads(bare.get(f"/v1/nodes/{node['uuid']}/boot", headers=headers).body)
    assert (document["mapping"], document["push"]) == (None, None)
