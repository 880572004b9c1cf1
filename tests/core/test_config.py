"""The INI configuration file: defaults, every key, and one clear line for every bad value."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from pathlib import Path

import attrs
import pytest

from metadatad import config as config_module
from metadatad.config import (
    AdminConfig,
    ConductorConfig,
    Config,
    ConfigError,
    DatabaseConfig,
    DhcpConfig,
    KeystoneConfig,
    MetadataConfig,
    TFTPConfig,
    VendordataConfig,
    load_config,
    parse_config,
    read_admin_token,
)
from metadatad.core.ring import DEFAULT_POINTS

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "conf" / "metadatad.conf"
SECRET = "s3cr3t-shared-with-the-proxy-7f1d"


def write(tmp_path: Path, text: str, name: str = "metadatad.conf") -> Path:
    """Write a configuration file and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(path: Path | str, text: str | None = None) -> str:
    """Load ``path`` (after writing ``text`` to it) and return the one-line ConfigError."""
    if text is not None:
        Path(path).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert message.strip(), "the error message is empty"
    assert len(message.splitlines()) == 1, f"not one line: {message!r}"
    assert str(path) in message
    return message


def documented_keys(text: str) -> dict[str, dict[str, str | None]]:
    """``{section: {key: documented default}}`` from the example file's text.

    A key counts when it is set (``key = value``) or shown commented out (``# key =``);
    its default is the ``Default: ...`` text in the comment block just above it.
    """
    sections: dict[str, dict[str, str | None]] = {}
    section = None
    default: str | None = None
    for line in text.splitlines():
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        if header:
            section = header.group(1)
            sections.setdefault(section, {})
            default = None
            continue
        stated = re.search(r"Default:\s*(.*?)\s*$", line)
        if stated and line.startswith("#"):
            default = stated.group(1)
            continue
        key = re.match(r"^#?\s*([a-z_][a-z0-9_]*)\s*=", line)
        if key:
            assert section is not None, f"key outside a section: {line!r}"
            assert key.group(1) not in sections[section], f"documented twice: {line!r}"
            sections[section][key.group(1)] = default
            default = None
    return sections


def schema_keys() -> dict[str, set[str]]:
    """The sections and keys the parser understands."""
    return {section: set(parsers) for section, (_cls, parsers) in config_module._SCHEMA.items()}


# --- defaults -------------------------------------------------------------------------


def test_empty_file_gives_every_default(tmp_path: Path) -> None:
    """A file with no sections yields the documented default of every key."""
    path = write(tmp_path, "# nothing configured\n")
    config = load_config(path)
    assert config.path == str(path)
    assert config.database == DatabaseConfig()
    assert config.database.url == "sqlite:///var/metadatad.sqlite"
    assert config.database.pool_size == 5
    assert config.metadata == MetadataConfig()
    assert config.metadata.listen == "tcp:8775"
    assert config.metadata.trusted_proxies == ()
    assert config.metadata.proxy_shared_secret == ""
    assert config.metadata.cache_ttl == 15.0
    assert config.metadata.region == ""
    assert config.metadata.access_log is False
    assert (config.metadata.peer_max_keys, config.metadata.peer_max_bytes) == (128, 65536)
    assert config.metadata.watch_max_wait == 300.0
    assert config.admin.listen == "tcp:8776:interface=127.0.0.1"
    assert config.admin.token_file == "/etc/metadatad/admin-token"
    assert config.conductor.hostname == socket.gethostname()
    assert config.conductor.group == ""
    assert (config.conductor.heartbeat_interval, config.conductor.heartbeat_timeout) == (10, 60)
    assert config.conductor.ring_points == DEFAULT_POINTS
    assert config.conductor.replicas == 2
    assert config.conductor.max_load_factor is None
    assert config.vendordata.static_file == ""
    assert config.vendordata.static == {}
    assert config.tftp == TFTPConfig()
    assert config.tftp.listen == ()
    assert config.tftp.serve_unowned is False
    assert config.tftp.max_blksize == 1468


def test_absent_sections_keep_defaults_next_to_a_present_one(tmp_path: Path) -> None:
    """Setting one key of one section leaves every other section and key at its default."""
    path = write(tmp_path, "[metadata]\nregion = eu-1\n")
    config = load_config(path)
    assert config.metadata == attrs.evolve(MetadataConfig(), region="eu-1")
    assert config.database == DatabaseConfig()
    assert config.admin == AdminConfig()
    assert config.conductor == ConductorConfig()
    assert config.vendordata == VendordataConfig()


def test_empty_sections_are_allowed(tmp_path: Path) -> None:
    """Every section may be present with no keys: all defaults."""
    text = "".join(f"[{section}]\n" for section in schema_keys())
    config = load_config(write(tmp_path, text))
    assert attrs.evolve(config, path="<defaults>") == Config()


# --- every key ------------------------------------------------------------------------

