"""Debian's cloud-init 22.4 reads metadata from the real daemon.

The daemon runs as ``twistd -n metadatad`` on loopback (see :mod:`tests.support.daemon`); nodes
are registered with ``metadatad-manage node import``.  cloud-init's own datasource code
(``DataSourceOpenStack`` and ``DataSourceEc2``) crawls it in a subprocess of Debian's
``/usr/bin/python3``, which has cloud-init and its dependencies.  The driver script
refuses every connection and name lookup that is not ``127.0.0.1``: the OpenStack
reader's EC2 half, which cloud-init 22.4 always sends to http://169.254.169.254, is
pointed at the daemon, and any attempt at another address fails the test.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.slow

SYSTEM_PYTHON = "/usr/bin/python3"
DRIVER_DEADLINE = 60.0

NODE_UUID = "5b1c3b9e-8d4a-4f7e-9c1e-2f4a6b8d0c13"
OTHER_UUID = "0f6e2a14-3c1d-4b7a-8e5f-9a0b1c2d3e4f"
HOSTNAME = "ci-node-1.example.org"
MAC = "fa:16:3e:00:00:01"
PUBLIC_KEYS = {
    "alice": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFsaWNlYWxpY2VhbGljZQ alice@example.org",
    "bob": "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCbobbobbobbobbob bob@example.org",
}
# Binary user-data (gzip, as people use to fit more in the size limit): byte-exact.
USER_DATA = gzip.compress(
    b"#cloud-config\nhostname: ci-node-1\nruncmd:\n  - [touch, /run/metadatad-was-here]\n",
    mtime=0,
)
BLOCK_DEVICE_MAPPING = {"ami": "sda", "root": "/dev/sda", "ephemeral0": "sdb", "swap": "sdc"}
NETWORK_DATA = {
    "links": [
        {
            "id": "tap0",
            "type": "phy",
            "ethernet_mac_address": MAC,
            "mtu": 1500,
            "vif_id": "1f3c0e9a-7a57-4c1e-b3b4-0c2d7f1e9a10",
        }
    ],
    "networks": [
        {
            "id": "network0",
            "type": "ipv4",
            "link": "tap0",
            "ip_address": "192.0.2.10",
            "netmask": "255.255.255.0",
            "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "192.0.2.1"}],
            "network_id": "5e4a3b2c-1d0e-4f9a-8b7c-6d5e4f3a2b1c",
        }
    ],
    "services": [{"type": "dns", "address": "192.0.2.53"}],
}
VENDORDATA = {
    "cloud-init": "#cloud-config\npackage_update: false\n",
    "site": {"rack": "r12"},
}

CALLER_NODE: dict[str, Any] = {
    "uuid": NODE_UUID,
    "name": "ci-node-1",
    "hostname": HOSTNAME,
    "project_id": "proj-ci",
    "availability_zone": "az1b",
    "instance_type": "baremetal.xlarge",
    "image_id": "ami-0000002a",
    "kernel_id": None,
    "ramdisk_id": None,
    "reservation_id": "r-0000002a",
    "launch_index": 3,
    "root_device_name": "/dev/sda",
    "block_device_mapping": BLOCK_DEVICE_MAPPING,
    "ports": [{"mac": MAC, "ip": "127.0.0.1", "pxe": True, "neutron_port_id": None}],
    "public_keys": PUBLIC_KEYS,
    "meta": {"role": "db", "tier": "gold"},
    "user_data": base64.b64encode(USER_DATA).decode("ascii"),
    "network_data": NETWORK_DATA,
    "service": {"name": "db", "domain": "db.example.org", "port": 5432},
    "boot_roles": ["member"],
    "conductor_group": "",
    "boot": {"arch": "x86_64", "firmware": "uefi"},
}
# A neighbour in the same project, on another address: cloud-init must not see it.
OTHER_NODE: dict[str, Any] = {
    **CALLER_NODE,
    "uuid": OTHER_UUID,
    "name": "ci-node-2",
    "hostname": "ci-node-2.example.org",
    "launch_index": 0,
    "ports": [{"mac": "fa:16:3e:00:00:02", "ip": "10.0.0.7", "pxe": True, "neutron_port_id": None}],
    "public_keys": {"carol": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNhcm9s carol@example.org"},
    "user_data": base64.b64encode(b"#cloud-config\n{}\n").decode("ascii"),
}

# A node on 127.0.0.5 whose network_data gives its port a second address: cloud-init's
# EC2 datasource, as on AWS, configures the extra one as a static secondary address.
NET_UUID = "7c2d9e41-5a3b-4c8d-9e1f-0a2b3c4d5e6f"
NET_MAC = "fa:16:3e:00:00:05"
NET_SOURCE = "127.0.0.5"
NET_NODE: dict[str, Any] = {
    "uuid": NET_UUID,
    "hostname": "net-node.example.org",
    "project_id": "proj-net",
    "availability_zone": "az1b",
    "ports": [{"mac": NET_MAC, "ip": NET_SOURCE, "pxe": True}],
    "network_data": {
        "links": [{"id": "eth0", "type": "phy", "ethernet_mac_address": NET_MAC}],
        "networks": [
            {
                "id": "n0",
                "type": "ipv4",
                "link": "eth0",
                "ip_address": NET_SOURCE,
                "netmask": "255.0.0.0",
            },
            {
                "id": "n1",
                "type": "ipv4",
                "link": "eth0",
                "ip_address": "127.0.0.6",
                "netmask": "255.0.0.0",
            },
        ],
        "services": [],
    },
    "public_ipv4": "203.0.113.5",
    "security_groups": ["web", "ssh"],
}

# The EC2 meta-data keys Nova serves (DESIGN.md), less kernel-id and ramdisk-id, which
# are absent when unset.
EC2_KEYS = {
    "ami-id",
    "ami-launch-index",
    "ami-manifest-path",
    "block-device-mapping",
    "hostname",
    "instance-action",
    "instance-id",
    "instance-type",
    "local-hostname",
    "local-ipv4",
    "placement",
    "public-hostname",
    "public-ipv4",
    "public-keys",
    "reservation-id",
    "security-groups",
    "mac",
    "network",
}

# Runs under Debian's /usr/bin/python3 -I.  argv[1]: {"base": URL, "jobs": [...]}.
# Prints one JSON object: job name -> result.  Everything cloud-init logs goes to stderr.
DRIVER = r'''
import base64, json, logging, socket, sys, tempfile, urllib.parse

ALLOWED = "127.0.0.1"
source = []    # when set, the local address to connect from (127.0.0.2: unregistered)
blocked = []   # non-loopback destinations cloud-init tried: must stay empty
requested = []  # every URL cloud-init's url_helper.readurl was asked for


def _allowed(host):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return host == ALLOWED


def _refuse(what, host):
    blocked.append("%s %s" % (what, host))
    raise PermissionError("test driver: refused %s to %s (only %s is allowed)"
                          % (what, host, ALLOWED))


# Guards below cloud-init and requests, installed before either is imported: no packet
# and no DNS query leaves for anything but 127.0.0.1.
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _check(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        if not _allowed(address[0]):
            _refuse("connect", address[0])
        if source and self.family == socket.AF_INET:
            self.bind((source[0], 0))


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


def _sendto(original):
    def sendto(self, data, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _allowed(address[0]):
            _refuse("sendto", address[0])
        return original(self, data, *args)
    return sendto


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.socket.sendto = _sendto(socket.socket.sendto)


def _lookup(original):
    def lookup(host, *args, **kwargs):
        if not _allowed(host):
            blocked.append("lookup %s" % (host,))
            raise socket.gaierror(socket.EAI_NONAME, "test driver: refused lookup of %r" % (host,))
        return original(host, *args, **kwargs)
    return lookup


for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, _name, _lookup(getattr(socket, _name)))

from cloudinit import helpers, net, url_helper, util  # noqa: E402
from cloudinit.sources import DataSourceEc2, DataSourceOpenStack  # noqa: E402
from cloudinit.sources.helpers import ec2, openstack  # noqa: E402

# After the imports: cloudinit.log resets the root logger when imported.
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")

_readurl = url_helper.readurl


def readurl(*args, **kwargs):
    url = kwargs["url"] if "url" in kwargs else args[0]
    requested.append(url)
    host = urllib.parse.urlsplit(url).hostname
    if host != ALLOWED:
        blocked.append("readurl " + url)
        raise url_helper.UrlError(ValueError("test driver: refused " + url), url=url)
    return _readurl(*args, **kwargs)


# Every cloud-init HTTP request (readurl, read_file_or_url, wait_for_url and the
# datasources' uhelp.readurl) looks up this module attribute.
url_helper.readurl = readurl
# No DNS-redirect probes (does-not-exist.example.com.) and no DMI detection.
util.is_resolvable_url = lambda url: True
util.is_resolvable = lambda name: True
DataSourceOpenStack.detect_openstack = lambda accept_oracle=False: True

# cloud-init 22.4's OpenStack reader sends its EC2 half to http://169.254.169.254
# whatever the base URL (MetadataReader._read_ec2_metadata passes no address).  Send it
# to the base URL instead, as it would reach the same service on a real machine.
def _read_ec2_metadata(self):
    return ec2.get_instance_metadata(metadata_address=self.base_path,
                                     ssl_details=self.ssl_details,
                                     timeout=self.timeout, retries=self.retries)


_original_read_ec2_metadata = openstack.MetadataReader._read_ec2_metadata
openstack.MetadataReader._read_ec2_metadata = _read_ec2_metadata

picked_versions = []
_find_working_version = openstack.BaseReader._find_working_version


def find_working_version(self):
    version = _find_working_version(self)
    picked_versions.append(version)
    return version


openstack.BaseReader._find_working_version = find_working_version


def b64(data):
    if data is None:
        return None
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def paths():
    tmp = tempfile.mkdtemp(prefix="cloudinit-")
    return helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})


def run_openstack(base, job):
    sys_cfg = {"datasource_list": ["OpenStack"],
               "datasource": {"OpenStack": {"metadata_urls": [base], "timeout": 5,
                                            "retries": 0}}}
    ds = DataSourceOpenStack.DataSourceOpenStack(sys_cfg, None, paths())
    found = ds._get_data()
    result = {"found": bool(found), "picked_versions": list(picked_versions)}
    if not found:
        return result
    network_json = json.loads(json.dumps(ds.network_json))  # convert_net_json edits it
    metadata = dict(ds.metadata)
    seed = metadata.pop("random_seed", None)
    known_macs = {link["ethernet_mac_address"]: "eth%d" % i
                  for i, link in enumerate((ds.network_json or {}).get("links", []))
                  if link.get("ethernet_mac_address")}
    result.update(
        instance_id=ds.get_instance_id(),
        fqdn=ds.get_hostname(fqdn=True, metadata_only=True).hostname,
        hostname=ds.get_hostname(metadata_only=True).hostname,
        metadata=metadata,
        random_seed_length=None if seed is None else len(seed),
        public_keys=ds.get_public_ssh_keys(),
        availability_zone=ds.availability_zone,
        userdata=b64(ds.userdata_raw),
        vendordata=ds.vendordata_pure,
        vendordata_raw=ds.vendordata_raw,
        vendordata2=ds.vendordata2_pure,
        vendordata2_raw=ds.vendordata2_raw,
        network_json=network_json,
        network_config=openstack.convert_net_json(ds.network_json, known_macs=known_macs),
        ec2_metadata=ds.ec2_metadata,
        version=ds.version,
        dsmode=ds.dsmode,
        files=ds.files,
    )
    return result


def run_ec2(base, job):
    sys_cfg = {"datasource": {"Ec2": {"metadata_urls": [base],
                                      "max_wait": job.get("max_wait", 10), "timeout": 5}}}
    ds = DataSourceEc2.DataSourceEc2(sys_cfg, None, paths())
    # Not AWS by default: IMDSv1, no token PUT, no DMI.  "aws": IMDSv2 tokens.
    ds._cloud_name = job.get("cloud", "unknown")
    found = ds._get_data()
    result = {"found": bool(found)}
    if not found:
        return result
    if job.get("nics"):
        # cloud-init maps the tree's MACs to this machine's NICs through
        # net.get_interfaces_by_mac(): the driver's machine has no NIC with the node's
        # MAC, so the job names the NICs the node would have.
        nics = dict(job["nics"])
        net.get_interfaces_by_mac = lambda *a, **k: dict(nics)
        net.find_fallback_nic = lambda *a, **k: sorted(nics.values())[0]
        result["network_config"] = ds.network_config
    result.update(
        api_version=ds._crawled_metadata.get("_metadata_api_version"),
        instance_id=ds.get_instance_id(),
        fqdn=ds.get_hostname(fqdn=True, metadata_only=True).hostname,
        hostname=ds.get_hostname(metadata_only=True).hostname,
        metadata=ds.metadata,
        public_keys=ds.get_public_ssh_keys(),
        availability_zone=ds.availability_zone,
        region=ds.region,
        launch_index=ds.launch_index,
        userdata=b64(ds.userdata_raw),
        used_token=bool(getattr(ds, "_api_token", None)),
    )
    return result


def run_guard_selftest(base, job):
    """Show that the guards refuse other addresses (127.0.0.3: still loopback, so a
    broken guard could not send anything off the machine)."""
    outcomes = {}

    def attempt(name, function):
        try:
            function()
        except Exception as e:
            outcomes[name] = type(e).__name__
        else:
            outcomes[name] = "allowed"

    def raw_connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect(("127.0.0.3", 9))
        finally:
            s.close()

    attempt("readurl", lambda: url_helper.readurl("http://127.0.0.3:9/latest/meta-data/",
                                                  retries=0, timeout=1))
    attempt("create_connection",
            lambda: socket.create_connection(("127.0.0.3", 9), timeout=1).close())
    attempt("connect", raw_connect)
    attempt("lookup", lambda: socket.getaddrinfo("metadata.invalid", 80))
    attempt("loopback", lambda: url_helper.readurl(base + "/", retries=0, timeout=5))
    # Why the OpenStack reader's EC2 half is redirected: it names no address, and the
    # helper's default is the link-local one.
    import inspect
    outcomes["ec2_default_address"] = inspect.signature(
        ec2.get_instance_metadata).parameters["metadata_address"].default
    outcomes["reader_names_an_address"] = (
        "metadata_address" in inspect.getsource(_original_read_ec2_metadata))
    return {"found": True, "outcomes": outcomes}


spec = json.loads(sys.argv[1])
results = {}
for job in spec["jobs"]:
    del blocked[:], requested[:], picked_versions[:], source[:]
    if job.get("source"):
        source.append(job["source"])
    run = {"openstack": run_openstack, "ec2": run_ec2,
           "guard-selftest": run_guard_selftest}[job["kind"]]
    try:
        result = run(spec["base"], job)
    except Exception as e:
        logging.exception("job %s failed", job["name"])
        result = {"found": False, "error": "%s: %s" % (type(e).__name__, e)}
    result["blocked"] = list(blocked)
    result["requested"] = list(requested)
    results[job["name"]] = result
print(json.dumps(results, default=b64))
# The driver's own assertion: no crawl tried anything but 127.0.0.1.
escaped = {name: r["blocked"] for name, r in results.items()
           if r["blocked"] and name != "guard-selftest"}
if escaped:
    sys.stderr.write("test driver: crawls tried non-loopback addresses: %r\n" % (escaped,))
    sys.exit(3)
'''


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def system_python() -> str:
    """Debian's python3 with cloud-init; skipped when absent, except under CI."""
    probe = (
        "import cloudinit.version, cloudinit.sources.DataSourceEc2, "
        "cloudinit.sources.DataSourceOpenStack; print(cloudinit.version.version_string())"
    )
    try:
        result = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", probe],
            capture_output=True,
            text=True,
            timeout=DRIVER_DEADLINE,
            check=False,
        )
        problem = (
            ""
            if result.returncode == 0
            else (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        )
    except OSError as e:
        problem = str(e)
    if problem:
        reason = f"{SYSTEM_PYTHON} cannot import cloud-init ({problem}); apt-get install cloud-init"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI requires it)", pytrace=False)
        pytest.skip(reason)
    return SYSTEM_PYTHON


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, knowing 127.0.0.1 (and a neighbour on 10.0.0.7).

    At teardown: it must have stopped cleanly on SIGTERM and logged no traceback.
    """
    running = Daemon.create(
        tmp_path_factory.mktemp("cloudinit"),
        nodes=[CALLER_NODE, OTHER_NODE, NET_NODE],
        vendordata=VENDORDATA,
    )
    try:
        yield running.start()
    finally:
        status = running.stop()
    assert status == -signal.SIGTERM, f"exit status {status}:\n{running.output()[-3000:]}"
    assert running.errors() == []


def run_driver(
    python: str, daemon: Daemon, label: str, jobs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Run cloud-init's crawls against ``daemon``; fails with the logs on a crash.

    cloud-init's log goes to ``cloud-init-<label>.log`` in the daemon's directory.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")
    }
    env["no_proxy"] = env["NO_PROXY"] = "*"
    spec = json.dumps({"base": daemon.metadata_url, "jobs": jobs})
    result = subprocess.run(
        [python, "-I", "-c", DRIVER, spec],
        capture_output=True,
        text=True,
        timeout=DRIVER_DEADLINE,
        check=False,
        env=env,
        cwd=daemon.directory,
    )
    log_path = daemon.directory / f"cloud-init-{label}.log"
    log_path.write_text(result.stderr, encoding="utf-8")
    if result.returncode != 0:
        pytest.fail(
            f"the cloud-init driver exited {result.returncode}:\n{result.stderr[-6000:]}\n"
            f"daemon output:\n{daemon.output()[-3000:]}",
            pytrace=False,
        )
    results = dict(json.loads(result.stdout))
    for job_result in results.values():
        job_result["log"] = str(log_path)
    return results


@pytest.fixture(scope="module")
def crawled(system_python: str, daemon: Daemon) -> dict[str, Any]:
    """cloud-init's OpenStack and EC2 datasources, run against the registered daemon."""
    return run_driver(
        system_python,
        daemon,
        "registered",
        [
            {"name": "guard-selftest", "kind": "guard-selftest"},
            {"name": "openstack", "kind": "openstack"},
            {"name": "ec2", "kind": "ec2"},
            {
                "name": "ec2-aws-network",
                "kind": "ec2",
                "cloud": "aws",
                "source": NET_SOURCE,
                "nics": {NET_MAC: "eth0"},
            },
        ],
    )


