"""Debian's cloud-init 22.4 reads dynamic vendordata from the real daemon.

A real ``twistd metadatad`` (tests/support/daemon.py) has one dynamic target, a threaded HTTP
server in this test process on loopback.  cloud-init's OpenStack crawl (the driver of
tests/daemon/test_cloudinit.py) reads ``vendor_data2.json`` with the target's section; the
target saw Nova's body, the node's stored boot roles and the service token.  With
``failure_fatal`` a failing target answers 500: cloud-init still boots without
vendordata2, and the admin API shows the node's ``vendordata_error``.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.test_cloudinit import (
    CALLER_NODE,
    NODE_UUID,
    VENDORDATA,
    context,
    run_driver,
    system_python,
)
from tests.support.daemon import Daemon

pytestmark = pytest.mark.slow

__all__ = ["system_python"]  # the fixture, used here by name

DYNAMIC = {"cloud-init": "#cloud-config\nruncmd: [[touch, /run/dynamic]]\n", "rack": "r12"}
SERVICE_TOKEN = "vendordata-service-token-0123"


class TargetServer:
    """A vendordata service on 127.0.0.1 in a thread: records POSTs, answers
    ``status`` with ``DYNAMIC``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                owner.seen.append(
                    {
                        "path": self.path,
                        "token": self.headers.get("X-Auth-Token"),
                        "content_type": self.headers.get("Content-Type"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                body = json.dumps(DYNAMIC).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/vendordata"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def target() -> Iterator[TargetServer]:
    server = TargetServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, target: TargetServer) -> Iterator[Daemon]:
    """The daemon with static and dynamic vendordata, failure_fatal, no caching."""
    directory = tmp_path_factory.mktemp("vendordata-cloudinit")
    token_file = Path(directory) / "vendordata-token"
    token_file.write_text(SERVICE_TOKEN + "\n", encoding="utf-8")
    running = Daemon.create(
        directory,
        nodes=[CALLER_NODE],
        vendordata=VENDORDATA,
        config={
            "vendordata": {
                "dynamic_targets": f"testing@{target.url}",
                "service_token_file": str(token_file),
                "failure_fatal": "true",
                "cache_ttl": "0",
                "failure_ttl": "0",
                "connect_timeout": "2",
                "read_timeout": "3",
            }
        },
    )
    try:
        yield running.start()
    finally:
        status = running.stop()
    assert status == -signal.SIGTERM, f"exit status {status}:\n{running.output()[-3000:]}"
    assert running.errors() == []
    # The failures were logged as warnings, without the service token.
    assert "dynamic vendordata target testing failed" in running.output()
    assert SERVICE_TOKEN not in running.output()


def test_cloudinit_reads_dynamic_vendordata(
    system_python: str, daemon: Daemon, target: TargetServer
) -> None:
    """cloud-init's crawl gets vendor_data2.json with static and the target's answer;
    the target got the node's facts and the service token."""
    target.status = 200
    result = run_driver(
        system_python, daemon, "dynamic", [{"name": "openstack", "kind": "openstack"}]
    )["openstack"]
    assert result["found"], context(result, daemon)
    assert result["vendordata2"] == {"static": VENDORDATA, "testing": DYNAMIC}
    assert result["vendordata"] == VENDORDATA
    seen = target.seen[-1]
    assert seen["path"] == "/vendordata"
    assert seen["token"] == SERVICE_TOKEN
    assert seen["content_type"] == "application/json"
    body = seen["body"]
    assert body["instance-id"] == NODE_UUID
    assert body["project-id"] == CALLER_NODE["project_id"]
    assert body["image-id"] == CALLER_NODE["image_id"]
    assert body["hostname"] == CALLER_NODE["hostname"]
    assert body["metadata"] == CALLER_NODE["meta"]
    assert body["user-data"] == CALLER_NODE["user_data"]
    assert body["boot-roles"] == "member"
    status, node = daemon.admin("GET", f"/v1/nodes/{NODE_UUID}")
    assert status == 200 and node["vendordata_error"] is None


def test_fatal_failure_500_cloudinit_boots_without_it(
    system_python: str, daemon: Daemon, target: TargetServer
) -> None:
    """The target fails: vendor_data2.json is a 500, cloud-init still finds its
    datasource (vendordata2 None), and the admin API shows why."""
    target.status = 500
    try:
        status, _, _ = daemon.get("/openstack/latest/vendor_data2.json")
        assert status == 500
        result = run_driver(
            system_python, daemon, "fatal", [{"name": "openstack", "kind": "openstack"}]
        )["openstack"]
        assert result["found"], context(result, daemon)
        assert result["vendordata2"] is None
        assert result["vendordata"] == VENDORDATA
        status, node = daemon.admin("GET", f"/v1/nodes/{NODE_UUID}")
        assert status == 200
        assert node["vendordata_error"]["reason"] == "testing: HTTP 500"
    finally:
        target.status = 200
    status, _, body = daemon.get("/openstack/latest/vendor_data2.json")
    assert status == 200 and json.loads(body)["testing"] == DYNAMIC
    status, node = daemon.admin("GET", f"/v1/nodes/{NODE_UUID}")
    assert node["vendordata_error"] is None
