"""Listen backlogs: ``backlog=`` from the endpoint string, a large default otherwise,
and the admin API and TFTP still answering while the metadata port is flooded."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from metadatad.core.backlog import ADMIN_BACKLOG, METADATA_BACKLOG, with_default_backlog
from tests.support.daemon import DaemonFactory, http_request


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp:8775", "tcp:8775:backlog=4096"),
        ("tcp:8775:interface=127.0.0.1", "tcp:8775:interface=127.0.0.1:backlog=4096"),
        ("tcp6:8775:interface=\\:\\:1", "tcp6:8775:interface=\\:\\:1:backlog=4096"),
        ("tcp:8775:backlog=77", "tcp:8775:backlog=77"),
        (
            "tcp:port=8775:backlog=9:interface=127.0.0.1",
            "tcp:port=8775:backlog=9:interface=127.0.0.1",
        ),
        ("unix:/run/m.sock", "unix:/run/m.sock:backlog=4096"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(given: str, expected: str) -> None:
    """A backlog the operator wrote is kept; otherwise the default is added where the
    endpoint type has one (a systemd socket's is systemd's ``Backlog=``)."""
    assert with_default_backlog(given, 4096) == expected


def _listen_backlog(port: int) -> int:
    """The backlog the kernel holds for the TCP listener on ``port`` (``ss``'s Send-Q)."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.fail("ss (iproute2) is required")
    out = subprocess.run(
        [ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    assert out and out[0] == "LISTEN", out
    return int(out[2])


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.slow
def test_listeners_get_a_large_backlog_or_the_one_configured(daemon_factory: DaemonFactory) -> None:
    """Without ``backlog=`` the metadata site listens with the deepest queue the kernel
    allows and the admin API with 1024 (the kernel caps both at net.core.somaxconn);
    ``backlog=`` is honoured."""
    daemon = daemon_factory()
    assert _listen_backlog(daemon.metadata_port) == min(METADATA_BACKLOG, _somaxconn())
    assert _listen_backlog(daemon.admin_port) == min(ADMIN_BACKLOG, _somaxconn())
    daemon.stop()
    text = daemon.config_path.read_text()
    text = text.replace(
        f"tcp:{daemon.metadata_port}:interface=127.0.0.1",
        f"tcp:{daemon.metadata_port}:interface=127.0.0.1:backlog=77",
    )
    daemon.config_path.write_text(text)
    daemon.start()
    assert _listen_backlog(daemon.metadata_port) == 77


def _tftp_first_block(port: int, name: bytes, timeout: float) -> float:
    """Seconds until the first DATA packet of an RRQ for ``name`` arrives."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        started = time.monotonic()
        s.sendto(b"\x00\x01" + name + b"\x00octet\x00", ("127.0.0.1", port))
        data, server = s.recvfrom(2048)
        elapsed = time.monotonic() - started
        opcode, block = struct.unpack("!HH", data[:4])
        assert (opcode, block) == (3, 1), data[:40]
        s.sendto(struct.pack("!HH", 5, 0) + b"done\x00", server)  # ERROR: stop the transfer
    return elapsed


@pytest.mark.slow
def test_admin_and_tftp_answer_during_a_metadata_connection_flood(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Many sources opening and dropping connections to the metadata port as fast as
    they can: the admin API's /healthz and a TFTP read still answer promptly."""
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "f.bin").write_bytes(b"x" * 4096)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        tftp_port = s.getsockname()[1]
    daemon = daemon_factory(
        config={"tftp": {"listen": f"127.0.0.1:{tftp_port}", "root": str(root)}}
    )
    stop = threading.Event()
    connects = [0]

    def flood(source: str) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(
                    ("127.0.0.1", daemon.metadata_port), timeout=2, source_address=(source, 0)
                ) as c:
                    c.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n")
                connects[0] += 1
            except OSError:
                pass

    threads = [
        threading.Thread(target=flood, args=(f"127.3.{i // 200}.{i % 200 + 1}",), daemon=True)
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)  # the flood is under way (a load, not a synchronisation)
        admin_waits = []
        tftp_waits = []
        for _ in range(5):
            started = time.monotonic()
            status, _, _ = http_request(
                daemon.admin_url + "/healthz",
                headers={"Authorization": f"Bearer {daemon.admin_token}"},
                timeout=5,
            )
            assert status == 200
            admin_waits.append(time.monotonic() - started)
            tftp_waits.append(_tftp_first_block(tftp_port, b"f.bin", timeout=5))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert connects[0] > 100, connects
    # Starved would be never, or after SYN retries (1 s, 3 s, ...); the bound leaves
    # room for a loaded test machine.
    assert max(admin_waits) < 2.5, admin_waits
    assert max(tftp_waits) < 2.5, tftp_waits
    assert daemon.errors() == []