EVERY_KEY = {
    "database": {
        "url": "postgresql+psycopg://metadatad:pw@db.example.org/metadatad",
        "pool_size": "12",
    },
    "metadata": {
        "listen": "tcp:9775:interface=10.0.0.1",
        "trusted_proxies": "10.1.0.0/16, 192.0.2.7  2001:db8::/32",
        "proxy_shared_secret": SECRET,
        "cache_ttl": "2.5",
        "region": "eu-west-7",
        "access_log": "yes",
        "peer_max_keys": "64",
        "peer_max_bytes": "4096",
        "watch_max_wait": "60",
        "token_secret": "token-secret-9c2e",
        "token_secret_previous": "old-token-secret",
        "require_tokens": "true",
        "token_hop_limit": "2",
        "rate_limit": "12.5",
        "rate_burst": "40",
        "require_header": "Metadata-Flavor: metadatad",
        "max_header_bytes": "4096",
        "max_body_bytes": "2048",
        "client_timeout": "3",
        "idle_timeout": "30",
        "max_connections_per_source": "8",
        "write_timeout": "7",
        "workers": "3",
    },
    "admin": {
        "listen": "unix:/run/metadatad/admin.sock",
        "token_file": "/srv/token",
        "max_header_bytes": "16384",
        "max_body_bytes": "1048576",
        "client_timeout": "20",
        "idle_timeout": "90",
        "max_connections_per_source": "4",
        "write_timeout": "15",
    },
    "conductor": {
        "hostname": "conductor-3.example.org",
        "group": "rack-7",
        "tftp_address": "10.0.0.5",
        "http_address": "http://10.0.0.5:8775/",
        "heartbeat_interval": "2.5",
        "heartbeat_timeout": "20",
        "ring_points": "512",
        "replicas": "3",
        "max_load_factor": "1.05",
    },
    "vendordata": {
        "static_file": "VENDORDATA",
        "dynamic_targets": "testing@http://10.0.0.9:8080/vd, ops@https://ops.example.org/a@b",
        "connect_timeout": "3",
        "read_timeout": "0.5",
        "failure_fatal": "true",
        "hold_boot": "true",
        "hold_retry": "45",
        "ca_file": "CAFILE",
        "cache_ttl": "0",
        "service_token_file": "/etc/metadatad/vendordata-token",
        "max_concurrent_calls": "4",
        "failure_ttl": "2.5",
    },
    "keystone": {
        "auth_url": "https://keystone.example.org:5000/v3/",
        "username": "metadatad",
        "password": SECRET,
        "project_name": "service",
        "user_domain_name": "svc",
        "project_domain_name": "svc-projects",
        "ca_file": "CAFILE",
        "timeout": "7.5",
    },
    "tftp": {
        "listen": "10.0.0.1, 10.1.0.1:6969 [2001:db8::1]:69",
        "root": "/srv/boot",
        "templates": "/etc/boot-templates",
        "serve_unowned": "true",
        "max_blksize": "8192",
        "max_windowsize": "16",
        "timeout": "0.5",
        "max_timeout": "4",
        "retries": "3",
        "max_transfers": "200",
        "max_transfers_per_source": "4",
        "event_retention": "30",
    },
    "logging": {"format": "JSON"},
    "dhcp": {
        "provider": "neutron",
        "bios_boot_file": "pxelinux.0",
        "uefi_boot_file": "grubx64.efi",
        "ipxe_script_url": "{http_address}/ipxe/{uuid}",
        "concurrency": "20",
        "retry_min": "0.5",
        "retry_max": "60",
        "permanent_retries": "3",
        "reconcile_interval": "120",
        "dnsmasq_hostsdir": "/srv/hosts",
        "dnsmasq_optsdir": "/srv/opts",
        "neutron_url": "http://neutron.example.org:9696",
        "neutron_token_file": "",
        "neutron_timeout": "5",
        "neutron_retries": "2",
        "script_command": "/usr/local/bin/push --fast",
        "script_timeout": "9",
    },
}


