# -*- test-case-name: tests.dhcp.test_dhcp_dnsmasq -*-
"""The ``dnsmasq`` provider: per-MAC host files and per-node option files.

dnsmasq (2.73+) started with ``--dhcp-hostsdir=HOSTSDIR --dhcp-optsdir=OPTSDIR
--dhcp-match=set:ipxe,175`` watches both directories with inotify and re-reads a file
when it is closed after writing or renamed into place; it ignores names starting with
a dot.  So every file is written to a dotfile that then takes its name atomically
(:mod:`metadatad.dhcp.files`), and a batch is flushed to disk with one ``syncfs``
before its nodes count as pushed: dnsmasq never reads a partial file, and is never
signalled (dnsmasq 2.86-2.90 crash on SIGHUP
once a host entry with ``set:`` tags has leased: see docs/dhcp.md).

* ``HOSTSDIR/metadatad-<mac>.conf``: ``<mac>,set:node-<uuid>[,<ip>,<host name>]`` —
  tags the MAC with its node and pins its port's registered address (the metadata
  site knows callers by it); a deleted node's MAC becomes ``<mac>,ignore`` (dnsmasq
  keeps a removed file's entries until restarted, so files are rewritten, never
  deleted).
* ``OPTSDIR/metadatad-<uuid>.conf``: the node's options, each line
  ``tag:node-<uuid>,<option>,<value>``; empty for a deleted node.

Every file starts with a comment naming the owner and the fencing generation it was
written under; a file written under a newer generation is never overwritten by an
older one (a conductor that was paused while its nodes were taken over).  The
directories may therefore be shared by all conductors (NFS, a shared volume).  Only
files whose content changes are written: on a takeover the option file (new owner,
address and generation), not the host files (same entry); see :meth:`write` for why
the fence still holds.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, FirstError, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from metadatad.core.bootmapping import BootMapping
from metadatad.dhcp.files import SpareFiles
from metadatad.dhcp.provider import PushError

__all__ = ["DnsmasqProvider", "host_entry", "host_file", "opts_file"]


def _find_syncfs() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _find_syncfs()
_HEADER = re.compile(rb"^# metadatad owner=(\S*) generation=(\d+)(?: node=(\S+))?")
# Our files are a few hundred bytes; a longer one is not ours and gets replaced.
_MAX_READ = 64 * 1024


@attrs.frozen
class _Header:
    """A file's first line, parsed (``node`` empty: none named, or not our header)."""

    owner: str
    generation: int
    node: str


def _tag(node_uuid: str) -> str:
    return f"node-{node_uuid}"


def _header(owner: str, generation: int, node_uuid: str) -> str:
    return f"# metadatad owner={owner} generation={generation} node={node_uuid}\n"


def host_entry(mapping: BootMapping, mac: str) -> str:
    """The ``dhcp-host`` line of ``mac``: its tag, then the port's registered address
    (IPv6 in brackets) and the node's host name, so the machine leases the address the
    metadata site knows it by; ``<mac>,ignore`` for a withdrawn MAC."""
    if mapping.removed:
        return f"{mac},ignore"
    fields = [mac, f"set:{_tag(mapping.node_uuid)}"]
    address = mapping.address_of(mac)
    if address:
        fields.append(f"[{address}]" if ":" in address else address)
        if mapping.hostname:
            # The first label: dnsmasq adds its own domain (and warns about others).
            fields.append(mapping.hostname.split(".", 1)[0])
    return ",".join(fields)


def host_file(mapping: BootMapping, mac: str, owner: str, generation: int) -> str:
    """The text of the host file of ``mac``."""
    return _header(owner, generation, mapping.node_uuid) + host_entry(mapping, mac) + "\n"


