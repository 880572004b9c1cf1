"""Checked fakes for tests: each passes the same test suite as the real object.

:class:`MemoryNodeRepository` passes ``tests/test_store.py`` beside
:class:`~metadatad.db.store.NodeRepository` on SQLite, PostgreSQL and MariaDB;
:class:`MemoryStore` is a :class:`~metadatad.db.store.Store` whose Deferreds have
already fired, for driving the Klein sites with ``StubTreq`` without threads.
:class:`MemoryBootEventRepository` passes ``tests/test_bootevents.py`` beside
:class:`~metadatad.db.bootevents.BootEventRepository`.
:class:`MemoryClusterRepository` passes ``tests/test_cluster_repository.py`` beside
:class:`~metadatad.db.cluster.ClusterRepository`.
:class:`MemoryPeerRepository` passes ``tests/test_peers_repository.py`` beside
:class:`~metadatad.db.peers.PeerRepository`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from metadatad.db.bootevents import BootEvent
from metadatad.db.cluster import Claim, ConductorInfo, ConductorRecord, RingState
from metadatad.db.peers import PeerConflict, PostResult
from metadatad.db.store import ConflictError, NodeRecord
from metadatad.metadata.peers import check_quota
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
        projects = {n.project_id for n in new_nodes} | {
            self._nodes[n.uuid].node.project_id for n in new_nodes if n.uuid in self._nodes
        }
        for listener in self.project_listeners:
            listener(projects)
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
        gone = self._nodes.pop(uuid, None)
        deleted = gone is not None
        if gone is not None:
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

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``f`` at once (the real store runs it on its threadpool)."""
        try:
            return succeed(f(*args))
        except Exception as e:
            return fail(e)

    def ping(self) -> Deferred[None]:
        return self._run("ping")

    def get_node(self, uuid: str) -> Deferred[NodeRecord | None]:
        return self._run("get_node", uuid)

    def node_by_ip(self, ip: str) -> Deferred[NodeRecord | None]:
        return self._run("node_by_ip", ip)

    def node_by_mac(self, mac: str) -> Deferred[NodeRecord | None]:
        return self._run("node_by_mac", mac)

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