def test_every_key_of_every_section_is_parsed(tmp_path: Path) -> None:
    """A file setting every key yields every value, converted to its type."""
    vendordata = tmp_path / "vendordata.json"
    vendordata.write_text(json.dumps({"cloud-init": "#cloud-config\n", "n": 1}))
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n")
    placeholders = {"VENDORDATA": str(vendordata), "CAFILE": str(ca_file)}
    text = ""
    for section, keys in EVERY_KEY.items():
        text += f"[{section}]\n"
        for key, raw in keys.items():
            text += f"{key} = {placeholders.get(raw, raw)}\n"
    config = load_config(write(tmp_path, text))
    assert config.database == DatabaseConfig(
        url="postgresql+psycopg://metadatad:pw@db.example.org/metadatad", pool_size=12
    )
    assert config.metadata.listen == "tcp:9775:interface=10.0.0.1"
    assert config.metadata.trusted_proxies == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert config.metadata.proxy_shared_secret == SECRET
    assert config.metadata.cache_ttl == 2.5
    assert config.metadata.region == "eu-west-7"
    assert config.metadata.access_log is True
    assert config.metadata.peer_max_keys == 64
    assert config.metadata.peer_max_bytes == 4096
    assert config.metadata.watch_max_wait == 60.0
    assert config.metadata == attrs.evolve(
        config.metadata,
        token_secret="token-secret-9c2e",
        token_secret_previous="old-token-secret",
        require_tokens=True,
        token_hop_limit=2,
        rate_limit=12.5,
        rate_burst=40,
        require_header=("Metadata-Flavor", "metadatad"),
        max_header_bytes=4096,
        max_body_bytes=2048,
        client_timeout=3.0,
        idle_timeout=30.0,
        max_connections_per_source=8,
        write_timeout=7.0,
        workers=3,
    )
    assert "token-secret-9c2e" not in repr(config)
    assert config.admin == AdminConfig(
        listen="unix:/run/metadatad/admin.sock",
        token_file="/srv/token",
        max_header_bytes=16384,
        max_body_bytes=1048576,
        client_timeout=20.0,
        idle_timeout=90.0,
        max_connections_per_source=4,
        write_timeout=15.0,
    )
    assert config.conductor == ConductorConfig(
        hostname="conductor-3.example.org",
        group="rack-7",
        tftp_address="10.0.0.5",
        http_address="http://10.0.0.5:8775",
        heartbeat_interval=2.5,
        heartbeat_timeout=20.0,
        ring_points=512,
        replicas=3,
        max_load_factor=1.05,
    )
    assert config.vendordata.static_file == str(vendordata)
    assert config.vendordata.static == {"cloud-init": "#cloud-config\n", "n": 1}
    assert config.vendordata.dynamic_targets == (
        ("testing", "http://10.0.0.9:8080/vd"),
        ("ops", "https://ops.example.org/a@b"),
    )
    assert config.vendordata.connect_timeout == 3.0
    assert config.vendordata.read_timeout == 0.5
    assert config.vendordata.failure_fatal is True
    assert config.vendordata.hold_boot is True
    assert config.vendordata.hold_retry == 45.0
    assert config.vendordata.ca_file == str(ca_file)
    assert config.vendordata.cache_ttl == 0.0
    assert config.vendordata.service_token_file == "/etc/metadatad/vendordata-token"
    assert config.vendordata.max_concurrent_calls == 4
    assert config.vendordata.failure_ttl == 2.5
    assert config.keystone == KeystoneConfig(
        auth_url="https://keystone.example.org:5000/v3",
        username="metadatad",
        password=SECRET,
        project_name="service",
        user_domain_name="svc",
        project_domain_name="svc-projects",
        ca_file=str(ca_file),
        timeout=7.5,
    )
    assert SECRET not in repr(config.keystone)
    assert config.tftp == TFTPConfig(
        listen=(("10.0.0.1", 69), ("10.1.0.1", 6969), ("2001:db8::1", 69)),
        root="/srv/boot",
        templates="/etc/boot-templates",
        serve_unowned=True,
        max_blksize=8192,
        max_windowsize=16,
        timeout=0.5,
        max_timeout=4.0,
        retries=3,
        max_transfers=200,
        max_transfers_per_source=4,
        event_retention=30.0,
    )
    assert config.logging.format == "json"
    assert config.dhcp == DhcpConfig(
        provider="neutron",
        bios_boot_file="pxelinux.0",
        uefi_boot_file="grubx64.efi",
        ipxe_script_url="{http_address}/ipxe/{uuid}",
        concurrency=20,
        retry_min=0.5,
        retry_max=60.0,
        permanent_retries=3,
        reconcile_interval=120.0,
        dnsmasq_hostsdir="/srv/hosts",
        dnsmasq_optsdir="/srv/opts",
        neutron_url="http://neutron.example.org:9696",
        neutron_timeout=5.0,
        neutron_retries=2,
        script_command="/usr/local/bin/push --fast",
        script_timeout=9.0,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dhcp]\nprovider = dnsmasq\n", "[dhcp] dnsmasq_hostsdir: required by provider"),
        ("[dhcp]\nprovider = script\n", "[dhcp] script_command: required by provider"),
        ("[dhcp]\nprovider = neutron\n", "neutron needs [dhcp] neutron_token_file or"),
        ("[dhcp]\nprovider = nova\n", "[dhcp] provider: expected one of none, dnsmasq"),
        ("[dhcp]\nuefi_boot_file = " + "x" * 65 + "\n", "[dhcp] uefi_boot_file: expected"),
        ("[dhcp]\nipxe_script_url = http://x/{nope}\n", "the placeholders are"),
        (
            "[dhcp]\nipxe_script_url = http://boot.example.org/scripts/{uuid}.ipxe\n",
            "can expand to 73 characters",
        ),
        (
            "[dhcp]\nprovider = script\nscript_command = /bin/true\n",
            "[conductor] tftp_address: required by [dhcp] provider script",
        ),
        (
            "[dhcp]\nprovider = neutron\nneutron_token_file = /t\n[conductor]\n"
            "tftp_address = 10.0.0.5\n",
            "[dhcp] neutron_url: required with neutron_token_file",
        ),
        (
            "[dhcp]\nprovider = neutron\n[keystone]\nauth_url = http://k/v3\n[conductor]\n"
            "tftp_address = 10.0.0.5\n",
            "[keystone] username: must be set when auth_url is set",
        ),
    ],
)
def test_dhcp_settings_the_provider_needs(tmp_path: Path, text: str, message: str) -> None:
    """Each provider's required keys, the 64-character limits and the template's
    placeholders are checked with a one-line error naming the key."""
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_every_key_test_covers_the_whole_schema() -> None:
    """The every-key test above sets exactly the keys the schema knows (none forgotten)."""
    assert {s: set(keys) for s, keys in EVERY_KEY.items()} == schema_keys()


def test_schema_matches_the_config_classes() -> None:
    """Every schema key is a field of its section's class (and the reverse, but ``static``)."""
    for _section, (cls, parsers) in config_module._SCHEMA.items():
        fields = {f.name for f in attrs.fields(cls)} - {"static"}
        assert set(parsers) == fields, cls.__name__