def context(result: dict[str, Any], daemon: Daemon) -> str:
    """A failure message: what cloud-init asked for, and the daemon's log tail."""
    log = Path(result["log"]).read_text(encoding="utf-8")
    return (
        f"\ncloud-init error: {result.get('error')}\nrequested: {result.get('requested')}\n"
        f"cloud-init log tail:\n{log[-4000:]}\ndaemon output:\n{daemon.output()[-2000:]}"
    )


# --- cloud-init against a registered caller -------------------------------------------


def test_openstack_datasource_reads_the_imported_node(
    crawled: dict[str, Any], daemon: Daemon
) -> None:
    result = crawled["openstack"]
    assert result["found"], context(result, daemon)
    # cloud-init's newest known version, chosen from our /openstack listing.
    assert result["picked_versions"] == ["2018-08-27"]
    assert result["version"] == 2
    assert result["instance_id"] == NODE_UUID
    metadata = result["metadata"]
    assert metadata["uuid"] == NODE_UUID
    assert metadata["instance-id"] == NODE_UUID
    assert metadata["local-hostname"] == HOSTNAME
    assert metadata["hostname"] == HOSTNAME
    assert result["fqdn"] == HOSTNAME
    assert result["hostname"] == "ci-node-1"
    assert metadata["name"] == "ci-node-1"
    assert metadata["availability_zone"] == "az1b"
    assert result["availability_zone"] == "az1b"
    assert metadata["launch_index"] == 3
    assert metadata["meta"] == {"role": "db", "tier": "gold"}
    assert metadata["public_keys"] == PUBLIC_KEYS
    assert sorted(result["public_keys"]) == sorted(PUBLIC_KEYS.values())
    assert metadata["project_id"] == "proj-ci"
    assert result["random_seed_length"] == 512
    assert base64.b64decode(result["userdata"]) == USER_DATA
    # meta has no dsmode, so cloud-init stays in its default mode; no injected files.
    assert result["dsmode"] == "net"
    assert result["files"] == {}
    # Every URL read under the chosen version.
    openstack_urls = [u for u in result["requested"] if "/openstack/" in u]
    assert openstack_urls and all("/openstack/2018-08-27/" in u for u in openstack_urls), (
        openstack_urls
    )


