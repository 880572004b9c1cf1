"""IMDSv2 against the real daemon (``twistd metadatad`` on loopback): botocore's token
flow in both modes, cloud-init's EC2 crawl with tokens, the hop limit on the wire, and
the hardened channel over real sockets.
"""

from __future__ import annotations

import base64
import http.client
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore.session
import pytest
from botocore.utils import IMDSFetcher, IMDSRegionProvider

from tests.daemon.test_cloudinit import (
    CALLER_NODE,
    NODE_UUID,
    USER_DATA,
    context,
    run_driver,
    system_python,
)
from tests.support.daemon import Daemon, http_request

__all__ = ["system_python"]  # the fixture, used by the cloud-init test below

pytestmark = pytest.mark.slow

TOKEN_SECRET = "imds-test-secret-4b1f"
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Daemon], botocore.session.Session]:
    """botocore pointed at a daemon with AWS_EC2_METADATA_SERVICE_ENDPOINT; no proxies,
    one attempt, a short timeout."""

    def point(daemon: Daemon) -> botocore.session.Session:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "*")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", daemon.metadata_url + "/")
        monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "5")
        monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
        return botocore.session.get_session()

    return point


def fetcher(session: botocore.session.Session) -> IMDSFetcher:
    """An IMDSFetcher configured from the session, as botocore's providers build it."""
    return IMDSFetcher(
        timeout=5,
        num_attempts=1,
        config={
            "ec2_metadata_service_endpoint": session.get_config_variable(
                "ec2_metadata_service_endpoint"
            ),
            "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled"),
        },
    )


def _start(tmp_path_factory: pytest.TempPathFactory, require: bool) -> Daemon:
    config = {
        "metadata": {
            "token_secret": TOKEN_SECRET,
            "require_tokens": "true" if require else "false",
            "token_hop_limit": "3",
            "max_header_bytes": "2048",
            "max_body_bytes": "1024",
            "max_connections_per_source": "4",
        }
    }
    return Daemon.create(
        tmp_path_factory.mktemp("imds"), nodes=[CALLER_NODE], config=config
    ).start()


def _stopped_cleanly(daemon: Daemon) -> None:
    status = daemon.stop()
    assert status == -signal.SIGTERM, daemon.output()[-3000:]
    assert daemon.errors() == []
    assert TOKEN_SECRET not in daemon.output()