@pytest.mark.parametrize(
    ("section", "key", "raw", "expected"),
    [
        ("metadata", "access_log", "1", True),
        ("metadata", "access_log", "TRUE", True),
        ("metadata", "access_log", "on", True),
        ("metadata", "access_log", "0", False),
        ("metadata", "access_log", "No", False),
        ("metadata", "access_log", "off", False),
        ("metadata", "cache_ttl", "0", 0.0),
        ("metadata", "cache_ttl", "86400", 86400.0),
        ("metadata", "peer_max_keys", "1", 1),
        ("metadata", "peer_max_bytes", "16777216", 16777216),
        ("metadata", "watch_max_wait", "1", 1.0),
        ("metadata", "watch_max_wait", "3600", 3600.0),
        ("database", "pool_size", "1", 1),
        ("database", "pool_size", "64", 64),
        (
            "database",
            "url",
            "sqlite:////var/lib/metadatad/store.sqlite",
            "sqlite:////var/lib/metadatad/store.sqlite",
        ),
        ("database", "url", "mysql+pymysql://u:p@db/metadatad", "mysql+pymysql://u:p@db/metadatad"),
        ("metadata", "trusted_proxies", "", ()),
        ("metadata", "trusted_proxies", "10.0.0.9/8", (ipaddress.ip_network("10.0.0.0/8"),)),
        ("metadata", "listen", "systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
        ("metadata", "listen", "tcp6:8775:interface=\\:\\:", "tcp6:8775:interface=\\:\\:"),
        ("admin", "listen", "", ""),
        ("tftp", "listen", "", ()),
        ("tftp", "listen", "0.0.0.0", (("0.0.0.0", 69),)),
        ("tftp", "listen", "[::1]", (("::1", 69),)),
        ("tftp", "listen", "127.0.0.1:0", (("127.0.0.1", 0),)),
        (
            "tftp",
            "listen",
            "systemd:domain=INET:index=1, 10.0.0.1",
            (("systemd:domain=INET:index=1", 0), ("10.0.0.1", 69)),
        ),
        (
            "tftp",
            "listen",
            "systemd:domain=INET:name=tftp",
            (("systemd:domain=INET:name=tftp", 0),),
        ),
        ("logging", "format", "json", "json"),
        ("logging", "format", " Text ", "text"),
        ("tftp", "max_blksize", "65464", 65464),
        ("tftp", "event_retention", "0", 0.0),
    ],
)
def test_accepted_values(
    tmp_path: Path, section: str, key: str, raw: str, expected: object
) -> None:
    """Valid spellings (booleans, bounds, URLs, networks, endpoints) give the typed value."""
    config = load_config(write(tmp_path, f"[{section}]\n{key} = {raw}\n"))
    assert getattr(getattr(config, section), key) == expected


# --- the documented example -----------------------------------------------------------


def test_example_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """conf/metadatad.conf (the `make run` configuration) loads from the checkout."""
    monkeypatch.chdir(REPO)
    config = load_config("conf/metadatad.conf")
    assert config.database.url == "sqlite:///var/metadatad.sqlite"
    assert config.metadata.listen == "tcp:8775:interface=127.0.0.1"
    assert config.admin.listen == "tcp:8776:interface=127.0.0.1"
    assert config.admin.token_file == "var/admin-token"
    vendordata = json.loads((REPO / "conf" / "vendordata.json").read_text())
    assert config.vendordata.static == vendordata


def test_example_file_documents_exactly_the_known_keys() -> None:
    """Every key the schema knows is in conf/metadatad.conf (set or `# key =`), and no other."""
    documented = documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    assert {s: set(keys) for s, keys in documented.items()} == schema_keys()
    assert "hostname" in documented["conductor"]


def test_example_file_states_the_real_defaults() -> None:
    """Each key's `Default:` comment, parsed as a value, equals the built-in default."""
    documented = documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    defaults = Config()
    for section, keys in documented.items():
        for key, stated in keys.items():
            assert stated is not None, f"[{section}] {key} has no 'Default:' comment"
            actual = getattr(getattr(defaults, section), key)
            if section == "conductor" and key == "hostname":
                assert "host name" in stated
                assert actual == socket.gethostname()
                continue
            raw = "" if stated == "empty" else stated
            parsed = parse_config("<doc>", {section: {key: raw}})
            assert getattr(getattr(parsed, section), key) == actual, f"[{section}] {key}"


def test_workers_auto_is_one_per_cpu_where_the_socket_can_be_shared(tmp_path: Path) -> None:
    """``auto`` (the default) means a worker per usable CPU, at most 64, and a single
    process where the listen address cannot be handed to workers; a number is kept."""
    auto = parse_config("<t>", {"metadata": {"workers": "AUTO"}}).metadata
    assert auto.workers is None and Config().metadata.workers is None
    assert [auto.worker_count(cpus) for cpus in (1, 2, 8, 200)] == [1, 2, 8, 64]
    for listen in ("tcp6:8775", "systemd:domain=INET:index=0"):
        assert attrs.evolve(auto, listen=listen).worker_count(4) == 4
    for listen in ("unix:/run/metadatad.sock", "ssl:8775:privateKey=k.pem"):
        assert attrs.evolve(auto, listen=listen).worker_count(4) == 1
    fixed = parse_config("<t>", {"metadata": {"workers": "3"}}).metadata
    assert fixed.worker_count(1) == fixed.worker_count(16) == 3


def test_documented_keys_helper_reads_commented_keys() -> None:
    """The helper counts `# key =` lines and ignores prose containing `=` or `:`."""
    text = (
        "[a]\n# Listen: tcp:PORT:interface=ADDRESS or systemd:domain=INET:index=0\n"
        "# Default: 1\nx = 1\n[b]\n# Default: nothing\n# y =\n"
    )
    assert documented_keys(text) == {"a": {"x": "1"}, "b": {"y": "nothing"}}


# --- bad values: one line naming the file, [section] and key ------------------------

BAD_VALUES = [
    # bad endpoint strings
    ("metadata", "listen", "tcp:notaport", "notaport"),
    ("metadata", "listen", "bogus:8775", "bogus"),
    ("metadata", "listen", "tcp:8775:colour=red", "colour"),
    ("metadata", "listen", "tcp:", "endpoint"),
    ("metadata", "listen", "", "endpoint"),
    ("metadata", "listen", "systemd:index=0", "domain="),
    ("metadata", "listen", "systemd:domain=INET", "index="),
    ("admin", "listen", "tcp:8776:backlog=many", "many"),
    # IMDSv2 and hardening
    ("metadata", "require_tokens", "maybe", "maybe"),
    ("metadata", "token_hop_limit", "0", "1 to 255"),
    ("metadata", "token_hop_limit", "256", "1 to 255"),
    ("metadata", "rate_limit", "-1", "-1"),
    ("metadata", "rate_burst", "0", "0"),
    ("metadata", "require_header", "Bad Header: x", "header name"),
    ("metadata", "require_header", ": value", "header name"),
    ("metadata", "max_header_bytes", "100", "1024"),
    ("metadata", "max_body_bytes", "lots", "lots"),
    ("metadata", "client_timeout", "0", "0"),
    ("metadata", "idle_timeout", "0", "0"),
    ("metadata", "max_connections_per_source", "0", "0"),
    ("metadata", "workers", "0", "0"),
    ("metadata", "workers", "65", "65"),
    ("metadata", "workers", "many", "or auto"),
    # bad numbers
    ("metadata", "cache_ttl", "fifteen", "fifteen"),
    ("metadata", "cache_ttl", "-1", "-1"),
    ("metadata", "cache_ttl", "nan", "nan"),
    ("metadata", "cache_ttl", "inf", "inf"),
    ("metadata", "cache_ttl", "86401", "86401"),
    ("metadata", "peer_max_keys", "0", "0"),
    ("metadata", "peer_max_keys", "many", "many"),
    ("metadata", "peer_max_bytes", "-5", "-5"),
    ("metadata", "peer_max_bytes", "16777217", "16777217"),
    ("metadata", "watch_max_wait", "0", "0"),
    ("metadata", "watch_max_wait", "3601", "3601"),
    ("metadata", "cache_ttl", "15 ; seconds", "15 ; seconds"),
    # integers: not one, or out of range
    ("database", "pool_size", "five", "five"),
    ("database", "pool_size", "5.5", "5.5"),
    ("database", "pool_size", "0", "1 to 64"),
    ("database", "pool_size", "65", "1 to 64"),
    ("database", "pool_size", "-3", "1 to 64"),
    # booleans
    ("metadata", "access_log", "maybe", "maybe"),
    ("metadata", "access_log", "", "true or false"),
    # IP networks
    ("metadata", "trusted_proxies", "10.0.0.0/33", "10.0.0.0/33"),
    ("metadata", "trusted_proxies", "10.0.0.1, proxy.example.org", "proxy.example.org"),
    ("metadata", "trusted_proxies", "2001:db8::/129", "2001:db8::/129"),
    # database URLs
    ("database", "url", "oracle://scott:tiger@db/orcl", "oracle"),
    ("database", "url", "mssql+pyodbc://db/metadatad", "mssql"),
    ("database", "url", "not a url", "not a database URL"),
    ("database", "url", "", "URL"),
    # empty host name
    ("conductor", "hostname", "", "empty"),
    # conductor membership
    ("conductor", "group", "g" * 256, "255"),
    ("conductor", "tftp_address", "tftp.example.org", "not an IP address"),
    ("conductor", "http_address", "10.0.0.5:8775", "http://"),
    ("conductor", "http_address", "ftp://10.0.0.5/", "http://"),
    ("conductor", "http_address", "http://10.0.0.5:99999/", "bad URL"),
    ("conductor", "heartbeat_interval", "0", "0.1"),
    ("conductor", "heartbeat_interval", "soon", "soon"),
    ("conductor", "heartbeat_timeout", "-5", "-5"),
    ("conductor", "ring_points", "0", "1 to"),
    ("conductor", "ring_points", "many", "many"),
    ("conductor", "replicas", "0", "1 to 16"),
    ("conductor", "max_load_factor", "0.9", "0.9"),
    ("conductor", "max_load_factor", "nan", "nan"),
    # TFTP listen addresses and limits
    ("tftp", "listen", "tftp.example.org", "tftp.example.org"),
    ("tftp", "listen", "udp:69:interface=10.0.0.1", "udp:69"),
    ("tftp", "listen", "10.0.0.1:70000", "70000"),
    ("tftp", "listen", "10.0.0.1:x", "'10.0.0.1:x'"),
    ("tftp", "listen", "[2001:db8::1", "[IPv6]:PORT"),
    ("tftp", "listen", "255.255.255.255", "broadcast"),
    ("tftp", "listen", "224.0.0.1", "multicast"),
    ("tftp", "listen", "[::]:69", "IPv6"),
    ("tftp", "listen", "10.0.0.1 10.0.0.1:69", "twice"),
    ("tftp", "root", "", "empty"),
    ("tftp", "serve_unowned", "sometimes", "sometimes"),
    ("tftp", "max_blksize", "511", "512 to 65464"),
    ("tftp", "max_blksize", "65465", "512 to 65464"),
    ("tftp", "max_windowsize", "0", "1 to 32767"),
    ("tftp", "timeout", "0", "0"),
    ("tftp", "retries", "-1", "0 to 100"),
    ("tftp", "max_transfers", "0", "1 to 100000"),
    ("tftp", "max_transfers_per_source", "many", "many"),
    ("tftp", "event_retention", "-1", "-1"),
    # dynamic vendordata
    ("vendordata", "dynamic_targets", "http://10.0.0.9/", "name@url"),
    ("vendordata", "dynamic_targets", "testing@", "name@url"),
    ("vendordata", "dynamic_targets", "testing@ftp://10.0.0.9/", "http://"),
    ("vendordata", "dynamic_targets", "static@http://10.0.0.9/", "'static'"),
    ("vendordata", "dynamic_targets", "a b@http://10.0.0.9/", "name@url"),
    ("vendordata", "dynamic_targets", "x/y@http://10.0.0.9/", "target name"),
    ("vendordata", "dynamic_targets", "a@http://h/, a@http://i/", "used twice"),
    ("vendordata", "connect_timeout", "0", "0.1"),
    ("vendordata", "read_timeout", "soon", "soon"),
    ("vendordata", "failure_fatal", "perhaps", "perhaps"),
    ("vendordata", "hold_boot", "maybe", "maybe"),
    ("vendordata", "hold_retry", "1", "5"),
    ("vendordata", "ca_file", "/nonexistent/ca.pem", "cannot read"),
    ("vendordata", "cache_ttl", "-1", "-1"),
    ("keystone", "auth_url", "keystone:5000", "http://"),
    ("keystone", "user_domain_name", "", "empty"),
    ("keystone", "ca_file", "/nonexistent/ca.pem", "cannot read"),
    ("keystone", "timeout", "0", "0.1"),
    ("tftp", "listen", "systemd:domain=INET", "one of index= or name="),
    ("tftp", "listen", "systemd:domain=UNIX:index=0", "domain=INET"),
    ("tftp", "listen", "systemd:domain=INET:index=x", "index must be"),
    ("tftp", "listen", "systemd:domain=INET:index=0:name=tftp", "one of index="),
    ("logging", "format", "xml", "text or json"),
]


def test_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    """A ca_file without a PEM certificate is refused at start, naming the key."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello\n")
    path = write(tmp_path, f"[vendordata]\nca_file = {not_pem}\n")
    assert "[vendordata] ca_file:" in one_line_error(path)
    assert "no PEM certificate" in one_line_error(path)


@pytest.mark.parametrize("missing", ["username", "password", "project_name"])
def test_keystone_needs_the_whole_service_user(tmp_path: Path, missing: str) -> None:
    """With auth_url set, username, password and project_name are required."""
    keys = {"auth_url": "http://127.0.0.1:5000", "username": "u", "password": "p"}
    keys["project_name"] = "service"
    del keys[missing]
    text = "[keystone]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    message = one_line_error(write(tmp_path, text))
    assert f"[keystone] {missing}: must be set when auth_url is set" in message


@pytest.mark.parametrize(("section", "key", "raw", "detail"), BAD_VALUES)
def test_bad_value_is_one_line_naming_file_section_and_key(
    tmp_path: Path, section: str, key: str, raw: str, detail: str
) -> None:
    """Each bad value is a ConfigError: one line with the path, [section], key and the value."""
    path = write(tmp_path, f"[{section}]\n{key} = {raw}\n")
    message = one_line_error(path)
    assert f"[{section}] {key}:" in message
    assert detail in message


def test_first_bad_key_is_reported_among_good_ones(tmp_path: Path) -> None:
    """A bad key after good keys and sections is the one named."""
    path = write(
        tmp_path,
        "[database]\nurl = sqlite:///x.sqlite\n[metadata]\ncache_ttl = 3\naccess_log = sure\n",
    )
    message = one_line_error(path)
    assert "[metadata] access_log:" in message
    assert "sure" in message


def test_unknown_section(tmp_path: Path) -> None:
    """A misspelt section is refused, naming it and listing the known ones."""
    message = one_line_error(write(tmp_path, "[databse]\nurl = sqlite:///x\n"))
    assert "[databse]" in message
    assert "unknown section" in message
    assert "[database]" in message


def test_unknown_key(tmp_path: Path) -> None:
    """A misspelt key is refused, naming [section] and key and listing the known keys."""
    message = one_line_error(write(tmp_path, "[metadata]\ncache_tll = 3\n"))
    assert "[metadata] cache_tll:" in message
    assert "unknown key" in message
    assert "cache_ttl" in message


def test_default_section_is_refused(tmp_path: Path) -> None:
    """[DEFAULT] is not configparser's magic section here: it is an unknown section."""
    message = one_line_error(write(tmp_path, "[DEFAULT]\nurl = sqlite:///x\n"))
    assert "[DEFAULT]" in message
    assert "unknown section" in message


def test_default_section_values_do_not_leak_into_sections(tmp_path: Path) -> None:
    """A [DEFAULT] next to real sections still fails instead of feeding keys to every section."""
    message = one_line_error(write(tmp_path, "[DEFAULT]\nregion = eu\n[metadata]\ncache_ttl = 3\n"))
    assert "[DEFAULT]" in message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    """A key set twice in one section is refused with the file, line, section and key."""
    message = one_line_error(
        write(tmp_path, "[database]\nurl = sqlite:///a\npool_size = 2\nurl = sqlite:///b\n")
    )
    assert "database" in message
    assert "url" in message
    assert "line 4" in message


def test_duplicate_key_names_section_and_key_like_other_errors(tmp_path: Path) -> None:
    """A duplicate key is reported as `[database] url: ...`, the form of every other error."""
    message = one_line_error(write(tmp_path, "[database]\nurl = sqlite:///a\nurl = sqlite:///b\n"))
    assert "[database] url" in message
    assert message.count(str(tmp_path)) == 1


def test_duplicate_section_is_refused(tmp_path: Path) -> None:
    """A section given twice is refused, naming it."""
    message = one_line_error(write(tmp_path, "[metadata]\nregion = a\n[metadata]\ncache_ttl = 1\n"))
    assert "metadata" in message
    assert "section appears twice" in message


def test_missing_file(tmp_path: Path) -> None:
    """A configuration file that does not exist is one line with its path and the reason."""
    message = one_line_error(tmp_path / "absent.conf")
    assert "No such file" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the configuration file is one clear line."""
    message = one_line_error(tmp_path)
    assert "cannot read" in message


def test_non_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is one line saying so."""
    path = tmp_path / "latin1.conf"
    path.write_bytes("[metadata]\nregion = Zürich\n".encode("latin-1"))
    message = one_line_error(path)
    assert "UTF-8" in message


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("url = sqlite:///x\n", "before any [section]"),
        ("[database\nurl = sqlite:///x\n", "before any [section]"),
        ("[database]\nthis line has no equals sign\n", "line 2"),
        ("[database]\nurl = sqlite:///x\n[metadata]\n= orphan value\n", "line 4"),
    ],
)
def test_syntax_error(tmp_path: Path, text: str, detail: str) -> None:
    """INI syntax errors are one line with the path and where the error is."""
    message = one_line_error(write(tmp_path, text))
    assert detail in message