def test_openstack_network_and_vendor_data(crawled: dict[str, Any], daemon: Daemon) -> None:
    result = crawled["openstack"]
    assert result["found"], context(result, daemon)
    assert result["network_json"] == NETWORK_DATA
    config = result["network_config"]
    assert config["version"] == 1
    physical = [c for c in config["config"] if c["type"] == "physical"]
    assert [(c["name"], c["mac_address"], c["mtu"]) for c in physical] == [("eth0", MAC, 1500)]
    (subnet,) = physical[0]["subnets"]
    assert subnet["type"] == "static"
    assert subnet["address"] == "192.0.2.10"
    assert subnet["netmask"] == "255.255.255.0"
    assert subnet["routes"] == [
        {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "192.0.2.1"}
    ]
    assert {"type": "nameserver", "address": "192.0.2.53"} in config["config"]
    # vendor_data.json and vendor_data2.json both parsed; cloud-init takes the
    # "cloud-init" key of the first as vendor data.
    assert result["vendordata"] == VENDORDATA
    assert result["vendordata_raw"] == VENDORDATA["cloud-init"]
    assert result["vendordata2"] == {"static": VENDORDATA}
    assert result["vendordata2_raw"] is None


def test_openstack_reader_ec2_half(crawled: dict[str, Any], daemon: Daemon) -> None:
    """The OpenStack reader's EC2 half (pointed at the daemon) sees the same node."""
    result = crawled["openstack"]
    assert result["found"], context(result, daemon)
    ec2 = result["ec2_metadata"]
    assert ec2, context(result, daemon)
    assert ec2["instance-id"] == NODE_UUID
    assert ec2["local-hostname"] == HOSTNAME
    assert ec2["public-keys"] == PUBLIC_KEYS
    assert ec2["ami-launch-index"] == "3"
    assert ec2["placement"] == {"availability-zone": "az1b"}
    assert ec2["block-device-mapping"] == BLOCK_DEVICE_MAPPING


