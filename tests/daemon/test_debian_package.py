"""The Debian package, for real: ``make deb`` builds it (once per run, shared with
tests/daemon/test_systemd_units.py: tests/support/debian.py), apt installs it on this
machine, the installed ``twistd metadatad`` runs with the packaged configuration as
the ``metadatad`` user on sockets passed the way systemd passes them (metadata over
HTTP, a boot config over TFTP), ``systemd-analyze verify`` accepts the installed
units, and purging leaves nothing behind.

Takes several minutes (the package carries its Python dependencies, fetched from
the package index).  It needs root and refuses to touch a machine where metadatad is
installed already; outside CI it is skipped in both cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import free_port, http_request
from tests.support.debian import BUILD_DEADLINE, run, unavailable
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

VENV = Path("/usr/lib/metadatad")
CONF = Path("/etc/metadatad/metadatad.conf")
STATE = Path("/var/lib/metadatad")
MAC = "52:54:00:de:b0:01"
NODE = node_document(0, ports=[{"mac": MAC, "ip": "127.0.0.1", "pxe": True}])
APT_DEADLINE = 600
DEADLINE = 60.0
TOOLS = (
    "dpkg-buildpackage", "dh_virtualenv", "apt-get", "setpriv", "systemd-analyze", "curl",
    "lintian",
)  # fmt: skip


def installed() -> bool:
    """Whether dpkg knows the package (installed, or removed with its conffiles)."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "metadatad"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.endswith((" installed", " config-files", " half-installed",
                                   " half-configured", " unpacked"))  # fmt: skip


def apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return run(
        "apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q", *args,
        timeout=APT_DEADLINE, env=env,
    )  # fmt: skip


