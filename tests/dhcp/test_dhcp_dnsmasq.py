"""End to end with a real dnsmasq: two real daemons push boot mappings into dnsmasq's
hostsdir/optsdir; a real DHCP client (busybox udhcpc) in a network namespace sees the
owner's address in siaddr and options 66/150, and B's after A is killed with -9.

Needs root, ``ip``, ``ethtool``, ``dnsmasq`` (Debian's dnsmasq-base) and busybox:
skipped without them, except under CI where they are mandatory.  Namespaces, links and
processes are removed even when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metadatad.core.bootmapping import BootDefaults, boot_mapping
from metadatad.dhcp.dnsmasq import DnsmasqProvider
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.factories import make_node, node_document

SERVER_IP = "10.99.0.1"
A_ADDRESS, B_ADDRESS = "10.99.0.2", "10.99.0.3"
DEADLINE = 30.0

# Prints the offer's fields udhcpc exports, as KEY=VALUE lines.
CLIENT_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
  for k in siaddr boot_file bootfile tftp opt150 ip serverid; do
    eval "v=\\${$k}"; echo "$k=$v"
  done
fi
exit 0
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ethtool", "dnsmasq", "busybox"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed"
    return None


def _require() -> None:
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires the dnsmasq end-to-end test)", pytrace=False)
    pytest.skip(reason)


def _run(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: {result.returncode} {result.stderr}")
    return result.stdout


class Network:
    """A server namespace (dnsmasq) and a client namespace joined by a veth pair."""

    def __init__(self, directory: Path) -> None:
        suffix = secrets.token_hex(3)
        self.server_ns, self.client_ns = f"mdt-s-{suffix}", f"mdt-c-{suffix}"
        self.server_if, self.client_if = f"mds{suffix}", f"mdc{suffix}"
        self.directory = directory
        self.hostsdir = directory / "hostsdir"
        self.optsdir = directory / "optsdir"
        self.hostsdir.mkdir()
        self.optsdir.mkdir()
        self.log = directory / "dnsmasq.log"
        self.script = directory / "udhcpc.sh"
        self.script.write_text(CLIENT_SCRIPT)
        self.script.chmod(0o755)
        self.dnsmasq: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        _run("ip", "netns", "add", self.server_ns)
        _run("ip", "netns", "add", self.client_ns)
        _run("ip", "link", "add", self.server_if, "type", "veth", "peer", "name", self.client_if)
        _run("ip", "link", "set", self.server_if, "netns", self.server_ns)
        _run("ip", "link", "set", self.client_if, "netns", self.client_ns)
        _run("ip", "-n", self.server_ns, "addr", "add", f"{SERVER_IP}/24", "dev", self.server_if)
        _run("ip", "-n", self.server_ns, "link", "set", self.server_if, "up")
        # veth leaves UDP checksums to "hardware": udhcpc's raw socket would drop them.
        _run("ip", "netns", "exec", self.server_ns, "ethtool", "-K", self.server_if, "tx", "off")

    def start_dnsmasq(self) -> None:
        command = [
            "ip", "netns", "exec", self.server_ns, "dnsmasq", "--keep-in-foreground",
            "--conf-file=/dev/null", "--port=0", f"--interface={self.server_if}",
            "--bind-interfaces", "--dhcp-range=10.99.0.50,10.99.0.150,1h",
            f"--dhcp-hostsdir={self.hostsdir}", f"--dhcp-optsdir={self.optsdir}",
            "--dhcp-match=set:ipxe,175", f"--dhcp-leasefile={self.directory / 'leases'}",
            "--pid-file=", "--log-dhcp", f"--log-facility={self.log}", "--user=root",
        ]  # fmt: skip
        self.dnsmasq = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while "started" not in self.dnsmasq_log():
            assert self.dnsmasq.poll() is None, self.dnsmasq_log()
            assert time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.05)  # poll-with-deadline on a real subprocess

    def dnsmasq_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def request(self, mac: str, ipxe: bool = False) -> dict[str, str]:
        """One DHCP exchange from ``mac``: the offer's fields."""
        _run("ip", "-n", self.client_ns, "link", "set", self.client_if, "down")
        _run("ip", "-n", self.client_ns, "link", "set", self.client_if, "address", mac)
        _run("ip", "-n", self.client_ns, "link", "set", self.client_if, "up")
        command = [
            "ip", "netns", "exec", self.client_ns, "busybox", "udhcpc", "-i", self.client_if,
            "-n", "-q", "-f", "-s", str(self.script), "-O", "tftp", "-O", "bootfile",
            "-O", "150", "-t", "5", "-T", "1",
        ]  # fmt: skip
        if ipxe:
            command += ["-x", "0xaf:01"]  # option 175: what iPXE sends
        output = _run(*command)
        fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        assert fields.get("ip"), output
        return fields

    def destroy(self) -> None:
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            self.dnsmasq.kill()
            self.dnsmasq.wait(timeout=10)
        for ns in (self.server_ns, self.client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    _require()
    net = Network(tmp_path)
    try:
        net.create()
        yield net
    finally:
        net.destroy()


def _conductor(name: str, address: str) -> dict[str, str]:
    return {
        "hostname": name,
        "tftp_address": address,
        "heartbeat_interval": "0.5",
        "heartbeat_timeout": "2",
    }


def _wait_pushed(daemon: Daemon, uuid: str, address: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    boot: Any = None
    while time.monotonic() < deadline:
        status, boot = daemon.admin("GET", f"/v1/nodes/{uuid}/boot")
        push = boot.get("push") if status == 200 else None
        if push and push["status"] == "pushed" and boot["mapping"]["tftp_server"] == address:
            return dict(boot)
        time.sleep(0.1)  # poll-with-deadline on a real subprocess
    raise AssertionError(f"node {uuid} not pushed with {address}: {boot}")


@pytest.mark.slow
def test_dhcp_offer_follows_the_owner_through_a_kill(
    network: Network, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A pushes, dnsmasq offers A's address and the right boot files; A is killed with
    -9, B takes over and pushes, the next offer carries B's address; dnsmasq was never
    restarted nor signalled."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    # Registered addresses in the range's subnet but outside its dynamic pool: dnsmasq
    # leases a pinned address of any subnet a dhcp-range covers (docs/dhcp.md).
    nodes = [
        node_document(i, ports=[{"mac": f"52:54:00:12:00:{i:02x}", "ip": f"10.99.0.{200 + i}"}])
        for i in range(8)
    ]
    dhcp = {
        "provider": "dnsmasq",
        "dnsmasq_hostsdir": str(network.hostsdir),
        "dnsmasq_optsdir": str(network.optsdir),
    }
    a = daemon_factory(
        nodes, database_url=url, config={"conductor": _conductor("a", A_ADDRESS), "dhcp": dhcp}
    )
    for node in nodes:
        _wait_pushed(a, node["uuid"], A_ADDRESS)
    network.start_dnsmasq()
    assert network.dnsmasq is not None
    dnsmasq_pid = network.dnsmasq.pid
    b = daemon_factory(
        database_url=url, config={"conductor": _conductor("b", B_ADDRESS), "dhcp": dhcp}
    )
    # The nodes the ring leaves with A once B has joined (B pushed the others).
    deadline = time.monotonic() + DEADLINE
    kept: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        owners = {n["uuid"]: a.admin("GET", f"/v1/nodes/{n['uuid']}/boot")[1] for n in nodes}
        if all(o["owner"] == o["ring_owner"] for o in owners.values()):
            kept = [n for n in nodes if owners[n["uuid"]]["owner"] == "a"]
            break
        time.sleep(0.1)  # poll-with-deadline on a real subprocess
    assert kept, "the ring gave every node to B"
    node = kept[0]
    mac = node["ports"][0]["mac"]
    _wait_pushed(a, node["uuid"], A_ADDRESS)

    offer = network.request(mac)
    assert (offer["siaddr"], offer["tftp"], offer["opt150"]) == (A_ADDRESS, A_ADDRESS, "0a630002")
    assert offer["ip"] == node["ports"][0]["ip"]  # the registered address, not the pool's
    assert offer["bootfile"] == "snponly.efi"
    offer = network.request(mac, ipxe=True)
    assert offer["bootfile"] == f"tftp://{A_ADDRESS}/{node['uuid']}.ipxe"

    assert a.process is not None
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=10)
    killed = time.monotonic()
    boot = _wait_pushed(b, node["uuid"], B_ADDRESS)
    took_over = time.monotonic() - killed
    assert boot["owner"] == "b"
    offer = network.request(mac)
    assert (offer["siaddr"], offer["tftp"], offer["opt150"]) == (B_ADDRESS, B_ADDRESS, "0a630003")
    assert offer["bootfile"] == "snponly.efi"
    print(f"B pushed A's node {took_over:.2f} s after the kill (heartbeat_timeout 2 s)")

    assert network.dnsmasq.poll() is None and network.dnsmasq.pid == dnsmasq_pid
    log = network.dnsmasq_log()
    assert log.count("started, version") == 1
    assert "SIGHUP" not in log and "exiting" not in log
    assert "inotify" in log  # the change reached dnsmasq through inotify alone
    assert b.errors() == []


def test_written_files_are_what_dnsmasq_reads(tmp_path: Path) -> None:
    """The provider's files (no dotfiles left, generation header), a retraction writes
    ``<mac>,ignore``, and an older generation cannot overwrite a newer one."""
    from metadatad.dhcp.provider import PushError

    hosts, opts = tmp_path / "h", tmp_path / "o"
    hosts.mkdir()
    opts.mkdir()
    provider = DnsmasqProvider(str(hosts), str(opts), "a", None, run=lambda f, *a: f(*a))
    provider.sync()  # syncfs works on these directories
    node = make_node(1)
    mapping = boot_mapping(node, "10.0.0.5", "", BootDefaults())
    provider.write(mapping, None, 3)
    assert sorted(p.name for p in hosts.iterdir()) == ["metadatad-52-54-00-12-00-01.conf"]
    host = (hosts / "metadatad-52-54-00-12-00-01.conf").read_text()
    assert host.splitlines() == [
        f"# metadatad owner=a generation=3 node={node.uuid}",
        f"52:54:00:12:00:01,set:node-{node.uuid},10.0.0.3,web-1",
    ]
    lines = (opts / f"metadatad-{node.uuid}.conf").read_text().splitlines()
    assert lines[1:] == [
        f"tag:node-{node.uuid},tag:!ipxe,67,snponly.efi",
        f"tag:node-{node.uuid},tag:ipxe,67,tftp://10.0.0.5/{node.uuid}.ipxe",
        f"tag:node-{node.uuid},66,10.0.0.5",
        f"tag:node-{node.uuid},150,10.0.0.5",
        f"tag:node-{node.uuid},option:server-ip-address,10.0.0.5",
    ]
    old = DnsmasqProvider(str(hosts), str(opts), "z", None, run=lambda f, *a: f(*a))
    with pytest.raises(PushError) as caught:
        old.write(mapping, None, 2)
    assert caught.value.permanent and "generation 3, newer than 2" in caught.value.message
    from metadatad.core.bootmapping import retraction

    provider.write(retraction(mapping, node.uuid, ()), mapping, 3)
    assert host != (hosts / "metadatad-52-54-00-12-00-01.conf").read_text()
    assert (
        (hosts / "metadatad-52-54-00-12-00-01.conf")
        .read_text()
        .endswith("52:54:00:12:00:01,ignore\n")
    )
    assert (opts / f"metadatad-{node.uuid}.conf").read_text().count("\n") == 1
    provider.flush()  # after a batch, no dotfile (spare) is left
    assert [p.name for p in hosts.iterdir() if p.name.startswith(".")] == []


def test_push_many_writes_each_node_and_reports_each_outcome(tmp_path: Path) -> None:
    """``push_many`` writes every node in a few thread jobs and answers one outcome per
    item, in order: a node fenced by a newer file fails alone, the others are written."""
    from twisted.internet.defer import maybeDeferred

    from metadatad.dhcp.provider import PushError

    hosts, opts = tmp_path / "h", tmp_path / "o"
    hosts.mkdir()
    opts.mkdir()
    jobs: list[int] = []

    def run(f: Any, *args: Any) -> Any:
        jobs.append(len(args[0]))
        return maybeDeferred(f, *args)

    nodes = [make_node(i) for i in range(7)]
    mappings = [boot_mapping(n, "10.0.0.6", "", BootDefaults()) for n in nodes]
    newer = DnsmasqProvider(str(hosts), str(opts), "c", None, run=lambda f, *a: f(*a))
    newer.write(boot_mapping(nodes[4], "10.0.0.7", "", BootDefaults()), None, 9)
    provider = DnsmasqProvider(str(hosts), str(opts), "b", None, threads=3, run=run)
    d = provider.push_many([(m, None, 5) for m in mappings])
    outcomes: list[Any] = []
    d.addCallback(outcomes.extend)
    assert sorted(jobs) == [2, 2, 3]  # one job per writer thread, not one per node
    assert [o is None for o in outcomes] == [True] * 4 + [False] + [True] * 2
    error = outcomes[4]
    assert isinstance(error, PushError) and error.permanent
    for i, node in enumerate(nodes):
        text = (opts / f"metadatad-{node.uuid}.conf").read_text()
        assert ("10.0.0.7" if i == 4 else "10.0.0.6") in text
    assert [p.name for p in hosts.iterdir() if p.name.startswith(".")] == []
