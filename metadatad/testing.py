"""Checked fakes for tests: each passes the same test suite as the real object.

:class:`MemoryNodeRepository` passes ``tests/test_store.py`` beside
:class:`~metadatad.db.store.NodeRepository` on SQLite, PostgreSQL and MariaDB;
:class:`MemoryStore` is a :class:`~metadatad.db.store.Store` whose Deferreds have
already fired, for driving the Klein sites with ``StubTreq`` without threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from metadatad.db.store import ConflictError, NodeRecord
from metadatad.nodes import Node

T = TypeVar("T")


@attrs.define
class _Stored:
    node: Node
    revision: int
    created_at: datetime
    updated_at: datetime
    password: str | None = None


class MemoryNodeRepository:
    """NodeRepository's behaviour, in a dict.  ``available = False`` makes it fail."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._nodes: dict[str, _Stored] = {}
        self.available = True

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

    def list_nodes(self) -> list[NodeRecord]:
        self._check()
        return [_record(self._nodes[uuid]) for uuid in sorted(self._nodes)]

    def get_password(self, uuid: str) -> str | None:
        self._check()
        stored = self._nodes.get(uuid)
        return stored.password if stored is not None else None

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
        for index, node in enumerate(new_nodes):
            prefix = f"[{index}]." if as_list else ""
            for p, port in enumerate(node.ports):
                for kind, value in (("mac", port.mac), ("ip", port.ip)):
                    if value is not None and (kind, value) in taken:
                        raise ConflictError(
                            f"{prefix}ports[{p}].{kind}",
                            f"{value} is a port of node {taken[(kind, value)]}",
                        )
        moment = self._moment()
        created = []
        for node in new_nodes:
            old = self._nodes.get(node.uuid)
            created.append(old is None)
            if old is None:
                self._nodes[node.uuid] = _Stored(node, 1, moment, moment)
            else:
                self._nodes[node.uuid] = _Stored(
                    node, old.revision + 1, old.created_at, moment, old.password
                )
        return created

    def delete_node(self, uuid: str) -> bool:
        self._check()
        return self._nodes.pop(uuid, None) is not None

    def set_password(self, uuid: str, password: str) -> bool | None:
        self._check()
        stored = self._nodes.get(uuid)
        if stored is None:
            return None
        if stored.password is not None:
            return False
        stored.password = password
        return True


def _record(stored: _Stored) -> NodeRecord:
    return NodeRecord(
        node=stored.node,
        revision=stored.revision,
        created_at=stored.created_at,
        updated_at=stored.updated_at,
        has_password=stored.password is not None,
    )


class MemoryStore:
    """The :class:`~metadatad.db.store.Store` interface over a memory repository.

    Calls run at once and return fired Deferreds; ``calls`` counts them by name so
    tests can assert that the hot path does not query.
    """

    def __init__(self, repository: Any = None) -> None:
        self.repository = repository if repository is not None else MemoryNodeRepository()
        self.calls: dict[str, int] = {}
        self._change_listeners: list[Callable[[], None]] = []

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        self._change_listeners.append(listener)

    def _run(self, name: str, *args: Any, changes: bool = False) -> Deferred[Any]:
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            result = getattr(self.repository, name)(*args)
        except Exception as e:
            return fail(e)
        if changes:
            for listener in self._change_listeners:
                listener()
        return succeed(result)

    def ping(self) -> Deferred[None]:
        return self._run("ping")

    def get_node(self, uuid: str) -> Deferred[NodeRecord | None]:
        return self._run("get_node", uuid)

    def node_by_ip(self, ip: str) -> Deferred[NodeRecord | None]:
        return self._run("node_by_ip", ip)

    def list_nodes(self) -> Deferred[list[NodeRecord]]:
        return self._run("list_nodes")

    def get_password(self, uuid: str) -> Deferred[str | None]:
        return self._run("get_password", uuid)

    def upsert_nodes(self, new_nodes: Sequence[Node], as_list: bool = True) -> Deferred[list[bool]]:
        return self._run("upsert_nodes", new_nodes, as_list, changes=True)

    def delete_node(self, uuid: str) -> Deferred[bool]:
        return self._run("delete_node", uuid, changes=True)

    def set_password(self, uuid: str, password: str) -> Deferred[bool | None]:
        return self._run("set_password", uuid, password, changes=True)