def test_indented_line_is_not_silently_glued_to_the_previous_value(tmp_path: Path) -> None:
    """An accidentally indented key gives a ConfigError instead of a multi-line URL."""
    path = write(tmp_path, "[database]\nurl = sqlite:///x.sqlite\n  pool_size = 3\n")
    message = one_line_error(path)
    assert "[database]" in message


# --- values the config accepts but that cannot work ----------------------------------


@pytest.mark.parametrize("listen", ["tcp:99999", "tcp:-1"])
def test_out_of_range_port_is_refused(tmp_path: Path, listen: str) -> None:
    """A port outside 0..65535 is a bad endpoint string, named [metadata] listen."""
    message = one_line_error(write(tmp_path, f"[metadata]\nlisten = {listen}\n"))
    assert "[metadata] listen:" in message


@pytest.mark.parametrize(
    "listen",
    ["tcp:8775:backlog=0", "tcp:8775:backlog=-5", "tcp:8775:backlog=lots", "tcp:1:backlog=70000"],
)
def test_bad_backlog_is_refused(tmp_path: Path, listen: str) -> None:
    """backlog= outside 1..65535 (or not a number) is a bad endpoint string."""
    message = one_line_error(write(tmp_path, f"[metadata]\nlisten = {listen}\n"))
    assert "[metadata] listen:" in message


