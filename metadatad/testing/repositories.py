"""Checked fakes of the SQL repositories: each passes the same tests as the real one.

:class:`MemoryNodeRepository` passes ``tests/db/test_store.py`` beside
:class:`~metadatad.db.store.NodeRepository` on SQLite, PostgreSQL and MariaDB;
:class:`MemoryBootEventRepository` passes ``tests/db/test_bootevents.py`` beside
:class:`~metadatad.db.bootevents.BootEventRepository`;
:class:`MemoryVendordataErrorRepository` passes ``tests/db/test_vendordata_errors.py``
beside :class:`~metadatad.db.vendordata.VendordataErrorRepository`;
:class:`MemoryPeerRepository` passes ``tests/db/test_peers_repository.py`` beside
:class:`~metadatad.db.peers.PeerRepository`, and with :class:`MemoryNodeRepository`
``tests/db/test_services_repository.py`` (service members, cardinal values);
:class:`MemorySeenRepository` passes ``tests/db/test_liveness.py`` beside
:class:`~metadatad.db.seen.SeenRepository`.  They apply the same rules from
:mod:`metadatad.core` as the SQL ones (port ownership, write-once peer entries, quotas).
``available = False`` makes a fake fail like an unreachable database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

import attrs

from metadatad.core.nodes import Node
from metadatad.core.peers import SharedView, check_quota, new_entries
from metadatad.core.records import NodeRecord, port_fields, port_taken
from metadatad.core.services import Member, ProjectView, choose_cardinals, plan_membership
from metadatad.db.bootevents import BootEvent
from metadatad.db.peers import PostResult
from metadatad.db.vendordata import VendordataError

__all__ = [
    "MemoryBootEventRepository",
    "MemoryNodeRepository",
    "MemoryPeerRepository",
    "MemorySeenRepository",
    "MemoryVendordataErrorRepository",
]


@attrs.define
class _Stored:
    node: Node
    revision: int
    created_at: datetime
    updated_at: datetime
    password: str | None = None
    # (project, service name, cardinal value) while a member of a service.
    member: tuple[str, str, int] | None = None
    seen_at: datetime | None = None


class MemoryNodeRepository:
    """NodeRepository's behaviour, in a dict.  ``available = False`` makes it fail."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._nodes: dict[str, _Stored] = {}
        # Bumped by every write that changes a lookup's answer (the SQL table's counter).
        self._generation = 0
        self.available = True
        # Called with the uuid of each deleted node (the cluster fake's ON DELETE CASCADE).
        self.delete_listeners: list[Callable[[str], None]] = []
        # Called with the projects each write touched (the peer fake bumps their index).
        self.project_listeners: list[Callable[[set[str]], None]] = []

    def _check(self) -> None:
        if not self.available:
            raise ConnectionError("database unreachable")

    def _moment(self) -> datetime:
        return datetime.fromtimestamp(self._now(), tz=UTC).replace(tzinfo=None, microsecond=0)

    def ping(self) -> None:
        self._check()

    def get_node(self, uuid: str) -> NodeRecord | None:
        self._check()
        stored = self._nodes.get(uuid)
        return _record(stored) if stored is not None else None

    def node_by_ip(self, ip: str) -> NodeRecord | None:
        self._check()
        for stored in self._nodes.values():
            if ip in stored.node.ips:
                return _record(stored)
        return None

    def nodes_by_ip(self, ips: Sequence[str]) -> dict[str, NodeRecord]:
        self._check()
        wanted = set(ips)
        return {
            ip: _record(stored)
            for stored in self._nodes.values()
            for ip in stored.node.ips
            if ip in wanted
        }

    def node_by_mac(self, mac: str) -> NodeRecord | None:
        self._check()
        for stored in self._nodes.values():
            if any(port.mac == mac for port in stored.node.ports):
                return _record(stored)
        return None

    def list_nodes(self) -> list[NodeRecord]:
        self._check()
        return [_record(self._nodes[uuid]) for uuid in sorted(self._nodes)]

    def get_password(self, uuid: str) -> str | None:
        self._check()
        stored = self._nodes.get(uuid)
        return stored.password if stored is not None else None

    def node_generation(self) -> int:
        self._check()
        return self._generation

    def upsert_nodes(self, new_nodes: Sequence[Node], as_list: bool = True) -> list[bool]:
        self._check()
        importing = {n.uuid for n in new_nodes}
        taken: dict[tuple[str, str], str] = {}
        for uuid, stored in self._nodes.items():
            if uuid in importing:
                continue
            for port in stored.node.ports:
                taken[("mac", port.mac)] = uuid
                if port.ip is not None:
                    taken[("ip", port.ip)] = uuid
        # The SQL repository's order: every MAC, then every address.
        wanted = port_fields(new_nodes, as_list)
        for kind in ("mac", "ip"):
            for (k, value), field in wanted.items():
                if k == kind and (k, value) in taken:
                    raise port_taken(field, value, taken[(k, value)])
        moment = self._moment()
        created = []
        projects = {n.project_id for n in new_nodes} | {
            self._nodes[n.uuid].node.project_id for n in new_nodes if n.uuid in self._nodes
        }
        for listener in self.project_listeners:
            listener(projects)
        current: dict[str, tuple[str, str]] = {}
        for n in new_nodes:
            member = self._nodes[n.uuid].member if n.uuid in self._nodes else None
            if member is not None:
                current[n.uuid] = (member[0], member[1])
        leaving, joining = plan_membership(current, new_nodes)
        for node in new_nodes:
            old = self._nodes.get(node.uuid)
            created.append(old is None)
            if old is None:
                self._nodes[node.uuid] = _Stored(node, 1, moment, moment)
            else:
                self._nodes[node.uuid] = _Stored(
                    node,
                    old.revision + 1,
                    old.created_at,
                    moment,
                    old.password,
                    None if node.uuid in leaving else old.member,
                    old.seen_at,
                )
        for (project, name), members in sorted(joining.items()):
            holding = [
                stored.member[2]
                for stored in self._nodes.values()
                if stored.member is not None and stored.member[:2] == (project, name)
            ]
            for joiner, cardinal in choose_cardinals(holding, members).items():
                self._nodes[joiner].member = (project, name, cardinal)
        self._generation += 1
        return created

    def delete_node(self, uuid: str) -> bool:
        self._check()
        gone = self._nodes.pop(uuid, None)
        deleted = gone is not None
        if gone is not None:
            self._generation += 1
            for project_listener in self.project_listeners:
                project_listener({gone.node.project_id})
            for listener in self.delete_listeners:
                listener(uuid)
        return deleted

    def set_password(self, uuid: str, password: str) -> bool | None:
        self._check()
        stored = self._nodes.get(uuid)
        if stored is None:
            return None
        if stored.password is not None:
            return False
        stored.password = password
        self._generation += 1
        return True

    def clear_password(self, uuid: str) -> bool | None:
        self._check()
        stored = self._nodes.get(uuid)
        if stored is None:
            return None
        had = stored.password is not None
        stored.password = None
        self._generation += had
        return had