def test_ec2_datasource_reads_the_imported_node(crawled: dict[str, Any], daemon: Daemon) -> None:
    result = crawled["ec2"]
    assert result["found"], context(result, daemon)
    # The newest of the dated versions cloud-init probes.
    assert result["api_version"] == "2021-03-23"
    metadata = result["metadata"]
    assert set(metadata) == EC2_KEYS, context(result, daemon)
    assert result["instance_id"] == NODE_UUID
    assert metadata["instance-id"] == NODE_UUID
    assert metadata["hostname"] == HOSTNAME
    assert metadata["local-hostname"] == HOSTNAME
    assert result["fqdn"] == HOSTNAME
    assert result["hostname"] == "ci-node-1"
    assert metadata["public-keys"] == PUBLIC_KEYS
    assert sorted(result["public_keys"]) == sorted(PUBLIC_KEYS.values())
    assert base64.b64decode(result["userdata"]) == USER_DATA
    assert metadata["placement"] == {"availability-zone": "az1b"}
    assert result["availability_zone"] == "az1b"
    assert result["region"] == "az1"
    assert metadata["ami-launch-index"] == "3"
    assert result["launch_index"] == "3"
    assert metadata["instance-type"] == "baremetal.xlarge"
    assert metadata["block-device-mapping"] == BLOCK_DEVICE_MAPPING
    assert metadata["ami-id"] == "ami-0000002a"
    assert metadata["reservation-id"] == "r-0000002a"
    assert metadata["local-ipv4"] == "127.0.0.1"
    assert metadata["mac"] == MAC
    # The port's address, then the one network_data gives its MAC.
    assert metadata["network"]["interfaces"]["macs"][MAC]["local-ipv4s"] == [
        "127.0.0.1",
        "192.0.2.10",
    ]
    assert "kernel-id" not in metadata and "ramdisk-id" not in metadata
    # IMDSv1 off AWS: no token PUT; and every crawl URL under the chosen version.
    crawl_urls = [u for u in result["requested"] if "/meta-data/" in u or "/user-data" in u]
    probes = {"/2009-04-04/meta-data/instance-id", "/2021-03-23/meta-data/instance-id"}
    paths = [urllib.parse.urlsplit(u).path for u in crawl_urls]
    assert all(p.startswith("/2021-03-23/") or p in probes for p in paths), paths
    assert not any("api/token" in u for u in result["requested"])


