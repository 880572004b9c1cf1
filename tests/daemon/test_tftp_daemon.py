"""Real TFTP clients against the real daemon (``twistd -n metadatad``) on loopback.

curl (with and without --tftp-blksize), tftp-hpa (no options: the RFC 1350 path),
atftp (windowsize), busybox tftp and tftpy download static and rendered files byte for
byte; traversal attempts are refused; boot events reach the admin API.  A missing
client skips its tests, except under CI (``CI`` set) where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

MAC = "52:54:00:12:34:56"
NODE = node_document(0, ports=[{"mac": MAC, "ip": "127.0.0.1", "pxe": True}])
OTHER = node_document(1, ports=[{"mac": "52:54:00:aa:bb:cc", "ip": "127.0.0.9", "pxe": True}])
TEMPLATE = "default $name\nlabel $name\n  kernel $uuid/kernel\n  append BOOTIF=01-$mac_dashed\n"
CLIENT_DEADLINE = 120


def need(program: str) -> str:
    """The path of ``program``; skip without it (fail under CI)."""
    path = shutil.which(program)
    if path is None:
        reason = f"{program} is not installed (apt-get install tftp-hpa atftp busybox curl)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires every TFTP client", pytrace=False)
        pytest.skip(reason)
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The daemon and the files it serves."""

    def __init__(self, daemon: Daemon, root: Path, port: int) -> None:
        self.daemon = daemon
        self.root = root
        self.port = port
        self.small = (root / "small.bin").read_bytes()
        self.rendered = (
            string.Template(TEMPLATE)
            .substitute(name=NODE["name"], uuid=NODE["uuid"], mac_dashed=MAC.replace(":", "-"))
            .encode()
        )

    @property
    def url(self) -> str:
        return f"tftp://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the module, TFTP on a free loopback port."""
    base = tmp_path_factory.mktemp("tftp")
    root = base / "root"
    (root / "boot").mkdir(parents=True)
    (root / "small.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "exact.bin").write_bytes(os.urandom(512 * 40))  # ends with an empty block
    (root / "boot" / "bootx64.efi").write_bytes(b"EFI" * 1000)
    # Over 65535 blocks of 512 bytes: the block counter wraps.
    with open(root / "wrap.bin", "wb") as f:
        f.write(bytes(range(256)) * (4 * 33 * 1024))
    (base / "secret").write_bytes(b"top secret outside the root\n")
    (root / "escape").symlink_to(base / "secret")
    (root / "outside").symlink_to(base)  # a directory link out of the root
    templates = base / "templates"
    templates.mkdir()
    (templates / "pxelinux.tmpl").write_text(TEMPLATE)
    (templates / "grub.tmpl").write_text("menuentry $uuid { linux $uuid/kernel }\n")
    port = free_udp_port()
    daemon = Daemon.create(
        base / "daemon",
        nodes=[NODE, OTHER],
        config={
            "tftp": {
                "listen": f"127.0.0.1:{port}",
                "root": str(root),
                "templates": str(templates),
                "timeout": "1",
            }
        },
    )
    daemon.start()
    try:
        yield Served(daemon, root, port)
    finally:
        daemon.stop()
        assert daemon.errors() == [], "\n\n".join(daemon.errors())


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=CLIENT_DEADLINE, check=False
    )


# --------------------------------------------------------------------------- clients


@pytest.mark.parametrize("blksize", [None, "1468", "8192"])
def test_curl(served: Served, tmp_path: Path, blksize: str | None) -> None:
    """curl with its default options (tsize, blksize 512, timeout) and larger blocks."""
    curl = need("curl")
    extra = ["--tftp-blksize", blksize] if blksize else []
    for name, expected in (
        ("small.bin", served.small),
        ("exact.bin", (served.root / "exact.bin").read_bytes()),
        ("pxelinux.cfg/01-52-54-00-12-34-56", served.rendered),
    ):
        out = tmp_path / "out"
        done = run([curl, "-sS", "-o", str(out), *extra, f"{served.url}/{name}"], tmp_path)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == expected, name


def test_tftp_hpa_no_options(served: Served, tmp_path: Path) -> None:
    """tftp-hpa sends no options at all: DATA 1 at once, 512-byte blocks."""
    tftp = need("tftp")
    for name, expected in (
        ("small.bin", served.small),
        ("pxelinux.cfg/01-52-54-00-12-34-56", served.rendered),
        ("boot\\bootx64.efi", b"EFI" * 1000),
    ):
        out = tmp_path / "out"
        command = f"get {name} {out}"
        done = run(
            [tftp, "-m", "binary", "127.0.0.1", str(served.port), "-c", *command.split()],
            tmp_path,
        )
        assert out.read_bytes() == expected, (name, done.stdout, done.stderr)


