# -*- test-case-name: tests.tftp.test_tftp_bootconfig -*-
"""Which bytes a TFTP file name gets: a per-node config rendered from a template, or a
static file under the root.

Generated names are matched narrowly (a loose match would send PXELINUX's walk of
hex-IP names through the node lookup, and a failure there halts a boot), anywhere
under a directory prefix, MAC hex digits in either case:

=========  ==========================================================================
pxelinux   ``pxelinux.cfg/01-<mac a-b-c-d-e-f>``, ``pxelinux.cfg/<node uuid>``,
           ``pxelinux.cfg/<client IPv4 as 8 hex digits>``
grub       ``grub.cfg-01-<mac>``, ``grub.cfg-<mac>`` (dashes or colons; builds differ
           on the ``01-``), ``grub.cfg-<node uuid>``, ``grub.cfg-<client IP hex>``
ipxe       ``[01-]<mac>.ipxe`` (``${mac:hexhyp}``, ``${mac}``, ``${mac:hexraw}``),
           ``<node uuid>.ipxe``
=========  ==========================================================================

A hex-IP name is rendered only when it is the requesting client's own address; the
shortened forms PXELINUX and GRUB try next, ``pxelinux.cfg/default`` and ``grub.cfg``
are static files.  A name that matches but whose node is unknown, or whose kind has no
template, falls back to a static file of that name.  A node this conductor does not
own gets "file not found" at once unless ``serve_unowned``.

A config is rendered once per transfer, before the first packet, into memory: the
transfer sends exactly those bytes and tsize is their length.  The variables depend
only on the stored node and on the addresses of the request, never on the time, so a
UEFI size probe and the download that follows get the same bytes.

Templates are ``string.Template`` files (``$name`` / ``${name}``; ``$$`` is a dollar)
in the templates directory, chosen by the node's boot arch and firmware, first found
of ``<kind>-<arch>-<firmware>.tmpl``, ``<kind>-<firmware>.tmpl``, ``<kind>-<arch>.tmpl``,
``<kind>.tmpl``.  A template naming a variable outside :data:`VARIABLES` is refused at
start-up, and if edited in later, when used (error 0, logged).  Files are re-read when
their modification time or size changes.
"""

from __future__ import annotations

import errno
import os
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from metadatad.core.records import NodeRecord
from metadatad.tftp import paths
from metadatad.tftp.hold import HOLD_KINDS, hold_stanza
from metadatad.tftp.protocol import BytesSource, ErrorCode, FileSource, Source, TFTPError

__all__ = [
    "KINDS",
    "VARIABLES",
    "BootFiles",
    "CachedLookup",
    "NodeLookup",
    "NotOwned",
    "Opened",
    "TemplateError",
    "Templates",
    "match",
    "variables",
]

U = TypeVar("U")

KINDS: Final = ("pxelinux", "grub", "ipxe")

#: Every variable a template may use; a node's missing value is the empty string.
VARIABLES: Final = {
    "uuid": "node uuid",
    "name": "node name",
    "hostname": "node host name",
    "project_id": "node project",
    "image_id": "node image id",
    "kernel_id": "node kernel id",
    "ramdisk_id": "node ramdisk id",
    "arch": "boot arch of the node (x86_64, aarch64...)",
    "firmware": "boot firmware of the node (bios or uefi)",
    "mac": "MAC of the booting port, lower case with colons",
    "mac_dashed": "the same MAC with dashes (pxelinux's form)",
    "mac_hex": "the same MAC as 12 hex digits",
    "ip": "address of the booting port in the node record, or empty",
    "client_ip": "address the request came from",
    "server": "address of this conductor the client contacted (for tftp:// URLs)",
    "conductor": "this conductor's host name",
    "http_address": "this conductor's [conductor] http_address, or empty",
    "boot_url": "base URL of this conductor's boot files: <http_address>/boot when it "
    "has an http_address, else tftp://<server>",
}

