# -*- test-case-name: tests.core.test_config -*-
"""The INI configuration file, parsed into frozen attrs objects.

Every section and key the daemon understands is declared once in ``_SCHEMA``; the
documented example ``conf/metadatad.conf`` lists the same keys with their defaults.
Anything the schema does not know, and every value that does not parse, is a
:class:`ConfigError` whose message is one line naming the file, section and key.
"""

from __future__ import annotations

import configparser
import json
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from metadatad.config.values import (
    MAX_WORKERS,
    BadValue,
    _boolean,
    _boot_option,
    _choice,
    _database_url,
    _endpoint,
    _group_name,
    _integer,
    _ipxe_url,
    _networks,
    _nonempty_string,
    _number,
    _optional_endpoint,
    _optional_http_url,
    _optional_ip,
    _optional_load_factor,
    _optional_timeout,
    _required_header,
    _string,
    _udp_addresses,
    _vendordata_targets,
    _workers,
    check_ca_file,
)
from metadatad.core.addresses import IPNetwork
from metadatad.core.ring import DEFAULT_POINTS, MAX_POINTS
from metadatad.errors import SetupError

# Listen kinds whose socket worker processes can share (adopt by descriptor).
SHAREABLE_LISTEN_KINDS = ("tcp", "tcp6", "systemd")


class ConfigError(SetupError):
    """A configuration file that cannot be used; ``str()`` is one line for the operator."""


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
    write_timeout: float = 30.0
    # None: "auto", one worker per usable CPU (see worker_count).
    workers: int | None = None

    def worker_count(self, cpus: int) -> int:
        """How many processes serve the site on a machine with ``cpus`` usable CPUs:
        ``workers`` when set; for ``auto``, one per CPU (at most ``MAX_WORKERS``), or 1
        where the listen address cannot be shared with workers (``unix:``, ``ssl:``)."""
        if self.workers is not None:
            return self.workers
        if self.listen.split(":", 1)[0] not in SHAREABLE_LISTEN_KINDS:
            return 1
        return max(1, min(cpus, MAX_WORKERS))


@attrs.frozen
class AdminConfig:
    """``[admin]``: the operators' API."""

    listen: str = "tcp:8776:interface=127.0.0.1"
    token_file: str = "/etc/metadatad/admin-token"
    max_header_bytes: int = 8192
    max_body_bytes: int = 64 * 1024 * 1024
    client_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_connections_per_source: int = 16
    write_timeout: float = 30.0


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
    hold_boot: bool = False
    hold_retry: float = 30.0
    ca_file: str = ""
    cache_ttl: float = 60.0
    service_token_file: str = ""
    max_concurrent_calls: int = 16
    failure_ttl: float = 5.0
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
    # Seconds a request to Keystone may take; None: [dhcp] neutron_timeout when the
    # neutron provider uses Keystone, else 10.
    timeout: float | None = None


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
    permanent_retries: int = 8
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
            "write_timeout": _number(1, 3600),
            "workers": _workers,
        },
    ),
    "admin": (
        AdminConfig,
        {
            "listen": _optional_endpoint,
            "token_file": _string,
            "max_header_bytes": _integer(1024, 1_048_576),
            "max_body_bytes": _integer(1024, 1024 * 1024 * 1024),
            "client_timeout": _number(0.1, 3600),
            "idle_timeout": _number(1, 86400),
            "max_connections_per_source": _integer(1, 100_000),
            "write_timeout": _number(1, 3600),
        },
    ),
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
            "static_file": _string,  # a path: read_files reads it
            "dynamic_targets": _vendordata_targets,
            "connect_timeout": _number(0.1, 600),
            "read_timeout": _number(0.1, 600),
            "failure_fatal": _boolean,
            "hold_boot": _boolean,
            "hold_retry": _number(5, 3600),
            "ca_file": _string,  # a path: read_files checks it
            "cache_ttl": _number(0, 86400),
            "service_token_file": _string,
            "max_concurrent_calls": _integer(1, 10_000),
            "failure_ttl": _number(0, 3600),
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
            "permanent_retries": _integer(0, 100),
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
            "ca_file": _string,  # a path: read_files checks it
            "timeout": _optional_timeout,
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
    raw = {s: dict(parser.items(s)) for s in parser.sections()}
    # The files each section names are checked before the checks across sections, so
    # the first error reported is the one it always was.
    config = read_files(_sections(path, raw))
    _check_dhcp(path, config)
    return config


def parse_config(path: str, sections: Mapping[str, Mapping[str, str]]) -> Config:
    """Build a :class:`Config` from raw strings, as read from ``path``.  It reads none
    of the files the configuration names (:func:`read_files` does; Twisted's check of
    an ``ssl:`` endpoint string still opens that endpoint's certificate files)."""
    config = _sections(path, sections)
    _check_dhcp(path, config)
    return config


def _sections(path: str, sections: Mapping[str, Mapping[str, str]]) -> Config:
    """Each section parsed and checked on its own."""
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
            except BadValue as e:
                raise ConfigError(f"{path}: [{section}] {key}: {e}") from None
        built[section] = cls(**values)
        if section == "conductor":
            _check_heartbeats(path, built[section], keys)
        if section == "keystone":
            _check_keystone(path, built[section])
    return Config(path=path, **built)


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
        from metadatad.core.bootmapping import MAX_OPTION_VALUE, longest_url

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


def read_files(config: Config) -> Config:
    """``config`` with the files it names read and checked: the static vendordata
    document, and the CA files of ``[vendordata]`` and ``[keystone]``."""
    for section in ("vendordata", "keystone"):
        try:
            check_ca_file(getattr(config, section).ca_file)
        except BadValue as e:
            raise ConfigError(f"{config.path}: [{section}] ca_file: {e}") from None
    if not config.vendordata.static_file:
        return config
    static = _load_static_vendordata(config.path, config.vendordata.static_file)
    return attrs.evolve(config, vendordata=attrs.evolve(config.vendordata, static=static))


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
