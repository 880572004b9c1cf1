"""The typed seams between the layers: what a collaborator must offer, not what it is.

Constructors take these; the real objects (the stores, the membership service, the
DHCP pusher, the Keystone client) and the fakes of :mod:`metadatad.testing` both
satisfy them.  The clock everywhere is Twisted's
:class:`~twisted.internet.interfaces.IReactorTime` (a reactor, or ``task.Clock`` in
tests); it is not redeclared here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from metadatad.core.conductors import Claim, ConductorInfo, ConductorRecord, RingState
from metadatad.core.nodes import Node
from metadatad.core.peers import SharedView
from metadatad.core.records import NodeRecord
from metadatad.core.services import ProjectView
from metadatad.db.bootevents import BootEvent
from metadatad.db.peers import PostResult
from metadatad.db.vendordata import VendordataError


class TokenSource(Protocol):
    """Service tokens for outbound calls: a Keystone client or a static token."""

    def token(self) -> Deferred[str]: ...

    def invalidate(self, token: str | None = None) -> None: ...

    def endpoint(self, service_type: str, interface: str = "public") -> str | None: ...


class NodeStore(Protocol):
    """The node store as the sites use it (a ``Store`` or its fake)."""

    def ping(self) -> Deferred[None]: ...

    def get_node(self, uuid: str) -> Deferred[NodeRecord | None]: ...

    def node_by_ip(self, ip: str) -> Deferred[NodeRecord | None]: ...

    def node_generation(self) -> Deferred[int]: ...

    def list_nodes(self) -> Deferred[list[NodeRecord]]: ...

    def upsert_nodes(
        self, new_nodes: Sequence[Node], as_list: bool = True
    ) -> Deferred[list[bool]]: ...

    def delete_node(self, uuid: str) -> Deferred[bool]: ...

    def clear_password(self, uuid: str) -> Deferred[bool | None]: ...


class NodeLookup(Protocol):
    """Where the metadata site's cache loads nodes from: by caller addresses (many per
    query, through ``db.cache.BatchedLookups``) and uuid, and the node generation it
    revalidates them with (one read per interval)."""

    def node_by_ip(self, ip: str) -> Deferred[NodeRecord | None]: ...

    def nodes_by_ip(self, ips: Sequence[str]) -> Deferred[dict[str, NodeRecord]]: ...

    def get_node(self, uuid: str) -> Deferred[NodeRecord | None]: ...

    def node_generation(self) -> Deferred[int]: ...


class BootEvents(Protocol):
    """Recent boot events of a node, newest first (a ``BootEventStore``)."""

    def recent(self, node_uuid: str, limit: int = 50) -> Deferred[list[BootEvent]]: ...


class ClusterView(Protocol):
    """What the admin API reads of conductor membership (``MembershipService``)."""

    heartbeat_timeout: float

    def health(self) -> str: ...

    def heartbeat_age(self) -> float | None: ...

    def conductors(self) -> Deferred[list[dict[str, Any]]]: ...

    def ring(self) -> Deferred[dict[str, Any]]: ...

    def node_boot(self, node_uuid: str, group: str) -> Deferred[dict[str, Any]]: ...


class VendordataMarks(Protocol):
    """Where the vendordata caller records fatal failures, and clears them."""

    def mark(self, error: VendordataError) -> Deferred[bool]: ...

    def clear(self, node_uuid: str, target: str) -> Deferred[None]: ...


class VendordataErrors(VendordataMarks, Protocol):
    """Recorded fatal vendordata failures (a ``VendordataErrorStore``)."""

    def for_node(self, node_uuid: str) -> Deferred[list[VendordataError]]: ...

    def all(self) -> Deferred[list[VendordataError]]: ...


class PeerEntries(Protocol):
    """What operators do with the entries nodes posted (a ``PeerStore``)."""

    def delete_shared(self, node_uuid: str) -> Deferred[int | None]: ...

    def node_entries(self, node_uuid: str) -> Deferred[dict[str, dict[str, str]]]: ...


class PushStates(Protocol):
    """The DHCP push state of a node (the ``DhcpPusher``)."""

    def state(self, node_uuid: str) -> Deferred[dict[str, Any] | None]: ...


class ClusterRepositoryLike(Protocol):
    """What the service needs from :class:`~metadatad.db.cluster.ClusterRepository`
    (its memory fake has the same methods)."""

    def heartbeat(self, info: ConductorInfo, instance: str) -> str | None: ...
    def mark_offline(self, name: str, instance: str) -> bool: ...
    def observe(self, timeout: float) -> RingState: ...
    def ring_state(self) -> RingState: ...
    def conductors(self, timeout: float) -> list[ConductorRecord]: ...
    def node_groups(self, group: str | None = None) -> dict[str, str]: ...
    def claims(self, group: str | None = None) -> dict[str, Claim]: ...
    def claim_of(self, node_uuid: str) -> Claim | None: ...
    def claim_counts(self) -> dict[str, int]: ...
    def claim(self, owner: str, group: str, generation: int, node_uuids: Any) -> list[str]: ...


class Passwords(Protocol):
    """The node passwords the metadata site reads and stores once (a ``Store``)."""

    def get_password(self, uuid: str) -> Deferred[str | None]: ...

    def set_password(self, uuid: str, password: str) -> Deferred[bool | None]: ...


class PeerBoard(Protocol):
    """What the peer routes and watches do with node entries (a ``PeerStore``)."""

    def post(
        self,
        node_uuid: str,
        entries: Mapping[str, str],
        shared: bool,
        max_keys: int,
        max_bytes: int,
    ) -> Deferred[PostResult | None]: ...

    def shared_view(self, project: str) -> Deferred[tuple[int, SharedView]]: ...

    def project_services(self, project: str) -> Deferred[tuple[int, ProjectView]]: ...

    def indexes(self, projects: Iterable[str]) -> Deferred[dict[str, int]]: ...


class WorkerStatus(Protocol):
    """The metadata site's worker processes, as ``/healthz`` reports them."""

    def status(self) -> dict[str, Any]:
        """``configured``, ``running``, ``pids`` and ``restarts``."""
        ...