def _record(stored: _Stored) -> NodeRecord:
    return NodeRecord(
        node=stored.node,
        revision=stored.revision,
        created_at=stored.created_at,
        updated_at=stored.updated_at,
        has_password=stored.password is not None,
        cardinal_value=stored.member[2] if stored.member is not None else None,
    )


class MemoryBootEventRepository:
    """BootEventRepository's behaviour, in a list.  ``available = False`` makes it fail."""

    def __init__(self) -> None:
        self._events: list[BootEvent] = []
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise ConnectionError("database unreachable")

    def add(self, events: Sequence[BootEvent]) -> None:
        self._check()
        self._events.extend(events)

    def recent(self, node_uuid: str, limit: int = 50) -> list[BootEvent]:
        self._check()
        # Newest first; among equal start times the later insert first, like ``id DESC``.
        mine = [
            (e.started_at, i, e) for i, e in enumerate(self._events) if e.node_uuid == node_uuid
        ]
        mine.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [event for _, _, event in mine[:limit]]

    def prune(self, before: datetime) -> int:
        self._check()
        kept = [e for e in self._events if e.started_at >= before]
        pruned = len(self._events) - len(kept)
        self._events = kept
        return pruned


class MemoryVendordataErrorRepository:
    """VendordataErrorRepository's behaviour, in a dict.  With ``nodes`` (a
    :class:`MemoryNodeRepository`), marks for unknown nodes are refused like the
    foreign key does.  ``available = False`` makes it fail."""

    def __init__(self, nodes: MemoryNodeRepository | None = None) -> None:
        self._nodes = nodes
        self._errors: dict[tuple[str, str], VendordataError] = {}
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise ConnectionError("database unreachable")

    def mark(self, error: VendordataError) -> bool:
        self._check()
        if self._nodes is not None and self._nodes.get_node(error.node_uuid) is None:
            return False
        row = error.row()
        self._errors[(error.node_uuid, error.target)] = attrs.evolve(
            error, reason=row["reason"], conductor=row["conductor"]
        )
        return True

    def clear(self, node_uuid: str, target: str) -> None:
        self._check()
        self._errors.pop((node_uuid, target), None)

    def for_node(self, node_uuid: str) -> list[VendordataError]:
        self._check()
        self._cascade()
        return [e for (uuid, _), e in sorted(self._errors.items()) if uuid == node_uuid]

    def all(self) -> list[VendordataError]:
        self._check()
        self._cascade()
        return [e for _, e in sorted(self._errors.items())]

    def _cascade(self) -> None:
        # ON DELETE CASCADE: a deleted node's failures go with it.
        if self._nodes is not None:
            for key in [k for k in self._errors if self._nodes.get_node(k[0]) is None]:
                del self._errors[key]


