"""Operability of the real daemon (``twistd -n metadatad``): ``/metrics`` follows the
traffic, ``/healthz`` follows a PostgreSQL server that is stopped and started again,
SIGHUP reloads vendordata without dropping a connection, SIGTERM answers the request in
progress, and JSON log lines."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon, DaemonFactory, free_port, http_request
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

NODE = node_document(0, ports=[{"mac": "52:54:00:12:34:56", "ip": "127.0.0.1", "pxe": True}])
DEADLINE = 30.0


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics``: ``{(sample name, sorted labels): value}``."""
    status, headers, body = http_request(
        daemon.admin_url + "/metrics", headers={"Authorization": f"Bearer {daemon.admin_token}"}
    )
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def poll(condition: Any, what: str, deadline: float = DEADLINE) -> Any:
    """Poll-with-deadline on a real subprocess."""
    give_up = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.1)


def test_metrics_follow_traffic(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Requests, latency, cache hits and misses, heartbeat, ring and TFTP counters are
    on /metrics, and the counters move with the traffic; no token, no metrics."""
    templates = tmp_path / "templates"
    templates.mkdir()
    daemon = daemon_factory(
        nodes=[NODE],
        config={
            "conductor": {"heartbeat_interval": "1", "heartbeat_timeout": "5"},
            "tftp": {"listen": "127.0.0.1:0", "root": str(tmp_path), "templates": str(templates)},
        },
    )
    status, _, _ = http_request(daemon.admin_url + "/metrics")
    assert status == 401
    poll(lambda: scrape(daemon).get(("metadatad_ring_generation", ())), "a ring generation")
    before = scrape(daemon)
    for _ in range(3):
        assert daemon.get("/latest/meta-data/instance-id")[0] == 200
    assert daemon.get("/nope")[0] == 404
    after = scrape(daemon)

    ok = {"site": "metadata", "method": "GET", "code": "200"}
    assert (
        value(after, "metadatad_http_requests_total", **ok)
        == value(before, "metadatad_http_requests_total", **ok) + 3
    )
    missing = {"site": "metadata", "method": "GET", "code": "404"}
    assert value(after, "metadatad_http_requests_total", **missing) == 1 + value(
        before, "metadatad_http_requests_total", **missing
    )
    latency = "metadatad_http_request_duration_seconds_count"
    assert value(after, latency, site="metadata") >= value(before, latency, site="metadata") + 4
    # The first lookup of 127.0.0.1 missed the cache; the next ones hit it.
    cache = {"cache": "metadata"}
    assert value(after, "metadatad_node_cache_misses_total", **cache) >= 1
    assert value(after, "metadatad_node_cache_hits_total", **cache) >= 2 + value(
        before, "metadatad_node_cache_hits_total", **cache
    )
    assert 0 <= value(after, "metadatad_heartbeat_age_seconds") < 5
    assert value(after, "metadatad_heartbeat_timeout_seconds") == 5
    assert value(after, "metadatad_membership_state", state="ok") == 1
    assert value(after, "metadatad_ring_members", group="") == 1
    assert value(after, "metadatad_owned_nodes") == 1
    assert ("metadatad_tftp_requests_total", ()) in after
    assert value(after, "metadatad_tftp_active_transfers") == 0


def test_sighup_reloads_vendordata_and_keeps_connections(daemon_factory: DaemonFactory) -> None:
    """SIGHUP: new static vendordata is served on a connection opened before the
    signal; a file that no longer parses changes nothing and is named in the log."""
    daemon = daemon_factory(nodes=[NODE], vendordata={"cloud-init": "#cloud-config\nold: 1\n"})
    assert daemon.process is not None
    connection = http.client.HTTPConnection("127.0.0.1", daemon.metadata_port, timeout=10)
    path = "/openstack/latest/vendor_data.json"

    def fetch() -> Any:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())

    try:
        assert fetch() == {"cloud-init": "#cloud-config\nold: 1\n"}
        vendordata = daemon.directory / "vendordata.json"
        vendordata.write_text(json.dumps({"cloud-init": "#cloud-config\nnew: 2\n"}))
        daemon.process.send_signal(signal.SIGHUP)
        poll(lambda: "reloaded" in daemon.output(), "the reload")
        # The same TCP connection: the request goes over the socket opened before.
        sock = connection.sock
        assert fetch() == {"cloud-init": "#cloud-config\nnew: 2\n"}
        assert connection.sock is sock

        vendordata.write_text("{not json")
        daemon.process.send_signal(signal.SIGHUP)
        poll(lambda: "reload refused" in daemon.output(), "the refusal")
        assert fetch() == {"cloud-init": "#cloud-config\nnew: 2\n"}
        assert "is not valid JSON" in daemon.output()
    finally:
        connection.close()
    assert daemon.running
    assert daemon.errors() == []


def test_sigterm_answers_the_request_in_progress(daemon_factory: DaemonFactory) -> None:
    """SIGTERM (one process): the metadata port refuses new connections at once, and a
    request begun before the signal and completed after it is still answered before
    the services stop (the site drains, at most 5 s).  It used to be dropped."""
    daemon = daemon_factory(nodes=[NODE])
    assert daemon.process is not None
    connection = http.client.HTTPConnection("127.0.0.1", daemon.metadata_port, timeout=10)
    try:
        connection.request("GET", "/latest/meta-data/instance-id")  # accepted, cached
        assert connection.getresponse().read() == NODE["uuid"].encode()
        sock = connection.sock
        sock.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\n")
        client_port = sock.getsockname()[1]
        poll(lambda: _read_by_the_daemon(daemon.metadata_port, client_port), "the first line read")
        daemon.process.send_signal(signal.SIGTERM)
        poll(lambda: _refused(daemon.metadata_port), "the port closed")
        sock.sendall(b"Host: a\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert (response.status, response.read()) == (200, NODE["uuid"].encode())
    finally:
        connection.close()
    assert daemon.process.wait(timeout=DEADLINE) == -signal.SIGTERM
    assert daemon.errors() == []


def _read_by_the_daemon(port: int, client_port: int) -> bool:
    """The daemon's end of the loopback connection from ``client_port`` to ``port`` has
    nothing left unread (``/proc/net/tcp``'s rx_queue): twisted.web has seen the bytes."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[1], 16) == 0
    return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_json_log_lines(daemon_factory: DaemonFactory) -> None:
    """[logging] format = json: every line the daemon writes is a JSON object with
    time, level, namespace and message; event fields stay fields."""
    daemon = daemon_factory(nodes=[NODE], config={"logging": {"format": "json"}})
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    poll(lambda: "reloaded" in daemon.output(), "the reload")
    daemon.stop()
    lines = [
        line
        for line in daemon.output().splitlines()
        if line.strip() and not line.startswith("--- ")  # the harness's own header
    ]
    documents = [json.loads(line) for line in lines]
    assert documents
    for document in documents:
        assert {"time", "level", "namespace", "message"} <= set(document)
    reload = next(d for d in documents if d["message"].startswith("reloaded"))
    assert reload["level"] == "info"
    assert reload["namespace"] == "metadatad.reload.ReloadService"
    assert reload["path"] == str(daemon.config_path)


# --- /healthz and a database that goes away -------------------------------------------


class PrivatePostgreSQL:
    """A PostgreSQL server of this test alone (initdb in a temporary directory, run
    as the ``postgres`` user on a free loopback port), so it can be stopped."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins or os.geteuid() != 0 or shutil.which("runuser") is None:
            reason = "needs root, runuser and PostgreSQL's server binaries"
            if os.environ.get("CI"):
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
        self.bin = bins[-1].parent
        self.directory = Path(tempfile.mkdtemp(prefix="metadatad-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                          "-U", "postgres", "--no-sync")  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.directory,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                          "-l", str(self.directory / "log"), "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "-t", "60", "stop")  # fmt: skip

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_postgresql() -> Iterator[PrivatePostgreSQL]:
    server = PrivatePostgreSQL()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


def healthz(daemon: Daemon) -> tuple[int, Any]:
    try:
        status, _, body = http_request(daemon.admin_url + "/healthz", timeout=15)
    except (OSError, http.client.HTTPException) as e:
        return 0, repr(e)
    return status, json.loads(body)


def test_healthz_follows_the_database(
    daemon_factory: DaemonFactory, private_postgresql: PrivatePostgreSQL
) -> None:
    """/healthz is 200 with a heartbeat age; 503 ("unreachable") once the PostgreSQL
    server is stopped; 200 again after it starts, without restarting the daemon."""
    daemon = daemon_factory(
        nodes=[NODE],
        database_url=private_postgresql.url,
        config={"conductor": {"heartbeat_interval": "1", "heartbeat_timeout": "5"}},
    )
    _, document = poll(lambda: (r := healthz(daemon))[0] == 200 and r, "healthy")
    assert document["database"] == "ok"
    assert 0 <= document["heartbeat_age"] < 5

    private_postgresql.stop()
    _, document = poll(lambda: (r := healthz(daemon))[0] == 503 and r, "unhealthy")
    assert document["status"] == "unhealthy"
    assert document["database"] == "unreachable"
    assert daemon.running

    private_postgresql.start()
    _, document = poll(lambda: (r := healthz(daemon))[0] == 200 and r, "healthy again")
    assert document == {
        "status": "ok",
        "database": "ok",
        "membership": "ok",
        "heartbeat_age": document["heartbeat_age"],
        "heartbeat_timeout": 5,
    }
    assert daemon.get("/latest/meta-data/instance-id")[0] == 200
    assert daemon.errors() == []
