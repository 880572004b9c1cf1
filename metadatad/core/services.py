# -*- test-case-name: tests.web.test_services_view -*-
"""The service view's rules: members of a service, their cardinal values, and the
project's services, with no HTTP and no storage.

After the cattle "Metadata Server" design: a leaf per fact (``SERVICE_LEAVES``).
Beside the caller's own service (``all_hosts``), the view lists every service of the
caller's project with its hosts, the way Rancher's tree lists a stack's services.
Cardinal values come from the store (:mod:`metadatad.db.services`): unique within a
service, kept while a node stays a member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs

from metadatad.core.nodes import Node

__all__ = [
    "SERVICE_LEAVES",
    "Member",
    "Membership",
    "ProjectView",
    "choose_cardinals",
    "member_of",
    "membership_of",
    "plan_membership",
    "service_document",
    "service_members",
]

SERVICE_LEAVES = (
    "cardinal_value",
    "hostname",
    "virt_ip_address",
    "service_domain",
    "service_name",
    "port",
    "all_hosts",
    "image",
    "volumes",
    "services",
)


@attrs.frozen
class Member:
    """A node of the project and its cardinal value (None outside a service)."""

    node: Node
    cardinal: int | None = None


@attrs.frozen
class ProjectView:
    """What the store read for the service view: the project's nodes and when the
    project's watch index last changed (``Last-Modified``; None: never recorded)."""

    members: tuple[Member, ...] = ()
    changed_at: datetime | None = None


def member_of(node: Node, view: ProjectView) -> Member:
    """The caller as the store has it now (fresher than a cached record)."""
    for member in view.members:
        if member.node.uuid == node.uuid:
            return member
    return Member(node, None)


def _order(member: Member) -> tuple[int, int, str]:
    cardinal = member.cardinal
    return (cardinal is None, cardinal if cardinal is not None else 0, member.node.uuid)


def service_members(me: Member, view: ProjectView) -> list[Member]:
    """The members of ``me``'s service in its project, by cardinal value then uuid."""
    if me.node.service is None:
        return []
    wanted = (me.node.project_id, me.node.service.name)
    members = [
        m
        for m in view.members
        if m.node.service is not None and (m.node.project_id, m.node.service.name) == wanted
    ]
    if all(m.node.uuid != me.node.uuid for m in members):
        members.append(me)
    return sorted(members, key=_order)


def _host(member: Member) -> dict[str, Any]:
    return {
        "cardinal_value": member.cardinal,
        "hostname": member.node.hostname,
        "virt_ip_address": member.node.local_ipv4 or None,
        "uuid": member.node.uuid,
    }


def _services(me: Member, view: ProjectView) -> list[dict[str, Any]]:
    """Every service of the project, by name; domain and port are those of the member
    with the lowest cardinal value (members may disagree)."""
    by_name: dict[str, list[Member]] = {}
    for member in (*view.members, me):
        node = member.node
        if node.service is None or node.project_id != me.node.project_id:
            continue
        group = by_name.setdefault(node.service.name, [])
        if all(m.node.uuid != node.uuid for m in group):
            group.append(member)
    found = []
    for name in sorted(by_name):
        members = sorted(by_name[name], key=_order)
        first = members[0].node.service
        assert first is not None
        found.append(
            {
                "service_name": name,
                "service_domain": first.domain or None,
                "port": first.port,
                "hosts": [_host(m) for m in members],
            }
        )
    return found


def service_document(node: Node, view: ProjectView) -> dict[str, Any]:
    """The whole service view of ``node`` (``Accept: application/json``)."""
    me = member_of(node, view)
    node = me.node
    assert node.service is not None
    return {
        "cardinal_value": me.cardinal,
        "hostname": node.hostname,
        "virt_ip_address": node.local_ipv4 or None,
        "service_domain": node.service.domain or None,
        "service_name": node.service.name,
        "port": node.service.port,
        "all_hosts": [_host(m) for m in service_members(me, view)],
        "image": node.image_id or None,
        "volumes": dict(node.block_device_mapping) or None,
        "services": _services(me, view),
    }


# --- joining and leaving -------------------------------------------------------------

Membership = tuple[str, str]  # (project_id, service name)


def membership_of(node: Node) -> Membership | None:
    """The service ``node`` is written into, or None."""
    return (node.project_id, node.service.name) if node.service is not None else None


def choose_cardinals(taken: Iterable[int], joining: Sequence[Node]) -> dict[str, int]:
    """Cardinal values for ``joining`` nodes of one service whose members hold
    ``taken``: each its launch index if free, else the lowest free value; joiners in
    order of launch index, then uuid, so the outcome does not depend on import order."""
    used = set(taken)
    chosen: dict[str, int] = {}
    for node in sorted(joining, key=lambda n: (n.launch_index, n.uuid)):
        value = node.launch_index
        if value in used:
            value = 0
            while value in used:
                value += 1
        used.add(value)
        chosen[node.uuid] = value
    return chosen


def plan_membership(
    current: Mapping[str, Membership], new_nodes: Sequence[Node]
) -> tuple[list[str], dict[Membership, list[Node]]]:
    """Who of ``new_nodes`` leaves (uuids) and who joins (by service), given their
    ``current`` memberships: a node joins when written with a service it was not a
    member of, and leaves when written without it (or with another)."""
    leaving: list[str] = []
    joining: dict[Membership, list[Node]] = {}
    for node in new_nodes:
        wanted = membership_of(node)
        had = current.get(node.uuid)
        if had == wanted:
            continue
        if had is not None:
            leaving.append(node.uuid)
        if wanted is not None:
            joining.setdefault(wanted, []).append(node)
    return leaving, joining
