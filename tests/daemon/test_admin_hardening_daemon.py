"""The admin API of a real daemon has the metadata site's connection hardening:
header and body limits, a per-source connection cap, and a client that stops reading
a large answer is dropped after ``write_timeout``."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time

import pytest

from tests.support.daemon import DaemonFactory, http_request
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

DEADLINE = 20.0


def _established(server_port: int, client_port: int) -> bool:
    ss = shutil.which("ss")
    if ss is None:
        pytest.fail("ss (iproute2) is required")
    out = subprocess.run(
        [
            ss,
            "-tnH",
            "state",
            "established",
            f"( sport = :{server_port} and dport = :{client_port} )",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return bool(out.strip())


def _big_nodes(count: int) -> list[dict[str, object]]:
    """Nodes of about 1 MB each (64 public keys of 16 KiB)."""
    keys = {f"key{i}": "ssh-ed25519 " + "A" * 16_000 for i in range(64)}
    return [node_document(i, public_keys=keys) for i in range(count)]


def test_admin_api_limits_headers_bodies_and_connections(daemon_factory: DaemonFactory) -> None:
    """431 for oversize headers, 413 for an oversize body (before it is read), and
    connections past ``[admin] max_connections_per_source`` closed unanswered."""
    daemon = daemon_factory(
        config={"admin": {"max_body_bytes": "4096", "max_connections_per_source": "2"}}
    )
    auth = {"Authorization": f"Bearer {daemon.admin_token}"}
    status, _, _ = http_request(
        daemon.admin_url + "/v1/nodes", headers={**auth, "X-Padding": "p" * 20_000}
    )
    assert status == 431
    status, _, _ = http_request(
        daemon.admin_url + "/v1/nodes", "POST", body=b"[" + b" " * 8000 + b"]", headers=auth
    )
    assert status == 413
    held = []
    for _ in range(2):  # two keep-alive connections, each answered once: both accepted
        connection = http.client.HTTPConnection("127.0.0.1", daemon.admin_port, timeout=5)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read()
        held.append(connection)
    try:
        with socket.create_connection(("127.0.0.1", daemon.admin_port), timeout=5) as third:
            third.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            try:
                answer = third.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed without an answer
    finally:
        for connection in held:
            connection.close()
    assert daemon.errors() == []


def test_admin_client_that_stops_reading_is_dropped(daemon_factory: DaemonFactory) -> None:
    """A client asks for a 5 MB node list and never reads: after write_timeout without
    progress the daemon aborts the connection instead of holding it for ever."""
    daemon = daemon_factory(_big_nodes(5), config={"admin": {"write_timeout": "1"}})
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(5)
    client.connect(("127.0.0.1", daemon.admin_port))
    client_port = client.getsockname()[1]
    try:
        client.sendall(
            b"GET /v1/nodes HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Authorization: Bearer " + daemon.admin_token.encode() + b"\r\n\r\n"
        )
        give_up = time.monotonic() + DEADLINE
        while _established(daemon.admin_port, client_port):
            assert time.monotonic() < give_up, "the stalled client is still connected"
            time.sleep(0.2)  # poll-with-deadline on a real subprocess
    finally:
        client.close()
    # The daemon is fine and serves the next caller.
    status, _, body = http_request(
        daemon.admin_url + "/v1/nodes",
        headers={"Authorization": f"Bearer {daemon.admin_token}"},
        timeout=30,
    )
    assert status == 200 and len(body) > 5_000_000
    assert (
        "write stall"
        in http_request(
            daemon.admin_url + "/metrics", headers={"Authorization": f"Bearer {daemon.admin_token}"}
        )[2].decode()
    )
    assert daemon.errors() == []
