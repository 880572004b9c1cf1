"""A Debian bookworm machine booted with systemd as PID 1, for tests of the units.

:func:`root_directory` builds a minimal bookworm root with ``mmdebstrap`` (variant
``minbase`` plus the packages asked for) and keeps it as a tarball, and unpacked beside
it, under ``/var/cache/metadatad-tests`` (``METADATAD_TEST_CACHE`` overrides), named by
a hash of the suite and package list: built once per machine, again only when the list
changes (the root of another list is removed once unused for a week). :class:`Machine`
makes two network namespaces joined by a veth pair (the machine's and a client's,
addresses :data:`MACHINE_ADDRESS`/:data:`CLIENT_ADDRESS`), boots the cached root
read-only under a throw-away tmpfs overlay (``systemd-nspawn --boot
--volatile=overlay``) inside the machine's namespace, with a directory of the host's at
:data:`SHARED`, and runs commands in it with ``nsenter`` (the host here has no systemd
of its own, so no machined: the container is not registered, and ``--keep-unit`` keeps
it in this process's control group). :meth:`Machine.stop` powers the container off by
signalling its own ``systemd-nspawn`` (SIGKILL to its PID 1 if that does not end within
the deadline), then deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.debian import run

SUITE = "bookworm"
CACHE = Path(os.environ.get("METADATAD_TEST_CACHE", "/var/cache/metadatad-tests"))
ROOT_DEADLINE = 1200  # the first build downloads ~100 MB of packages
LOCK_DEADLINE = 1500.0
KEEP_UNUSED = 7 * 86400.0  # seconds an unused root of another package list is kept
BOOT_DEADLINE = 120.0
STOP_DEADLINE = 30.0
COMMAND_DEADLINE = 120.0
MACHINE_ADDRESS = "10.99.16.2"
CLIENT_ADDRESS = "10.99.16.1"
PREFIX = 24
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SHARED = "/run/host-files"  # where Machine's ``shared`` directory appears, read-only


def root_directory(packages: Sequence[str]) -> Path:
    """A cached bookworm root holding ``packages``, unpacked from its cached tarball;
    either is made when missing (the tarball by mmdebstrap: a minute or more)."""
    wanted = sorted(set(packages))
    key = hashlib.sha256("\n".join([SUITE, "minbase", *wanted]).encode()).hexdigest()[:16]
    name = f"nspawn-{SUITE}-{key}"
    tarball, directory = CACHE / f"{name}.tar", CACHE / name
    if directory.is_dir():
        for used in (directory, tarball):  # in use: see the clean-up below
            with contextlib.suppress(OSError):
                os.utime(used)
        return directory
    CACHE.mkdir(parents=True, exist_ok=True)
    # Two test runs at once: the second waits for the first's build.
    with open(CACHE / f"nspawn-{SUITE}.lock", "w") as lock:
        give_up = time.monotonic() + LOCK_DEADLINE
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up:
                    raise AssertionError(f"{lock.name} held for {LOCK_DEADLINE} s") from None
                time.sleep(1)
        if directory.is_dir():
            return directory
        if not tarball.exists():
            partial = CACHE / f"{name}.partial.tar"  # mmdebstrap takes the format from .tar
            partial.unlink(missing_ok=True)
            run(
                "mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(wanted)}",
                SUITE, str(partial),
                timeout=ROOT_DEADLINE, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            os.replace(partial, tarball)
        unpacking = CACHE / f"{name}.partial"
        shutil.rmtree(unpacking, ignore_errors=True)
        unpacking.mkdir()
        run("tar", "-C", str(unpacking), "--numeric-owner", "-xf", str(tarball), timeout=600)
        unpacking.rename(directory)
        # Roots of other package lists (other branches) that no run used for a week.
        for old in CACHE.glob(f"nspawn-{SUITE}-*"):
            if old.name.startswith(name) or time.time() - old.stat().st_mtime < KEEP_UNUSED:
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return directory


class Machine:
    """A booted container: ``run`` executes in it, ``client`` in the client namespace."""

    def __init__(self, root: Path, workdir: Path, shared: Path) -> None:
        tag = f"{os.getpid() % 100000:05d}"
        self.name = f"mdtest{tag}"
        self.machine_ns, self.client_ns = f"mdtest-{tag}-m", f"mdtest-{tag}-c"
        self.machine_if, self.client_if = f"mdt{tag}m", f"mdt{tag}c"
        self.root, self.shared = root, shared
        self.log = workdir / "nspawn.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self) -> None:
        """Make the namespaces, boot, and wait until systemd says the boot is done."""
        self._network()
        with open(self.log, "wb") as log:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn", f"--directory={self.root}", f"--machine={self.name}",
                    # The cached root stays as it is (shared by concurrent runs): every
                    # change goes to a tmpfs laid over it, gone at power-off.
                    "--volatile=overlay", "--read-only", f"--bind-ro={self.shared}:{SHARED}",
                    "--register=no", "--keep-unit", "--settings=no", "--link-journal=no",
                    "--resolv-conf=off", "--timezone=off", "--console=read-only",
                    f"--network-namespace-path=/run/netns/{self.machine_ns}", "--boot",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.leader = self._poll(self._leader, "the container's PID 1")
        self._poll(self._booted, "the end of the boot (systemctl is-system-running)")

    def _network(self) -> None:
        for ns in (self.machine_ns, self.client_ns):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", self.machine_if, "type", "veth", "peer", "name", self.client_if)
        for ns, interface, address in (
            (self.machine_ns, self.machine_if, MACHINE_ADDRESS),
            (self.client_ns, self.client_if, CLIENT_ADDRESS),
        ):
            run("ip", "link", "set", interface, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", interface)
            run("ip", "-n", ns, "link", "set", interface, "up")

    def _leader(self) -> int:
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        with contextlib.suppress(OSError):
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        return 0

    def _booted(self) -> bool:
        try:
            result = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return result.stdout.strip() in ("running", "degraded")

    def _poll(self, condition: Any, what: str) -> Any:
        give_up = time.monotonic() + BOOT_DEADLINE
        while True:
            result = condition()
            if result:
                return result
            assert self.nspawn is not None
            if self.nspawn.poll() is not None or time.monotonic() > give_up:
                raise AssertionError(f"{what}: not within {BOOT_DEADLINE} s\n{self.console()}")
            time.sleep(0.2)

    def console(self) -> str:
        """What systemd-nspawn and the container's console printed."""
        return self.log.read_text(errors="replace")[-8000:] if self.log.exists() else ""

    def run(
        self, *command: str, check: bool = True, timeout: float = COMMAND_DEADLINE, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """``command`` as root inside the container (its namespaces and root directory)."""
        argv = (
            "nsenter", f"--target={self.leader}", "--all", "--root", "--wd",
            "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
            *command,
        )  # fmt: skip
        if "input" not in kwargs:  # CI may run with no standard input at all
            kwargs["stdin"] = subprocess.DEVNULL
        if check:
            return run(*argv, timeout=timeout, **kwargs)
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )

    def client(
        self, *command: str, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """``command`` (a program of this machine) in the client namespace."""
        return subprocess.run(
            ("ip", "netns", "exec", self.client_ns, *command),
            stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, check=False, **kwargs,
        )  # fmt: skip

    def stop(self) -> None:
        """Power off (SIGTERM to systemd-nspawn; SIGKILL to PID 1 after the deadline),
        then remove the namespaces."""
        try:
            if self.nspawn is not None and self.nspawn.poll() is None:
                self.nspawn.send_signal(signal.SIGTERM)
                try:
                    self.nspawn.wait(timeout=STOP_DEADLINE)
                except subprocess.TimeoutExpired:
                    if self.leader:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.leader, signal.SIGKILL)  # ends the PID namespace
                    self.nspawn.kill()
                    self.nspawn.wait(timeout=STOP_DEADLINE)
        finally:
            for ns in (self.machine_ns, self.client_ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            if Path(f"/sys/class/net/{self.machine_if}").exists():  # set up half-way
                subprocess.run(
                    ["ip", "link", "del", self.machine_if], capture_output=True, check=False
                )
