"""The packaged units under a real systemd: the .deb installed in a Debian bookworm
container booted by ``systemd-nspawn`` (systemd as PID 1), reached over a veth pair
from a network namespace of the test's own.

Shows that installing enables and starts ``metadatad.socket`` (0.0.0.0:80/tcp and
0.0.0.0:69/udp); that the first TFTP datagram and the first HTTP connection each start
the stopped service; that the hardened service (no capability, no new privileges, its
own mount namespace, a system call filter) serves a registered node its metadata and its
pxelinux config; that it survives ``systemctl restart`` on the same sockets, applies a
new static vendordata on ``systemctl reload`` in the same process, and that a process
under the unit's own sandboxing gets EPERM for what the filter forbids while the same
process without the filter does not; and that it stops cleanly.

Needs root, systemd-container, mmdebstrap and the Debian mirror the first time (the root
is cached, see tests/support/nspawn.py); outside CI it is skipped when any is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.debian import package_dependencies, unavailable
from tests.support.factories import node_document
from tests.support.nspawn import (
    CLIENT_ADDRESS,
    MACHINE_ADDRESS,
    PREFIX,
    SHARED,
    Machine,
    root_directory,
)

pytestmark = pytest.mark.slow

# The container's own packages; the .deb's dependencies are added to these.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
TOOLS = ("systemd-nspawn", "mmdebstrap", "nsenter", "ip", "curl", "tftp", "dpkg-deb")
MAC = "52:54:00:de:b0:16"
NODE = node_document(0, ports=[{"mac": MAC, "ip": CLIENT_ADDRESS, "pxe": True}])
STRANGER = "10.99.16.3"  # an address of the client namespace that no node has
CONF = "/etc/metadatad/metadatad.conf"
VENDORDATA = "/etc/metadatad/vendordata.json"
UNIT = "/lib/systemd/system/metadatad.service"
DEADLINE = 60.0
# [Service] settings that say what to run, not how it is confined.
NOT_SANDBOXING = ("Type", "ExecStart", "ExecReload", "Restart", "RestartSec", "TimeoutStopSec")
# Each is allowed to an unprivileged process and forbidden by the unit's filter
# (@resources: setpriority, sched_setaffinity; @privileged: setuid).
PROBE = """
import errno, json, os
calls = {
    "setpriority": lambda: os.nice(1),
    "sched_setaffinity": lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)),
    "setuid": lambda: os.setuid(os.getuid()),
    "getpid": os.getpid,
}
result = {"uid": os.getuid()}
for name, call in calls.items():
    try:
        call()
        result[name] = "ok"
    except OSError as error:
        result[name] = errno.errorcode[error.errno]
for path in ("/var/lib/metadatad/probe", "/var/cache/metadatad-probe/probe"):
    try:
        open(path, "w").close()
        os.unlink(path)
        result[path] = "ok"
    except OSError as error:
        result[path] = errno.errorcode[error.errno]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def machine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Machine]:
    """A booted bookworm container with the .deb installed by dpkg."""
    if os.geteuid() != 0:
        unavailable("booting a container needs root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (see the needed list in .ci/run)")
    deb: Path = request.getfixturevalue("built_deb")
    root = root_directory([*BASE_PACKAGES, *package_dependencies(deb)])
    box = Machine(root, tmp_path_factory.mktemp("nspawn"), shared=deb.parent)
    try:
        box.start()
        box.run("dpkg", "--install", f"{SHARED}/{deb.name}", timeout=300)
        yield box
    finally:
        box.stop()


def show(box: Machine, unit: str, *properties: str) -> dict[str, str]:
    """``systemctl show`` of ``properties``."""
    out = box.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def systemctl(box: Machine, *args: str, timeout: float = 90) -> None:
    """``systemctl *args``; if it fails, the failure shows the service's journal."""
    result = box.run("systemctl", *args, check=False, timeout=timeout)
    assert result.returncode == 0, (
        f"systemctl {' '.join(args)} exited {result.returncode}: {result.stderr}\n"
        f"{journal(box, 'metadatad.service')[-6000:]}"
    )