def test_ec2_datasource_renders_network_config_from_the_macs_tree(
    crawled: dict[str, Any], daemon: Daemon
) -> None:
    """cloud-init's EC2 datasource, as on AWS (IMDSv2, the network tree), renders a
    network configuration naming the node's MAC and its second address."""
    result = crawled["ec2-aws-network"]
    assert result["found"], context(result, daemon)
    assert result["used_token"]
    assert result["instance_id"] == NET_UUID
    metadata = result["metadata"]
    assert metadata["mac"] == NET_MAC
    interface = metadata["network"]["interfaces"]["macs"][NET_MAC]
    assert interface["local-ipv4s"] == [NET_SOURCE, "127.0.0.6"]
    assert interface["subnet-ipv4-cidr-block"] == "127.0.0.0/8"
    assert interface["device-number"] == "0"
    assert interface["security-groups"] == ["web", "ssh"]
    assert metadata["public-ipv4"] == "203.0.113.5"
    assert metadata["security-groups"] == ["web", "ssh"]
    assert result["network_config"] == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "dhcp4": True,
                "dhcp6": False,
                "match": {"macaddress": NET_MAC},
                "set-name": "eth0",
                "addresses": ["127.0.0.6/8"],
            }
        },
    }, context(result, daemon)
    assert result["blocked"] == []