_HEX = "[0-9a-fA-F]"
_MAC_DASHED = f"{_HEX}{{2}}(?:-{_HEX}{{2}}){{5}}"
_MAC_COLON = f"{_HEX}{{2}}(?::{_HEX}{{2}}){{5}}"
_MAC_RAW = f"{_HEX}{{12}}"
_UUID = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_IP_HEX = f"{_HEX}{{8}}"
_PREFIX = r"(?:.*/)?"
_PATTERNS: Final = (
    (
        "pxelinux",
        re.compile(
            rf"{_PREFIX}pxelinux\.cfg/(?:01-(?P<mac>{_MAC_DASHED})|(?P<uuid>{_UUID})"
            rf"|(?P<iphex>{_IP_HEX}))"
        ),
    ),
    (
        "grub",
        re.compile(
            rf"{_PREFIX}grub\.cfg-(?:(?:01-)?(?P<mac>{_MAC_DASHED}|{_MAC_COLON})"
            rf"|(?P<uuid>{_UUID})|(?P<iphex>{_IP_HEX}))"
        ),
    ),
    (
        "ipxe",
        re.compile(
            rf"{_PREFIX}(?:(?:01-)?(?P<mac>{_MAC_DASHED}|{_MAC_COLON}|{_MAC_RAW})"
            rf"|(?P<uuid>{_UUID}))\.ipxe"
        ),
    ),
)
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@attrs.frozen
class Match:
    """A generated name: its kind and the key that finds the node."""

    kind: str
    key: str  # "mac", "uuid" or "ip"
    value: str  # canonical: MAC with colons, lower-case uuid, dotted IPv4


def match(name: str) -> Match | None:
    """The generated config a normalized file name asks for, if any."""
    for kind, pattern in _PATTERNS:
        found = pattern.fullmatch(name)
        if found is None:
            continue
        groups = {k: v for k, v in found.groupdict().items() if v}
        if "mac" in groups:
            digits = re.sub("[-:]", "", groups["mac"]).lower()
            mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
            return Match(kind, "mac", mac)
        if "uuid" in groups:
            return Match(kind, "uuid", groups["uuid"].lower())
        value = int(groups["iphex"], 16)
        return Match(kind, "ip", ".".join(str((value >> s) & 0xFF) for s in (24, 16, 8, 0)))
    return None


# --------------------------------------------------------------------------- templates


class TemplateError(Exception):
    """A template that cannot be used; ``str()`` names the file and the problem."""