def journal(box: Machine, unit: str) -> str:
    return box.run("journalctl", "--no-pager", "--output=cat", f"--unit={unit}").stdout


def poll(condition: Any, what: str, box: Machine, unit: str = "metadatad.service") -> Any:
    """Poll-with-deadline; on time-out, the unit's journal says why."""
    give_up = time.monotonic() + DEADLINE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > give_up:
            log = journal(box, unit)[-6000:]
            raise AssertionError(f"{what}: not within {DEADLINE} s\n{log}")
        time.sleep(0.2)


def metadata(box: Machine, path: str, source: str = CLIENT_ADDRESS) -> tuple[int, str]:
    """GET ``path`` from the client namespace: (HTTP status, body); status 0 if none."""
    result = box.client(
        "curl", "--silent", "--noproxy", "*", "--max-time", "20", "--interface", source,
        "--write-out", "\n%{http_code}", f"http://{MACHINE_ADDRESS}{path}",
    )  # fmt: skip
    body, _, status = result.stdout.rpartition("\n")
    return (int(status) if status.isdigit() else 0), body


def tftp_get(box: Machine, name: str, into: Path) -> str | None:
    """Fetch ``name`` with tftp-hpa's client from the client namespace; None if it failed."""
    into.unlink(missing_ok=True)
    result = box.client(
        "tftp", "-m", "octet", MACHINE_ADDRESS, "-c", "get", name, str(into), timeout=40
    )
    if result.returncode != 0 or "Error" in result.stdout + result.stderr or not into.exists():
        return None
    return into.read_text()


def as_daemon_user(box: Machine, *command: str, **kwargs: Any) -> None:
    box.run(
        "setpriv", "--reuid=metadatad", "--regid=metadatad", "--init-groups", *command, **kwargs
    )


def main_pid(box: Machine) -> int:
    return int(show(box, "metadatad.service", "MainPID")["MainPID"])


def status_fields(box: Machine, pid: int) -> dict[str, str]:
    text = box.run("cat", f"/proc/{pid}/status").stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


PXE_NAME = f"pxelinux.cfg/01-{MAC.replace(':', '-')}"
INSTANCE_ID = "/latest/meta-data/instance-id"
VENDOR_DATA = "/openstack/latest/vendor_data.json"


def test_install_enables_and_starts_both_units(machine: Machine) -> None:
    """dpkg's postinst enables both units and starts them; systemd holds both sockets."""
    for unit in ("metadatad.socket", "metadatad.service"):
        assert machine.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        poll(lambda u=unit: machine.run("systemctl", "is-active", u, check=False).stdout
             .strip() == "active", f"{unit} active", machine, unit)  # fmt: skip
    listen = machine.run("systemctl", "show", "metadatad.socket", "--property=Listen").stdout
    assert listen.split("\n") == ["Listen=0.0.0.0:80 (Stream)", "Listen=0.0.0.0:69 (Datagram)", ""]