def test_backlog_is_accepted(tmp_path: Path) -> None:
    """backlog= in range is Twisted's own keyword, passed through unchanged."""
    config = load_config(write(tmp_path, "[metadata]\nlisten = tcp:8775:backlog=1024\n"))
    assert config.metadata.listen == "tcp:8775:backlog=1024"


def test_ssl_endpoint_with_missing_certificate_is_a_config_error(tmp_path: Path) -> None:
    """ssl:...:privateKey=<missing file> is a one-line error naming [metadata] listen."""
    missing = tmp_path / "missing.pem"
    path = write(tmp_path, f"[metadata]\nlisten = ssl:8443:privateKey={missing}\n")
    message = one_line_error(path)
    assert "[metadata] listen:" in message


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(tmp_path: Path, url: str) -> None:
    """An in-memory SQLite database cannot be shared: refused as [database] url."""
    message = one_line_error(write(tmp_path, f"[database]\nurl = {url}\n"))
    assert "[database] url:" in message


# --- static vendordata ----------------------------------------------------------------


def test_static_vendordata_relative_to_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative static_file is read from the working directory, as the example says."""
    (tmp_path / "vd.json").write_text('{"a": {"b": [1, 2]}}', encoding="utf-8")
    path = write(tmp_path, "[vendordata]\nstatic_file = vd.json\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).vendordata.static == {"a": {"b": [1, 2]}}


def test_empty_static_file_means_empty_vendordata(tmp_path: Path) -> None:
    """static_file left empty serves {} and reads nothing."""
    config = load_config(write(tmp_path, "[vendordata]\nstatic_file =\n"))
    assert config.vendordata.static == {}


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (None, "No such file"),
        (b'{"cloud-init": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'["a", "list"]', "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
    ],
    ids=["missing", "truncated", "empty", "not-utf8", "list", "string", "null"],
)
def test_bad_static_vendordata(tmp_path: Path, content: bytes | None, detail: str) -> None:
    """A static_file that is missing, not JSON or not an object is one line naming it."""
    vendordata = tmp_path / "vendordata.json"
    if content is not None:
        vendordata.write_bytes(content)
    path = write(tmp_path, f"[vendordata]\nstatic_file = {vendordata}\n")
    message = one_line_error(path)
    assert "[vendordata] static_file:" in message
    assert str(vendordata) in message
    assert detail in message


# --- the shared secret stays secret ---------------------------------------------------


def test_shared_secret_is_not_in_repr(tmp_path: Path) -> None:
    """proxy_shared_secret is loaded but never shown by repr() or str() of the config."""
    config = load_config(write(tmp_path, f"[metadata]\nproxy_shared_secret = {SECRET}\n"))
    assert config.metadata.proxy_shared_secret == SECRET
    for shown in (repr(config), str(config), repr(config.metadata), str(config.metadata)):
        assert SECRET not in shown
        assert "proxy_shared_secret" not in shown


def test_shared_secret_is_not_in_errors(tmp_path: Path) -> None:
    """An error about the secret's key (set twice) does not print the secret."""
    message = one_line_error(
        write(
            tmp_path,
            f"[metadata]\nproxy_shared_secret = {SECRET}\nproxy_shared_secret = {SECRET}x\n",
        )
    )
    assert "proxy_shared_secret" in message
    assert SECRET not in message