def test_driver_refuses_every_other_address(crawled: dict[str, Any]) -> None:
    """The driver's guards work, so an empty ``blocked`` list means something."""
    result = crawled["guard-selftest"]
    assert result["outcomes"] == {
        "readurl": "UrlError",
        "create_connection": "gaierror",
        "connect": "PermissionError",
        "lookup": "gaierror",
        "loopback": "allowed",
        # cloud-init 22.4's OpenStack reader would send its EC2 half here:
        "ec2_default_address": "http://169.254.169.254",
        "reader_names_an_address": False,
    }
    assert result["blocked"] == [
        "readurl http://127.0.0.3:9/latest/meta-data/",
        "lookup 127.0.0.3",
        "connect 127.0.0.3",
        "lookup metadata.invalid",
    ]


def test_crawls_only_contact_the_daemon_on_loopback(
    crawled: dict[str, Any], daemon: Daemon
) -> None:
    base = daemon.metadata_url
    for name in ("openstack", "ec2"):
        result = crawled[name]
        assert result["blocked"] == [], f"{name} tried non-loopback addresses"
        assert result["requested"], name
        outside = [u for u in result["requested"] if not u.startswith(base + "/")]
        assert outside == [], f"{name} requested URLs outside {base}"


# --- the trees, walked directly ------------------------------------------------------