def test_socket_activation_on_udp_then_tcp(machine: Machine, tmp_path: Path) -> None:
    """With the service stopped and the socket listening, a TFTP request starts the
    service and is answered; stopped again, an HTTP request starts it and is answered."""
    systemctl(machine, "stop", "metadatad.service")
    # Register the node (as the daemon's user, so its SQLite store stays its own) and
    # give the daemon a static vendordata file for the reload test.
    as_daemon_user(
        machine, "/usr/bin/metadatad-manage", "--config", CONF, "node", "import", "-",
        input=json.dumps([NODE]),
    )  # fmt: skip
    machine.run("sh", "-c", f"echo '{{\"generation\": 1}}' > {VENDORDATA}")
    machine.run("sed", "-i", f"s|^static_file =$|static_file = {VENDORDATA}|", CONF)
    assert f"static_file = {VENDORDATA}" in machine.run("cat", CONF).stdout

    state = show(machine, "metadatad.service", "ActiveState")["ActiveState"]
    assert state == "inactive"
    assert show(machine, "metadatad.socket", "ActiveState")["ActiveState"] == "active"

    config = poll(lambda: tftp_get(machine, PXE_NAME, tmp_path / "pxe.cfg"), "TFTP", machine)
    assert f"kernel {NODE['uuid']}/kernel" in config
    assert f"BOOTIF=01-{MAC.replace(':', '-')}" in config
    assert show(machine, "metadatad.service", "ActiveState")["ActiveState"] == "active"

    systemctl(machine, "stop", "metadatad.service")
    assert show(machine, "metadatad.service", "ActiveState")["ActiveState"] == "inactive"
    status, body = metadata(machine, INSTANCE_ID)
    assert (status, body) == (200, NODE["uuid"])
    assert show(machine, "metadatad.service", "ActiveState")["ActiveState"] == "active"
    # The caller is known by its source address, as systemd's socket passed it on.
    added = machine.client("ip", "addr", "add", f"{STRANGER}/{PREFIX}", "dev", machine.client_if)
    assert added.returncode == 0, added.stderr
    assert metadata(machine, INSTANCE_ID, source=STRANGER)[0] == 404
    log = journal(machine, "metadatad.service")
    assert "Traceback" not in log, log


def test_service_runs_confined(machine: Machine) -> None:
    """The running daemon: the metadatad user, no capability in any set, no new
    privileges, a seccomp filter of its own, its own mount namespace; the unit's
    resolved filter leaves out the calls the probe below is refused."""
    pid = main_pid(machine)
    assert pid > 0
    fields = status_fields(machine, pid)
    uid = machine.run("id", "-u", "metadatad").stdout.strip()
    assert fields["Uid"].split() == [uid] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capabilities], 16) == 0, (capabilities, fields[capabilities])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    # systemd-nspawn filters every process in the container: the unit adds its own.
    init_filters = int(status_fields(machine, 1)["Seccomp_filters"])
    assert int(fields["Seccomp_filters"]) > init_filters
    namespaces = machine.run("readlink", "/proc/1/ns/mnt", f"/proc/{pid}/ns/mnt").stdout.split()
    assert namespaces[0] != namespaces[1]

    allowed = show(machine, "metadatad.service", "SystemCallFilter")["SystemCallFilter"].split()
    assert "read" in allowed and "accept4" in allowed and "recvmsg" in allowed
    for forbidden in ("setpriority", "sched_setaffinity", "setuid", "reboot", "mount"):
        assert forbidden not in allowed, forbidden
    errno_name = show(machine, "metadatad.service", "SystemCallErrorNumber")
    assert errno_name["SystemCallErrorNumber"] in ("1", "EPERM")


def sandbox_settings(machine: Machine) -> list[str]:
    """The installed unit's [Service] confinement settings, as systemd-run properties."""
    text = machine.run("cat", UNIT).stdout
    section = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    settings = []
    for line in section.splitlines():
        key, sep, _ = line.partition("=")
        if sep and not line.startswith("#") and key.strip() not in NOT_SANDBOXING:
            settings.append(line.strip())
    assert any(s.startswith("SystemCallFilter=") for s in settings), settings
    return settings