def opts_file(mapping: BootMapping, owner: str, generation: int) -> str:
    """The text of the node's option file (dnsmasq ``dhcp-optsfile`` syntax)."""
    tag = f"tag:{_tag(mapping.node_uuid)}"
    lines = [_header(owner, generation, mapping.node_uuid)]
    for option in mapping.options:
        name = option.name
        if option.ip_version == 6:
            # "tag:ipxe6,59" -> "tag:ipxe6,option6:59"
            head, _, code = name.rpartition(",")
            name = f"{head},option6:{code}" if head else f"option6:{code}"
        elif name == "255":
            # dnsmasq's name for the BOOTP siaddr (next-server) it otherwise fills
            # with its own address.
            name = "option:server-ip-address"
        lines.append(f"{tag},{name},{option.value}\n")
    return "".join(lines)


def host_file_name(mac: str) -> str:
    return f"metadatad-{mac.replace(':', '-')}.conf"


def opts_file_name(node_uuid: str) -> str:
    return f"metadatad-{node_uuid}.conf"


class DnsmasqProvider:
    """Writes mappings into dnsmasq's watched directories (on a small threadpool:
    file I/O never runs on the reactor)."""

    name = "dnsmasq"

    def __init__(
        self,
        hostsdir: str,
        optsdir: str,
        owner: str,
        reactor: Any,
        *,
        threads: int = 4,
        fsync: str = "batch",
        run: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``fsync``: ``"file"`` fsyncs every file before its rename; ``"batch"`` (the
        default) leaves that to :meth:`flush`, one ``syncfs`` per directory per batch
        (the pusher records a batch as pushed only after it); ``"none"`` for tests.
        ``run(f, *args)`` replaces the threadpool in tests (call at once)."""
        self.hostsdir = hostsdir
        self.optsdir = optsdir
        self.owner = owner
        self._fsync = fsync
        self._files = SpareFiles(owner, fsync=fsync == "file")
        self._threads = max(1, threads)
        self._pool: ThreadPool | None = None
        if run is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="metadatad-dnsmasq")
            pool = self._pool

            def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, f, *args)

        self._run = run

    def start(self) -> None:
        if self._pool is not None:
            self._pool.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()

    def push(
        self, mapping: BootMapping, previous: BootMapping | None, generation: int
    ) -> Deferred[None]:
        return self._run(self.write, mapping, previous, generation)

    def push_many(
        self, items: Sequence[tuple[BootMapping, BootMapping | None, int]]
    ) -> Deferred[list[PushError | None]]:
        """Push many nodes: ``(mapping, previous, generation)`` each; fires with one
        outcome per item, in order (None: written, or its :class:`PushError`).

        The items are split into one thread job per writer thread rather than one
        job per node: a takeover moves thousands of nodes, and a thread hop plus a
        Deferred per node cost more reactor time than writing the node's files."""
        groups = [list(items[i :: self._threads]) for i in range(self._threads)]
        groups = [group for group in groups if group]
        d = DeferredList(
            [maybeDeferred(self._run, self.write_many, group) for group in groups],
            fireOnOneErrback=True,
            consumeErrors=True,
        )

        def merge(results: list[tuple[bool, list[PushError | None]]]) -> list[PushError | None]:
            outcomes: list[PushError | None] = [None] * len(items)
            for i, (_, group) in enumerate(results):
                # Group i holds items i, i + threads, i + 2 * threads...
                outcomes[i :: self._threads] = group
            return outcomes

        def unwrap(failure: Failure) -> Failure:
            # fireOnOneErrback wraps the first failure: pass on the error itself.
            error = failure.value
            return error.subFailure if isinstance(error, FirstError) else failure

        return d.addCallbacks(merge, unwrap)

    def write_many(
        self, items: Sequence[tuple[BootMapping, BootMapping | None, int]]
    ) -> list[PushError | None]:
        """(Off the reactor.)  :meth:`write` each item; a failed node does not stop
        the others."""
        outcomes: list[PushError | None] = []
        for mapping, previous, generation in items:
            try:
                self.write(mapping, previous, generation)
            except PushError as e:
                outcomes.append(e)
            else:
                outcomes.append(None)
        return outcomes

    def flush(self) -> Deferred[None] | None:
        """Make the files written so far durable (before a batch is recorded), and
        remove the spare dotfiles (no write is in flight)."""
        return self._run(self._flush)

    def _flush(self) -> None:
        self._files.tidy()
        if self._fsync == "batch":
            self.sync()

    def sync(self) -> None:
        """(Off the reactor.)  ``syncfs`` the filesystems of both directories: one
        journal commit for a whole batch instead of two fsyncs per node."""
        for directory in {self.hostsdir, self.optsdir}:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _SYNCFS is None or _SYNCFS(fd) != 0:
                    os.fsync(fd)
                    os.sync()
            finally:
                os.close(fd)

    def write(self, mapping: BootMapping, previous: BootMapping | None, generation: int) -> None:
        """(Off the reactor.)  Write the node's files that changed; raise :class:`PushError`.

        Fencing: nothing is written if any of the node's files, its option file
        included, was written under a newer generation.  The option file names the
        owner's TFTP address and is rewritten whenever its owner or generation changes,
        so it always carries the node's current generation: a host file whose entry
        did not change keeps its old header and is not rewritten (most host files on a
        takeover), yet a stale writer of this node still finds the newer option file.
        An ``ignore`` entry (retraction, or a MAC the node no longer has) never
        replaces a host file written for another node: that node has the MAC now."""
        hosts = [
            (
                os.path.join(self.hostsdir, host_file_name(mac)),
                host_file(mapping, mac, self.owner, generation),
                mapping.removed,
            )
            for mac in mapping.macs
        ]
        if previous is not None and not mapping.removed:
            # A MAC the node no longer has: ignore it from now on.
            gone = BootMapping(node_uuid=mapping.node_uuid, macs=(), removed=True)
            hosts.extend(
                (
                    os.path.join(self.hostsdir, host_file_name(mac)),
                    host_file(gone, mac, self.owner, generation),
                    True,
                )
                for mac in previous.macs
                if mac not in mapping.macs
            )
        opts = (
            os.path.join(self.optsdir, opts_file_name(mapping.node_uuid)),
            opts_file(mapping, self.owner, generation),
            False,
        )
        # Options before tags (a tagged MAC finds its options), and tags withdrawn
        # before the options are emptied.
        files = [opts, *hosts] if not mapping.removed else [*hosts, opts]
        writes: list[tuple[str, bytes]] = []
        for path, text, ignore in files:
            data = text.encode("utf-8")
            existing = self._existing(path)
            if existing is None:
                writes.append((path, data))
                continue
            header, content = existing
            if ignore and header.node not in ("", mapping.node_uuid):
                continue  # the MAC's current owner wrote it: not ours to withdraw
            if header.generation > generation:
                raise PushError(
                    f"{path} was written by {header.owner} at "
                    f"generation {header.generation}, newer than {generation}",
                    permanent=True,
                )
            # The option file always (its header is the node's fence); a host file
            # only if its entry changed.
            if path == opts[0]:
                unchanged = content == data
            else:
                unchanged = content.partition(b"\n")[2] == data.partition(b"\n")[2]
            if not unchanged:
                writes.append((path, data))
        for path, data in writes:
            self._replace(path, data)

    def _existing(self, path: str) -> tuple[_Header, bytes] | None:
        """The file's header and content (None: no file)."""
        try:
            with open(path, "rb") as f:
                content = f.read(_MAX_READ)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PushError(f"cannot read {path}: {e.strerror}") from None
        match = _HEADER.match(content)
        if match is None:
            return _Header("", 0, ""), content
        header = _Header(
            match.group(1).decode(errors="replace"),
            int(match.group(2)),
            (match.group(3) or b"").decode(errors="replace"),
        )
        return header, content

    def _replace(self, path: str, data: bytes) -> None:
        try:
            self._files.replace(path, data)
        except OSError as e:
            raise PushError(f"cannot write {path}: {e.strerror}") from None