def as_metadatad(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(
        "setpriv", "--reuid=metadatad", "--regid=metadatad", "--init-groups", *command,
        cwd=STATE, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def package(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Install the .deb built for this run, and purge it (and its user) afterwards."""
    if os.geteuid() != 0:
        unavailable("installing a package needs root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (see the needed list in .ci/run)")
    if installed():
        unavailable("metadatad is installed on this machine already; not touching it")
    had_user = _user_exists()
    had_tftp_root = Path("/srv/tftp").exists()
    deb: Path = request.getfixturevalue("built_deb")
    try:
        apt("install", "--no-install-recommends", str(deb))
        yield deb
    finally:
        if installed():
            apt("purge", "metadatad")
        if not had_user and _user_exists():
            run("deluser", "--system", "--quiet", "metadatad")
            subprocess.run(["delgroup", "--system", "--quiet", "metadatad"], check=False)
        if not had_tftp_root:
            with contextlib.suppress(OSError):
                Path("/srv/tftp").rmdir()  # made by postinst, still empty


def _user_exists() -> bool:
    try:
        pwd.getpwnam("metadatad")
    except KeyError:
        return False
    return True


def test_lintian_finds_no_errors(package: Path) -> None:
    """lintian reports no error (E:) for the package; warnings are allowed."""
    result = subprocess.run(
        ["lintian", "--tag-display-limit", "0", str(package)],
        capture_output=True, text=True, timeout=BUILD_DEADLINE, check=False,
    )  # fmt: skip
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert errors == [], "\n".join(errors[:50])


def test_installed_files_and_units(package: Path) -> None:
    """The user, the conffile, a token only the daemon can read, a migrated SQLite
    store of the daemon's own, the plugin cache; units that systemd-analyze accepts."""
    entry = pwd.getpwnam("metadatad")
    assert entry.pw_uid != 0 and entry.pw_dir == str(STATE)
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "metadatad").stdout
    assert str(CONF) in conffiles
    token = Path("/etc/metadatad/admin-token")
    assert token.stat().st_mode & 0o777 == 0o640
    assert token.stat().st_gid == entry.pw_gid
    store = STATE / "metadatad.sqlite"
    assert store.stat().st_uid == entry.pw_uid
    assert list(VENV.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
    assert Path("/usr/bin/metadatad-manage").resolve() == VENV / "bin" / "metadatad-manage"
    units = [f"/lib/systemd/system/metadatad.{kind}" for kind in ("socket", "service")]
    result = run("systemd-analyze", "verify", *units)
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result


class Activated:
    """The installed daemon as the metadatad user, given a TCP and a UDP socket on
    loopback as descriptors 3 and 4 with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, the
    way metadatad.socket hands them over (index 0: metadata, index 1: TFTP)."""

    def __init__(self, log: Path) -> None:
        self.http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.http.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.http.bind(("127.0.0.1", free_port()))
        self.http.listen(64)
        self.tftp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tftp.bind(("127.0.0.1", 0))
        self.http_port = self.http.getsockname()[1]
        self.tftp_port = self.tftp.getsockname()[1]
        self.log = log
        http_fd, tftp_fd = self.http.fileno(), self.tftp.fileno()
        # bash keeps its pid across exec: LISTEN_PID names the final twistd process.
        script = (
            f"exec 3<&{http_fd} 4<&{tftp_fd} {http_fd}<&- {tftp_fd}<&-; "
            "export LISTEN_PID=$$ LISTEN_FDS=2 "
            "LISTEN_FDNAMES=metadatad.socket:metadatad.socket; "
            "exec setpriv --reuid=metadatad --regid=metadatad --init-groups "
            f"{VENV}/bin/twistd --nodaemon --pidfile= metadatad --config {CONF}"
        )
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                ["bash", "-c", script],
                pass_fds=(http_fd, tftp_fd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=STATE,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.http.close()
        self.tftp.close()
        return self.process.returncode


def poll(condition: Any, what: str, daemon: Activated) -> Any:
    """Poll-with-deadline on a real subprocess."""
    give_up = time.monotonic() + DEADLINE
    while True:
        try:
            result = condition()
        except (OSError, ConnectionError):
            result = None
        if result:
            return result
        if daemon.process.poll() is not None or time.monotonic() > give_up:
            raise AssertionError(f"{what}: not within {DEADLINE} s\n{daemon.output()}")
        time.sleep(0.2)


def test_installed_daemon_serves_metadata_and_tftp(package: Path, tmp_path: Path) -> None:
    """Import a node with the installed metadatad-manage, run the installed daemon:
    it runs as metadatad, serves the node its instance id over the passed TCP socket
    and its pxelinux config over the passed UDP socket; /healthz and /metrics answer."""
    as_metadatad(
        "/usr/bin/metadatad-manage", "--config", str(CONF), "node", "import", "-",
        input=json.dumps([NODE]),
    )  # fmt: skip
    token = Path("/etc/metadatad/admin-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}

    daemon = Activated(tmp_path / "daemon.log")
    try:
        _, _, body = poll(
            lambda: (r := http_request(f"http://127.0.0.1:{daemon.http_port}"
                                       "/latest/meta-data/instance-id"))[0] == 200 and r,
            "the metadata site",
            daemon,
        )  # fmt: skip
        assert body.decode() == NODE["uuid"]
        uid = next(
            line.split()[1]
            for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert int(uid) == pwd.getpwnam("metadatad").pw_uid

        health = poll(
            lambda: (r := http_request("http://127.0.0.1:8776/healthz"))[0] == 200 and r,
            "a healthy daemon (membership settled)",
            daemon,
        )
        assert json.loads(health[2])["database"] == "ok"
        # The packaged default, workers = auto, serves the site from worker processes,
        # which report their counters to /metrics every second.
        answered = b'metadatad_http_requests_total{code="200",method="GET",site="metadata"}'
        poll(
            lambda: (r := http_request("http://127.0.0.1:8776/metrics", headers=auth))[0]
            == 200 and answered in r[2],
            "the metadata answer counted in /metrics",
            daemon,
        )  # fmt: skip

        # The node's pxelinux config, rendered by the packaged template, over TFTP.
        url = f"tftp://127.0.0.1:{daemon.tftp_port}/pxelinux.cfg/01-{MAC.replace(':', '-')}"
        config = poll(
            lambda: (r := subprocess.run(["curl", "-sS", "--max-time", "10", url],
                                         capture_output=True, check=False)).returncode == 0
            and r.stdout,
            "the pxelinux config over TFTP",
            daemon,
        )  # fmt: skip
        assert f"kernel {NODE['uuid']}/kernel".encode() in config
    finally:
        code = daemon.stop()
    output = daemon.output()
    assert "Traceback" not in output, output
    assert code in (0, -signal.SIGTERM), output


def test_purge_leaves_nothing(package: Path) -> None:
    """Purging removes the virtual environment, the configuration, the token and the
    state directory."""
    apt("purge", "metadatad")
    assert not installed()
    for path in (VENV, Path("/etc/metadatad"), STATE, Path("/usr/bin/metadatad-manage")):
        assert not path.exists(), path
