# -*- test-case-name: tests.tftp.test_tftp_protocol -*-
"""What a read transfer sends: a file, bytes in memory, or either in netascii.
Sources do no I/O beyond reading their own open file, at the session's request."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Protocol, Self

# --------------------------------------------------------------------------- sources


class Source(Protocol):
    """What a transfer reads from: a fixed ``size`` and random-access ``read``.

    ``read(offset, length)`` returns exactly ``min(length, size - offset)`` bytes; the
    session aborts the transfer if a read comes back short (the file changed under it).
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes | memoryview: ...


class BytesSource:
    """A rendered file held in memory; reads are zero-copy memoryview slices."""

    __slots__ = ("_view", "size")

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(bytes(data))
        self.size = len(self._view)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


class FileSource:
    """A static file, read with ``pread`` (no shared file position) in chunks.

    One ``pread`` fills a chunk of many blocks and each block is a memoryview slice of
    it: a lock-step transfer costs a syscall per chunk, not per block. Not ``mmap``: a
    file truncated while mapped kills the whole daemon with SIGBUS on the next read.
    The size is taken once, at construction, so a growing file cannot make tsize lie.
    The source owns the file: ``close()`` closes it.
    """

    __slots__ = ("_buf", "_chunk", "_end", "_fd", "_file", "_start", "size")

    def __init__(self, file: BinaryIO | int, *, chunk: int = 1 << 17) -> None:
        self._file = None if isinstance(file, int) else file
        self._fd = file if isinstance(file, int) else file.fileno()
        self.size = os.fstat(self._fd).st_size
        self._chunk = chunk
        self._buf = memoryview(b"")
        self._start = self._end = 0  # file offsets held in _buf

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FileSource:
        """Open a regular file for serving.

        O_NOFOLLOW: the path should already be resolved (``paths.resolve``), so a symlink
        here means it was swapped in since. O_NONBLOCK: opening a FIFO must not hang the
        reactor. Raises ``IsADirectoryError`` / ``PermissionError`` for non-regular files.
        """
        flags = (
            os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        fd = os.open(path, flags)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(f"{os.fspath(path)} is a directory")
            if not stat.S_ISREG(mode):
                raise PermissionError(f"{os.fspath(path)} is not a regular file")
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        """The open file (HTTP reads it with its own ``pread`` and ``fstat``)."""
        return self._fd

    def read(self, offset: int, length: int) -> memoryview:
        start = offset - self._start
        if start < 0 or offset + length > self._end:
            # Outside the chunk: a new one from here (a retransmitted window that
            # starts before the chunk, or the next chunk; reads mostly move forward).
            chunk = os.pread(self._fd, max(length, self._chunk), offset)
            self._buf = memoryview(chunk)
            self._start = offset
            self._end = offset + len(chunk)
            start = 0
            if len(chunk) < length:
                return self._buf  # short: end of file (or it shrank)
        return self._buf[start : start + length]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._buf = memoryview(b"")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetasciiSource:
    """Netascii view of another source (LF -> CR LF, CR -> CR NUL) with its exact size.

    The mapping is per byte, so chunks convert independently and the size is one pass
    counting CR and LF. Reads are expected to move forward; a rewind within ``keep``
    bytes is served from the buffer, an older one re-converts from the start (slow but
    correct; only netascii test clients ever get here).
    """

    def __init__(self, inner: Source, *, chunk: int = 1 << 16, keep: int = 1 << 20) -> None:
        self._inner = inner
        self._inner_size = inner.size
        self._chunk = chunk
        self._keep = keep
        extra = 0
        offset = 0
        while offset < self._inner_size:
            raw = bytes(inner.read(offset, min(chunk, self._inner_size - offset)))
            if not raw:
                break
            extra += raw.count(b"\n") + raw.count(b"\r")
            offset += len(raw)
        self.size = self._inner_size + extra
        self._buf = bytearray()
        self._out_start = 0  # output offset of self._buf[0]
        self._in_pos = 0  # next input offset to convert

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset < self._out_start:
            self._buf.clear()
            self._out_start = self._in_pos = 0
        buf = self._buf
        while self._out_start + len(buf) < end and self._in_pos < self._inner_size:
            drop = min(offset - self._keep - self._out_start, len(buf))
            if drop > 0:
                del buf[:drop]
                self._out_start += drop
            raw = bytes(
                self._inner.read(self._in_pos, min(self._chunk, self._inner_size - self._in_pos))
            )
            if not raw:
                break
            self._in_pos += len(raw)
            buf += raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        start = offset - self._out_start
        with memoryview(buf) as view:
            return bytes(view[start : start + max(0, end - offset)])
