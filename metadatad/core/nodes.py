# -*- test-case-name: tests.core.test_nodes -*-
"""The node record: validation of the import document and its canonical form.

Pure: no I/O.  ``parse_node`` accepts exactly the document docs/nodes.md describes and
raises :class:`NodeValidationError` naming the first bad field (``ports[0].mac``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from metadatad.core.jsoninput import JSONInputError, check_document, is_valid_text

USER_DATA_MAX_BYTES = 64 * 1024
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FIRMWARES = ("bios", "uefi")
# DHCP option values a node may set (boot file, iPXE script URL): Ironic's 64-character
# limit, which Neutron imposes; checked here so a bad node is refused at import.
BOOT_OPTION_MAX = 64
NETWORK_DATA_MAX_DEPTH = 16


class NodeValidationError(ValueError):
    """A node document that cannot be stored; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def as_json(self) -> dict[str, str]:
        """The body of the 400 answer."""
        return {"error": "invalid node", "field": self.field, "message": self.message}


@attrs.frozen
class Port:
    """A network port of a node; ``ip`` is how the metadata site recognises callers."""

    mac: str
    ip: str | None = None
    pxe: bool = False
    neutron_port_id: str | None = None


@attrs.frozen
class Service:
    """The service a node is a member of (the service view)."""

    name: str
    domain: str = ""
    port: int | None = None


