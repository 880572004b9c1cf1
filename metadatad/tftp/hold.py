# -*- test-case-name: tests.tftp.test_boot_hold -*-
"""Holding a machine's boot while its dynamic vendordata failed (``[vendordata]
hold_boot``): the iPXE script or pxelinux config it asks for becomes a wait-and-retry
stanza instead of its kernel, for as long as the node is marked
(:mod:`metadatad.db.vendordata`).

Pure: the stanza depends on the node, the failed target names (never the reasons: the
console is not the place for a target's URL or error text), the name the machine asked
for, the address it asked and the retry interval.

* pxelinux: a prompt that waits ``retry`` seconds, then ``CONFIG`` reloads the same file
  (a fresh TFTP request: a cleared node gets its real config).
* iPXE: a message, ``sleep``, then ``reboot``: the firmware starts the boot again from
  DHCP.  (Re-chaining the same script from itself would nest one more script per retry,
  and iPXE builds before ``chain --replace`` cannot avoid that.)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["HOLD_KINDS", "hold_stanza"]

#: The boot config kinds a hold replaces; GRUB configs are served as usual.
HOLD_KINDS = ("ipxe", "pxelinux")

# pxelinux's TIMEOUT is in tenths of a second, at most 35996.
_PXELINUX_MAX_TENTHS = 35996


def hold_stanza(
    kind: str, node_uuid: str, targets: Sequence[str], filename: str, retry: float
) -> str:
    """The text served instead of the node's ``kind`` config while it is held."""
    names = ", ".join(sorted(targets)) or "unknown"
    why = f"metadatad: boot of node {node_uuid} held: dynamic vendordata failed ({names})"
    seconds = max(1, round(retry))
    if kind == "ipxe":
        return (
            "#!ipxe\n"
            f"echo {why}\n"
            f"echo metadatad: starting the boot again in {seconds} seconds\n"
            f"sleep {seconds}\n"
            "reboot\n"
        )
    if kind == "pxelinux":
        tenths = min(_PXELINUX_MAX_TENTHS, seconds * 10)
        return (
            f"# {why}\n"
            "# Asks for this file again until the node is cleared.\n"
            f"SAY {why}\n"
            f"SAY metadatad: asking again in {seconds} seconds\n"
            "DEFAULT hold\n"
            "PROMPT 1\n"
            f"TIMEOUT {tenths}\n"
            "ONTIMEOUT hold\n"
            "LABEL hold\n"
            f"  CONFIG {filename}\n"
        )
    raise ValueError(f"no hold stanza for {kind!r}")