class Templates:
    """The template files of one directory, cached by modification time and size."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, tuple[int, int, string.Template | TemplateError]] = {}

    def check(self) -> list[str]:
        """Problems of the templates present now (for start-up), one line each."""
        problems = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return []
        for name in names:
            if name.endswith(".tmpl") and name.split("-", 1)[0].split(".")[0] in KINDS:
                loaded = self._load(name)
                if isinstance(loaded, TemplateError):
                    problems.append(str(loaded))
        return problems

    def find(self, kind: str, arch: str, firmware: str) -> string.Template | None:
        """The most specific template for ``kind`` on this arch and firmware, or None.

        Raises :class:`TemplateError` if that template is broken."""
        candidates = []
        arch_ok = bool(_SAFE_PART.fullmatch(arch))
        firmware_ok = bool(_SAFE_PART.fullmatch(firmware))
        if arch_ok and firmware_ok:
            candidates.append(f"{kind}-{arch}-{firmware}.tmpl")
        if firmware_ok:
            candidates.append(f"{kind}-{firmware}.tmpl")
        if arch_ok:
            candidates.append(f"{kind}-{arch}.tmpl")
        candidates.append(f"{kind}.tmpl")
        for name in candidates:
            loaded = self._load(name)
            if isinstance(loaded, TemplateError):
                raise loaded
            if loaded is not None:
                return loaded
        return None

    def _load(self, name: str) -> string.Template | TemplateError | None:
        path = self.directory / name
        try:
            info = os.stat(path)
        except OSError:
            self._cache.pop(name, None)
            return None
        cached = self._cache.get(name)
        if cached is not None and cached[:2] == (info.st_mtime_ns, info.st_size):
            return cached[2]
        loaded: string.Template | TemplateError
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            loaded = TemplateError(f"{path}: cannot read the template: {e}")
        else:
            loaded = _compile(path, text)
        self._cache[name] = (info.st_mtime_ns, info.st_size, loaded)
        return loaded


def _compile(path: Path, text: str) -> string.Template | TemplateError:
    template = string.Template(text)
    if not template.is_valid():
        return TemplateError(f"{path}: a '$' that starts no variable (write '$$' for '$')")
    unknown = sorted(set(template.get_identifiers()) - set(VARIABLES))
    if unknown:
        return TemplateError(
            f"{path}: unknown variable {', '.join('$' + u for u in unknown)} "
            f"(known: {', '.join(sorted(VARIABLES))})"
        )
    return template


def variables(
    record: NodeRecord,
    mac: str | None,
    client_ip: str,
    server: str,
    conductor: str,
    *,
    http_address: str = "",
) -> dict[str, str]:
    """The template variables for ``record`` booting from port ``mac`` (None: its first
    PXE port, else its first port)."""
    node = record.node
    port = None
    for candidate in node.ports:
        if candidate.mac == mac:
            port = candidate
            break
    if port is None:
        pxe = [p for p in node.ports if p.pxe] or list(node.ports)
        port = pxe[0] if pxe else None
    port_mac = port.mac if port is not None else ""
    return {
        "uuid": node.uuid,
        "name": node.name,
        "hostname": node.hostname,
        "project_id": node.project_id,
        "image_id": node.image_id or "",
        "kernel_id": node.kernel_id or "",
        "ramdisk_id": node.ramdisk_id or "",
        "arch": node.boot.get("arch", ""),
        "firmware": node.boot.get("firmware", ""),
        "mac": port_mac,
        "mac_dashed": port_mac.replace(":", "-"),
        "mac_hex": port_mac.replace(":", ""),
        "ip": (port.ip or "") if port is not None else "",
        "client_ip": client_ip,
        "server": server,
        "conductor": conductor,
        "http_address": http_address,
        "boot_url": boot_url(http_address, server),
    }


def boot_url(http_address: str, server: str) -> str:
    """Where a rendered config fetches kernels and initrds: this conductor's HTTP boot
    route when it has an ``http_address``, else its TFTP server."""
    if http_address:
        return f"{http_address.rstrip('/')}/boot"
    return f"tftp://[{server}]" if ":" in server else f"tftp://{server}"


# --------------------------------------------------------------------------- lookups


class _Entry(Protocol):
    @property
    def record(self) -> NodeRecord | None: ...


class NodeLookup(Protocol):
    """Node lookups for the TFTP server: a cached entry, or a Deferred of one."""

    def by_mac(self, mac: str) -> _Entry | Deferred[Any]: ...

    def by_ip(self, ip: str) -> _Entry | Deferred[Any]: ...

    def by_uuid(self, uuid: str) -> _Entry | Deferred[Any]: ...


class CachedLookup:
    """:class:`NodeLookup` over the metadata site's ``NodeCache`` (by address and uuid)
    and a second ``NodeCache`` built with ``node_by_mac`` as its address loader."""

    def __init__(self, mac_cache: Any, cache: Any) -> None:
        self._mac_cache = mac_cache
        self._cache = cache

    def by_mac(self, mac: str) -> Any:
        return self._mac_cache.by_ip(mac)

    def by_ip(self, ip: str) -> Any:
        return self._cache.by_ip(ip)

    def by_uuid(self, uuid: str) -> Any:
        return self._cache.by_uuid(uuid)


def _then(value: Any, f: Callable[[Any], U]) -> Any:
    """``f(value)`` now, or when the Deferred fires: no Deferred on the cached path."""
    if isinstance(value, Deferred):
        return value.addCallback(f)
    return f(value)


# --------------------------------------------------------------------------- files


_NOT_FOUND = "file not found"


class NotOwned(TFTPError):
    """The node belongs to another conductor: a fast "file not found"."""

    def __init__(self, node_uuid: str, kind: str) -> None:
        super().__init__(ErrorCode.FILE_NOT_FOUND, _NOT_FOUND)
        self.node_uuid = node_uuid
        self.kind = kind


@attrs.frozen
class Opened:
    """What a request resolved to."""

    source: Source
    kind: str  # "static" or a KINDS entry
    node_uuid: str | None = None


def _static_error(error: OSError) -> TFTPError:
    if isinstance(error, (PermissionError, IsADirectoryError)):
        return TFTPError(ErrorCode.ACCESS_VIOLATION, "access violation")
    if isinstance(error, (FileNotFoundError, NotADirectoryError)) or error.errno in (
        errno.ELOOP,
        errno.ENAMETOOLONG,
    ):
        return TFTPError(ErrorCode.FILE_NOT_FOUND, _NOT_FOUND)
    return TFTPError(ErrorCode.NOT_DEFINED, "cannot read the file")


class BootFiles:
    """Resolve TFTP file names for one conductor."""

    log = Logger()

    def __init__(
        self,
        root: str | os.PathLike[str],
        templates: Templates,
        nodes: NodeLookup,
        owns: Callable[[str], bool],
        *,
        serve_unowned: bool = False,
        conductor: str = "",
        held: Callable[[NodeRecord], Deferred[list[str]]] | None = None,
        hold_retry: float = 30.0,
        http_address: str = "",
    ) -> None:
        self.root = Path(root)
        self.templates = templates
        self._nodes = nodes
        self._owns = owns
        self._serve_unowned = serve_unowned
        self._conductor = conductor
        # [vendordata] hold_boot: the targets that failed for a node at its current
        # revision (empty: not held).
        self._held = held
        self._hold_retry = hold_retry
        self._http_address = http_address

    def open(self, filename: str, client_ip: str, server: str) -> Opened | Deferred[Opened]:
        """The source for ``filename`` asked by ``client_ip`` of ``server``.

        Raises (or fails with) :class:`TFTPError`: 1 not found or not owned, 2 unsafe
        or unreadable, 0 broken template.
        """
        try:
            name = paths.normalize(filename)
        except paths.UnsafePath as e:
            raise TFTPError(e.code, e.message) from None
        generated = match(name)
        if generated is None:
            return self._static(name)
        if generated.key == "mac":
            entry = self._nodes.by_mac(generated.value)
        elif generated.key == "uuid":
            entry = self._nodes.by_uuid(generated.value)
        elif generated.value == client_ip:
            entry = self._nodes.by_ip(generated.value)
        else:
            return self._static(name)
        mac = generated.value if generated.key == "mac" else None

        def render(e: _Entry) -> Opened | Deferred[Opened]:
            record = e.record
            if (
                self._held is None
                or generated.kind not in HOLD_KINDS
                or record is None
                or (not self._serve_unowned and not self._owns(record.node.uuid))
            ):
                return self._render(
                    name, generated.kind, record, mac=mac, client_ip=client_ip, server=server
                )
            return self._held(record).addCallbacks(
                lambda targets: self._hold(name, generated.kind, record, targets)
                if targets
                else self._render(
                    name, generated.kind, record, mac=mac, client_ip=client_ip, server=server
                ),
                self._hold_unknown,
                errbackArgs=(record.node.uuid,),
            )

        return _then(entry, render)

    def node_of_client(self, client_ip: str) -> str | Deferred[str | None] | None:
        """The uuid of the node with port address ``client_ip`` (for boot events)."""

        def uuid(entry: _Entry) -> str | None:
            return entry.record.node.uuid if entry.record is not None else None

        return _then(self._nodes.by_ip(client_ip), uuid)

    def _render(
        self,
        name: str,
        kind: str,
        record: NodeRecord | None,
        *,
        mac: str | None,
        client_ip: str,
        server: str,
    ) -> Opened:
        if record is None:
            return self._static(name)
        node = record.node
        if not self._serve_unowned and not self._owns(node.uuid):
            raise NotOwned(node.uuid, kind)
        try:
            template = self.templates.find(
                kind, node.boot.get("arch", ""), node.boot.get("firmware", "")
            )
        except TemplateError as e:
            self.log.error(
                "cannot render {kind} for node {uuid}: {error}", kind=kind, uuid=node.uuid, error=e
            )
            raise TFTPError(ErrorCode.NOT_DEFINED, "boot config template error") from None
        if template is None:
            return self._static(name, node.uuid)
        values = variables(
            record, mac, client_ip, server, self._conductor, http_address=self._http_address
        )
        data = template.substitute(values).encode("utf-8")
        return Opened(BytesSource(data), kind, node.uuid)

    def _hold_unknown(self, failure: Any, node_uuid: str) -> Opened:
        # The database did not answer: neither boot the node nor pretend the file is
        # missing; the firmware retries.
        self.log.warn(
            "cannot tell whether the boot of node {uuid} is held: {error}",
            uuid=node_uuid,
            error=failure.getErrorMessage(),
        )
        raise TFTPError(ErrorCode.NOT_DEFINED, "boot hold check failed, retry")

    def _hold(self, name: str, kind: str, record: NodeRecord, targets: Sequence[str]) -> Opened:
        uuid = record.node.uuid
        self.log.info(
            "holding the boot of node {uuid} ({kind}): vendordata failed for {targets}",
            uuid=uuid,
            kind=kind,
            targets=", ".join(targets),
        )
        text = hold_stanza(kind, uuid, targets, name, self._hold_retry)
        return Opened(BytesSource(text.encode("utf-8")), kind, uuid)

    def _static(self, name: str, node_uuid: str | None = None) -> Opened:
        try:
            path = paths.resolve(self.root, name)
            return Opened(FileSource.open(path), "static", node_uuid)
        except paths.UnsafePath as e:
            raise TFTPError(e.code, e.message) from None
        except OSError as e:
            raise _static_error(e) from None
