# -*- test-case-name: tests.core.test_config -*-
"""The value parsers of the configuration schema: each takes the raw string of one key
and returns the typed value, or raises :class:`BadValue` with a one-line reason that
:func:`metadatad.config.parse_config` prefixes with the file, section and key."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable

from twisted.internet.endpoints import serverFromString

from metadatad.core.addresses import IPNetwork
from metadatad.core.backlog import endpoint_backlog
from metadatad.core.bootmapping import MAX_OPTION_VALUE, URL_FIELDS, longest_url
from metadatad.core.systemd import PREFIX, parse


class BadValue(ValueError):
    """Raised by value parsers; turned into a ``ConfigError`` with the location."""


class _UnusedReactor:
    """Stands in for the reactor when an endpoint string is only checked: building
    a server endpoint stores its reactor and uses it only when listening."""


def _string(raw: str) -> str:
    return raw.strip()


def _nonempty_string(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise BadValue("must not be empty")
    return value


MAX_WORKERS = 64


def _number(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise BadValue(f"expected a number, got {raw.strip()!r}") from None
        if math.isnan(value) or value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and <= {maximum:g}"
            raise BadValue(f"expected a number >= {minimum:g}{upper}, got {raw.strip()!r}")
        return value

    return parse


def _integer(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise BadValue(f"expected an integer, got {raw.strip()!r}") from None
        if not minimum <= value <= maximum:
            raise BadValue(f"expected an integer from {minimum} to {maximum}, got {value}")
        return value

    return parse


def _workers(raw: str) -> int | None:
    """``auto`` (None: one per usable CPU, decided at start-up) or an integer, 1..64."""
    if raw.strip().lower() == "auto":
        return None
    try:
        return _integer(1, MAX_WORKERS)(raw)
    except BadValue as e:
        raise BadValue(f"{e} (or auto)") from None


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise BadValue(f"expected true or false, got {raw.strip()!r}")


def _endpoint(raw: str) -> str:
    """A Twisted server endpoint string; checked by parsing it against a fake reactor."""
    value = raw.strip()
    if not value:
        raise BadValue("expected a Twisted endpoint string such as tcp:8775:interface=127.0.0.1")
    if value.startswith("systemd:"):
        # Systemd endpoints resolve inherited descriptors when built, which only works
        # under systemd; check the syntax that can be checked here.
        if "domain=" not in value or ("index=" not in value and "name=" not in value):
            raise BadValue(f"bad systemd endpoint {value!r}: needs domain= and index= or name=")
        return value
    try:
        serverFromString(_UnusedReactor(), value)
    except Exception as e:  # a missing certificate file, an unknown type, bad syntax...
        raise BadValue(f"bad endpoint string {value!r}: {e}") from None
    port = _endpoint_port(value)
    if port is not None and not 0 <= port <= 65535:
        raise BadValue(f"bad endpoint string {value!r}: port {port} is not 0..65535")
    backlog = endpoint_backlog(value)
    if backlog is not None and not (backlog.isdigit() and 1 <= int(backlog) <= 65535):
        raise BadValue(f"bad endpoint string {value!r}: backlog {backlog} is not 1..65535")
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
        raise BadValue(f"at most 255 characters, got {len(value)}")
    return value


def _optional_ip(raw: str) -> str:
    value = raw.strip()
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadValue(f"not an IP address: {value!r}") from None


def _optional_http_url(raw: str) -> str:
    from urllib.parse import urlsplit

    value = raw.strip()
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise BadValue(f"bad URL {value!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(value) > 255:
        raise BadValue(
            f"expected an http:// or https:// URL such as http://10.0.0.5:8775, got {value!r}"
        )
    return value.rstrip("/")


def _optional_load_factor(raw: str) -> float | None:
    if not raw.strip():
        return None
    return _number(1.0, 100.0)(raw)


def _optional_timeout(raw: str) -> float | None:
    if not raw.strip():
        return None
    return _number(0.1, 600)(raw)


def _required_header(raw: str) -> tuple[str, str | None] | None:
    """``Name`` or ``Name: value`` (e.g. ``Metadata-Flavor: metadatad``); empty: none."""
    value = raw.strip()
    if not value:
        return None
    name, sep, expected = value.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
        raise BadValue(f"expected a header name, or 'Name: value', got {value!r}")
    return name, (expected.strip() if sep else None)


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in raw.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise BadValue(f"not an IP address or network: {item!r}") from None
    return tuple(networks)


def _database_url(raw: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    value = raw.strip()
    try:
        url = make_url(value)
    except ArgumentError:
        raise BadValue("not a database URL") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise BadValue(
            f"unsupported database {url.get_backend_name()!r}: use sqlite, "
            "postgresql+psycopg or mysql+pymysql"
        )
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise BadValue(f"{shown}: an in-memory SQLite database cannot be shared; name a file")
    try:
        url.get_dialect().import_dbapi()
    except ImportError as e:
        raise BadValue(
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
            raise BadValue(f"expected {expected}, got {raw.strip()!r}")
        return value

    return parse


_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _vendordata_targets(raw: str) -> tuple[tuple[str, str], ...]:
    """``name@url`` items, comma or space separated; split on the first ``@`` (Nova)."""
    targets: list[tuple[str, str]] = []
    for item in raw.replace(",", " ").split():
        name, at, url = item.partition("@")
        if not at:
            raise BadValue(f"{item!r}: expected name@url, such as testing@http://10.0.0.9/")
        if not _TARGET_NAME.match(name):
            raise BadValue(
                f"{item!r}: a target name is 1-64 letters, digits, '_', '.' or '-'"
            )
        if name == "static":
            raise BadValue(f"{item!r}: 'static' is the static vendordata's name")
        if any(name == known for known, _ in targets):
            raise BadValue(f"{item!r}: the name {name!r} is used twice")
        try:
            checked = _optional_http_url(url)
        except BadValue as e:
            raise BadValue(f"{item!r}: {e}") from None
        if not checked:
            raise BadValue(f"{item!r}: expected name@url, such as testing@http://10.0.0.9/")
        # The URL is POSTed to as given (a trailing slash may matter to the target).
        targets.append((name, url))
    return tuple(targets)


def check_ca_file(value: str) -> None:
    """``value`` is empty or a readable file of PEM certificates."""
    if not value:
        return
    try:
        with open(value, "rb") as f:
            content = f.read()
    except OSError as e:
        raise BadValue(f"cannot read {value}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in content:
        raise BadValue(f"{value} holds no PEM certificate")


def _udp_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    """``ADDRESS[:PORT]`` items (``[IPv6]:PORT``), comma or space separated; port 69.

    The wildcard ``0.0.0.0`` is allowed (the server learns which address each client
    contacted from IP_PKTINFO); ``::``, broadcast and multicast addresses are not.
    ``systemd:domain=INET:index=N`` (or ``name=NAME``) is a socket passed by systemd,
    kept as ``(description, 0)``.
    """
    found: list[tuple[str, int]] = []
    for item in raw.replace(",", " ").split():
        if item.startswith(PREFIX):
            try:
                parse(item)
            except ValueError as e:
                raise BadValue(str(e)) from None
            found.append((item, 0))
            continue
        host, port = item, "69"
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise BadValue(f"bad address {item!r}: expected [IPv6]:PORT")
            port = rest[1:] or port
        elif item.count(":") == 1:
            host, port = item.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise BadValue(f"not an IP address: {item!r}") from None
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise BadValue(f"bad port in {item!r}: expected 0..65535")
        if address.is_multicast or str(address) == "255.255.255.255":
            raise BadValue(f"{item!r}: a broadcast or multicast address cannot serve TFTP")
        if address.version == 6 and address.is_unspecified:
            raise BadValue(f"{item!r}: list each IPv6 address (:: is not supported)")
        found.append((str(address), int(port)))
    if len(set(found)) != len(found):
        raise BadValue("an address is listed twice")
    return tuple(found)


def _boot_option(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > MAX_OPTION_VALUE or any(c.isspace() or c in ",#" for c in value):
        raise BadValue(
            f"expected a file name of 1 to {MAX_OPTION_VALUE} characters (Neutron's limit) "
            f"without spaces, commas or #, got {value[:80]!r}"
        )
    return value


def _ipxe_url(raw: str) -> str:
    value = raw.strip()
    if not value:
        return ""
    try:
        longest_url(value, "")
    except (KeyError, IndexError, ValueError):
        fields = ", ".join("{" + f + "}" for f in URL_FIELDS)
        raise BadValue(f"bad template {value!r}: the placeholders are {fields}") from None
    if any(c.isspace() or c in ",#" for c in value):
        raise BadValue(f"{value!r}: no spaces, commas or # (dnsmasq option syntax)")
    if len(value) > 4 * MAX_OPTION_VALUE:
        raise BadValue(f"{value[:80]!r}...: far over the {MAX_OPTION_VALUE}-character limit")
    return value
