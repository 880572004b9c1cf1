"""A real machine boots end to end, and boots again after its conductor dies.

QEMU (TCG; KVM where the CPU offers it) with Debian's iPXE ROM on an e1000 NIC, in a
network namespace with a bridge; a real dnsmasq configured as docs/dhcp.md says and
fed by the ``dnsmasq`` provider; two real conductors sharing PostgreSQL (reached
through its unix socket from inside the namespace), each with its own address on the
bridge.  The machine loads its iPXE script, Debian's kernel and a busybox initramfs
the test builds, leases its registered address, and prints the metadata it reads:

1. conductor A alone, kernel and initrd over HTTP (``http_address`` set);
2. conductor B joins and owns the node (no ``http_address``): TFTP only;
3. B is killed with -9; A takes the node over, dnsmasq (never touched) offers A, the
   script and kernel come from A, and the metadata is read there.

See docs/boot.md (the worked example) and tests/support/vm.py (the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from metadatad.core.ring import HashRing
from metadatad.testing.daemon import Daemon
from tests.support import vm
from tests.support.databases import ScratchDatabase
from tests.support.factories import node_document

SUBNET = "10.77.0"
DNSMASQ_ADDRESS, A_ADDRESS, B_ADDRESS = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
NODE_IP, NODE_MAC = f"{SUBNET}.100", "52:54:00:77:00:01"
PG_SOCKET = "/var/run/postgresql"
BOOT_DEADLINE = 240.0
PUSH_DEADLINE = 30.0

# An operator's template (docs/boot.md): the kernel from $boot_url (HTTP when the
# conductor has an http_address, else TFTP), the metadata site on the same address.
IPXE_TEMPLATE = """#!ipxe
echo metadatad: node $uuid from $conductor
kernel ${boot_url}/$uuid/kernel console=ttyS0 quiet metadata_url=http://$server/
initrd ${boot_url}/$uuid/ramdisk
boot
"""


def _require() -> None:
    reason = vm.missing()
    if reason is None and not os.path.isdir(PG_SOCKET):
        reason = f"no PostgreSQL socket directory {PG_SOCKET}"
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires the VM end-to-end test)", pytrace=False)
    pytest.skip(reason)


def _owned_by_b() -> str:
    """A node uuid the ring gives to B when A and B are both live."""
    ring = HashRing(["a", "b"])
    for i in range(1000):
        candidate = str(uuidlib.UUID(int=0x7E57B007_0000_4000_8000_000000000000 + i))
        if ring.owner(candidate) == "b":
            return candidate
    raise AssertionError("no uuid for B")


class BridgeDaemon(Daemon):
    """A daemon whose metadata site listens on its bridge address, port 80."""

    address = ""

    @property
    def metadata_url(self) -> str:
        return f"http://{self.address}"


class Lab:
    """The namespace, dnsmasq, the conductors and the boot files of one test."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.directory = directory
        self.database_url = database_url
        self.net = vm.Namespace([f"{a}/24" for a in (DNSMASQ_ADDRESS, A_ADDRESS, B_ADDRESS)])
        self.hostsdir = directory / "dnsmasq-hosts"
        self.optsdir = directory / "dnsmasq-opts"
        self.root = directory / "tftp-root"
        self.templates = directory / "templates"
        self.dnsmasq_log = directory / "dnsmasq.log"
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.daemons: list[Daemon] = []
        self.kernel = self.initrd = Path()
        for d in (self.hostsdir, self.optsdir, self.root, self.templates):
            d.mkdir()
        (self.templates / "ipxe.tmpl").write_text(IPXE_TEMPLATE)

    def install_boot_files(self, node_uuid: str) -> None:
        (self.root / node_uuid).mkdir()
        shutil.copyfile(self.kernel, self.root / node_uuid / "kernel")
        shutil.copyfile(self.initrd, self.root / node_uuid / "ramdisk")

    def start_dnsmasq(self) -> None:
        """dnsmasq with the lines of docs/dhcp.md (its ``static`` range: every address
        is pinned by the provider) for this bridge, subnet and directories, plus what a
        test needs (no DNS, its own lease file and log)."""
        conf = self.directory / "dnsmasq.conf"
        lines = [
            line.replace("eth1", "br0")
            .replace("10.0.0.", f"{SUBNET}.")
            .replace("/var/lib/metadatad/dnsmasq/hosts", str(self.hostsdir))
            .replace("/var/lib/metadatad/dnsmasq/opts", str(self.optsdir))
            for line in documented_dnsmasq_lines()
        ]
        assert f"dhcp-range={SUBNET}.0,static,255.255.255.0,12h" in lines, lines
        lines += [
            "port=0",
            f"dhcp-leasefile={self.directory / 'leases'}",
            "log-dhcp",
            f"log-facility={self.dnsmasq_log}",
            "user=root",
        ]
        conf.write_text("\n".join(lines) + "\n")
        self.dnsmasq = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--pid-file="],
            stdin=subprocess.DEVNULL,
            preexec_fn=vm.die_with_parent,  # noqa: PLW1509 (see tests/daemon.py)
        )
        deadline = time.monotonic() + 10
        while "started" not in self.dnsmasq_output():
            assert self.dnsmasq.poll() is None, self.dnsmasq_output()
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)  # poll-with-deadline on a real subprocess

    def dnsmasq_output(self) -> str:
        try:
            return self.dnsmasq_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def conductor(
        self, name: str, address: str, nodes: list[dict[str, Any]], http: bool
    ) -> BridgeDaemon:
        config = {
            "metadata": {"listen": f"tcp:80:interface={address}", "cache_ttl": "0"},
            "conductor": {
                "hostname": name,
                "tftp_address": address,
                "http_address": f"http://{address}" if http else "",
                "heartbeat_interval": "0.5",
                "heartbeat_timeout": "2",
            },
            "tftp": {
                "listen": f"{address}:69",
                "root": str(self.root),
                "templates": str(self.templates),
            },
            "dhcp": {
                "provider": "dnsmasq",
                "dnsmasq_hostsdir": str(self.hostsdir),
                "dnsmasq_optsdir": str(self.optsdir),
            },
        }
        directory = self.directory / f"conductor-{name}"
        daemon = BridgeDaemon.create(
            directory, nodes=nodes, database_url=self.database_url, config=config
        )
        assert isinstance(daemon, BridgeDaemon)
        daemon.address = address
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        vm.stop_process(self.dnsmasq)
        self.net.destroy()


