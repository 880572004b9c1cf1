# -*- test-case-name: tests.dhcp.test_dhcp_guarantees -*-
"""Replace small files atomically, recycling inodes (for the dnsmasq provider).

A reader (dnsmasq, through inotify) must only ever see a whole old or a whole new
file, so a file is never written in place: the new content goes to a dotfile (ignored
by dnsmasq), which then takes the file's name in one ``rename``.

Creating that dotfile is what costs: a new inode is 1-2 ms on a busy ext4, against
0.05 ms for writing and renaming (measured: see docs/benchmarks-failover.md), and a
takeover rewrites thousands of files.  So each writer thread keeps one *spare* dotfile
per directory, ``.metadatad-spare-<owner>-<pid>-<n>``: the new content is written into
it and it is swapped with the file by ``renameat2(RENAME_EXCHANGE)``, atomically; the
spare then holds the old content, and its inode is reused for the next file.  Only
this thread of this process writes its spare, so writers never share one.  Where the
filesystem cannot exchange (NFS, no ``renameat2``), the spare is renamed over the file
(a new spare per file, as before).  :meth:`SpareFiles.tidy` removes the spares once no
write is in flight (the pusher flushes after every batch): no dotfile outlives a batch
except after a crash (at most one per writer thread and directory, ignored by dnsmasq).

Durability is the caller's: it syncs the filesystem before it records a batch as
pushed.  A crash before that can leave a file with its previous content (the spare's
data blocks are overwritten in place, which ext4 does not order before the rename),
which is why nothing unrecorded counts: it is pushed again after the restart, and a
file whose content differs is rewritten.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from typing import Any

__all__ = ["SpareFiles"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_CANNOT_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


def _find_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _find_renameat2()


class SpareFiles:
    """Atomic replacement of small files through per-thread spare dotfiles."""

    def __init__(self, owner: str, *, fsync: bool = False, exchange: bool = True) -> None:
        """``fsync``: fsync each file's content before it takes the name;
        ``exchange``: False always renames (the old way; tests, comparison)."""
        self._prefix = f".metadatad-spare-{owner}-{os.getpid()}-"
        self._fsync = fsync
        self._exchange = exchange and _RENAMEAT2 is not None
        self._local = threading.local()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._spares: set[str] = set()

    def replace(self, path: str, data: bytes) -> None:
        """(Off the reactor.)  Make ``data`` the content of ``path``; raises OSError."""
        directory = os.path.dirname(path)
        spare = self._spare(directory)
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            view = memoryview(data)
            offset = 0
            while offset < len(data):
                offset += os.pwrite(fd, view[offset:], offset)
            os.ftruncate(fd, len(data))
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self._exchange and self._swap(spare, path):
            return
        os.rename(spare, path)  # a new file, or no exchange here: the spare is used up

    def tidy(self) -> None:
        """(No write in flight.)  Remove this process's spares."""
        with self._lock:
            spares, self._spares = self._spares, set()
        for spare in spares:
            try:
                os.unlink(spare)
            except FileNotFoundError:
                pass

    def _spare(self, directory: str) -> str:
        number = getattr(self._local, "number", None)
        if number is None:
            number = self._local.number = next(self._numbers)
        spare = os.path.join(directory, f"{self._prefix}{number}")
        with self._lock:
            self._spares.add(spare)
        return spare

    def _swap(self, spare: str, path: str) -> bool:
        """Exchange ``spare`` and ``path``; False if ``path`` does not exist yet or the
        filesystem cannot exchange (then never tried again)."""
        if (
            _RENAMEAT2(
                _AT_FDCWD, os.fsencode(spare), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE
            )
            == 0
        ):
            return True
        error = ctypes.get_errno()
        if error == errno.ENOENT:
            return False
        if error in _CANNOT_EXCHANGE:
            self._exchange = False
            return False
        raise OSError(error, os.strerror(error), path)
