"""Which bytes a TFTP name gets: generated-name matching, templates, ownership and
static files with path safety."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from metadatad.core.records import NodeRecord
from metadatad.db.cache import CacheEntry
from metadatad.tftp.bootconfig import (
    VARIABLES,
    BootFiles,
    Match,
    NotOwned,
    Opened,
    Templates,
    match,
    variables,
)
from metadatad.tftp.protocol import TFTPError
from tests.support.factories import make_node

MAC = "52:54:00:12:00:00"
NODE = make_node(0, ports=[{"mac": MAC, "ip": "10.0.0.5", "pxe": True}])
RECORD = NodeRecord(NODE, 1, datetime(2026, 1, 1), datetime(2026, 1, 1))
UUID = NODE.uuid


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pxelinux.cfg/01-52-54-00-12-00-00", Match("pxelinux", "mac", MAC)),
        ("bios/pxelinux.cfg/01-52-54-00-AB-00-00", Match("pxelinux", "mac", "52:54:00:ab:00:00")),
        (f"pxelinux.cfg/{UUID.upper()}", Match("pxelinux", "uuid", UUID)),
        ("pxelinux.cfg/0A000005", Match("pxelinux", "ip", "10.0.0.5")),
        ("grub.cfg-01-52-54-00-12-00-00", Match("grub", "mac", MAC)),
        ("grub/grub.cfg-52-54-00-12-00-00", Match("grub", "mac", MAC)),
        ("EFI/BOOT/grub.cfg-52:54:00:12:00:00", Match("grub", "mac", MAC)),
        (f"grub.cfg-{UUID}", Match("grub", "uuid", UUID)),
        ("grub.cfg-0A000005", Match("grub", "ip", "10.0.0.5")),
        ("52-54-00-12-00-00.ipxe", Match("ipxe", "mac", MAC)),
        ("ipxe/01-52-54-00-12-00-00.ipxe", Match("ipxe", "mac", MAC)),
        ("525400120000.ipxe", Match("ipxe", "mac", MAC)),
        (f"{UUID}.ipxe", Match("ipxe", "uuid", UUID)),
        # not generated: static files or not found
        ("pxelinux.cfg/default", None),
        ("pxelinux.cfg/0A00000", None),  # PXELINUX's shortened hex walk
        ("pxelinux.cfg/01-52-54-00-12-00", None),
        ("grub.cfg", None),
        ("grub.cfg-0A0", None),
        ("pxelinux.0", None),
        ("pxelinux.cfg/01-52-54-00-12-00-00.bak", None),
        ("autoexec.ipxe", None),
    ],
)
def test_match(name: str, expected: Match | None) -> None:
    """Generated names are matched narrowly and canonicalised."""
    assert match(name) == expected


def test_variables_are_the_documented_set() -> None:
    """variables() fills exactly VARIABLES; unset ids are empty strings."""
    values = variables(RECORD, None, "10.0.0.5", "10.0.0.1", "c1")
    assert set(values) == set(VARIABLES)
    assert values["mac"] == MAC
    assert values["mac_dashed"] == "52-54-00-12-00-00"
    assert values["mac_hex"] == "525400120000"
    assert values["kernel_id"] == ""
    assert values["server"] == "10.0.0.1"
    assert (values["arch"], values["firmware"]) == ("x86_64", "uefi")


class Lookup:
    def __init__(self, *records: NodeRecord) -> None:
        self.records = records

    def _entry(self, found: list[NodeRecord]) -> CacheEntry:
        return CacheEntry(found[0] if found else None, float("inf"))

    def by_mac(self, mac: str) -> Any:
        return self._entry([r for r in self.records if any(p.mac == mac for p in r.node.ports)])

    def by_ip(self, ip: str) -> Any:
        return self._entry([r for r in self.records if ip in r.node.ips])

    def by_uuid(self, uuid: str) -> Any:
        return self._entry([r for r in self.records if r.node.uuid == uuid])


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "root" / "pxelinux.cfg").mkdir(parents=True)
    (tmp_path / "root" / "pxelinux.0").write_bytes(b"PXE")
    (tmp_path / "root" / "pxelinux.cfg" / "default").write_bytes(b"default config")
    (tmp_path / "root" / "sub").mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "root" / "escape").symlink_to(tmp_path / "secret")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "grub.tmpl").write_text("generic $mac\n")
    (tmp_path / "templates" / "grub-uefi.tmpl").write_text("uefi $uuid $server\n")
    return tmp_path


def files(tree: Path, owned: bool = True, serve_unowned: bool = False) -> BootFiles:
    return BootFiles(
        tree / "root",
        Templates(tree / "templates"),
        Lookup(RECORD),
        lambda uuid: owned,
        serve_unowned=serve_unowned,
        conductor="c1",
    )


def read(opened: Any) -> bytes:
    assert isinstance(opened, Opened)
    return bytes(opened.source.read(0, opened.source.size))


def test_renders_most_specific_template(tree: Path) -> None:
    """grub-uefi.tmpl beats grub.tmpl for a UEFI node; rendering is deterministic."""
    boot = files(tree)
    first = boot.open("grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "10.0.0.1")
    assert read(first) == f"uefi {UUID} 10.0.0.1\n".encode()
    assert first.kind == "grub" and first.node_uuid == UUID
    again = boot.open("grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "10.0.0.1")
    assert read(again) == read(first)


def test_hex_ip_name_only_for_the_requesting_client(tree: Path) -> None:
    """grub.cfg-<hex IP> renders for that client; another client's falls to static."""
    assert read(files(tree).open("grub.cfg-0A000005", "10.0.0.5", "10.0.0.1")).startswith(b"uefi")
    with pytest.raises(TFTPError) as raised:
        files(tree).open("grub.cfg-0A000005", "10.0.0.6", "10.0.0.1")
    assert raised.value.code == 1


