"""Path safety for TFTP file names.

Two steps, kept apart so each is testable on its own:

``normalize(filename)`` is pure string logic: backslashes become slashes (Windows-style
PXE clients send ``boot\\bootx64.efi``), a leading drive letter (``C:``) and leading
slashes are stripped, empty and ``.`` components collapse, and any ``..`` component or
control character is refused. TFTP has no percent-encoding, so ``%2E%2E`` is an ordinary
(odd) file name: it is left as it is and is then simply not found. (curl decodes its URL
path before sending, so ``tftp://host/%2E%2E/x`` arrives as ``../x`` and is refused.)

``resolve(root, relative)`` walks the normalized name inside ``root`` one component at
a time, resolving symlinks, and refuses any step that leaves the root. Containment is
checked by path components (``os.path.commonpath``), not by string prefix, so
``/srv/tftp-private`` is not inside ``/srv/tftp``. Checking every step, not only the end,
refuses a link that goes out of the root and comes back through an outside directory.
What remains is a race with someone who can write inside the root between ``resolve``
and ``open``; ``FileSource.open`` uses O_NOFOLLOW for the last component.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["UnsafePath", "normalize", "resolve", "safe_path"]

ACCESS_VIOLATION = 2  # TFTP error code (same value as protocol.ErrorCode.ACCESS_VIOLATION)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")


class UnsafePath(ValueError):
    """A file name refused for safety; answer it with ERROR ``code`` (2, access violation)."""

    code = ACCESS_VIOLATION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def normalize(filename: str) -> str:
    """Turn a requested name into a relative POSIX path (``"a/b"``) or raise ``UnsafePath``."""
    if _CONTROL.search(filename):
        raise UnsafePath("file name contains control characters")
    name = filename.replace("\\", "/")
    if _DRIVE.match(name):
        name = name[2:]
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("file name contains '..'")
    if not parts:
        raise UnsafePath("empty file name")
    return "/".join(parts)


def resolve(root: str | os.PathLike[str], relative: str) -> Path:
    """Absolute real path of ``relative`` (a ``normalize`` result) inside ``root``.

    Symlinks are followed one component at a time; one that leads outside the root is
    ``UnsafePath``. Missing components are not an error here: the path is returned and
    opening it fails with ``FileNotFoundError`` (TFTP error 1).
    """
    real_root = os.path.realpath(root)
    current = real_root
    parts = relative.split("/")
    if not relative or ".." in parts or relative.startswith("/"):
        raise UnsafePath("not a normalized relative path")
    for part in parts:
        current = os.path.realpath(os.path.join(current, part))
        if os.path.commonpath([real_root, current]) != real_root:
            raise UnsafePath("path leaves the TFTP root")
    return Path(current)


def safe_path(root: str | os.PathLike[str], filename: str) -> Path:
    """``resolve(root, normalize(filename))``."""
    return resolve(root, normalize(filename))