# --- the admin token ------------------------------------------------------------------


def token_config(tmp_path: Path, content: bytes | None) -> Config:
    """A config whose [admin] token_file holds ``content`` (None: the file is absent)."""
    token_file = tmp_path / "admin-token"
    if content is not None:
        token_file.write_bytes(content)
    return load_config(write(tmp_path, f"[admin]\ntoken_file = {token_file}\n"))


def test_admin_token_is_read_and_stripped(tmp_path: Path) -> None:
    """The token is the file's one line without surrounding whitespace."""
    config = token_config(tmp_path, b"  Zm9vYmFyLXRva2Vu-_x \n\n")
    assert read_admin_token(config) == "Zm9vYmFyLXRva2Vu-_x"


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (None, "No such file"),
        (b"", "one token"),
        (b" \n\t\n", "one token"),
        (b"two words\n", "without spaces"),
        (b"line-one\nline-two\n", "without spaces"),
    ],
    ids=["missing", "empty", "blank", "spaces", "two-lines"],
)
def test_bad_admin_token_file(tmp_path: Path, content: bytes | None, detail: str) -> None:
    """A missing, empty or spaced token file is a one-line error naming the file and key."""
    config = token_config(tmp_path, content)
    with pytest.raises(ConfigError) as excinfo:
        read_admin_token(config)
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1
    assert config.path in message
    assert "[admin] token_file:" in message
    assert str(tmp_path / "admin-token") in message
    assert detail in message