def test_tftp_hpa_netascii(served: Served, tmp_path: Path) -> None:
    """netascii mode converts on the wire; the client converts back."""
    tftp = need("tftp")
    out = tmp_path / "out"
    done = run(
        [
            tftp,
            "-m",
            "ascii",
            "127.0.0.1",
            str(served.port),
            "-c",
            "get",
            "pxelinux.cfg/01-52-54-00-12-34-56",
            str(out),
        ],
        tmp_path,
    )
    assert out.read_bytes() == served.rendered, done.stderr


def test_block_counter_wraps_with_a_real_client(served: Served, tmp_path: Path) -> None:
    """33 MiB at 512-byte blocks (over 65535 blocks) with curl: identical bytes."""
    curl = need("curl")
    out = tmp_path / "out"
    done = run([curl, "-sS", "-o", str(out), f"{served.url}/wrap.bin"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == (served.root / "wrap.bin").read_bytes()


@pytest.mark.parametrize(
    "options",
    [
        ["blksize 1468", "tsize 0", "windowsize 16"],
        ["windowsize 4"],
        ["blksize 512", "windowsize 64"],
    ],
)
def test_atftp_windowsize(served: Served, tmp_path: Path, options: list[str]) -> None:
    """atftp negotiates RFC 7440 windowsize; --trace shows the OACK carrying it."""
    atftp = need("atftp")
    for name, expected in (
        ("small.bin", served.small),
        ("pxelinux.cfg/01-52-54-00-12-34-56", served.rendered),
    ):
        out = tmp_path / "out"
        argv = [atftp, "--trace"]
        for option in options:
            argv += ["--option", option]
        argv += ["-g", "-r", name, "-l", str(out), "127.0.0.1", str(served.port)]
        done = run(argv, tmp_path)
        assert out.read_bytes() == expected, (name, done.stdout, done.stderr)
        trace = done.stdout + done.stderr
        assert "OACK" in trace
        window = next(o for o in options if o.startswith("windowsize")).split()[1]
        assert f"windowsize: {window}" in trace or f"windowsize {window}" in trace, trace[:2000]


@pytest.mark.parametrize("blksize", [None, "1468"])
def test_busybox(served: Served, tmp_path: Path, blksize: str | None) -> None:
    """busybox tftp, with and without -b."""
    busybox = need("busybox")
    for name, expected in (
        ("small.bin", served.small),
        ("pxelinux.cfg/01-52-54-00-12-34-56", served.rendered),
    ):
        out = tmp_path / "out"
        extra = ["-b", blksize] if blksize else []
        done = run(
            [
                busybox,
                "tftp",
                "-g",
                *extra,
                "-r",
                name,
                "-l",
                str(out),
                "127.0.0.1",
                str(served.port),
            ],
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == expected, name


def test_tftpy(served: Served, tmp_path: Path) -> None:
    """tftpy (PyPI) with blksize and tsize, static and rendered."""
    tftpy = pytest.importorskip("tftpy") if not os.environ.get("CI") else __import__("tftpy")
    grub = f"menuentry {NODE['uuid']} {{ linux {NODE['uuid']}/kernel }}\n".encode()
    for name, expected, options in (
        ("small.bin", served.small, {"blksize": 1468, "tsize": 0}),
        (f"grub.cfg-01-{MAC.replace(':', '-')}", grub, {"blksize": 1024, "tsize": 0}),
        ("exact.bin", (served.root / "exact.bin").read_bytes(), {}),
    ):
        out = tmp_path / "out"
        client = tftpy.TftpClient("127.0.0.1", served.port, options=options)
        client.download(name, str(out), timeout=5, retries=3)
        assert out.read_bytes() == expected, name


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name",
    [
        "../secret",
        "..\\secret",
        "boot/../../secret",
        "escape",
        "outside/secret",
        "%2E%2E/secret",
        "/etc/passwd",
        "\\..\\secret",
        "C:\\..\\secret",
    ],
)
def test_traversal_is_refused_atftp(served: Served, tmp_path: Path, name: str) -> None:
    """Raw names through atftp (no URL normalisation): nothing outside the root."""
    atftp = need("atftp")
    out = tmp_path / "out"
    done = run(
        [atftp, "--trace", "-g", "-r", name, "-l", str(out), "127.0.0.1", str(served.port)],
        tmp_path,
    )
    got = out.read_bytes() if out.exists() else b""
    assert b"secret" not in got and b"root:" not in got
    trace = done.stdout + done.stderr
    assert "ERROR" in trace or "error" in trace, trace


def test_traversal_is_refused_tftpy(served: Served, tmp_path: Path) -> None:
    """tftpy sends names as given: every attempt ends in a TFTP error, no bytes."""
    tftpy = pytest.importorskip("tftpy") if not os.environ.get("CI") else __import__("tftpy")
    for name in ("../secret", "escape", "outside/secret", "%2E%2E/secret", "..\\secret"):
        out = tmp_path / "out"
        client = tftpy.TftpClient("127.0.0.1", served.port, options={"blksize": 1468})
        with pytest.raises(tftpy.TftpException):
            client.download(name, str(out), timeout=5, retries=1)
        got = out.read_bytes() if out.exists() else b""
        assert b"secret" not in got, name


@pytest.mark.parametrize(
    "path", ["%2E%2E/secret", "%2e%2e%2fsecret", "..%5Csecret", "%2Fetc%2Fpasswd", "escape"]
)
def test_traversal_is_refused_curl(served: Served, tmp_path: Path, path: str) -> None:
    """Percent-encoded traversal through curl (which decodes before sending)."""
    curl = need("curl")
    out = tmp_path / "out"
    done = run([curl, "-sS", "-o", str(out), f"{served.url}/{path}"], tmp_path)
    assert done.returncode != 0
    got = out.read_bytes() if out.exists() else b""
    assert b"secret" not in got and b"root:" not in got


def test_write_request_is_refused(served: Served, tmp_path: Path) -> None:
    """tftp-hpa put: ERROR 4, nothing written under the root."""
    tftp = need("tftp")
    source = tmp_path / "upload.bin"
    source.write_bytes(b"upload")
    done = run(
        [
            tftp,
            "-m",
            "binary",
            "127.0.0.1",
            str(served.port),
            "-c",
            "put",
            str(source),
            "uploaded.bin",
        ],
        tmp_path,
    )
    assert not (served.root / "uploaded.bin").exists()
    assert "rror" in done.stdout + done.stderr


def test_unknown_tid_over_real_sockets(served: Served) -> None:
    """A stranger's packet to a transfer port gets ERROR 5; the client's download
    continues and completes."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger,
    ):
        client.settimeout(5)
        stranger.settimeout(5)
        client.sendto(b"\x00\x01exact.bin\x00octet\x00", ("127.0.0.1", served.port))
        data, server = client.recvfrom(1024)
        assert data[:4] == b"\x00\x03\x00\x01"
        stranger.sendto(b"\x00\x04\x00\x01", server)
        error, _ = stranger.recvfrom(1024)
        assert error[:4] == b"\x00\x05\x00\x05"
        received = data[4:]
        block = 1
        while True:
            client.sendto(b"\x00\x04" + block.to_bytes(2, "big"), server)
            data, _ = client.recvfrom(1024)
            assert int.from_bytes(data[2:4], "big") == block + 1
            received += data[4:]
            block += 1
            if len(data) - 4 < 512:
                client.sendto(b"\x00\x04" + block.to_bytes(2, "big"), server)
                break
    assert received == (served.root / "exact.bin").read_bytes()


def test_boot_events_in_the_admin_api(served: Served, tmp_path: Path) -> None:
    """Transfers of the node's config show up in GET /v1/nodes/<uuid>/boot."""
    curl = need("curl")
    name = "pxelinux.cfg/01-52-54-00-12-34-56"
    done = run([curl, "-sS", "-o", str(tmp_path / "o"), f"{served.url}/{name}"], tmp_path)
    assert done.returncode == 0
    deadline = time.monotonic() + 10
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, body = served.daemon.admin("GET", f"/v1/nodes/{NODE['uuid']}/boot")
        assert status == 200
        assert body["uuid"] == NODE["uuid"]
        events = [e for e in body["events"] if e["filename"] == name]
        if events:
            break
        time.sleep(0.1)  # poll-with-deadline on a real subprocess
    assert events, "no boot event"
    event = events[0]
    assert event["outcome"] == "complete"
    assert event["kind"] == "pxelinux"
    assert event["bytes_sent"] == len(served.rendered) == event["size"]
    assert event["client"] == "127.0.0.1"
    assert event["conductor"] == "test-conductor"
    status, body = served.daemon.admin("GET", "/v1/nodes/00000000-0000-4000-8000-000000000000/boot")
    assert status == 404