def _listing(body: bytes) -> list[str]:
    return [line for line in body.decode("utf-8").splitlines() if line]


def test_every_listed_key_answers(daemon: Daemon) -> None:
    """Every name in every listing answers 200, with or without a trailing slash; JSON
    files are never empty."""
    failures: list[str] = []

    def fetch(path: str) -> bytes | None:
        bodies = []
        for variant in (path.rstrip("/"), path.rstrip("/") + "/"):
            status, _, body = daemon.get(variant)
            if status != 200:
                failures.append(f"GET {variant}: {status} {body[:200]!r}")
                return None
            bodies.append(body)
        if path.rstrip("/").endswith("/meta_data.json"):
            # random_seed is fresh on every read, as in Nova: compare the rest.
            bodies = [json.dumps({**json.loads(b), "random_seed": ""}).encode() for b in bodies]
        if bodies[0] != bodies[1]:
            failures.append(f"GET {path}: differs with and without a trailing slash")
        return bodies[0]

    def walk(path: str) -> None:
        body = fetch(path)
        if body is None:
            return
        for line in _listing(body):
            if line.endswith("/"):
                walk(path + line)
            elif "=" in line and line.split("=", 1)[0].isdigit():
                walk(path + line.split("=", 1)[0] + "/")  # public-keys: 0=name
            elif line == "user-data":
                if fetch(path + line) != USER_DATA:
                    failures.append(f"GET {path}{line}: not the imported user-data")
            else:
                leaf = fetch(path + line)
                if line == "document" and leaf is not None:
                    document = json.loads(leaf)
                    if (
                        document["instanceId"],
                        document["availabilityZone"],
                        document["region"],
                    ) != (NODE_UUID, "az1b", "az1"):
                        failures.append(f"GET {path}{line}: {document}")

    status, _, body = daemon.get("/")
    assert status == 200
    versions = _listing(body)
    assert {"2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest"} <= set(versions)
    for version in versions:
        walk(f"/{version}/")

    body = fetch("/openstack")
    assert body is not None, failures
    os_versions = _listing(body)
    assert {"2018-08-27", "latest"} <= set(os_versions)
    for version in os_versions:
        listing = fetch(f"/openstack/{version}")
        if listing is None:
            continue
        for name in _listing(listing):
            content = fetch(f"/openstack/{version}/{name}")
            if content is None or not name.endswith(".json"):
                continue
            try:
                if not isinstance(json.loads(content), (dict, list)):
                    failures.append(f"/openstack/{version}/{name}: not an object or list")
            except ValueError:
                failures.append(f"/openstack/{version}/{name}: not JSON: {content[:100]!r}")
    assert failures == []


