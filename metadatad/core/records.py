# -*- test-case-name: tests.db.test_store -*-
"""Stored nodes: a node with its bookkeeping, and the rule that a port (its MAC, its
address) belongs to one node.  The SQL repository and its fake share these."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from metadatad.core.nodes import Node


def utc_moment(seconds: float) -> datetime:
    """A naive UTC datetime at whole-second precision (what every backend stores)."""
    return datetime.fromtimestamp(seconds, tz=UTC).replace(tzinfo=None, microsecond=0)


def utc_text(moment: datetime) -> str:
    """A naive UTC moment as the API shows it: ISO 8601 with a ``Z``."""
    return moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


class ConflictError(Exception):
    """A write that conflicts with stored state; ``field`` names what conflicts."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def as_json(self) -> dict[str, str]:
        """The body of the 409 answer."""
        return {"error": "conflict", "field": self.field, "message": self.message}


def port_fields(new_nodes: Sequence[Node], as_list: bool) -> dict[tuple[str, str], str]:
    """Every port MAC and address of ``new_nodes`` as ``("mac" | "ip", value)``, with
    the field that names it in errors: ``[2].ports[0].mac`` with ``as_list`` (an
    import of several nodes), else ``ports[0].mac``."""
    wanted: dict[tuple[str, str], str] = {}
    for index, node in enumerate(new_nodes):
        prefix = f"[{index}]." if as_list else ""
        for p, port in enumerate(node.ports):
            wanted[("mac", port.mac)] = f"{prefix}ports[{p}].mac"
            if port.ip is not None:
                wanted[("ip", port.ip)] = f"{prefix}ports[{p}].ip"
    return wanted


def port_taken(field: str, value: str, owner: str) -> ConflictError:
    """The conflict of a port MAC or address (``value``, named by ``field``) that node
    ``owner`` already has: a port belongs to one node."""
    return ConflictError(field, f"{value} is a port of node {owner}")


@attrs.frozen
class NodeRecord:
    """A stored node with its bookkeeping."""

    node: Node
    revision: int
    created_at: datetime
    updated_at: datetime
    has_password: bool = False
    # The node's cardinal value in its service (metadatad.db.services); None outside one.
    cardinal_value: int | None = None

    def to_document(self) -> dict[str, Any]:
        """The node document plus read-only bookkeeping fields, for operators."""
        document = self.node.to_document()
        document["revision"] = self.revision
        document["created_at"] = utc_text(self.created_at)
        document["updated_at"] = utc_text(self.updated_at)
        document["password_set"] = self.has_password
        document["cardinal_value"] = self.cardinal_value
        return document