def test_template_edits_are_seen_and_bad_ones_refused(tree: Path) -> None:
    """A changed file is re-read; an unknown variable is error 0 and a start-up problem."""
    boot = files(tree)
    template = tree / "templates" / "grub-uefi.tmpl"
    template.write_text("changed $hostname\n")
    os.utime(template, ns=(1, 1))
    assert read(boot.open("grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "s")) == (
        b"changed web-0.example.org\n"
    )
    template.write_text("broken $password\n")
    with pytest.raises(TFTPError) as raised:
        boot.open("grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "s")
    assert raised.value.code == 0
    (problem,) = boot.templates.check()
    assert "$password" in problem and "grub-uefi.tmpl" in problem
    template.write_text("cost: 5$\n")
    assert "'$$'" in boot.templates.check()[0]


def test_not_owned_is_not_found_unless_serve_unowned(tree: Path) -> None:
    """Another conductor's node: NotOwned (code 1); serve_unowned renders anyway."""
    with pytest.raises(NotOwned) as raised:
        files(tree, owned=False).open("grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "s")
    assert raised.value.code == 1 and raised.value.node_uuid == UUID
    opened = files(tree, owned=False, serve_unowned=True).open(
        "grub.cfg-01-52-54-00-12-00-00", "10.0.0.5", "s"
    )
    assert read(opened).startswith(b"uefi")


def test_unknown_node_or_missing_template_falls_back_to_static(tree: Path) -> None:
    """A generated name for no known node, or with no template: a static file."""
    static = tree / "root" / "pxelinux.cfg" / "01-52-54-00-99-99-99"
    static.write_bytes(b"static per-mac")
    opened = files(tree).open("pxelinux.cfg/01-52-54-00-99-99-99", "10.0.0.5", "s")
    assert read(opened) == b"static per-mac"
    with pytest.raises(TFTPError) as raised:
        files(tree).open("pxelinux.cfg/01-52-54-00-12-00-00", "10.0.0.5", "s")  # no template
    assert raised.value.code == 1


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../secret", 2),
        ("sub/../../secret", 2),
        ("..\\secret", 2),
        ("escape", 2),  # a symlink out of the root
        ("%2E%2E/secret", 1),  # no percent-decoding in TFTP: just a missing name
        ("sub", 2),  # a directory
        ("missing", 1),
        ("pxelinux.0/x", 1),
    ],
)
def test_static_refusals(tree: Path, name: str, code: int) -> None:
    """Traversal, symlinks out of the root and directories are refused."""
    with pytest.raises(TFTPError) as raised:
        files(tree).open(name, "10.0.0.5", "s")
    assert raised.value.code == code


@pytest.mark.parametrize("name", ["/pxelinux.0", "\\pxelinux.0", "C:\\pxelinux.0", "./pxelinux.0"])
def test_absolute_and_windows_names_are_inside_the_root(tree: Path, name: str) -> None:
    """Leading slashes, backslashes and drive letters are relative to the root."""
    assert read(files(tree).open(name, "10.0.0.5", "s")) == b"PXE"


def test_node_of_client(tree: Path) -> None:
    """Static transfers are attributed to the node owning the client's address."""
    assert files(tree).node_of_client("10.0.0.5") == UUID
    assert files(tree).node_of_client("10.0.0.6") is None
