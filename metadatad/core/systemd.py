# -*- test-case-name: tests.tftp.test_tftp_activation -*-
"""The syntax of a socket handed over by systemd: ``systemd:domain=INET:index=N`` (or
``name=NAME``, matched against ``FileDescriptorName=``), as in Twisted's ``systemd:``
stream endpoints.  Parsing only; adopting the descriptor is the listeners' job."""

from __future__ import annotations

import attrs

PREFIX = "systemd:"


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
