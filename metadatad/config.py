# -*- test-case-name: tests.test_config -*-
"""The INI configuration file, parsed into frozen attrs objects.

Every section and key the daemon understands is declared once in ``_SCHEMA``; the
documented example ``conf/metadatad.conf`` lists the same keys with their defaults.
Anything the schema does not know, and every value that does not parse, is a
:class:`ConfigError` whose message is one line naming the file, section and key.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import math
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from metadatad.cluster.ring import DEFAULT_POINTS, MAX_POINTS

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration file that cannot be used; ``str()`` is one line for the operator."""


class _BadValue(ValueError):
    """Raised by value parsers; turned into a :class:`ConfigError` with the location."""


# --- value parsers: each takes the raw string and returns the typed value -----------


def _string(raw: str) -> str:
    return raw.strip()


def _nonempty_string(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise _BadValue("must not be empty")
    return value


def _number(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _BadValue(f"expected a number, got {raw.strip()!r}") from None
        if math.isnan(value) or value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and <= {maximum:g}"
            raise _BadValue(f"expected a number >= {minimum:g}{upper}, got {raw.strip()!r}")
        return value

    return parse


def _integer(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise _BadValue(f"expected an integer, got {raw.strip()!r}") from None
        if not minimum <= value <= maximum:
            raise _BadValue(f"expected an integer from {minimum} to {maximum}, got {value}")
        return value

    return parse


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise _BadValue(f"expected true or false, got {raw.strip()!r}")


def _endpoint(raw: str) -> str:
    """A Twisted server endpoint string; checked by parsing it against a fake reactor."""
    value = raw.strip()
    if not value:
        raise _BadValue("expected a Twisted endpoint string such as tcp:8775:interface=127.0.0.1")
    if value.startswith("systemd:"):
        # Systemd endpoints resolve inherited descriptors when built, which only works
        # under systemd; check the syntax that can be checked here.
        if "domain=" not in value or ("index=" not in value and "name=" not in value):
            raise _BadValue(f"bad systemd endpoint {value!r}: needs domain= and index= or name=")
        return value
    try:
        serverFromString(MemoryReactor(), value)
    except Exception as e:  # a missing certificate file, an unknown type, bad syntax...
        raise _BadValue(f"bad endpoint string {value!r}: {e}") from None
    port = _endpoint_port(value)
    if port is not None and not 0 <= port <= 65535:
        raise _BadValue(f"bad endpoint string {value!r}: port {port} is not 0..65535")
    return value


def _endpoint_port(description: str) -> int | None:
    """The port of a tcp, tcp6 or ssl endpoint string, if it names one."""
    # Colons escaped with a backslash belong to values (IPv6 interfaces).
    fields = re.split(r"(?<!\\):", description)
    if fields[0] not in ("tcp", "tcp6", "ssl") or len(fields) < 2:
        return None
    for field in fields[1:]:
        if "=" in field and not field.startswith("port="):
            continue
        try:
            return int(field.removeprefix("port="))
        except ValueError:
            return None
    return None


def _optional_endpoint(raw: str) -> str:
    return _endpoint(raw) if raw.strip() else ""


def _group_name(raw: str) -> str:
    value = raw.strip()
    if len(value) > 255:
        raise _BadValue(f"at most 255 characters, got {len(value)}")
    return value


def _optional_ip(raw: str) -> str:
    value = raw.strip()
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _BadValue(f"not an IP address: {value!r}") from None


def _optional_http_url(raw: str) -> str:
    from urllib.parse import urlsplit

    value = raw.strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise _BadValue(f"bad URL {value!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(value) > 255:
        raise _BadValue(
            f"expected an http:// or https:// URL such as http://10.0.0.5:8775, got {value!r}"
        )
    return value.rstrip("/")


def _optional_load_factor(raw: str) -> float | None:
    if not raw.strip():
        return None
    return _number(1.0, 100.0)(raw)


def _required_header(raw: str) -> tuple[str, str | None] | None:
    """``Name`` or ``Name: value`` (e.g. ``Metadata-Flavor: metadatad``); empty: none."""
    value = raw.strip()
    if not value:
        return None
    name, sep, expected = value.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
        raise _BadValue(f"expected a header name, or 'Name: value', got {value!r}")
    return name, (expected.strip() if sep else None)


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in raw.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _BadValue(f"not an IP address or network: {item!r}") from None
    return tuple(networks)


def _database_url(raw: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    value = raw.strip()
    try:
        url = make_url(value)
    except ArgumentError:
        raise _BadValue("not a database URL") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise _BadValue(
            f"unsupported database {url.get_backend_name()!r}: use sqlite, "
            "postgresql+psycopg or mysql+pymysql"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise _BadValue(f"{shown}: an in-memory SQLite database cannot be shared; name a file")
    try:
        url.get_dialect().import_dbapi()
    except ImportError as e:
        raise _BadValue(
            f"{shown}: the database driver is not installed ({e.name or e}); "
            "use postgresql+psycopg or mysql+pymysql"
        ) from None
    return value


def _choice(*choices: str) -> Callable[[str], str]:
    """One of ``choices``, in any case."""
    expected = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise _BadValue(f"expected {expected}, got {raw.strip()!r}")
        return value

    return parse


def _json_object_file(raw: str) -> str:
    return raw.strip()


_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _vendordata_targets(raw: str) -> tuple[tuple[str, str], ...]:
    """``name@url`` items, comma or space separated; split on the first ``@`` (Nova)."""
    targets: list[tuple[str, str]] = []
    for item in raw.replace(",", " ").split():
        name, at, url = item.partition("@")
        if not at:
            raise _BadValue(f"{item!r}: expected name@url, such as testing@http://10.0.0.9/")
        if not _TARGET_NAME.match(name):
            raise _BadValue(
                f"{item!r}: a target name is 1-64 letters, digits, '_', '.' or '-'"
            )
        if name == "static":
            raise _BadValue(f"{item!r}: 'static' is the static vendordata's name")
        if any(name == known for known, _ in targets):
            raise _BadValue(f"{item!r}: the name {name!r} is used twice")
        try:
            checked = _optional_http_url(url)
        except _BadValue as e:
            raise _BadValue(f"{item!r}: {e}") from None
        if not checked:
            raise _BadValue(f"{item!r}: expected name@url, such as testing@http://10.0.0.9/")
        # The URL is POSTed to as given (a trailing slash may matter to the target).
        targets.append((name, url))
    return tuple(targets)


def _ca_file(raw: str) -> str:
    """Empty (the system's trust store) or a readable file of PEM certificates."""
    value = raw.strip()
    if not value:
        return ""
    try:
        with open(value, "rb") as f:
            content = f.read()
    except OSError as e:
        raise _BadValue(f"cannot read {value}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in content:
        raise _BadValue(f"{value} holds no PEM certificate")
    return value


def _udp_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    """``ADDRESS[:PORT]`` items (``[IPv6]:PORT``), comma or space separated; port 69.

    The wildcard ``0.0.0.0`` is allowed (the server learns which address each client
    contacted from IP_PKTINFO); ``::``, broadcast and multicast addresses are not.
    ``systemd:domain=INET:index=N`` (or ``name=NAME``) is a socket passed by systemd,
    kept as ``(description, 0)``.
    """
    from metadatad.tftp.activation import PREFIX, parse

    found: list[tuple[str, int]] = []
    for item in raw.replace(",", " ").split():
        if item.startswith(PREFIX):
            try:
                parse(item)
            except ValueError as e:
                raise _BadValue(str(e)) from None
            found.append((item, 0))
            continue
        host, port = item, "69"
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise _BadValue(f"bad address {item!r}: expected [IPv6]:PORT")
            port = rest[1:] or port
        elif item.count(":") == 1:
            host, port = item.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise _BadValue(f"not an IP address: {item!r}") from None
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise _BadValue(f"bad port in {item!r}: expected 0..65535")
        if address.is_multicast or str(address) == "255.255.255.255":
            raise _BadValue(f"{item!r}: a broadcast or multicast address cannot serve TFTP")
        if address.version == 6 and address.is_unspecified:
            raise _BadValue(f"{item!r}: list each IPv6 address (:: is not supported)")
        found.append((str(address), int(port)))
    if len(set(found)) != len(found):
        raise _BadValue("an address is listed twice")
    return tuple(found)


def _boot_option(raw: str) -> str:
    from metadatad.dhcp.mapping import MAX_OPTION_VALUE

    value = raw.strip()
    if not value or len(value) > MAX_OPTION_VALUE or any(c.isspace() or c in ",#" for c in value):
        raise _BadValue(
            f"expected a file name of 1 to {MAX_OPTION_VALUE} characters (Neutron's limit) "
            f"without spaces, commas or #, got {value[:80]!r}"
        )
    return value


def _ipxe_url(raw: str) -> str:
    from metadatad.dhcp.mapping import MAX_OPTION_VALUE, URL_FIELDS, longest_url

    value = raw.strip()
    if not value:
        return ""
    try:
        longest_url(value, "")
    except (KeyError, IndexError, ValueError):
        fields = ", ".join("{" + f + "}" for f in URL_FIELDS)
        raise _BadValue(f"bad template {value!r}: the placeholders are {fields}") from None
    if any(c.isspace() or c in ",#" for c in value):
        raise _BadValue(f"{value!r}: no spaces, commas or # (dnsmasq option syntax)")
    if len(value) > 4 * MAX_OPTION_VALUE:
        raise _BadValue(f"{value[:80]!r}...: far over the {MAX_OPTION_VALUE}-character limit")
    return value


# --- the configuration objects -------------------------------------------------------


@attrs.frozen
class DatabaseConfig:
    """``[database]``: where the shared store lives."""

    url: str = "sqlite:///var/metadatad.sqlite"
    pool_size: int = 5


@attrs.frozen
class MetadataConfig:
    """``[metadata]``: the site booting machines talk to."""

    listen: str = "tcp:8775"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_shared_secret: str = attrs.field(default="", repr=False)
    cache_ttl: float = 15.0
    region: str = ""
    access_log: bool = False
    peer_max_keys: int = 128
    peer_max_bytes: int = 65536
    watch_max_wait: float = 300.0
    token_secret: str = attrs.field(default="", repr=False)
    token_secret_previous: str = attrs.field(default="", repr=False)
    require_tokens: bool = False
    token_hop_limit: int = 1
    rate_limit: float = 100.0
    rate_burst: int = 1000
    require_header: tuple[str, str | None] | None = None
    max_header_bytes: int = 8192
    max_body_bytes: int = 65536
    client_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections_per_source: int = 64


@attrs.frozen
class AdminConfig:
    """``[admin]``: the operators' API."""

    listen: str = "tcp:8776:interface=127.0.0.1"
    token_file: str = "/etc/metadatad/admin-token"


@attrs.frozen
class ConductorConfig:
    """``[conductor]``: who this daemon is in the cluster."""

    hostname: str = attrs.field(factory=socket.gethostname)
    group: str = ""
    tftp_address: str = ""
    http_address: str = ""
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 60.0
    ring_points: int = DEFAULT_POINTS
    replicas: int = 2
    max_load_factor: float | None = None


@attrs.frozen
class VendordataConfig:
    """``[vendordata]``: extra configuration handed to every machine."""

    static_file: str = ""
    dynamic_targets: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    failure_fatal: bool = False
    ca_file: str = ""
    cache_ttl: float = 60.0
    service_token_file: str = ""
    static: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen
class KeystoneConfig:
    """``[keystone]``: the service user metadatad authenticates as (Keystone v3)."""

    auth_url: str = ""
    username: str = ""
    password: str = attrs.field(default="", repr=False)
    project_name: str = ""
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    ca_file: str = ""


@attrs.frozen
class TFTPConfig:
    """``[tftp]``: boot files and per-node boot configs for PXE."""

    listen: tuple[tuple[str, int], ...] = ()
    root: str = "/srv/tftp"
    templates: str = "/etc/metadatad/templates"
    serve_unowned: bool = False
    max_blksize: int = 1468
    max_windowsize: int = 64
    timeout: float = 1.0
    max_timeout: float = 10.0
    retries: int = 5
    max_transfers: int = 1000
    max_transfers_per_source: int = 16
    event_retention: float = 7.0


@attrs.frozen
class LoggingConfig:
    """``[logging]``: how the daemon writes its log."""

    format: str = "text"


@attrs.frozen
class DhcpConfig:
    """``[dhcp]``: where boot mappings are pushed (see docs/dhcp.md)."""

    provider: str = "none"
    bios_boot_file: str = "undionly.kpxe"
    uefi_boot_file: str = "snponly.efi"
    ipxe_script_url: str = "tftp://{tftp_address}/{uuid}.ipxe"
    concurrency: int = 50
    retry_min: float = 1.0
    retry_max: float = 300.0
    reconcile_interval: float = 300.0
    dnsmasq_hostsdir: str = ""
    dnsmasq_optsdir: str = ""
    neutron_url: str = ""
    neutron_token_file: str = ""
    neutron_timeout: float = 10.0
    neutron_retries: int = 3
    script_command: str = ""
    script_timeout: float = 30.0


@attrs.frozen
class Config:
    """The whole configuration of one daemon."""

    path: str = "<defaults>"
    database: DatabaseConfig = DatabaseConfig()
    metadata: MetadataConfig = MetadataConfig()
    admin: AdminConfig = AdminConfig()
    conductor: ConductorConfig = attrs.field(factory=ConductorConfig)
    vendordata: VendordataConfig = VendordataConfig()
    tftp: TFTPConfig = TFTPConfig()
    dhcp: DhcpConfig = DhcpConfig()
    keystone: KeystoneConfig = KeystoneConfig()
    logging: LoggingConfig = LoggingConfig()


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[str], Any]]]] = {
    "database": (DatabaseConfig, {"url": _database_url, "pool_size": _integer(1, 64)}),
    "metadata": (
        MetadataConfig,
        {
            "listen": _endpoint,
            "trusted_proxies": _networks,
            "proxy_shared_secret": _string,
            "cache_ttl": _number(0, 86400),
            "region": _string,
            "access_log": _boolean,
            "peer_max_keys": _integer(1, 100_000),
            "peer_max_bytes": _integer(1, 16 * 1024 * 1024),
            "watch_max_wait": _number(1, 3600),
            "token_secret": _string,
            "token_secret_previous": _string,
            "require_tokens": _boolean,
            "token_hop_limit": _integer(1, 255),
            "rate_limit": _number(0, 1_000_000),
            "rate_burst": _integer(1, 1_000_000),
            "require_header": _required_header,
            "max_header_bytes": _integer(1024, 1_048_576),
            "max_body_bytes": _integer(1024, 67_108_864),
            "client_timeout": _number(0.1, 3600),
            "idle_timeout": _number(1, 86400),
            "max_connections_per_source": _integer(1, 100_000),
        },
    ),
    "admin": (AdminConfig, {"listen": _optional_endpoint, "token_file": _string}),
    "conductor": (
        ConductorConfig,
        {
            "hostname": _nonempty_string,
            "group": _group_name,
            "tftp_address": _optional_ip,
            "http_address": _optional_http_url,
            "heartbeat_interval": _number(0.1, 3600),
            "heartbeat_timeout": _number(0.5, 86400),
            "ring_points": _integer(1, MAX_POINTS),
            "replicas": _integer(1, 16),
            "max_load_factor": _optional_load_factor,
        },
    ),
    "vendordata": (
        VendordataConfig,
        {
            "static_file": _json_object_file,
            "dynamic_targets": _vendordata_targets,
            "connect_timeout": _number(0.1, 600),
            "read_timeout": _number(0.1, 600),
            "failure_fatal": _boolean,
            "ca_file": _ca_file,
            "cache_ttl": _number(0, 86400),
            "service_token_file": _string,
        },
    ),
    "tftp": (
        TFTPConfig,
        {
            "listen": _udp_addresses,
            "root": _nonempty_string,
            "templates": _nonempty_string,
            "serve_unowned": _boolean,
            "max_blksize": _integer(512, 65464),
            "max_windowsize": _integer(1, 32767),
            "timeout": _number(0.01, 255),
            "max_timeout": _number(0.01, 3600),
            "retries": _integer(0, 100),
            "max_transfers": _integer(1, 100_000),
            "max_transfers_per_source": _integer(1, 10_000),
            "event_retention": _number(0, 3650),
        },
    ),
    "dhcp": (
        DhcpConfig,
        {
            "provider": _choice("none", "dnsmasq", "neutron", "script"),
            "bios_boot_file": _boot_option,
            "uefi_boot_file": _boot_option,
            "ipxe_script_url": _ipxe_url,
            "concurrency": _integer(1, 10_000),
            "retry_min": _number(0.01, 3600),
            "retry_max": _number(0.01, 86400),
            "reconcile_interval": _number(1, 86400),
            "dnsmasq_hostsdir": _string,
            "dnsmasq_optsdir": _string,
            "neutron_url": _optional_http_url,
            "neutron_token_file": _string,
            "neutron_timeout": _number(0.1, 600),
            "neutron_retries": _integer(0, 20),
            "script_command": _string,
            "script_timeout": _number(0.1, 3600),
        },
    ),
    "keystone": (
        KeystoneConfig,
        {
            "auth_url": _optional_http_url,
            "username": _string,
            "password": _string,
            "project_name": _string,
            "user_domain_name": _nonempty_string,
            "project_domain_name": _nonempty_string,
            "ca_file": _ca_file,
        },
    ),
    "logging": (LoggingConfig, {"format": _choice("text", "json")}),
}


def load_config(path: str | Path) -> Config:
    """Read and check the configuration file at ``path``."""
    path = str(path)
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\0no default section", strict=True
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(
            f"{path}: [{e.section}] {e.option}: set twice (line {e.lineno})"
        ) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigError(
            f"{path}: [{e.section}]: section appears twice (line {e.lineno})"
        ) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(f"{path}: line {e.lineno}: a key before any [section]") from None
    except configparser.ParsingError as e:
        lines = ", ".join(str(lineno) for lineno, _ in e.errors)
        raise ConfigError(f"{path}: line {lines}: not 'key = value' nor a [section]") from None
    except configparser.Error as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"{path}: {message}") from None
    return parse_config(path, {s: dict(parser.items(s)) for s in parser.sections()})


def parse_config(path: str, sections: Mapping[str, Mapping[str, str]]) -> Config:
    """Build a :class:`Config` from raw strings, as read from ``path``."""
    built: dict[str, Any] = {}
    for section, keys in sections.items():
        if section not in _SCHEMA:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        cls, parsers = _SCHEMA[section]
        values: dict[str, Any] = {}
        for key, raw in keys.items():
            if key not in parsers:
                raise ConfigError(
                    f"{path}: [{section}] {key}: unknown key (known: {', '.join(parsers)})"
                )
            if "\n" in raw:
                # configparser joins indented lines to the value above; never intended here.
                raise ConfigError(
                    f"{path}: [{section}] {key}: the value continues on an indented line; "
                    "every value is one line"
                )
            try:
                values[key] = parsers[key](raw)
            except _BadValue as e:
                raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
        if section == "vendordata" and values.get("static_file"):
            values["static"] = _load_static_vendordata(path, values["static_file"])
        built[section] = cls(**values)
        if section == "conductor":
            _check_heartbeats(path, built[section], keys)
        if section == "keystone":
            _check_keystone(path, built[section])
    config = Config(path=path, **built)
    _check_dhcp(path, config)
    return config


def _check_dhcp(path: str, config: Config) -> None:
    """The keys the chosen ``[dhcp] provider`` needs."""
    dhcp = config.dhcp
    needed: list[str] = []
    if dhcp.provider == "dnsmasq":
        needed = [k for k in ("dnsmasq_hostsdir", "dnsmasq_optsdir") if not getattr(dhcp, k)]
    elif dhcp.provider == "script" and not dhcp.script_command:
        needed = ["script_command"]
    elif dhcp.provider == "neutron" and not dhcp.neutron_token_file:
        if not config.keystone.auth_url:
            raise ConfigError(
                f"{path}: [dhcp] provider: neutron needs [dhcp] neutron_token_file or "
                "[keystone] auth_url"
            )
        missing = [
            k for k in ("username", "password", "project_name") if not getattr(config.keystone, k)
        ]
        if missing:
            raise ConfigError(
                f"{path}: [keystone] {missing[0]}: required by [dhcp] provider "
                "neutron without neutron_token_file"
            )
    elif dhcp.provider == "neutron" and not dhcp.neutron_url:
        raise ConfigError(
            f"{path}: [dhcp] neutron_url: required with neutron_token_file "
            "(no Keystone catalog to find Neutron in)"
        )
    if needed:
        raise ConfigError(f"{path}: [dhcp] {needed[0]}: required by provider {dhcp.provider}")
    if dhcp.provider != "none" and not config.conductor.tftp_address:
        raise ConfigError(
            f"{path}: [conductor] tftp_address: required by [dhcp] provider {dhcp.provider} "
            "(the TFTP server the boot mappings point at)"
        )
    if dhcp.ipxe_script_url:
        from metadatad.dhcp.mapping import MAX_OPTION_VALUE, longest_url

        # The longest IPv4 owner address and this conductor's HTTP address.
        longest = longest_url(dhcp.ipxe_script_url, config.conductor.http_address)
        if len(longest) > MAX_OPTION_VALUE:
            raise ConfigError(
                f"{path}: [dhcp] ipxe_script_url: can expand to {len(longest)} characters "
                f"({longest!r}); the limit is {MAX_OPTION_VALUE} (Neutron's)"
            )
    if dhcp.retry_max < dhcp.retry_min:
        raise ConfigError(f"{path}: [dhcp] retry_max: must be >= retry_min ({dhcp.retry_min:g})")


def _check_heartbeats(path: str, conductor: ConductorConfig, keys: Mapping[str, str]) -> None:
    """A conductor is judged dead after heartbeat_timeout: it must span more than two
    heartbeats, or one late heartbeat would hand its nodes to the others."""
    interval, timeout = conductor.heartbeat_interval, conductor.heartbeat_timeout
    if timeout > 2 * interval:
        return
    shown = f"{timeout:g}" + ("" if "heartbeat_timeout" in keys else " (the default)")
    raise ConfigError(
        f"{path}: [conductor] heartbeat_timeout: must be more than twice heartbeat_interval "
        f"({interval:g} s), got {shown}: one late heartbeat would hand this conductor's "
        "nodes to the others"
    )


def _check_keystone(path: str, keystone: KeystoneConfig) -> None:
    """With an auth_url, the service user must be named in full."""
    if not keystone.auth_url:
        return
    for key in ("username", "password", "project_name"):
        if not getattr(keystone, key):
            raise ConfigError(f"{path}: [keystone] {key}: must be set when auth_url is set")


def _load_static_vendordata(path: str, filename: str) -> Mapping[str, Any]:
    where = f"{path}: [vendordata] static_file"
    try:
        with open(filename, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {filename}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {filename} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: {filename} must hold a JSON object")
    return document


def read_admin_token(config: Config) -> str:
    """Read the admin bearer token; it must be a single non-empty line."""
    return read_token_file(config, "admin", "token_file", config.admin.token_file)


def read_token_file(config: Config, section: str, key: str, filename: str) -> str:
    """Read a token file named by ``[section] key``: one non-empty ASCII line without
    spaces (it goes into HTTP headers)."""
    where = f"{config.path}: [{section}] {key}"
    try:
        with open(filename, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {filename}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {filename} is not UTF-8 text") from None
    if not token or any(c.isspace() for c in token) or not token.isascii():
        raise ConfigError(f"{where}: {filename} must hold one token without spaces")
    return token
