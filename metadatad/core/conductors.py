"""Conductors, ring generations and claims as the cluster layer sees them: plain
values, judged by the database's clock when they were read."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs

from metadatad.core.records import utc_text


def _isoformat(moment: datetime | None) -> str | None:
    return None if moment is None else utc_text(moment)


@attrs.frozen
class ConductorInfo:
    """What a conductor says about itself in every heartbeat."""

    name: str
    group: str = ""
    tftp_address: str = ""
    http_address: str = ""


@attrs.frozen
class ConductorRecord:
    """A stored conductor, judged by the database's clock at the time of the query."""

    name: str
    group: str
    tftp_address: str
    http_address: str
    online: bool
    live: bool
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float  # seconds, by the database's clock

    def to_document(self) -> dict[str, Any]:
        """The JSON form the admin API shows."""
        return {
            "name": self.name,
            "group": self.group,
            "tftp_address": self.tftp_address,
            "http_address": self.http_address,
            "online": self.online,
            "live": self.live,
            "started_at": _isoformat(self.started_at),
            "heartbeat_at": _isoformat(self.heartbeat_at),
            "heartbeat_age": round(self.heartbeat_age, 3),
        }


@attrs.frozen
class RingState:
    """A generation and the membership recorded for it: sorted ``(group, name)`` pairs."""

    generation: int = 0
    members: tuple[tuple[str, str], ...] = ()
    changed_at: datetime | None = None

    def by_group(self) -> dict[str, tuple[str, ...]]:
        """``{group: sorted names}`` of the groups with at least one member."""
        groups: dict[str, list[str]] = {}
        for group, name in self.members:
            groups.setdefault(group, []).append(name)
        return {group: tuple(sorted(names)) for group, names in groups.items()}


@attrs.frozen
class Claim:
    """Who holds a node, since when, at which generation, for which conductor group."""

    node_uuid: str
    owner: str
    group: str
    generation: int
    claimed_at: datetime

    def to_document(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "generation": self.generation,
            "claimed_at": _isoformat(self.claimed_at),
        }


def encode_members(members: Iterable[tuple[str, str]]) -> str:
    """The canonical text of a membership (sorted, so equal sets give equal text)."""
    return json.dumps(sorted({(g, n) for g, n in members}), separators=(",", ":"))


def decode_members(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(g), str(n)) for g, n in json.loads(text or "[]"))


@attrs.frozen
class ClaimEvent:
    """This conductor now holds ``nodes`` (claimed at ``generation``)."""

    conductor: str
    generation: int
    nodes: tuple[str, ...]
    previous: Mapping[str, str | None]  # node uuid -> former owner (None: unclaimed)
    reason: str  # "start-up", "membership change" or "reconcile"
