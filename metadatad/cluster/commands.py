# -*- test-case-name: tests.cluster.test_cluster_cli -*-
"""``metadatad-manage conductor list`` and ``ring show [--without HOST]``.

Both read the database directly (no daemon needed) and judge liveness by the
database's clock with this configuration's ``heartbeat_timeout``; ``ring show``
computes the rings of the conductors live now, exactly as the daemons do.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, TextIO

from metadatad.config import Config
from metadatad.core.conductors import RingState
from metadatad.core.placement import Placement, moves_without, ring_report
from metadatad.db.cluster import ClusterRepository

__all__ = ["add_commands", "run_command"]


class CommandError(Exception):
    """A failure to report on one line (``metadatad-manage`` exits 1)."""


def add_commands(commands: Any) -> None:
    """Add the ``conductor`` and ``ring`` commands to ``metadatad-manage``'s parser."""
    conductor = commands.add_parser("conductor", help="conductors of the cluster")
    conductor_actions = conductor.add_subparsers(dest="action", required=True, metavar="ACTION")
    conductor_list = conductor_actions.add_parser(
        "list", help="every conductor, live or not, with the nodes it holds"
    )
    conductor_list.add_argument("--json", action="store_true", help="print JSON documents")
    ring = commands.add_parser("ring", help="the consistent-hash ring of live conductors")
    ring_actions = ring.add_subparsers(dest="action", required=True, metavar="ACTION")
    ring_show = ring_actions.add_parser(
        "show", help="nodes per conductor, or the nodes that would move if HOST failed"
    )
    ring_show.add_argument(
        "--without", metavar="HOST", help="list the nodes that would move if HOST failed"
    )
    ring_show.add_argument("--json", action="store_true", help="print JSON")


def run_command(
    args: argparse.Namespace, config: Config, repository: ClusterRepository, stdout: TextIO
) -> int:
    """Run ``conductor list`` or ``ring show``; returns the exit status."""
    timeout = config.conductor.heartbeat_timeout
    if args.command == "conductor":
        return _conductor_list(repository, timeout, args.json, stdout)
    assert args.command == "ring"
    recorded = repository.ring_state()
    live = RingState(recorded.generation, repository.live_members(timeout), recorded.changed_at)
    placement = Placement.of(
        live,
        replicas=config.conductor.replicas,
        points=config.conductor.ring_points,
        max_load_factor=config.conductor.max_load_factor,
    )
    node_groups = repository.node_groups()
    if args.without is not None:
        return _without(live, placement, node_groups, args, stdout)
    report = ring_report(live, placement, node_groups, repository.claims())
    report["recorded_groups"] = {
        group: list(names) for group, names in sorted(recorded.by_group().items())
    }
    if args.json:
        _dump(report, stdout)
        return 0
    print(
        f"generation {report['generation']}"
        + (f" (since {report['changed_at']})" if report["changed_at"] else ""),
        file=stdout,
    )
    if recorded.members != live.members:
        print(
            "the live conductors differ from the generation's: the daemons record the "
            "change at their next poll",
            file=stdout,
        )
    rows = [("CONDUCTOR", "GROUP", "LIVE", "ASSIGNED", "CLAIMED")]
    rows += [
        (
            c["name"],
            c["group"] or "-",
            "yes" if c["live"] else "no",
            str(c["assigned"]),
            str(c["claimed"]),
        )
        for c in report["conductors"]
    ]
    _table(rows, stdout)
    unowned = ", ".join(f"{g or '(no group)'}: {n}" for g, n in report["unowned_groups"].items())
    print(
        f"{report['nodes']} nodes, {report['unowned']} unowned"
        + (f" ({unowned})" if unowned else "")
        + f", {report['pending']} not claimed by their ring owner yet",
        file=stdout,
    )
    return 0


def _conductor_list(
    repository: ClusterRepository, timeout: float, as_json: bool, stdout: TextIO
) -> int:
    counts = repository.claim_counts()
    documents = [
        {**r.to_document(), "nodes": counts.get(r.name, 0)} for r in repository.conductors(timeout)
    ]
    if as_json:
        _dump(documents, stdout)
        return 0
    rows = [("NAME", "GROUP", "LIVE", "HEARTBEAT", "NODES", "TFTP", "HTTP")]
    for d in documents:
        state = "yes" if d["live"] else ("no" if d["online"] else "stopped")
        rows.append(
            (
                d["name"],
                d["group"] or "-",
                state,
                f"{d['heartbeat_age']:.1f} s ago",
                str(d["nodes"]),
                d["tftp_address"] or "-",
                d["http_address"] or "-",
            )
        )
    _table(rows, stdout)
    return 0


def _without(
    live: RingState,
    placement: Placement,
    node_groups: dict[str, str],
    args: argparse.Namespace,
    stdout: TextIO,
) -> int:
    host = args.without
    names = [name for _group, name in live.members]
    if host not in names:
        raise CommandError(
            f"{host} is not a live conductor (live: {', '.join(sorted(names)) or 'none'})"
        )
    moves = moves_without(placement, node_groups, host)
    if args.json:
        _dump(
            [
                {"uuid": uuid, "group": node_groups[uuid], "from": old, "to": new}
                for uuid, (old, new) in moves.items()
            ],
            stdout,
        )
        return 0
    print(f"if {host} failed, {len(moves)} of {len(node_groups)} nodes would move", file=stdout)
    if moves:
        rows = [("NODE", "GROUP", "FROM", "TO")]
        rows += [
            (uuid, node_groups[uuid] or "-", old or "-", new or "(unowned)")
            for uuid, (old, new) in moves.items()
        ]
        _table(rows, stdout)
    return 0


def _table(rows: Sequence[Sequence[str]], stdout: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=stdout)


def _dump(document: Any, stdout: TextIO) -> None:
    json.dump(document, stdout, indent=2, sort_keys=True)
    print(file=stdout)