def documented_dnsmasq_lines() -> list[str]:
    """The dnsmasq configuration docs/dhcp.md gives operators (its first block)."""
    text = (Path(__file__).parents[2] / "docs" / "dhcp.md").read_text()
    after = text.split("dnsmasq, for example in `/etc/dnsmasq.d/metadatad.conf`:", 1)[1]
    block = after.split("```", 2)[1]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def _wait_pushed(daemon: Daemon, uuid: str, address: str) -> dict[str, Any]:
    deadline = time.monotonic() + PUSH_DEADLINE
    boot: Any = None
    while time.monotonic() < deadline:
        status, boot = daemon.admin("GET", f"/v1/nodes/{uuid}/boot")
        push = boot.get("push") if status == 200 else None
        if push and push["status"] == "pushed" and boot["mapping"]["tftp_server"] == address:
            return dict(boot)
        time.sleep(0.1)  # poll-with-deadline on a real subprocess
    raise AssertionError(f"node {uuid} not pushed with {address}: {boot}")


def _events(daemon: Daemon, uuid: str, since: float = 0.0) -> list[dict[str, Any]]:
    """The node's boot events (newest first) as ``daemon`` sees them; waits for the
    kernel's event (events are written in batches)."""
    deadline = time.monotonic() + PUSH_DEADLINE
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, boot = daemon.admin("GET", f"/v1/nodes/{uuid}/boot")
        assert status == 200, boot
        events = [e for e in boot["events"] if e["filename"].endswith("/kernel")]
        if events and events[0]["outcome"] == "complete":
            return list(boot["events"])
        time.sleep(0.2)  # poll-with-deadline on a real subprocess
    raise AssertionError(f"no kernel download recorded for {uuid}: {events}")


def _check_metadata(result: dict[str, Any], node: dict[str, Any]) -> None:
    assert result["meta_data"]["uuid"] == node["uuid"]
    assert result["meta_data"]["hostname"] == node["hostname"]
    assert result["instance_id"] == node["uuid"]  # this project's instance id
    assert result["address"] == f"{NODE_IP}/24"  # the pinned address


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    _require()
    database = ScratchDatabase("postgresql")
    try:
        database.create()
    except Exception as e:  # reported as a skip (or, under CI, a failure)
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL unreachable: {e}")
    # From inside the namespace the server is reached through its unix socket.
    url = make_url(database.url).set(host=None, port=None, query={"host": PG_SOCKET})
    lab = Lab(tmp_path, url.render_as_string(hide_password=False))
    try:
        # Fetched (when not cached) and built before entering the namespace, which
        # has no route to Debian's mirrors.
        lab.kernel, e1000 = vm.debian_kernel()
        lab.initrd = vm.build_initramfs(tmp_path, e1000)
        lab.net.create()
        lab.net.enter()
        yield lab
    finally:
        lab.close()
        database.drop()


