# -*- test-case-name: tests.web.test_console_activity -*-
"""A node's boot timeline: its DHCP mapping, TFTP transfers and HTTP activity, in
time order (pure: no I/O, no clock)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from metadatad.db.activity import Activity
from metadatad.db.bootevents import BootEvent

__all__ = ["Entry", "timeline"]

# Within one second (the stored precision), the order a boot goes through.
BOOT_ORDER = {
    "dhcp": 0,
    "tftp": 1,
    "token": 2,
    "metadata": 3,
    "vendordata": 4,
    "peer-post": 5,
    "operator": 6,
}
# Metadata rows closer than this are one crawl (cloud-init's runs are seconds apart).
CRAWL_GAP = timedelta(seconds=120)


@attrs.frozen
class Entry:
    """One line of the timeline: when, what (``kind``), a summary, and whether it is
    a problem."""

    at: datetime
    kind: str
    summary: str
    detail: str = ""
    problem: bool = False
    until: datetime | None = None


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC).replace(tzinfo=None, microsecond=0)


def timeline(
    push: Mapping[str, Any] | None,
    events: Iterable[BootEvent],
    activity: Iterable[Activity],
) -> list[Entry]:
    """Entries oldest first.  ``push`` is the DHCP push state (as the admin API shows
    it), ``events`` the node's TFTP boot events, ``activity`` its HTTP activity."""
    entries: list[Entry] = []
    if push is not None:
        entries.append(
            Entry(
                _moment(push["desired_at"]),
                "dhcp",
                f"DHCP mapping wanted by {push['owner']} (generation {push['generation']})",
            )
        )
        if push.get("pushed_at") is not None and push["status"] == "pushed":
            entries.append(Entry(_moment(push["pushed_at"]), "dhcp", "DHCP mapping pushed"))
        elif push["status"] != "pushed":
            entries.append(
                Entry(
                    _moment(push["desired_at"]),
                    "dhcp",
                    f"DHCP push {push['status']} after {push['attempts']} attempts",
                    push.get("last_error") or "",
                    problem=bool(push.get("last_error")),
                )
            )
    for event in events:
        size = f"{event.bytes_sent} bytes in {event.duration:.3f} s"
        entries.append(
            Entry(
                event.started_at,
                "tftp",
                f"TFTP {event.filename}: {event.outcome}",
                f"{event.kind} from {event.client} via {event.conductor}, {size}"
                + (f": {event.error}" if event.error else ""),
                problem=event.outcome != "complete",
            )
        )
    entries.extend(_http(activity))
    entries.sort(key=lambda e: (e.at, BOOT_ORDER.get(e.kind, len(BOOT_ORDER))))
    return entries


def _http(activity: Iterable[Activity]) -> list[Entry]:
    entries: list[Entry] = []
    crawl: list[Activity] = []

    def close() -> None:
        if crawl:
            requests = sum(a.requests for a in crawl)
            imdsv2 = all(a.imdsv2 for a in crawl)
            entries.append(
                Entry(
                    min(a.first_at for a in crawl),
                    "metadata",
                    f"metadata crawl: {requests} requests, "
                    + ("IMDSv2 (every request with a token)" if imdsv2 else "IMDSv1 requests"),
                    "via " + ", ".join(sorted({a.conductor for a in crawl})),
                    until=max(a.last_at for a in crawl),
                )
            )
            crawl.clear()

    for row in sorted(activity, key=lambda a: a.first_at):
        if row.kind == "metadata":
            if crawl and row.first_at - max(a.last_at for a in crawl) > CRAWL_GAP:
                close()
            crawl.append(row)
            continue
        times = f" ({row.requests} times)" if row.requests > 1 else ""
        summary = {
            "token": "IMDSv2 session token issued",
            "peer-post": "posted",
            "vendordata": "vendordata",
            "operator": "operator",
        }.get(row.kind, row.kind)
        problem = (row.kind == "vendordata" and not row.detail.endswith(": ok")) or (
            row.kind == "peer-post" and "HTTP 2" not in row.detail
        )
        entries.append(
            Entry(
                row.first_at,
                row.kind,
                f"{summary}: {row.detail}{times}",
                f"via {row.conductor}",
                problem=problem,
                until=row.last_at if row.last_at != row.first_at else None,
            )
        )
    close()
    return entries
