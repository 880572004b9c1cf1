"""A real virtual machine for the end-to-end boot test (tests/daemon/test_vm_boot.py).

* :func:`debian_kernel`: Debian's kernel, from the package ``linux-image-amd64``
  depends on (``apt-get download``, unpacked with ``dpkg-deb -x``, never installed),
  cached outside the clone in ``/var/cache/metadatad-tests`` (``METADATAD_TEST_CACHE``)
  as the kernel image and the e1000 NIC driver.  Fetched when missing.
* :func:`build_initramfs`: a busybox initramfs whose ``/init`` leases an address
  (udhcpc), reads ``/openstack/latest/meta_data.json`` and
  ``/latest/meta-data/instance-id`` from the ``metadata_url=`` of its kernel command
  line, prints them on the serial port between markers and powers off.
* :class:`Namespace`: a network namespace with a bridge and a tap device for QEMU; the
  calling thread can :meth:`Namespace.enter` it, so every process it starts (daemons,
  dnsmasq, QEMU) and every socket it opens lives there.
* :class:`Machine`: one QEMU run (Debian's iPXE ROM on an e1000 NIC, network boot),
  its serial console in a file.

Waits poll real subprocesses with deadlines; processes are stopped by their PID.
"""

from __future__ import annotations

import ctypes
import fcntl
import gzip
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("METADATAD_TEST_CACHE", "/var/cache/metadatad-tests"))
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000.rom")  # Debian's ipxe-qemu
QEMU = "qemu-system-x86_64"
FETCH_DEADLINE = 300.0
CLONE_NEWNET = 0x40000000

TOOLS = ("ip", "dnsmasq", QEMU, "cpio", "busybox", "apt-get", "dpkg-deb")


def missing() -> str | None:
    """Why the VM test cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and tap devices need root"
    for tool in TOOLS:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed"
    if not IPXE_ROM.exists():
        return f"{IPXE_ROM} is missing (Debian package ipxe-qemu)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def run(*command: str, cwd: Path | None = None, timeout: float = 30.0) -> str:
    """Run ``command``; its stdout, or AssertionError with its stderr."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr}")
    return result.stdout


def kvm_usable() -> bool:
    """KVM only where the CPU has virtualisation extensions: on these machines
    ``/dev/kvm`` opens but the CPU has no svm/vmx and a KVM guest hangs."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line for line in f if line.startswith("flags")), "").split()
    return "vmx" in flags or "svm" in flags


# --------------------------------------------------------------------------- kernel


def debian_kernel(cache: Path = CACHE) -> tuple[Path, Path]:
    """``(vmlinuz, e1000.ko)`` of the kernel Debian's ``linux-image-amd64`` depends on.

    One test run at a time fetches (an exclusive lock on the cache directory); the
    files are renamed into place only when complete."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        deadline = time.monotonic() + FETCH_DEADLINE
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "another run holds the kernel cache lock"
                time.sleep(0.5)  # poll-with-deadline on another process's lock
        found = sorted(cache.glob("linux-image-*/vmlinuz"))
        if not found:
            _fetch_kernel(cache)
            found = sorted(cache.glob("linux-image-*/vmlinuz"))
        return found[-1], found[-1].parent / "e1000.ko"


def _fetch_kernel(cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as name:
        work = Path(name)
        try:
            run("apt-get", "download", "linux-image-amd64", cwd=work, timeout=FETCH_DEADLINE)
        except AssertionError:
            # A fresh machine may have no package lists yet.
            run("apt-get", "update", "-q", timeout=FETCH_DEADLINE)
            run("apt-get", "download", "linux-image-amd64", cwd=work, timeout=FETCH_DEADLINE)
        (meta,) = work.glob("linux-image-amd64_*.deb")
        depends = run("dpkg-deb", "-f", str(meta), "Depends")
        found = re.search(r"linux-image-[0-9][^\s,(|]*", depends)
        assert found, f"no kernel package in {meta.name}'s Depends: {depends}"
        package = found.group(0)
        run("apt-get", "download", package, cwd=work, timeout=FETCH_DEADLINE)
        (deb,) = work.glob(f"{package}_*.deb")
        tree = work / "tree"
        run("dpkg-deb", "-x", str(deb), str(tree), timeout=FETCH_DEADLINE)
        (vmlinuz,) = (tree / "boot").glob("vmlinuz-*")
        (module,) = (tree / "lib" / "modules").glob(
            "*/kernel/drivers/net/ethernet/intel/e1000/e1000.ko*"
        )
        unpacked = work / package
        unpacked.mkdir()
        shutil.copyfile(vmlinuz, unpacked / "vmlinuz")
        data = module.read_bytes()
        if module.name.endswith(".xz"):  # busybox insmod wants a plain module
            data = lzma.decompress(data)
        (unpacked / "e1000.ko").write_bytes(data)
        os.rename(unpacked, cache / package)


# --------------------------------------------------------------------------- initramfs

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/ttyS0 2>&1
url=
for word in $(cat /proc/cmdline); do
  case "$word" in metadata_url=*) url="${word#metadata_url=}" ;; esac
done
url="${url%/}"
echo "VMTEST init $(cut -d' ' -f1 /proc/uptime) metadata_url=$url"
insmod /lib/e1000.ko
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 30 -T 1 -s /udhcpc.sh || echo "VMTEST dhcp failed"
echo "VMTEST address $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "VMTEST-BEGIN meta_data.json"
timeout 20 wget -q -O - "$url/openstack/latest/meta_data.json"
echo
echo "VMTEST-END meta_data.json"
echo "VMTEST instance-id $(timeout 20 wget -q -O - "$url/latest/meta-data/instance-id")"
echo "VMTEST done $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""
# (Debian's busybox 1.35 wget crashes with -T: the time limit comes from `timeout`.)