@pytest.mark.slow
def test_a_machine_boots_over_http_then_tftp_then_after_its_conductor_is_killed(
    lab: Lab, tmp_path: Path
) -> None:
    node = node_document(
        0,
        uuid=_owned_by_b(),
        name="vm-1",
        hostname="vm-1.example.org",
        ports=[{"mac": NODE_MAC, "ip": NODE_IP, "pxe": True}],
        boot={"arch": "x86_64", "firmware": "bios"},
    )
    uuid = node["uuid"]
    lab.install_boot_files(uuid)
    lab.start_dnsmasq()
    assert lab.dnsmasq is not None
    dnsmasq_pid = lab.dnsmasq.pid
    times: dict[str, float] = {}

    # 1. A alone, over HTTP.
    a = lab.conductor("a", A_ADDRESS, [node], http=True)
    _wait_pushed(a, uuid, A_ADDRESS)
    result = vm.Machine(tmp_path, NODE_MAC, "boot1-http").boot(BOOT_DEADLINE)
    _check_metadata(result, node)
    times["http"] = result["seconds"]
    events = _events(a, uuid)
    fetched = {e["filename"]: e for e in events if e["conductor"] == "a"}
    kernel_seconds = {"http": fetched[f"{uuid}/kernel"]["duration"]}
    assert fetched[f"{uuid}/kernel"]["protocol"] == "http"
    assert fetched[f"{uuid}/ramdisk"]["protocol"] == "http"
    assert fetched[f"{uuid}.ipxe"]["protocol"] == "tftp"

    # 2. B joins and owns the node; it has no http_address: TFTP only.
    b = lab.conductor("b", B_ADDRESS, [], http=False)
    _wait_pushed(b, uuid, B_ADDRESS)
    before = len(_events(b, uuid))
    result = vm.Machine(tmp_path, NODE_MAC, "boot2-tftp").boot(BOOT_DEADLINE)
    _check_metadata(result, node)
    times["tftp"] = result["seconds"]
    events = _events(b, uuid)
    assert len(events) > before
    served_by_b = [e for e in events if e["conductor"] == "b" and e["outcome"] == "complete"]
    assert {e["filename"] for e in served_by_b} >= {f"{uuid}.ipxe", f"{uuid}/kernel"}
    assert all(e["protocol"] == "tftp" for e in served_by_b)
    kernel_seconds["tftp"] = next(
        e["duration"] for e in served_by_b if e["filename"] == f"{uuid}/kernel"
    )

    # 3. kill -9 the owner; A takes over; the machine boots from A.
    assert b.process is not None
    b.process.send_signal(signal.SIGKILL)
    b.process.wait(timeout=10)
    killed = time.monotonic()
    boot = _wait_pushed(a, uuid, A_ADDRESS)
    took_over = time.monotonic() - killed
    assert boot["owner"] == "a"
    seen = len(lab.dnsmasq_output())
    machine = vm.Machine(tmp_path, NODE_MAC, "boot3-takeover")
    result = machine.boot(BOOT_DEADLINE)
    _check_metadata(result, node)
    times["takeover"] = result["seconds"]
    # What dnsmasq said since A pushed: its offers name A (next-server, option 66, the
    # script URL) and never B.
    log = lab.dnsmasq_output()
    offered = log[seen:]
    assert "DHCPOFFER" in offered, log[-3000:]
    assert f"next server: {A_ADDRESS}" in offered
    assert f"option: 66 tftp-server  {A_ADDRESS}" in offered
    assert f"tftp://{A_ADDRESS}/{uuid}.ipxe" in offered
    assert B_ADDRESS not in offered
    events = _events(a, uuid)
    latest = {e["filename"]: e for e in reversed(events) if e["conductor"] == "a"}
    assert latest[f"{uuid}.ipxe"]["server"] == A_ADDRESS
    assert latest[f"{uuid}/kernel"]["protocol"] == "http"
    # Nothing was restarted: dnsmasq is the same process, never signalled.
    assert lab.dnsmasq.poll() is None and lab.dnsmasq.pid == dnsmasq_pid
    assert log.count("started, version") == 1
    assert a.errors() == []
    accel = "kvm" if vm.kvm_usable() else "tcg"
    print(
        f"\nboot-to-metadata ({accel}): HTTP {times['http']:.1f} s, "
        f"TFTP {times['tftp']:.1f} s, after takeover {times['takeover']:.1f} s "
        f"(B's node pushed by A {took_over:.1f} s after kill -9, heartbeat_timeout 2 s); "
        f"kernel download {kernel_seconds['http']:.1f} s over HTTP, "
        f"{kernel_seconds['tftp']:.1f} s over TFTP"
    )