class MemoryPeerRepository:
    """PeerRepository's behaviour over a :class:`MemoryNodeRepository`."""

    def __init__(self, nodes: MemoryNodeRepository) -> None:
        self._nodes = nodes
        self._entries: dict[str, dict[str, tuple[str, bool]]] = {}
        self._indexes: dict[str, int] = {}
        self._changed: dict[str, datetime] = {}
        nodes.project_listeners.append(self._touched)
        nodes.delete_listeners.append(self._cascade)

    def _touched(self, projects: set[str]) -> None:
        self._bump(projects)

    def _cascade(self, uuid: str) -> None:
        self._entries.pop(uuid, None)

    def _bump(self, projects: Iterable[str]) -> dict[str, int]:
        moment = self._nodes._moment()
        for project in projects:
            self._indexes[project] = self._indexes.get(project, 0) + 1
            self._changed[project] = moment
        return {p: self._indexes[p] for p in projects}

    def _node(self, uuid: str) -> Node | None:
        self._nodes._check()
        stored = self._nodes._nodes.get(uuid)
        return stored.node if stored is not None else None

    def post(
        self,
        node_uuid: str,
        entries: Mapping[str, str],
        shared: bool,
        max_keys: int,
        max_bytes: int,
    ) -> PostResult | None:
        node = self._node(node_uuid)
        if node is None:
            return None
        stored = self._entries.get(node_uuid, {})
        new = new_entries(stored, entries, shared)
        index = self._indexes.get(node.project_id, 0)
        if not new:
            return PostResult((), index)
        check_quota({k: v for k, (v, _) in stored.items()}, new, max_keys, max_bytes)
        self._entries.setdefault(node_uuid, {}).update((k, (v, shared)) for k, v in new.items())
        if shared:
            index = self._bump([node.project_id])[node.project_id]
        return PostResult(tuple(sorted(new)), index)

    def delete_shared(self, node_uuid: str) -> int | None:
        node = self._node(node_uuid)
        if node is None:
            return None
        stored = self._entries.get(node_uuid, {})
        gone = [k for k, (_, shared) in stored.items() if shared]
        for key in gone:
            del stored[key]
        if gone:
            self._bump([node.project_id])
        return len(gone)

    def index(self, project: str) -> int:
        return self.indexes([project]).get(project, 0)

    def indexes(self, projects: Iterable[str]) -> dict[str, int]:
        self._nodes._check()
        return {p: self._indexes[p] for p in set(projects) if p in self._indexes}

    def shared(self, project: str) -> tuple[int, list[tuple[str, dict[str, str]]]]:
        self._nodes._check()
        found = []
        for uuid in sorted(self._entries):
            node = self._node(uuid)
            if node is None or node.project_id != project:
                continue
            meta = {k: v for k, (v, shared) in sorted(self._entries[uuid].items()) if shared}
            if meta:
                found.append((uuid, meta))
        return self._indexes.get(project, 0), found

    def shared_view(self, project: str) -> tuple[int, SharedView]:
        index, entries = self.shared(project)
        seen = {
            uuid: moment
            for uuid, _ in entries
            if (moment := self._nodes._nodes[uuid].seen_at) is not None
        }
        return index, SharedView(tuple(entries), seen, self._changed.get(project))

    def project_services(self, project: str) -> tuple[int, ProjectView]:
        self._nodes._check()
        members = tuple(
            Member(stored.node, stored.member[2] if stored.member is not None else None)
            for uuid, stored in sorted(self._nodes._nodes.items())
            if stored.node.project_id == project
        )
        return self._indexes.get(project, 0), ProjectView(members, self._changed.get(project))

    def node_entries(self, node_uuid: str) -> dict[str, dict[str, str]]:
        self._nodes._check()
        found: dict[str, dict[str, str]] = {"shared": {}, "private": {}}
        for key, (value, shared) in sorted(self._entries.get(node_uuid, {}).items()):
            found["shared" if shared else "private"][key] = value
        return found


class MemorySeenRepository:
    """SeenRepository's behaviour over a :class:`MemoryNodeRepository`."""

    def __init__(self, nodes: MemoryNodeRepository) -> None:
        self._nodes = nodes

    def record(self, seen: Mapping[str, datetime]) -> int:
        self._nodes._check()
        changed = 0
        for uuid, moment in seen.items():
            stored = self._nodes._nodes.get(uuid)
            if stored is not None and (stored.seen_at is None or stored.seen_at < moment):
                stored.seen_at = moment
                changed += 1
        return changed

    def seen_at(self, node_uuid: str) -> datetime | None:
        self._nodes._check()
        stored = self._nodes._nodes.get(node_uuid)
        return stored.seen_at if stored is not None else None
