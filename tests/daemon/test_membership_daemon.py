"""One real ``twistd metadatad`` with membership: registration, the admin routes, the
CLI, and the offline mark on SIGTERM."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.support.daemon import DaemonFactory
from tests.support.factories import node_document

CONDUCTOR = {
    "hostname": "solo",
    "tftp_address": "127.0.0.1",
    "http_address": "http://127.0.0.1:8775",
    "heartbeat_interval": "1",
    "heartbeat_timeout": "5",
}


@pytest.mark.slow
def test_a_single_daemon_holds_every_node(daemon_factory: DaemonFactory) -> None:
    """The daemon registers, claims every node at start-up (ready means synced), shows
    it on the admin API and the CLI, and marks itself offline when stopped."""
    nodes = [node_document(i) for i in range(5)]
    daemon = daemon_factory(nodes, config={"conductor": CONDUCTOR})
    # /healthz answered 200 before start() returned: the first sync is done.
    status, ring = daemon.admin("GET", "/v1/ring")
    assert status == 200, ring
    assert ring["groups"] == {"": ["solo"]}
    assert [(c["name"], c["claimed"], c["assigned"]) for c in ring["conductors"]] == [
        ("solo", 5, 5)
    ]
    status, found = daemon.admin("GET", "/v1/conductors")
    assert status == 200
    [solo] = found["conductors"]
    assert (solo["name"], solo["live"], solo["nodes"]) == ("solo", True, 5)
    assert solo["tftp_address"] == "127.0.0.1"
    status, boot = daemon.admin("GET", f"/v1/nodes/{nodes[0]['uuid']}/boot")
    assert status == 200
    assert (boot["owner"], boot["standbys"]) == ("solo", [])
    listed = daemon.manage("conductor", "list").stdout.splitlines()
    assert listed[1].split()[:3] == ["solo", "-", "yes"]
    # A node added later is claimed within one heartbeat interval.
    daemon.import_nodes([node_document(9)])
    deadline = time.monotonic() + 3
    owner: Any = None
    while time.monotonic() < deadline and owner != "solo":
        owner = daemon.admin("GET", f"/v1/nodes/{node_document(9)['uuid']}/boot")[1]["owner"]
        time.sleep(0.05)  # poll-with-deadline on a real subprocess
    assert owner == "solo"
    assert daemon.stop() == -signal.SIGTERM
    listed = daemon.manage("conductor", "list").stdout.splitlines()
    assert listed[1].split()[:3] == ["solo", "-", "stopped"]
    output = daemon.output()
    assert "conductor solo (group '') registered" in output
    assert "claimed 5 nodes at generation 1 (start-up): 5 unclaimed" in output
    assert "conductor solo is offline" in output
    assert daemon.errors() == []


def test_make_service_builds_membership_from_the_config(
    tmp_path: Any, scratch_databases: Any
) -> None:
    """[conductor] settings reach the service, which has an engine of its own whose
    queries are refused on the reactor thread."""
    from twisted.internet.testing import MemoryReactorClock

    from metadatad.db.store import ReactorThreadError
    from metadatad.tap import Options, makeService
    from tests.support.databases import empty_database

    url = empty_database("sqlite", tmp_path, scratch_databases)
    conf = tmp_path / "metadatad.conf"
    conf.write_text(
        f"[database]\nurl = {url}\n[admin]\nlisten =\n"
        "[conductor]\nhostname = c7\ngroup = rack-2\ntftp_address = 10.0.0.7\n"
        "heartbeat_interval = 3\nheartbeat_timeout = 20\nring_points = 128\nreplicas = 3\n"
        "max_load_factor = 1.1\n",
        encoding="utf-8",
    )
    options = Options()
    options.parseOptions(["--config", str(conf)])
    root = makeService(options, MemoryReactorClock())
    membership = root.getServiceNamed("membership")
    store = root.getServiceNamed("store")
    try:
        assert (membership.info.name, membership.info.group) == ("c7", "rack-2")
        assert membership.info.tftp_address == "10.0.0.7"
        assert (membership.heartbeat_interval, membership.heartbeat_timeout) == (3, 20)
        assert membership.poll_interval == 1
        assert membership._settings == {"replicas": 3, "points": 128, "max_load_factor": 1.1}
        assert membership.repository.engine is not store.repository.engine
        with pytest.raises(ReactorThreadError):
            membership.repository.conductors(20)
    finally:
        membership.repository.engine.dispose()
        store.repository.engine.dispose()
