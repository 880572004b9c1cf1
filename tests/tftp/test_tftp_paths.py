"""TFTP path safety: name normalization and symlink-aware resolution inside the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metadatad.tftp.paths import UnsafePath, normalize, resolve, safe_path


@pytest.mark.parametrize(
    ("requested", "normalized"),
    [
        ("pxelinux.0", "pxelinux.0"),
        ("/pxelinux.0", "pxelinux.0"),
        ("///pxelinux.cfg//01-52-54-00-12-34-56", "pxelinux.cfg/01-52-54-00-12-34-56"),
        ("\\boot\\bootx64.efi", "boot/bootx64.efi"),
        ("C:\\boot\\bootx64.efi", "boot/bootx64.efi"),
        ("c:/grub/grub.cfg", "grub/grub.cfg"),
        ("C:grub.cfg", "grub.cfg"),
        ("./a/./b/", "a/b"),
        ("...", "..."),
        ("..foo/bar..", "..foo/bar.."),
        ("a:b", "b"),  # a leading one-letter "drive" is always stripped, like tftp-hpa's rule
        ("dir/a:b", "dir/a:b"),
        # No percent-decoding in TFTP: this is a literal (and absent) file name.
        ("%2E%2E/%2E%2E/etc/passwd", "%2E%2E/%2E%2E/etc/passwd"),
        ("grub.cfg-01-52-54-00-12-34-56", "grub.cfg-01-52-54-00-12-34-56"),
    ],
)
def test_normalize(requested: str, normalized: str) -> None:
    assert normalize(requested) == normalized


@pytest.mark.parametrize(
    "requested",
    [
        "..",
        "../etc/passwd",
        "/../etc/passwd",
        "a/../../b",
        "a/..",
        "..\\..\\windows",
        "boot\\..\\..\\x",
        "C:..\\x",
        "C:\\..",
        "a\x00b",
        "a\nb",
        "a\rb",
        "tab\there",
        "del\x7f",
        "",
        "/",
        "\\",
        "C:",
        "C:\\",
        ".",
        "./",
    ],
)
def test_normalize_refuses(requested: str) -> None:
    with pytest.raises(UnsafePath) as info:
        normalize(requested)
    assert info.value.code == 2
    assert info.value.message


@given(st.text(max_size=40))
def test_normalize_output_is_always_a_clean_relative_path(name: str) -> None:
    try:
        result = normalize(name)
    except UnsafePath:
        return
    parts = result.split("/")
    assert result and not result.startswith("/") and "\\" not in result
    assert ".." not in parts and "." not in parts and "" not in parts
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in result)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root (the TFTP root) beside tmp/outside and tmp/root-private."""
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "bootx64.efi").write_bytes(b"efi")
    (root / "pxelinux.0").write_bytes(b"pxe")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "root-private").mkdir()
    (tmp_path / "root-private" / "secret").write_bytes(b"private")
    return root


def test_resolve_plain_files(tree: Path) -> None:
    assert resolve(tree, "pxelinux.0") == (tree / "pxelinux.0").resolve()
    assert resolve(tree, "boot/bootx64.efi").read_bytes() == b"efi"
    assert safe_path(str(tree), "\\boot\\bootx64.efi").read_bytes() == b"efi"


def test_missing_file_resolves_but_does_not_exist(tree: Path) -> None:
    path = resolve(tree, "boot/missing.efi")
    assert path == tree.resolve() / "boot" / "missing.efi"
    assert not path.exists()


def test_symlinks_inside_the_root_are_followed(tree: Path) -> None:
    (tree / "grubx64.efi").symlink_to("boot/bootx64.efi")
    (tree / "efi").symlink_to(tree / "boot")  # absolute, but still inside
    assert resolve(tree, "grubx64.efi").read_bytes() == b"efi"
    assert resolve(tree, "efi/bootx64.efi") == (tree / "boot" / "bootx64.efi").resolve()


def test_symlink_to_a_file_outside_is_refused(tree: Path) -> None:
    (tree / "passwd").symlink_to(tree.parent / "outside" / "secret")
    with pytest.raises(UnsafePath):
        resolve(tree, "passwd")


def test_symlink_to_a_directory_outside_is_refused(tree: Path) -> None:
    (tree / "etc").symlink_to("../outside")
    with pytest.raises(UnsafePath):
        resolve(tree, "etc/secret")
    with pytest.raises(UnsafePath):
        resolve(tree, "etc/missing")  # refused at the link, whether or not the file exists


def test_sibling_with_the_root_as_string_prefix_is_outside(tree: Path) -> None:
    # /tmp/x/root-private starts with "/tmp/x/root": a string-prefix check would allow it.
    (tree / "priv").symlink_to("../root-private")
    with pytest.raises(UnsafePath):
        resolve(tree, "priv/secret")


def test_a_path_that_leaves_and_comes_back_is_refused(tree: Path) -> None:
    outside = tree.parent / "outside"
    (outside / "back").symlink_to(tree / "boot")
    (tree / "detour").symlink_to(outside)
    # The final real path is inside the root, but the walk went through "outside".
    assert os.path.realpath(tree / "detour" / "back" / "bootx64.efi").startswith(
        str(tree.resolve())
    )
    with pytest.raises(UnsafePath):
        resolve(tree, "detour/back/bootx64.efi")


def test_root_given_through_a_symlink(tree: Path) -> None:
    alias = tree.parent / "alias"
    alias.symlink_to(tree)
    assert resolve(alias, "boot/bootx64.efi") == (tree / "boot" / "bootx64.efi").resolve()


def test_symlink_loop_stays_inside_and_fails_on_open(tree: Path) -> None:
    (tree / "loop").symlink_to("loop")
    path = resolve(tree, "loop")
    with pytest.raises(OSError):
        path.read_bytes()


@pytest.mark.parametrize("relative", ["", "../x", "a/../b", "/etc/passwd"])
def test_resolve_refuses_unnormalized_input(tree: Path, relative: str) -> None:
    with pytest.raises(UnsafePath):
        resolve(tree, relative)


@pytest.mark.parametrize(
    "requested", ["../outside/secret", "..\\outside\\secret", "/../root-private/secret"]
)
def test_safe_path_refuses_traversal(tree: Path, requested: str) -> None:
    with pytest.raises(UnsafePath):
        safe_path(tree, requested)


def test_absolute_request_is_relative_to_the_root(tree: Path) -> None:
    assert safe_path(tree, "/pxelinux.0").read_bytes() == b"pxe"
    # An absolute host path is just a (missing) name under the root.
    path = safe_path(tree, str(tree.parent / "outside" / "secret"))
    assert str(path).startswith(str(tree.resolve()) + os.sep)
    assert not path.exists()