class MemoryClusterRepository:
    """ClusterRepository's behaviour, in dicts, over a :class:`MemoryNodeRepository`.

    ``now`` is the *database's* clock (seconds); conductors never supply times.
    ``available = False`` makes every call fail, like an unreachable database.
    """

    def __init__(
        self, nodes: MemoryNodeRepository | None = None, now: Callable[[], float] = time.time
    ) -> None:
        self.nodes = nodes if nodes is not None else MemoryNodeRepository()
        self._now = now
        self._conductors: dict[str, dict[str, Any]] = {}
        self._state: RingState | None = None
        self._claims: dict[str, Claim] = {}
        self.available = True
        self.nodes.delete_listeners.append(self._cascade)

    def _check(self) -> None:
        if not self.available:
            raise ConnectionError("database unreachable")

    def _cascade(self, node_uuid: str) -> None:
        self._claims.pop(node_uuid, None)

    def _moment(self) -> datetime:
        return datetime.fromtimestamp(self._now(), tz=UTC).replace(tzinfo=None)

    def _live(self, row: dict[str, Any], timeout: float) -> bool:
        return bool(row["online"]) and row["heartbeat_at"] >= self._moment() - timedelta(
            seconds=timeout
        )

    def heartbeat(self, info: ConductorInfo, instance: str) -> str | None:
        self._check()
        moment = self._moment()
        row = self._conductors.get(info.name)
        previous = row["instance"] if row is not None else None
        if row is None or row["instance"] != instance:
            row = self._conductors[info.name] = {"instance": instance, "started_at": moment}
        row.update(
            group=info.group,
            tftp_address=info.tftp_address,
            http_address=info.http_address,
            online=True,
            heartbeat_at=moment,
        )
        return previous

    def mark_offline(self, name: str, instance: str) -> bool:
        self._check()
        row = self._conductors.get(name)
        if row is None or row["instance"] != instance:
            return False
        row["online"] = False
        return True

    def conductors(self, timeout: float) -> list[ConductorRecord]:
        self._check()
        moment = self._moment()
        return [
            ConductorRecord(
                name=name,
                group=row["group"],
                tftp_address=row["tftp_address"],
                http_address=row["http_address"],
                online=row["online"],
                live=self._live(row, timeout),
                started_at=row["started_at"],
                heartbeat_at=row["heartbeat_at"],
                heartbeat_age=max(0.0, (moment - row["heartbeat_at"]).total_seconds()),
            )
            for name, row in sorted(self._conductors.items())
        ]

    def live_members(self, timeout: float) -> tuple[tuple[str, str], ...]:
        self._check()
        return tuple(
            sorted(
                (row["group"], name)
                for name, row in self._conductors.items()
                if self._live(row, timeout)
            )
        )

    def ring_state(self) -> RingState:
        self._check()
        return self._state or RingState()

    def observe(self, timeout: float) -> RingState:
        live = self.live_members(timeout)
        if self._state is None or self._state.members != live:
            generation = self._state.generation + 1 if self._state is not None else 1
            self._state = RingState(generation, live, self._moment())
        return self._state

    def node_groups(self, group: str | None = None) -> dict[str, str]:
        self._check()
        return {
            uuid: stored.node.conductor_group
            for uuid, stored in self.nodes._nodes.items()
            if group is None or stored.node.conductor_group == group
        }

    def claims(self, group: str | None = None) -> dict[str, Claim]:
        self._check()
        groups = self.node_groups(group)
        return {uuid: claim for uuid, claim in self._claims.items() if uuid in groups}

    def claim_of(self, node_uuid: str) -> Claim | None:
        self._check()
        return self._claims.get(node_uuid)

    def claim_counts(self) -> dict[str, int]:
        self._check()
        counts: dict[str, int] = {}
        for claim in self._claims.values():
            counts[claim.owner] = counts.get(claim.owner, 0) + 1
        return counts

    def claim(
        self, owner: str, group: str, generation: int, node_uuids: Iterable[str]
    ) -> list[str]:
        self._check()
        wanted = sorted(set(node_uuids))
        current = self._state.generation if self._state is not None else None
        groups = self.node_groups(group)
        if current == generation:
            moment = self._moment()
            for uuid in wanted:
                stored = self._claims.get(uuid)
                if uuid in groups and (
                    stored is None or stored.generation < generation or stored.group != group
                ):
                    self._claims[uuid] = Claim(uuid, owner, group, generation, moment)
        return [
            uuid
            for uuid in wanted
            if uuid in self._claims
            and uuid in groups
            and (self._claims[uuid].owner, self._claims[uuid].generation, self._claims[uuid].group)
            == (owner, generation, group)
        ]


class MemoryVendordataErrorRepository:
    """VendordataErrorRepository's behaviour, in a dict.  With ``nodes`` (a
    :class:`MemoryNodeRepository`), marks for unknown nodes are refused like the
    foreign key does.  ``available = False`` makes it fail."""

    def __init__(self, nodes: MemoryNodeRepository | None = None) -> None:
        from metadatad.db.vendordata import VendordataError

        self._nodes = nodes
        self._errors: dict[tuple[str, str], VendordataError] = {}
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise ConnectionError("database unreachable")

    def mark(self, error: Any) -> bool:
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

    def for_node(self, node_uuid: str) -> list[Any]:
        self._check()
        self._cascade()
        return [e for (uuid, _), e in sorted(self._errors.items()) if uuid == node_uuid]

    def all(self) -> list[Any]:
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
        nodes.project_listeners.append(self._touched)
        nodes.delete_listeners.append(self._cascade)

    def _touched(self, projects: set[str]) -> None:
        self._bump(projects)

    def _cascade(self, uuid: str) -> None:
        self._entries.pop(uuid, None)

    def _bump(self, projects: Iterable[str]) -> dict[str, int]:
        for project in projects:
            self._indexes[project] = self._indexes.get(project, 0) + 1
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
        new = {}
        for key, value in entries.items():
            if key not in stored:
                new[key] = value
                continue
            old_value, old_shared = stored[key]
            if old_shared != shared:
                scope = "shared with the project" if old_shared else "private"
                raise PeerConflict(key, f"key {key!r} is already set, {scope}")
            if old_value != value:
                raise PeerConflict(key, f"key {key!r} is already set to another value")
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

    def project_nodes(self, project: str) -> tuple[int, list[Node]]:
        self._nodes._check()
        members = [
            stored.node
            for uuid, stored in sorted(self._nodes._nodes.items())
            if stored.node.project_id == project
        ]
        return self._indexes.get(project, 0), members

    def node_entries(self, node_uuid: str) -> dict[str, dict[str, str]]:
        self._nodes._check()
        found: dict[str, dict[str, str]] = {"shared": {}, "private": {}}
        for key, (value, shared) in sorted(self._entries.get(node_uuid, {}).items()):
            found["shared" if shared else "private"][key] = value
        return found