# --- an unregistered caller -----------------------------------------------------------

# 127.0.0.2 is on loopback too, but no node has it: the daemon must not answer for it
# with anyone's data (not the 127.0.0.1 node's, not the neighbour's).
UNREGISTERED = "127.0.0.2"

PER_NODE_PATHS = [
    "/latest",
    "/latest/",
    "/latest/meta-data/",
    "/latest/meta-data/instance-id",
    "/2009-04-04/meta-data/instance-id",
    "/2021-03-23/meta-data/instance-id",
    "/latest/meta-data/public-keys/",
    "/latest/user-data",
    "/latest/dynamic/instance-identity/document",
    "/openstack/latest",
    "/openstack/2018-08-27/",
    "/openstack/latest/meta_data.json",
    "/openstack/2018-08-27/meta_data.json",
    "/openstack/2018-08-27/user_data",
    "/openstack/latest/vendor_data.json",
    "/openstack/latest/vendor_data2.json",
    "/openstack/latest/network_data.json",
    "/openstack/latest/password",
]


def test_unregistered_caller_gets_listings_but_no_node(daemon: Daemon) -> None:
    status, _, body = daemon.get("/", source=UNREGISTERED)
    assert status == 200 and "latest" in _listing(body)
    for path in ("/openstack", "/openstack/"):
        status, _, body = daemon.get(path, source=UNREGISTERED)
        assert status == 200 and {"2018-08-27", "latest"} <= set(_listing(body)), path
    answers = {path: daemon.get(path, source=UNREGISTERED) for path in PER_NODE_PATHS}
    assert {path: status for path, (status, _, _) in answers.items()} == dict.fromkeys(
        PER_NODE_PATHS, 404
    )
    for path, (_, _, body) in answers.items():
        assert body, path
        assert NODE_UUID.encode() not in body and OTHER_UUID.encode() not in body, path
    # The same paths still answer the registered caller: the 404s are about who asks.
    assert daemon.get("/latest/meta-data/instance-id")[::2] == (200, NODE_UUID.encode())


def test_cloudinit_finds_nothing_for_unregistered_caller(
    system_python: str, daemon: Daemon
) -> None:
    results = run_driver(
        system_python,
        daemon,
        "unregistered",
        [
            {"name": "openstack", "kind": "openstack", "source": UNREGISTERED},
            {"name": "ec2", "kind": "ec2", "max_wait": 1, "source": UNREGISTERED},
        ],
    )
    for name, result in results.items():
        assert result["found"] is False, name
        assert "error" not in result, context(result, daemon)  # a clean "no datasource"
        assert result["blocked"] == [], name
        assert all(u.startswith(daemon.metadata_url + "/") for u in result["requested"]), name
    # OpenStack: discovery worked (/openstack is 200), then meta_data.json was refused.
    assert any(u.endswith("/meta_data.json") for u in results["openstack"]["requested"])