def test_non_utf8_admin_token_is_a_config_error(tmp_path: Path) -> None:
    """A binary token file is a ConfigError naming [admin] token_file."""
    config = token_config(tmp_path, b"\xff\xfe\xfd-token\n")
    with pytest.raises(ConfigError, match=r"\[admin\] token_file"):
        read_admin_token(config)


def test_admin_token_never_in_error(tmp_path: Path) -> None:
    """A refused token (it has a space) is not echoed in the message."""
    config = token_config(tmp_path, b"very-secret-part other-part\n")
    with pytest.raises(ConfigError) as excinfo:
        read_admin_token(config)
    assert "very-secret-part" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("heartbeat_interval = 10\nheartbeat_timeout = 20\n", "got 20:"),
        ("heartbeat_interval = 1\nheartbeat_timeout = 1.5\n", "got 1.5:"),
        ("heartbeat_interval = 30\n", "got 60 (the default):"),
    ],
)
def test_heartbeat_timeout_must_span_two_heartbeats(tmp_path: Path, text: str, shown: str) -> None:
    """A timeout of two heartbeats or less is refused in one line that says why."""
    message = one_line_error(write(tmp_path, "[conductor]\n" + text))
    assert "[conductor] heartbeat_timeout: must be more than twice heartbeat_interval" in message
    assert shown in message


def test_membership_timings_just_over_two_heartbeats_are_accepted(tmp_path: Path) -> None:
    """The test cluster's timings (1 s heartbeats, 5 s timeout) and the edge load."""
    config = load_config(
        write(tmp_path, "[conductor]\nheartbeat_interval = 1\nheartbeat_timeout = 2.1\n")
    )
    assert (config.conductor.heartbeat_interval, config.conductor.heartbeat_timeout) == (1, 2.1)
    config = load_config(write(tmp_path, "[conductor]\nmax_load_factor =\ntftp_address = ::1\n"))
    assert config.conductor.max_load_factor is None
    assert config.conductor.tftp_address == "::1"