UDHCPC = r"""#!/bin/sh
case "$1" in
  bound|renew) ifconfig "$interface" "$ip" netmask "$subnet" up ;;
esac
exit 0
"""


def build_initramfs(directory: Path, e1000: Path) -> Path:
    """A gzip'ed newc cpio: Debian's busybox with its libraries, the e1000 driver,
    ``/init`` and the udhcpc script."""
    root = directory / "initramfs"
    for sub in ("bin", "lib", "proc", "sys", "dev", "tmp", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    shutil.copy(busybox, root / "bin" / "busybox")
    # A dynamically linked busybox brings its loader and libraries.
    for library in re.findall(r"(/\S+) \(0x", run("ldd", str(busybox))):
        target = root / library.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(library), target)
        target.chmod(0o755)
    shutil.copyfile(e1000, root / "lib" / "e1000.ko")
    for name, text in (("init", INIT), ("udhcpc.sh", UDHCPC)):
        (root / name).write_text(text)
        (root / name).chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        cwd=root,
        timeout=60,
        check=True,
    ).stdout
    initrd = directory / "initrd.gz"
    initrd.write_bytes(gzip.compress(archive, compresslevel=6))
    return initrd


# --------------------------------------------------------------------------- network

_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """SIGKILL the child (dnsmasq, QEMU) should the test process die first."""
    _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Namespace:
    """A network namespace holding bridge ``br0`` with ``addresses`` and tap ``tap0``
    enslaved to it (names inside a namespace are its own)."""

    def __init__(self, addresses: list[str]) -> None:
        self.name = f"mdt-vm-{secrets.token_hex(3)}"
        self.addresses = addresses
        self._home: int | None = None

    def create(self) -> None:
        run("ip", "netns", "add", self.name)
        ns = ("ip", "-n", self.name)
        run(*ns, "link", "set", "lo", "up")
        run(*ns, "link", "add", "br0", "type", "bridge")
        for address in self.addresses:
            run(*ns, "addr", "add", address, "dev", "br0")
        run(*ns, "link", "set", "br0", "up")
        run(*ns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        run(*ns, "link", "set", "tap0", "master", "br0")
        run(*ns, "link", "set", "tap0", "up")

    def enter(self) -> None:
        """Move the calling thread (and what it starts from now on) into the namespace."""
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    def leave(self) -> None:
        if self._home is not None:
            _setns(self._home)
            os.close(self._home)
            self._home = None

    def destroy(self) -> None:
        self.leave()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def stop_process(process: subprocess.Popen[Any] | None, deadline: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``deadline``: by PID, only a process we started."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=deadline)


# --------------------------------------------------------------------------- machine


class BootFailed(AssertionError):
    """The machine did not print its metadata in time."""


class Machine:
    """One network boot of a QEMU machine with MAC ``mac`` on ``tap0``."""

    def __init__(self, directory: Path, mac: str, name: str) -> None:
        self.directory = directory
        self.mac = mac
        self.console = directory / f"{name}-console.log"
        self.qemu_log = directory / f"{name}-qemu.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.metadata_at = 0.0

    def command(self) -> list[str]:
        accel = "kvm" if kvm_usable() else "tcg"
        return [
            QEMU, "-accel", accel, "-m", "256", "-smp", "1",
            "-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none",
            "-serial", f"file:{self.console}",
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device", f"e1000,netdev=net0,mac={self.mac},romfile={IPXE_ROM}",
            "-boot", "n",
        ]  # fmt: skip

    def boot(self, deadline: float) -> dict[str, Any]:
        """Boot until the machine printed its metadata and powered off (or ``deadline``
        seconds passed): ``meta_data`` (parsed), ``instance_id``, ``address``,
        ``seconds`` (QEMU start to metadata printed)."""
        with open(self.qemu_log, "wb") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (see tests/daemon.py)
            )
        give_up = self.started + deadline
        try:
            while "VMTEST done" not in self.output():
                if self.process.poll() is not None:
                    raise BootFailed(f"QEMU exited {self.process.returncode}:\n{self.report()}")
                if time.monotonic() > give_up:
                    raise BootFailed(f"no metadata after {deadline} s:\n{self.report()}")
                if not self.metadata_at and "VMTEST instance-id" in self.output():
                    self.metadata_at = time.monotonic()
                time.sleep(0.1)  # poll-with-deadline on a real subprocess
            if not self.metadata_at:
                self.metadata_at = time.monotonic()
            self.process.wait(timeout=max(1.0, give_up - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BootFailed(f"the machine did not power off:\n{self.report()}") from None
        finally:
            stop_process(self.process)
        return self.result()

    def output(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def report(self) -> str:
        qemu = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
        return f"--- serial console\n{self.output()[-6000:]}\n--- qemu\n{qemu[-2000:]}"

    def result(self) -> dict[str, Any]:
        text = self.output().replace("\r", "")
        block = re.search(r"VMTEST-BEGIN meta_data.json\n(.*?)\nVMTEST-END", text, re.S)
        instance = re.search(r"VMTEST instance-id (\S*)", text)
        address = re.search(r"VMTEST address (\S*)", text)
        try:
            meta_data = json.loads(block.group(1)) if block else None
        except ValueError:
            meta_data = None
        if meta_data is None or instance is None:
            raise BootFailed(f"the machine printed no metadata:\n{self.report()}")
        return {
            "meta_data": meta_data,
            "instance_id": instance.group(1),
            "address": address.group(1) if address else "",
            "seconds": self.metadata_at - self.started,
        }