@pytest.fixture(scope="module")
def optional(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon serving CALLER_NODE (127.0.0.1), tokens optional, hop limit 3, small
    size limits; at teardown: stopped cleanly, no traceback, never the secret logged."""
    daemon = _start(tmp_path_factory, False)
    try:
        yield daemon
    finally:
        _stopped_cleanly(daemon)


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The same with ``require_tokens = true``."""
    daemon = _start(tmp_path_factory, True)
    try:
        yield daemon
    finally:
        _stopped_cleanly(daemon)


@pytest.fixture
def daemon_with_tokens(optional: Daemon, required: Daemon) -> Callable[[bool], Daemon]:
    """The module's daemon of either mode."""
    return lambda require: required if require else optional


@pytest.mark.parametrize("require", [False, True], ids=["optional", "required"])
def test_botocore_token_flow_and_reads(
    require: bool, daemon_with_tokens: Callable[..., Daemon], aws_env: Any
) -> None:
    """botocore PUTs a token, then reads with it: the region provider (which asks for
    placement/availability-zone/ with a trailing slash) and plain GETs."""
    daemon = daemon_with_tokens(require)
    session = aws_env(daemon)
    assert IMDSRegionProvider(session).provide() == "az1"  # az1b minus its letter
    imds = fetcher(session)
    token = imds._fetch_metadata_token()
    assert token
    response = imds._get_request("latest/meta-data/instance-id", None, token)
    assert (response.status_code, response.text) == (200, NODE_UUID)
    user_data = imds._get_request("latest/user-data", None, token)
    assert user_data.content == USER_DATA
    status, _, _ = daemon.get("/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "x.y"})
    assert status == 401


def test_a_token_is_good_on_every_conductor_sharing_the_secret(
    optional: Daemon, required: Daemon
) -> None:
    """Stateless tokens: one daemon's token reads from another daemon (its own process
    and database) that has the same token_secret and the same node."""
    status, _, token = optional.request("PUT", "/latest/api/token", headers=TTL)
    assert status == 200
    header = {"X-aws-ec2-metadata-token": token.decode()}
    assert required.get("/latest/meta-data/instance-id", header)[::2] == (200, NODE_UUID.encode())
    assert required.get("/latest/meta-data/instance-id")[0] == 401


def test_botocore_with_imdsv1_disabled_uses_tokens_in_optional_mode(
    daemon_with_tokens: Callable[..., Daemon], aws_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_EC2_METADATA_V1_DISABLED makes botocore insist on a token; it gets one."""
    daemon = daemon_with_tokens(False)
    monkeypatch.setenv("AWS_EC2_METADATA_V1_DISABLED", "true")
    session = aws_env(daemon)
    assert IMDSRegionProvider(session).provide() == "az1"


def test_imdsv1_is_401_when_tokens_are_required(
    daemon_with_tokens: Callable[..., Daemon], aws_env: Any
) -> None:
    """require_tokens: a plain GET and botocore's tokenless GET get 401; the listings
    stay open; the denial is audit-logged with the reason."""
    daemon = daemon_with_tokens(True)
    for path in ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json"):
        status, _, body = daemon.get(path)
        assert status == 401, path
        assert NODE_UUID.encode() not in body
    assert daemon.get("/")[0] == 200
    imds = fetcher(aws_env(daemon))
    with pytest.raises(Exception) as raised:
        imds._get_request("latest/meta-data/instance-id", None, None)
    assert "Retries" in type(raised.value).__name__ or "retries" in str(raised.value).lower()
    assert "denied GET /latest/meta-data/instance-id" in daemon.output()
    assert "no token" in daemon.output()


def test_token_put_rules_over_the_wire(daemon_with_tokens: Callable[..., Daemon]) -> None:
    """The documented statuses, over real HTTP: 200 with the TTL echoed, 400, 403, 405."""
    daemon = daemon_with_tokens(False)
    status, headers, token = daemon.request("PUT", "/latest/api/token", headers=TTL)
    assert status == 200
    assert headers.get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "21600"
    assert daemon.request("PUT", "/latest/api/token")[0] == 400
    forwarded = {**TTL, "X-Forwarded-For": "127.0.0.1"}
    assert daemon.request("PUT", "/latest/api/token", headers=forwarded)[0] == 403
    assert daemon.request("PUT", "/2021-03-23/api/token", headers=TTL)[0] == 403
    assert daemon.get("/latest/api/token")[0] == 405
    assert token.decode() not in daemon.output()


# --- cloud-init ------------------------------------------------------------------------


def test_cloudinit_ec2_crawl_with_tokens_required(
    system_python: str, daemon_with_tokens: Callable[..., Daemon]
) -> None:
    """cloud-init as on AWS (IMDSv2) crawls a daemon that requires tokens."""
    daemon = daemon_with_tokens(True)
    results = run_driver(
        system_python, daemon, "tokens", [{"name": "ec2", "kind": "ec2", "cloud": "aws"}]
    )
    result = results["ec2"]
    assert result["found"], context(result, daemon)
    assert result["used_token"] is True
    assert any(u.endswith("/latest/api/token") for u in result["requested"])
    assert result["api_version"] == "2021-03-23"
    assert result["instance_id"] == NODE_UUID
    assert result["metadata"]["instance-id"] == NODE_UUID
    assert result["metadata"]["local-hostname"] == CALLER_NODE["hostname"]
    assert base64.b64decode(result["userdata"]) == USER_DATA
    assert result["region"] == "az1"
    assert result["blocked"] == []


# --- the hop limit on the wire ---------------------------------------------------------


def _capture(port: int, action: Callable[[], Any]) -> list[tuple[int, bytes]]:
    """(IP TTL, first payload bytes) of every TCP segment with data sent from ``port``
    on the loopback interface while ``action`` runs (an AF_PACKET capture, read by a
    thread as the packets come: loopback frames are big and the buffer small)."""
    try:
        sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    except (PermissionError, AttributeError) as e:
        pytest.skip(f"no packet capture here ({e}); the socket-option test covers the TTL")
    sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sniffer.bind(("lo", 0))
    sniffer.settimeout(0.1)
    seen: list[tuple[int, bytes]] = []
    stop_at: list[float] = []

    def read() -> None:
        # Other traffic on lo never lets it go quiet: stop half a second after the action.
        while not stop_at or time.monotonic() < stop_at[0]:
            try:
                frame = sniffer.recv(65535)
            except TimeoutError:
                continue
            if frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            if ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4 :]
            if int.from_bytes(tcp[0:2], "big") != port:
                continue
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if payload:
                seen.append((ip[8], payload[:16]))

    reader = threading.Thread(target=read, name="capture")
    reader.start()
    try:
        action()
    finally:
        stop_at.append(time.monotonic() + 0.5)
        reader.join()
        sniffer.close()
    return seen


def test_token_response_leaves_with_the_hop_limit(
    daemon_with_tokens: Callable[..., Daemon],
) -> None:
    """Captured on lo: the token PUT's response has IP TTL token_hop_limit (3 here), a
    GET's response the system default."""
    daemon = daemon_with_tokens(False)
    default_ttl = int(open("/proc/sys/net/ipv4/ip_default_ttl").read())
    assert default_ttl != 3

    def exchange() -> None:
        assert daemon.request("PUT", "/latest/api/token", headers=TTL)[0] == 200
        assert daemon.get("/latest/meta-data/instance-id")[0] == 200

    seen = _capture(daemon.metadata_port, exchange)
    responses = [(ttl, payload) for ttl, payload in seen if payload.startswith(b"HTTP/1.1 ")]
    assert {ttl for ttl, _ in responses} == {3, default_ttl}, responses
    assert responses[0][0] == 3 and responses[-1][0] == default_ttl


# --- the hardened channel over real sockets ----------------------------------------------


def test_limits_over_real_sockets(daemon_with_tokens: Callable[..., Daemon]) -> None:
    """431 for big headers, 413 for a big body, a connection cap per source."""
    daemon = daemon_with_tokens(False)
    status, _, _ = daemon.get("/latest/meta-data/", {"X-Pad": "p" * 4000})
    assert status == 431
    status, _, _ = daemon.request("POST", "/openstack/latest/password", body=b"x" * 2000)
    assert status == 413
    assert http_request(daemon.admin_url + "/healthz")[0] == 200
    held = [socket.create_connection(("127.0.0.1", daemon.metadata_port)) for _ in range(4)]
    try:
        # Every slot taken: the next connection is closed without an answer.
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            daemon.get("/latest/meta-data/instance-id")
    finally:
        for sock in held:
            sock.close()
    give_up = time.monotonic() + 10
    while True:  # poll-with-deadline: the daemon notices the closes
        try:
            if daemon.get("/latest/meta-data/instance-id")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        assert time.monotonic() < give_up, "connections were not released"
        time.sleep(0.05)