def probe(machine: Machine, settings: list[str]) -> dict[str, Any]:
    properties = [f"--property={setting}" for setting in settings]
    result = machine.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "--collect", *properties,
        "/usr/lib/metadatad/bin/python", "-c", PROBE,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def test_syscall_filter_refuses_what_it_forbids(machine: Machine) -> None:
    """A process started by systemd with the installed unit's own [Service] settings
    (user, namespaces, filter) gets EPERM for setpriority, sched_setaffinity and setuid
    and cannot write outside its state directory, even to a directory of its own; the same process
    with every setting but the filter may make those calls: the filter refuses them."""
    settings = sandbox_settings(machine)
    uid = int(machine.run("id", "-u", "metadatad").stdout)
    # A directory of the daemon's user outside its StateDirectory: writable to it, but
    # not under ProtectSystem=strict.
    machine.run("install", "-d", "-o", "metadatad", "-g", "metadatad", "/var/cache/metadatad-probe")
    as_daemon_user(machine, "touch", "/var/cache/metadatad-probe/probe")
    as_daemon_user(machine, "rm", "/var/cache/metadatad-probe/probe")

    confined = probe(machine, settings)
    assert confined == {
        "uid": uid, "setpriority": "EPERM", "sched_setaffinity": "EPERM", "setuid": "EPERM",
        "getpid": "ok",
        "/var/lib/metadatad/probe": "ok", "/var/cache/metadatad-probe/probe": "EROFS",
    }  # fmt: skip

    unfiltered = [s for s in settings if not s.startswith("SystemCall")]
    control = probe(machine, unfiltered)
    assert control["uid"] == uid
    assert control["setpriority"] == control["sched_setaffinity"] == "ok"
    assert control["setuid"] == "ok"


def test_restart_keeps_the_sockets_and_serves(machine: Machine, tmp_path: Path) -> None:
    """systemctl restart: a request sent as the restart begins is answered, not refused
    (the socket unit is not restarted; the kernel queues it); then a new process on the
    same sockets serves metadata and TFTP."""
    before = main_pid(machine)
    socket_since = show(machine, "metadatad.socket", "ActiveEnterTimestampMonotonic")
    systemctl(machine, "restart", "--no-block", "metadatad.service")
    assert metadata(machine, INSTANCE_ID) == (200, NODE["uuid"])

    def restarted() -> bool:
        fields = show(machine, "metadatad.service", "ActiveState", "MainPID")
        return fields["ActiveState"] == "active" and int(fields["MainPID"]) not in (0, before)

    poll(restarted, "a new process after the restart", machine)
    after = main_pid(machine)
    assert show(machine, "metadatad.socket", "ActiveEnterTimestampMonotonic") == socket_since
    assert metadata(machine, INSTANCE_ID) == (200, NODE["uuid"])
    config = poll(lambda: tftp_get(machine, PXE_NAME, tmp_path / "pxe.cfg"), "TFTP", machine)
    assert NODE["uuid"] in config
    assert main_pid(machine) == after


def test_reload_applies_new_vendordata_in_the_same_process(machine: Machine) -> None:
    """systemctl reload (SIGHUP): the changed static vendordata is served, by the same
    process."""
    status, body = metadata(machine, VENDOR_DATA)
    assert status == 200 and json.loads(body) == {"generation": 1}, (status, body)
    pid = main_pid(machine)
    machine.run("sh", "-c", f"echo '{{\"generation\": 2}}' > {VENDORDATA}")
    assert json.loads(metadata(machine, VENDOR_DATA)[1]) == {"generation": 1}  # not yet
    systemctl(machine, "reload", "metadatad.service")
    poll(lambda: (r := metadata(machine, VENDOR_DATA))[0] == 200
         and json.loads(r[1]) == {"generation": 2}, "the reloaded vendordata", machine)  # fmt: skip
    assert main_pid(machine) == pid


def test_stops_cleanly(machine: Machine) -> None:
    """systemctl stop of both units: the daemon exits within TimeoutStopSec, with
    success, and nothing in its journal is a traceback."""
    systemctl(machine, "stop", "metadatad.socket", "metadatad.service")
    fields = show(machine, "metadatad.service", "ActiveState", "Result")
    assert fields == {"ActiveState": "inactive", "Result": "success"}, fields
    assert show(machine, "metadatad.socket", "ActiveState")["ActiveState"] == "inactive"
    assert metadata(machine, INSTANCE_ID)[0] == 0  # nothing listens any more
    log = journal(machine, "metadatad.service")
    assert "Traceback" not in log, log
