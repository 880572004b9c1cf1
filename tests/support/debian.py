"""The Debian package for the tests that install it: built once per test run.

``built_deb`` (a session fixture, made visible by conftest.py) runs ``make deb`` into a
temporary directory the first time a test asks for it and hands every later test the
same file: tests/daemon/test_debian_package.py installs it on this machine, and
tests/daemon/test_systemd_units.py in a container booted with systemd.  The build needs no
root (``Rules-Requires-Root: no``) but takes a minute or more (the package carries its
Python dependencies, fetched from the package index).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_DEADLINE = 1800
BUILD_TOOLS = ("make", "dpkg-buildpackage", "dh_virtualenv")


def unavailable(reason: str) -> None:
    """Skip, except under CI, where a missing prerequisite is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def run(*command: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to completion within ``timeout``; any exit but 0 fails the test."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n"
        f"stdout: {result.stdout[-6000:]}\nstderr: {result.stderr[-6000:]}"
    )
    return result


@pytest.fixture(scope="session")
def built_deb() -> Iterator[Path]:
    """``make deb`` of this checkout, once per run; the .deb is removed at the end."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (see the needed list in .ci/run)")
    out = Path(tempfile.mkdtemp(prefix="metadatad-deb-"))
    try:
        run("make", "deb", f"DEB_OUT={out}", cwd=ROOT, timeout=BUILD_DEADLINE)
        (deb,) = out.glob("metadatad_*.deb")
        yield deb
    finally:
        shutil.rmtree(out, ignore_errors=True)


def package_dependencies(deb: Path) -> list[str]:
    """The package names in the .deb's Depends and Pre-Depends (the first of each set
    of alternatives, without versions): what a root must hold to install it offline."""
    fields = run("dpkg-deb", "--field", str(deb), "Depends", "Pre-Depends").stdout
    names: set[str] = set()
    for line in fields.splitlines():
        _, _, value = line.partition(":")
        for relation in value.split(","):
            first = relation.split("|")[0].strip()
            if first:
                names.add(first.split()[0].split(":")[0])
    return sorted(names)
