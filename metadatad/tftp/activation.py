# -*- test-case-name: tests.test_tftp_activation -*-
"""TFTP on a UDP socket handed over by systemd (``ListenDatagram=`` in a .socket unit).

``[tftp] listen`` takes ``systemd:domain=INET:index=N`` (or ``name=NAME``, matched
against ``FileDescriptorName=``) next to plain addresses, with the syntax of Twisted's
``systemd:`` stream endpoints.  systemd binds port 69 itself, so the daemon never
needs a capability.  A socket bound to ``0.0.0.0`` gets IP_PKTINFO, as the daemon's own
wildcard listener does; a socket bound to one address is adopted as it is.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet import fdesc
from twisted.python.systemd import ListenFDs

PREFIX = "systemd:"

# The daemon's own listeners read datagrams of up to this size (Twisted's default).
MAX_PACKET_SIZE = 8192


class ActivationError(Exception):
    """No usable socket for a ``systemd:`` TFTP listener; ``str()`` is one line."""


@attrs.frozen
class SystemdSocket:
    """Which inherited descriptor a ``systemd:`` description names."""

    description: str
    domain: str
    index: int | None = None
    name: str | None = None


def parse(description: str) -> SystemdSocket:
    """Parse ``systemd:domain=INET|INET6:index=N|name=NAME``; ValueError if bad."""
    if not description.startswith(PREFIX):
        raise ValueError(f"{description!r} does not start with {PREFIX}")
    fields: dict[str, str] = {}
    for field in description[len(PREFIX) :].split(":"):
        key, sep, value = field.partition("=")
        if not sep or key not in ("domain", "index", "name") or key in fields or not value:
            raise ValueError(
                f"bad systemd socket {description!r}: expected "
                "systemd:domain=INET:index=N or systemd:domain=INET:name=NAME"
            )
        fields[key] = value
    if fields.get("domain") not in ("INET", "INET6"):
        raise ValueError(f"bad systemd socket {description!r}: domain=INET or domain=INET6")
    if ("index" in fields) == ("name" in fields):
        raise ValueError(f"bad systemd socket {description!r}: give one of index= or name=")
    index = None
    if "index" in fields:
        if not fields["index"].isdigit():
            raise ValueError(f"bad systemd socket {description!r}: index must be 0, 1, ...")
        index = int(fields["index"])
    return SystemdSocket(description, fields["domain"], index, fields.get("name"))


def find_descriptor(
    spec: SystemdSocket, environ: Mapping[str, str] | None = None, start: int | None = None
) -> int:
    """The inherited descriptor ``spec`` names (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID;
    ``start`` replaces systemd's first descriptor, 3, in tests)."""
    if environ is None:
        # Twisted read LISTEN_FDS when its endpoints module was imported and, as
        # systemd advises, removed it from the environment: share what it found.
        from twisted.internet.endpoints import _SystemdParser

        fds: ListenFDs = _SystemdParser._sddaemon
    else:
        fds = ListenFDs.fromEnvironment(environ=dict(environ), start=start)
    if spec.name is not None:
        named = fds.inheritedNamedDescriptors()
        if spec.name not in named:
            raise ActivationError(
                f"{spec.description}: systemd passed no socket named {spec.name!r} "
                f"(names: {', '.join(sorted(named)) or 'none'})"
            )
        return named[spec.name]
    descriptors = fds.inheritedDescriptors()
    assert spec.index is not None
    if spec.index >= len(descriptors):
        raise ActivationError(
            f"{spec.description}: systemd passed {len(descriptors)} sockets, "
            f"no index {spec.index} (is the daemon started by its .socket unit?)"
        )
    return descriptors[spec.index]


def inspect(fd: int, spec: SystemdSocket) -> tuple[socket.AddressFamily, str, int]:
    """Check that ``fd`` is a UDP socket of ``spec.domain``: ``(family, host, port)``."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise ActivationError(f"{spec.description}: descriptor {fd}: {e.strerror}") from None
    with sock:
        family, kind = sock.family, sock.type
        address = sock.getsockname() if kind == socket.SOCK_DGRAM else ("", 0)
    wanted = socket.AF_INET if spec.domain == "INET" else socket.AF_INET6
    if kind != socket.SOCK_DGRAM or family != wanted:
        raise ActivationError(
            f"{spec.description}: descriptor {fd} is not a {spec.domain} UDP socket "
            "(ListenDatagram= in the .socket unit)"
        )
    host, port = address[0], address[1]
    if family == socket.AF_INET6 and host == "::":
        raise ActivationError(
            f"{spec.description}: a socket on [::] cannot tell which address a client "
            "contacted; use ListenDatagram=0.0.0.0:69 or one address per socket"
        )
    return family, host, port


def adopt(reactor: Any, fd: int, family: int, host: str, protocol: Any) -> Any:
    """Start reading ``protocol``'s datagrams from ``fd``; returns the port."""
    fdesc.setNonBlocking(fd)
    fdesc._setCloseOnExec(fd)
    if family == socket.AF_INET and host == "0.0.0.0":
        from metadatad.tftp.server import IP_PKTINFO, PktinfoPort

        # Set on the shared socket: the port's own copy of the descriptor sees it.
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        port = PktinfoPort._fromListeningDescriptor(
            reactor, fd, family, protocol, maxPacketSize=MAX_PACKET_SIZE
        )
        port.startListening()
        return port
    return reactor.adoptDatagramPort(fd, family, protocol, maxPacketSize=MAX_PACKET_SIZE)
