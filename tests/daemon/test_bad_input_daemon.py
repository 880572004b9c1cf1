"""Hostile input against a real daemon (``twistd metadatad``) on loopback: bytes that
are not UTF-8 in headers, lone surrogates, deep nesting, mapped port addresses.  Each
gets a clear 4xx (or one line from ``metadatad-manage``), changes nothing, logs no
traceback, and a flood of it runs into the caller's rate limit without flooding the
log."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, http_request
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

HERE = node_document(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module: a trusted proxy (127.0.0.6) and a shared secret,
    so every identity header is read; a rate limit low enough to reach."""
    running = Daemon.create(
        tmp_path_factory.mktemp("bad-input"),
        nodes=[HERE],
        config={
            "metadata": {
                "trusted_proxies": "127.0.0.6/32",
                "proxy_shared_secret": "proxy-secret",
                "rate_limit": "1",
                "rate_burst": "20",
            }
        },
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def raw_request(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """Send ``request`` as is; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def status_of(line: bytes) -> int:
    return int(line.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("header", "method", "path"),
    [
        (b"X-aws-ec2-metadata-token", b"GET", b"/latest/meta-data/instance-id"),
        (b"X-aws-ec2-metadata-token-ttl-seconds", b"PUT", b"/latest/api/token"),
        (b"X-Forwarded-For", b"GET", b"/latest/meta-data/instance-id"),
        (b"X-Instance-ID", b"GET", b"/latest/meta-data/instance-id"),
        (b"X-Instance-ID-Signature", b"GET", b"/latest/meta-data/instance-id"),
    ],
)
def test_non_utf8_header_floods_are_4xx_rate_limited_and_quiet(
    daemon: Daemon, header: bytes, method: bytes, path: bytes
) -> None:
    """60 requests with ``\\xff`` in the header from an address with no node: each a
    4xx, past the burst a 429, no traceback, and only a handful of log lines."""
    source = {
        b"X-aws-ec2-metadata-token": "127.0.0.2",
        b"X-aws-ec2-metadata-token-ttl-seconds": "127.0.0.3",
        b"X-Forwarded-For": "127.0.0.6",  # the trusted proxy: its header is read
        b"X-Instance-ID": "127.0.0.4",
        b"X-Instance-ID-Signature": "127.0.0.5",
    }[header]
    lines_before = len(daemon.output().splitlines())
    request = (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n"
        + header
        + b": \xff\xfe\r\n\r\n"
    )
    statuses = [status_of(raw_request(daemon.metadata_port, request, source)) for _ in range(60)]
    assert all(400 <= s < 500 for s in statuses), statuses
    assert 429 in statuses, statuses
    assert daemon.errors() == []
    written = len(daemon.output().splitlines()) - lines_before
    assert written <= 12, daemon.output().splitlines()[lines_before:]


def _admin_raw(daemon: Daemon, method: str, path: str, body: bytes) -> tuple[int, object]:
    status, _, raw = http_request(
        daemon.admin_url + path,
        method,
        body=body,
        headers={"Authorization": f"Bearer {daemon.admin_token}"},
    )
    return status, json.loads(raw)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({**node_document(5), "name": "\ud800"}).encode(),
        json.dumps({**node_document(5), "meta": {"k": "x\udfff"}}).encode(),
        b"[" * 5000,
        b'{"network_data": ' * 5000 + b"null" + b"}" * 5000,
    ],
    ids=["surrogate-value", "surrogate-meta", "deep-list", "deep-object"],
)
def test_admin_refuses_lone_surrogates_and_deep_nesting(daemon: Daemon, body: bytes) -> None:
    """400 on the import and the PUT, nothing stored, no traceback."""
    uuid = node_document(5)["uuid"]
    for method, path in (("POST", "/v1/nodes"), ("PUT", f"/v1/nodes/{uuid}")):
        status, document = _admin_raw(daemon, method, path, body)
        assert status == 400, document
    assert daemon.admin("GET", f"/v1/nodes/{uuid}")[0] == 404
    assert daemon.errors() == []


@pytest.mark.parametrize(
    "body",
    [b'{"k": "\\ud800"}', b'{"meta": {"k": "\\udc00"}}', b"[" * 5000, b'{"a":' * 5000],
    ids=["surrogate", "surrogate-meta", "deep-list", "deep-object"],
)
def test_peer_post_refuses_lone_surrogates_and_deep_nesting(daemon: Daemon, body: bytes) -> None:
    """A registered machine posting them gets 400, not 503 ("retry"), and the log
    shows no false database alarm."""
    status, _, answer = daemon.request(
        "POST", "/openstack/latest/metadata?shared=project", body=body
    )
    assert status == 400, answer
    assert "store query failed" not in daemon.output()
    assert daemon.errors() == []


@pytest.mark.parametrize(
    "content",
    [
        json.dumps([{**node_document(6), "name": "n\ud800"}]).encode(),
        b"[" * 5000,
    ],
    ids=["surrogate", "deep"],
)
def test_node_import_refuses_with_one_line(daemon: Daemon, tmp_path: Path, content: bytes) -> None:
    """``metadatad-manage node import`` of such a file: exit 1, one line, nothing
    imported."""
    path = tmp_path / "nodes.json"
    path.write_bytes(content)
    result = daemon.manage("node", "import", str(path), check=False)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "nothing was imported" in result.stderr
    assert daemon.admin("GET", f"/v1/nodes/{node_document(6)['uuid']}")[0] == 404


def test_a_mapped_port_address_cannot_take_anothers_address(daemon: Daemon) -> None:
    """``::ffff:127.0.0.1`` is node 0's 127.0.0.1: 409; a zoned address is stored
    without its zone."""
    twin = node_document(7, ports=[{"mac": "52:54:00:00:00:07", "ip": "::ffff:127.0.0.1"}])
    assert daemon.admin("POST", "/v1/nodes", twin)[0] == 409
    zoned = node_document(8, ports=[{"mac": "52:54:00:00:00:08", "ip": "fe80::8%lo"}])
    assert daemon.admin("POST", "/v1/nodes", zoned)[0] == 200
    status, document = daemon.admin("GET", f"/v1/nodes/{zoned['uuid']}")
    assert status == 200
    assert document["ports"][0]["ip"] == "fe80::8"