@attrs.frozen
class Node:
    """A registered machine, as validated from its document."""

    uuid: str
    name: str
    hostname: str
    project_id: str = ""
    availability_zone: str = "nova"
    instance_type: str = "baremetal"
    image_id: str | None = None
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    reservation_id: str = ""
    launch_index: int = 0
    root_device_name: str = "/dev/sda"
    block_device_mapping: Mapping[str, str] = attrs.field(factory=dict)
    ports: tuple[Port, ...] = ()
    public_keys: Mapping[str, str] = attrs.field(factory=dict)
    meta: Mapping[str, str] = attrs.field(factory=dict)
    user_data: bytes | None = attrs.field(default=None, repr=False)
    network_data: Mapping[str, Any] | None = None
    service: Service | None = None
    boot_roles: tuple[str, ...] = ()
    conductor_group: str = ""
    boot: Mapping[str, str] = attrs.field(factory=dict)
    public_ipv4: str | None = None
    public_hostname: str | None = None
    security_groups: tuple[str, ...] = ("default",)

    @property
    def ips(self) -> tuple[str, ...]:
        """Every port address of the node, in port order."""
        return tuple(p.ip for p in self.ports if p.ip is not None)

    @property
    def local_ipv4(self) -> str:
        """The first IPv4 port address, or ``""``."""
        for ip in self.ips:
            if ":" not in ip:
                return ip
        return ""

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON document: what ``parse_node`` accepts and the API returns."""
        return {
            "uuid": self.uuid,
            "name": self.name,
            "hostname": self.hostname,
            "project_id": self.project_id,
            "availability_zone": self.availability_zone,
            "instance_type": self.instance_type,
            "image_id": self.image_id,
            "kernel_id": self.kernel_id,
            "ramdisk_id": self.ramdisk_id,
            "reservation_id": self.reservation_id,
            "launch_index": self.launch_index,
            "root_device_name": self.root_device_name,
            "block_device_mapping": dict(self.block_device_mapping),
            "ports": [attrs.asdict(p) for p in self.ports],
            "public_keys": dict(self.public_keys),
            "meta": dict(self.meta),
            "user_data": (
                base64.b64encode(self.user_data).decode("ascii")
                if self.user_data is not None
                else None
            ),
            "network_data": self.network_data,
            "service": attrs.asdict(self.service) if self.service else None,
            "boot_roles": list(self.boot_roles),
            "conductor_group": self.conductor_group,
            "boot": dict(self.boot),
            "public_ipv4": self.public_ipv4,
            "public_hostname": self.public_hostname,
            "security_groups": list(self.security_groups),
        }


# --- field checkers: each takes (field name, value) and returns the clean value ------


def _fail(field: str, message: str) -> NodeValidationError:
    return NodeValidationError(field, message)


def _shown_key(key: str) -> str:
    """An unknown key as an error names it: quoted and escaped when it is not plain
    printable text (a line break in it would split the one-line error)."""
    return key if key.isprintable() else repr(key)


def _text(max_length: int = 255, allow_empty: bool = True) -> Callable[[str, Any], str]:
    def check(field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(field, f"must be a string, not {_type_name(value)}")
        if not allow_empty and not value:
            raise _fail(field, "must not be empty")
        if len(value) > max_length:
            raise _fail(field, f"must be at most {max_length} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise _fail(field, "must not contain control characters")
        if not is_valid_text(value):
            raise _fail(field, "must be valid Unicode text (no lone surrogates)")
        return value

    return check


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def optional(field: str, value: Any) -> Any:
        return None if value is None else check(field, value)

    return optional


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _uuid(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, not {_type_name(value)}")
    try:
        parsed = uuidlib.UUID(value)
    except ValueError:
        raise _fail(field, f"not a UUID: {value[:64]!r}") from None
    canonical = str(parsed)
    if value.lower() != canonical:
        raise _fail(field, f"not a UUID in canonical form: {value[:64]!r}")
    return canonical


def _hostname(field: str, value: Any) -> str:
    value = _text(253, allow_empty=False)(field, value)
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise _fail(field, f"not a valid host name: {value!r}")
    return value


def _integer(minimum: int, maximum: int) -> Callable[[str, Any], int]:
    def check(field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(field, f"must be an integer, not {_type_name(value)}")
        if not minimum <= value <= maximum:
            raise _fail(field, f"must be from {minimum} to {maximum}")
        return value

    return check


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, f"must be true or false, not {_type_name(value)}")
    return value


def _string_map(
    max_items: int, key_length: int, value_length: int
) -> Callable[[str, Any], dict[str, str]]:
    def check(field: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise _fail(field, f"must be an object, not {_type_name(value)}")
        if len(value) > max_items:
            raise _fail(field, f"must have at most {max_items} entries")
        out = {}
        for key, item in value.items():
            _text(key_length, allow_empty=False)(f"{field}.{key}", key)
            out[key] = _text(value_length)(f"{field}.{key}", item)
        return out

    return check


def _mac(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, not {_type_name(value)}")
    mac = value.lower().replace("-", ":")
    if not _MAC.match(mac):
        raise _fail(field, f"not a MAC address: {value[:64]!r}")
    if int(mac[:2], 16) & 1:
        raise _fail(field, f"a multicast address cannot be a port: {value!r}")
    return mac


def _ip(field: str, value: Any) -> str:
    """A port address in the form identity compares callers in: an IPv4-mapped IPv6
    address becomes IPv4 and a zone (``%eth0``) is dropped, as they are from callers'
    addresses; otherwise ``::ffff:10.0.0.2`` would dodge the uniqueness of ``10.0.0.2``
    and a zoned address would never match a caller."""
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, not {_type_name(value)}")
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0] if "%" in value else value)
        if "%" in value:
            # The zone must at least be a zone: ip_address checks its syntax.
            ipaddress.IPv6Address(value)
    except ValueError:
        raise _fail(field, f"not an IP address: {value[:64]!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_multicast or address.is_unspecified:
        raise _fail(field, f"not a host address: {value!r}")
    return str(address)


def _ipv4(field: str, value: Any) -> str:
    address = _ip(field, value)
    if ":" in address:
        raise _fail(field, f"not an IPv4 address: {value!r}")
    return address


def _security_groups(field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(field, f"must be a list, not {_type_name(value)}")
    if len(value) > 64:
        raise _fail(field, "must have at most 64 groups")
    groups = tuple(_text(255, allow_empty=False)(f"{field}[{i}]", v) for i, v in enumerate(value))
    for index, group in enumerate(groups):
        if group in groups[:index]:
            raise _fail(f"{field}[{index}]", f"{group!r} is listed twice")
    return groups


def _ports(field: str, value: Any) -> tuple[Port, ...]:
    if not isinstance(value, list):
        raise _fail(field, f"must be a list, not {_type_name(value)}")
    if len(value) > 64:
        raise _fail(field, "must have at most 64 ports")
    ports = []
    seen_macs: set[str] = set()
    seen_ips: set[str] = set()
    for index, item in enumerate(value):
        where = f"{field}[{index}]"
        fields = _object(
            where,
            item,
            {
                "mac": _mac,
                "ip": _optional(_ip),
                "pxe": _boolean,
                "neutron_port_id": _optional(_text(255, allow_empty=False)),
            },
            required=("mac",),
        )
        port = Port(**fields)
        if port.mac in seen_macs:
            raise _fail(f"{where}.mac", f"{port.mac} is listed twice")
        if port.ip is not None and port.ip in seen_ips:
            raise _fail(f"{where}.ip", f"{port.ip} is listed twice")
        seen_macs.add(port.mac)
        if port.ip is not None:
            seen_ips.add(port.ip)
        ports.append(port)
    return tuple(ports)


def _user_data(field: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(field, f"must be base64 text, not {_type_name(value)}")
    if len(value) > (USER_DATA_MAX_BYTES // 3 + 1) * 4 + 1024:
        raise _fail(field, f"must decode to at most {USER_DATA_MAX_BYTES} bytes")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _fail(field, "is not valid base64") from None
    if len(data) > USER_DATA_MAX_BYTES:
        raise _fail(field, f"must decode to at most {USER_DATA_MAX_BYTES} bytes")
    return data


def _network_data(field: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object, not {_type_name(value)}")
    for key in value:
        if key not in ("links", "networks", "services"):
            raise _fail(f"{field}.{_shown_key(key)}", "unknown field (links, networks, services)")
    for key in ("links", "networks", "services"):
        if key not in value:
            raise _fail(f"{field}.{key}", "is required")
        if not isinstance(value[key], list):
            raise _fail(f"{field}.{key}", f"must be a list, not {_type_name(value[key])}")
        for index, item in enumerate(value[key]):
            if not isinstance(item, dict):
                raise _fail(f"{field}.{key}[{index}]", "must be an object")
    try:
        # Free-form below this level: stored as JSON, so bounded and valid text.
        check_document(value, NETWORK_DATA_MAX_DEPTH)
    except JSONInputError as e:
        raise _fail(field, str(e)) from None
    return value


def _service(field: str, value: Any) -> Service | None:
    if value is None:
        return None
    fields = _object(
        field,
        value,
        {
            "name": _text(255, allow_empty=False),
            "domain": _text(253),
            "port": _optional(_integer(1, 65535)),
        },
        required=("name",),
    )
    return Service(**fields)


def _boot_roles(field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(field, f"must be a list, not {_type_name(value)}")
    return tuple(_text(255, allow_empty=False)(f"{field}[{i}]", v) for i, v in enumerate(value))


def _boot(field: str, value: Any) -> dict[str, str]:
    fields = _object(
        field,
        value,
        {
            "arch": _text(32, allow_empty=False),
            "firmware": _text(16, allow_empty=False),
            "boot_file": _boot_option(allow_empty=False),
            "ipxe_script_url": _boot_option(allow_empty=True),
        },
        required=(),
    )
    firmware = fields.get("firmware")
    if firmware is not None and firmware not in _FIRMWARES:
        raise _fail(f"{field}.firmware", f"must be one of {', '.join(_FIRMWARES)}")
    return fields


def _boot_option(allow_empty: bool) -> Callable[[str, Any], str]:
    text = _text(BOOT_OPTION_MAX, allow_empty=allow_empty)

    def check(field: str, value: Any) -> str:
        if isinstance(value, str) and len(value) > BOOT_OPTION_MAX:
            raise _fail(
                field,
                f"must be at most {BOOT_OPTION_MAX} characters (a DHCP boot option; "
                f"Neutron's limit), got {len(value)}",
            )
        value = text(field, value)
        if any(c.isspace() or c in ",#" for c in value):
            # dnsmasq option files split on commas and treat # as a comment.
            raise _fail(field, "must not contain spaces, commas or #")
        return value

    return check


def _object(
    field: str,
    value: Any,
    checkers: Mapping[str, Callable[[str, Any], Any]],
    required: tuple[str, ...],
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, f"must be an object, not {_type_name(value)}")
    prefix = f"{field}." if field else ""
    for key in value:
        if key not in checkers:
            raise _fail(f"{prefix}{_shown_key(key)}", "unknown field")
    for key in required:
        if key not in value:
            raise _fail(f"{prefix}{key}", "is required")
    return {key: checkers[key](f"{prefix}{key}", item) for key, item in value.items()}


_NODE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "uuid": _uuid,
    "name": _text(255),
    "hostname": _hostname,
    "project_id": _text(255),
    "availability_zone": _text(255, allow_empty=False),
    "instance_type": _text(255, allow_empty=False),
    "image_id": _optional(_text(255)),
    "kernel_id": _optional(_text(255)),
    "ramdisk_id": _optional(_text(255)),
    "reservation_id": _text(64),
    "launch_index": _integer(0, 2**31 - 1),
    "root_device_name": _text(255, allow_empty=False),
    "block_device_mapping": _string_map(64, 64, 255),
    "ports": _ports,
    "public_keys": _string_map(64, 255, 16384),
    "meta": _string_map(128, 255, 255),
    "user_data": _user_data,
    "network_data": _network_data,
    "service": _service,
    "boot_roles": _boot_roles,
    "conductor_group": _text(255),
    "boot": _boot,
    "public_ipv4": _optional(_ipv4),
    "public_hostname": _optional(_hostname),
    "security_groups": _security_groups,
}


def parse_node(document: Any, field: str = "") -> Node:
    """Validate one node document and return the :class:`Node`.

    ``field`` prefixes the names in errors (``"[3]"`` for the fourth node of a list).
    """
    fields = _object(field, document, _NODE_FIELDS, required=("uuid",))
    node_uuid = fields["uuid"]
    hostname = fields.get("hostname")
    name = fields.get("name") or (hostname.split(".")[0] if hostname else node_uuid)
    fields.setdefault("name", name)
    if not fields["name"]:
        fields["name"] = name
    if hostname is None:
        # Without a host name, derive one from the display name when it is one.
        fields["hostname"] = name if _is_hostname(name) else "host-" + node_uuid[:8]
    fields.setdefault("reservation_id", "r-" + node_uuid.replace("-", "")[:8])
    if not fields["reservation_id"]:
        fields["reservation_id"] = "r-" + node_uuid.replace("-", "")[:8]
    root = fields.get("root_device_name", "/dev/sda")
    fields.setdefault("block_device_mapping", {"ami": root.rsplit("/", 1)[-1], "root": root})
    fields.setdefault("boot", {})
    boot = {"arch": "x86_64", "firmware": "uefi"}
    boot.update(fields["boot"])
    fields["boot"] = boot
    return Node(**fields)


# Bookkeeping fields the API and CLI show; an operator may feed them back, they are ignored.
READ_ONLY_FIELDS = (
    "revision",
    "created_at",
    "updated_at",
    "password_set",
    "vendordata_error",
    "shared_keys",
    "private_keys",
    "cardinal_value",
)


def strip_read_only(document: Any) -> Any:
    """Drop the bookkeeping fields ``show`` adds, from one document or a list of them."""
    if isinstance(document, list):
        return [strip_read_only(item) for item in document]
    if isinstance(document, dict):
        return {k: v for k, v in document.items() if k not in READ_ONLY_FIELDS}
    return document


def parse_nodes(document: Any) -> list[Node]:
    """Validate an import: one node object or a list of them, uuids unique."""
    if isinstance(document, dict):
        return [parse_node(document)]
    if not isinstance(document, list):
        raise _fail("", f"expected a node object or a list of them, not {_type_name(document)}")
    if not document:
        raise _fail("", "the list of nodes is empty")
    nodes = [parse_node(item, f"[{index}]") for index, item in enumerate(document)]
    seen: dict[str, int] = {}
    owner_of: dict[tuple[str, str], int] = {}
    for index, node in enumerate(nodes):
        if node.uuid in seen:
            raise _fail(f"[{index}].uuid", f"{node.uuid} is also node [{seen[node.uuid]}]")
        seen[node.uuid] = index
        for p, port in enumerate(node.ports):
            for kind, value in (("mac", port.mac), ("ip", port.ip)):
                if value is None:
                    continue
                other = owner_of.setdefault((kind, value), index)
                if other != index:
                    raise _fail(
                        f"[{index}].ports[{p}].{kind}", f"{value} is also a port of node [{other}]"
                    )
    return nodes


def _is_hostname(value: str) -> bool:
    try:
        _hostname("name", value)
    except NodeValidationError:
        return False
    return True