class RecordingProvider:
    """A DHCP provider that records pushes (``pushes``: ``(mapping, previous,
    generation)``) and answers from ``outcomes``: a queue of None (success),
    :class:`~metadatad.dhcp.provider.PushError` instances (failure) or ``"hold"``
    (an unfired Deferred, kept in ``held`` for the test to fire); success when empty."""

    name = "recording"

    def __init__(self) -> None:
        self.pushes: list[tuple[Any, Any, int]] = []
        self.outcomes: list[Any] = []
        self.held: list[Deferred[None]] = []
        self.started = False
        self.stopped = False
        self.flushes = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def flush(self) -> None:
        self.flushes += 1

    def push(self, mapping: Any, previous: Any, generation: int) -> Deferred[None]:
        self.pushes.append((mapping, previous, generation))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome == "hold":
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        if isinstance(outcome, Exception):
            return fail(outcome)
        return succeed(None)

    def pushed_uuids(self) -> list[str]:
        """The node uuids pushed, in order."""
        return [mapping.node_uuid for mapping, _, _ in self.pushes]


# --- a Neutron and Keystone stub (their API subset the DHCP provider uses) ------------------

_NEUTRON_OPT_KEYS = {"opt_name", "opt_value", "ip_version"}


class NeutronStub:
    """``PUT /v2.0/ports/<id>`` and ``POST /v3/auth/tokens``, from the Networking and
    Identity v3 API references, checking what they receive.

    * Keystone: the password-auth body (methods, user name/domain/password, project
      scope) must match ``credentials``; answers 201 with ``X-Subject-Token`` and a
      token document (``expires_at`` ``token_lifetime`` seconds from ``now()``, a
      catalog whose ``network`` endpoint is ``neutron_url``); wrong credentials: 401.
    * Neutron: ``X-Auth-Token`` must be a token issued and not expired (or in
      ``static_tokens``), else 401; the body must be ``{"port": {"extra_dhcp_opts":
      [{"opt_name": str, "opt_value": str|null, "ip_version": 4|6}, ...]}}`` with no
      other key, option names at most 64 characters, values at most 255, else 400; an
      unknown port is 404 (Neutron's ``PortNotFound`` body).  Accepted options are
      merged into ``ports[id]`` (null deletes), as Neutron does.

    ``faults`` is a queue of actions for the next PUTs: an int status to answer
    (500, 503...) or ``"hang"`` (never answer: a timeout).  Every PUT is recorded in
    ``puts`` as ``(port id, body)``, ``accepted`` holds those applied.
    """

    def __init__(
        self,
        ports: Iterable[str] = (),
        credentials: dict[str, str] | None = None,
        now: Callable[[], float] = time.time,
        token_lifetime: float = 3600.0,
        neutron_url: str = "",
    ) -> None:
        self.ports: dict[str, dict[tuple[str, int], str]] = {p: {} for p in ports}
        self.credentials = credentials or {}
        self.now = now
        self.token_lifetime = token_lifetime
        self.neutron_url = neutron_url
        self.tokens: dict[str, float] = {}
        self.static_tokens: set[str] = set()
        self.faults: list[Any] = []
        self.puts: list[tuple[str, dict[str, Any]]] = []
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.accepted_at: dict[str, float] = {}  # port id -> time of its last update
        self.auth_requests = 0
        self.hanging: list[Any] = []

    def resource(self) -> Any:
        """The twisted.web resource serving both APIs."""
        from twisted.web.resource import Resource

        stub = self

        class Root(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                return stub._render(request)

        return Root()

    def _render(self, request: Any) -> Any:
        import json as _json
        import secrets as _secrets

        from twisted.web.server import NOT_DONE_YET

        path = request.path.decode()
        request.setHeader(b"Content-Type", b"application/json")
        if request.method == b"POST" and path.endswith("/auth/tokens"):
            self.auth_requests += 1
            try:
                body = _json.loads(request.content.read())
                auth = body["auth"]
                assert auth["identity"]["methods"] == ["password"]
                user = auth["identity"]["password"]["user"]
                project = auth["scope"]["project"]
                given = {
                    "username": user["name"],
                    "password": user["password"],
                    "user_domain_name": user["domain"]["name"],
                    "project_name": project["name"],
                    "project_domain_name": project["domain"]["name"],
                }
            except (ValueError, KeyError, TypeError, AssertionError):
                request.setResponseCode(400)
                return b'{"error": {"code": 400, "message": "malformed auth request"}}'
            if given != self.credentials:
                request.setResponseCode(401)
                return b'{"error": {"code": 401, "message": "authentication required"}}'
            token = _secrets.token_hex(16)
            expires = self.now() + self.token_lifetime
            self.tokens[token] = expires
            stamp = datetime.fromtimestamp(expires, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            request.setResponseCode(201)
            request.setHeader(b"X-Subject-Token", token.encode())
            catalog = [
                {
                    "type": "network",
                    "endpoints": [{"interface": "public", "url": self.neutron_url}],
                }
            ]
            return _json.dumps({"token": {"expires_at": stamp, "catalog": catalog}}).encode()
        prefix = "/v2.0/ports/"
        if request.method != b"PUT" or not path.startswith(prefix):
            request.setResponseCode(404)
            return b'{"NeutronError": {"type": "HTTPNotFound", "message": "no such resource"}}'
        port = path[len(prefix) :]
        raw = request.content.read()
        try:
            body = _json.loads(raw)
        except ValueError:
            body = None
        self.puts.append((port, body))
        token = (request.getHeader(b"X-Auth-Token") or b"").decode("ascii", "replace").strip()
        if token not in self.static_tokens and self.tokens.get(token, 0) <= self.now():
            request.setResponseCode(401)
            return b'{"error": "Authentication required"}'
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "hang":
                self.hanging.append(request)
                return NOT_DONE_YET
            request.setResponseCode(int(fault))
            return b'{"NeutronError": {"type": "ServiceUnavailable", "message": "try again"}}'
        problem = _check_port_body(body)
        if problem:
            request.setResponseCode(400)
            return _json.dumps(
                {"NeutronError": {"type": "HTTPBadRequest", "message": problem}}
            ).encode()
        if port not in self.ports:
            request.setResponseCode(404)
            return _json.dumps(
                {
                    "NeutronError": {
                        "type": "PortNotFound",
                        "message": f"Port {port} could not be found.",
                    }
                }
            ).encode()
        options = self.ports[port]
        for option in body["port"]["extra_dhcp_opts"]:
            key = (option["opt_name"], option.get("ip_version", 4))
            if option["opt_value"] is None:
                options.pop(key, None)
            else:
                options[key] = option["opt_value"]
        self.accepted.append((port, body))
        self.accepted_at[port] = self.now()
        return _json.dumps(
            {
                "port": {
                    "id": port,
                    "extra_dhcp_opts": [
                        {"opt_name": n, "opt_value": v, "ip_version": ver}
                        for (n, ver), v in options.items()
                    ],
                }
            }
        ).encode()


def _check_port_body(body: Any) -> str | None:
    """Why ``body`` is not a valid extra_dhcp_opts update (None: it is)."""
    if not isinstance(body, dict) or set(body) != {"port"} or not isinstance(body["port"], dict):
        return 'body must be {"port": {...}}'
    if set(body["port"]) != {"extra_dhcp_opts"}:
        return "only extra_dhcp_opts may be updated here"
    options = body["port"]["extra_dhcp_opts"]
    if not isinstance(options, list):
        return "extra_dhcp_opts must be a list"
    for option in options:
        if not isinstance(option, dict) or not set(option) <= _NEUTRON_OPT_KEYS:
            return f"bad option {option!r}"
        name, value = option.get("opt_name"), option.get("opt_value")
        if not isinstance(name, str) or not name or len(name) > 64:
            return f"bad opt_name {name!r}"
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            return f"bad opt_value {value!r}"
        if option.get("ip_version", 4) not in (4, 6):
            return f"bad ip_version {option.get('ip_version')!r}"
    return None
