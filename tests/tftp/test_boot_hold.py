"""Holding a marked node's boot (``[vendordata] hold_boot``): the stanzas, the TFTP file
resolution that serves them, and the check against the node's revision."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from metadatad.config import Config, VendordataConfig
from metadatad.core.records import NodeRecord
from metadatad.db.vendordata import VendordataError, VendordataErrorStore
from metadatad.testing import MemoryNodeRepository, MemoryVendordataErrorRepository
from metadatad.tftp.bootconfig import BootFiles, NotOwned, Templates
from metadatad.tftp.hold import hold_stanza
from metadatad.tftp.protocol import TFTPError
from metadatad.tftp.service import _held
from tests.daemon.test_tftp_daemon import free_udp_port, need, run
from tests.support.daemon import free_port
from tests.support.factories import node_document
from tests.support.sites import fired
from tests.tftp.test_tftp_bootconfig import NODE, RECORD, UUID, Lookup, read

IPXE = "01-52-54-00-12-00-00.ipxe"
PXELINUX = "pxelinux.cfg/01-52-54-00-12-00-00"
GRUB = "grub.cfg-01-52-54-00-12-00-00"


def test_ipxe_stanza_waits_then_reboots() -> None:
    text = hold_stanza("ipxe", UUID, ["ops", "billing"], IPXE, 45)
    assert text.splitlines() == [
        "#!ipxe",
        f"echo metadatad: boot of node {UUID} held: dynamic vendordata failed (billing, ops)",
        "echo metadatad: starting the boot again in 45 seconds",
        "sleep 45",
        "reboot",
    ]


def test_pxelinux_stanza_prompts_then_reloads_the_same_file() -> None:
    lines = hold_stanza("pxelinux", UUID, ["ops"], PXELINUX, 30).splitlines()
    assert f"SAY metadatad: boot of node {UUID} held: dynamic vendordata failed (ops)" in lines
    assert lines[-6:] == [
        "DEFAULT hold",
        "PROMPT 1",
        "TIMEOUT 300",
        "ONTIMEOUT hold",
        "LABEL hold",
        f"  CONFIG {PXELINUX}",
    ]
    # pxelinux's TIMEOUT tops out at 35996 tenths.
    assert "TIMEOUT 35996" in hold_stanza("pxelinux", UUID, ["ops"], PXELINUX, 3600)
    with pytest.raises(ValueError, match="grub"):
        hold_stanza("grub", UUID, ["ops"], GRUB, 30)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "templates").mkdir()
    for kind in ("ipxe", "pxelinux", "grub"):
        (tmp_path / "templates" / f"{kind}.tmpl").write_text(f"{kind} kernel for $uuid\n")
    return tmp_path


def boot_files(tree: Path, held: Any, owned: bool = True) -> BootFiles:
    return BootFiles(
        tree / "root",
        Templates(tree / "templates"),
        Lookup(RECORD),
        lambda uuid: owned,
        conductor="c1",
        held=held,
        hold_retry=20,
    )


def opened(result: Any) -> bytes:
    return read(fired(result) if isinstance(result, Deferred) else result)


def test_a_held_node_gets_the_stanza_for_ipxe_and_pxelinux_only(tree: Path) -> None:
    asked: list[str] = []

    def held(record: NodeRecord) -> Deferred[list[str]]:
        asked.append(record.node.uuid)
        return succeed(["ops"])

    boot = boot_files(tree, held)
    assert opened(boot.open(IPXE, "10.0.0.5", "10.0.0.1")).startswith(b"#!ipxe\necho metadatad")
    pxelinux = opened(boot.open(PXELINUX, "10.0.0.5", "10.0.0.1")).decode()
    assert f"CONFIG {PXELINUX}" in pxelinux and "kernel" not in pxelinux
    assert opened(boot.open(GRUB, "10.0.0.5", "10.0.0.1")) == f"grub kernel for {UUID}\n".encode()
    assert asked == [UUID, UUID]


def test_a_node_not_held_boots_and_without_the_option_nothing_is_asked(tree: Path) -> None:
    boot = boot_files(tree, lambda record: succeed([]))
    assert opened(boot.open(IPXE, "10.0.0.5", "s")) == f"ipxe kernel for {UUID}\n".encode()
    plain = boot_files(tree, None).open(IPXE, "10.0.0.5", "s")
    assert not isinstance(plain, Deferred)  # the cached path stays synchronous
    assert read(plain) == f"ipxe kernel for {UUID}\n".encode()


def test_not_owned_is_refused_before_any_hold_check(tree: Path) -> None:
    def held(record: NodeRecord) -> Deferred[list[str]]:
        raise AssertionError("no query for another conductor's node")

    with pytest.raises(NotOwned):
        boot_files(tree, held, owned=False).open(IPXE, "10.0.0.5", "s")


def test_database_down_fails_the_transfer(tree: Path) -> None:
    result = boot_files(tree, lambda r: fail(ConnectionError("away"))).open(IPXE, "10.0.0.5", "s")
    assert isinstance(result, Deferred)
    failures: list[Any] = []
    result.addErrback(failures.append)
    (failure,) = failures
    assert failure.check(TFTPError) and failure.value.code == 0


def mark(revision: int, target: str = "ops") -> VendordataError:
    return VendordataError(UUID, target, "HTTP 500", revision, "c1", datetime(2026, 12, 6))


def test_held_counts_marks_of_the_current_revision_only() -> None:
    """Re-registering the node (a new revision) releases it; a new mark holds again."""
    nodes = MemoryNodeRepository()
    nodes.upsert_nodes([NODE])
    repository = MemoryVendordataErrorRepository(nodes)
    errors = VendordataErrorStore(
        repository,
        None,
        run=lambda f, *a: succeed(f(*a)),  # type: ignore[arg-type]
    )
    config = Config(vendordata=VendordataConfig(failure_fatal=True, hold_boot=True))
    held = _held(config, errors)
    assert held is not None
    record = nodes.get_node(UUID)
    assert record is not None and record.revision == 1
    assert fired(held(record)) == []
    repository.mark(mark(1))
    assert fired(held(record)) == ["ops"]
    nodes.upsert_nodes([NODE])
    newer = nodes.get_node(UUID)
    assert newer is not None and newer.revision == 2
    assert fired(held(newer)) == []
    repository.mark(mark(2, "billing"))
    assert fired(held(newer)) == ["billing"]
    off = Config(vendordata=VendordataConfig(failure_fatal=True, hold_boot=False))
    assert _held(off, errors) is None


# --- against the real daemon, with a real TFTP client -------------------------------------


@pytest.mark.slow
def test_daemon_holds_a_marked_nodes_boot_until_it_is_registered_again(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A dynamic target that refuses connections fails the node's vendor_data2.json
    (failure_fatal): its iPXE script and pxelinux config (curl over TFTP) become the
    hold stanzas; re-registering the node releases it."""
    curl = need("curl")
    port = free_udp_port()
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "ipxe.tmpl").write_text("#!ipxe\nkernel $uuid/kernel\nboot\n")
    (templates / "pxelinux.tmpl").write_text("default linux\nlabel linux\n  kernel $uuid\n")
    (tmp_path / "root").mkdir()
    node = node_document(0, ports=[{"mac": "52:54:00:12:00:00", "ip": "127.0.0.1", "pxe": True}])
    daemon = daemon_factory(
        nodes=[node],
        config={
            "vendordata": {
                "dynamic_targets": f"ops@http://127.0.0.1:{free_port()}/vendordata",
                "failure_fatal": "true",
                "hold_boot": "true",
                "hold_retry": "20",
                "connect_timeout": "2",
                "read_timeout": "2",
            },
            "tftp": {
                "listen": f"127.0.0.1:{port}",
                "root": str(tmp_path / "root"),
                "templates": str(templates),
                "timeout": "1",
            },
        },
    )
    uuid = node["uuid"]

    def fetch(name: str) -> bytes:
        out = tmp_path / "out"
        out.unlink(missing_ok=True)
        done = run([curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{port}/{name}"], tmp_path)
        assert done.returncode == 0, done.stderr
        return out.read_bytes()

    kernel = f"#!ipxe\nkernel {uuid}/kernel\nboot\n".encode()
    assert fetch(IPXE) == kernel
    status, _, _ = daemon.get("/openstack/latest/vendor_data2.json")
    assert status == 500
    deadline = time.monotonic() + 30
    while True:
        _, document = daemon.admin("GET", f"/v1/nodes/{uuid}")
        if document.get("vendordata_error") is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling a real subprocess, with a deadline
    assert document["vendordata_error"] is not None, document
    held = fetch(IPXE).decode()
    assert held.startswith("#!ipxe\n") and "held: dynamic vendordata failed (ops)" in held
    assert "sleep 20\nreboot\n" in held and "kernel" not in held
    assert f"CONFIG {PXELINUX}" in fetch(PXELINUX).decode()
    # Registering the node again (a new revision) releases it.
    document = {k: v for k, v in document.items() if k != "vendordata_error"}
    assert daemon.admin("PUT", f"/v1/nodes/{uuid}", document)[0] == 200
    assert fetch(IPXE) == kernel
