"""A checked fake of :class:`~metadatad.db.cluster.ClusterRepository`: it passes
``tests/db/test_cluster_repository.py`` beside the SQL one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from metadatad.core.conductors import Claim, ConductorInfo, ConductorRecord, RingState
from metadatad.testing.repositories import MemoryNodeRepository

__all__ = ["MemoryClusterRepository"]


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
