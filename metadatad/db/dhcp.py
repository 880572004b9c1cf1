# -*- test-case-name: tests.dhcp.test_dhcp_pusher -*-
"""Desired and pushed DHCP boot mappings per node (synchronous queries).

The pusher of the conductor that holds a node writes the node's *desired* mapping and,
after a push succeeded, copies it to *pushed*.  Every write is fenced by the claims
table: a desired mapping is written only for nodes whose claim names this conductor,
and recorded with the claim's generation; a push result is recorded only while the row
still carries that owner, generation and desired digest.  A conductor that lost a node
(a newer claim) can therefore neither set its mapping nor mark it pushed.

A crash between a push and its record leaves desired != pushed: the mapping is pushed
again after the restart (pushes are idempotent), so nothing is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from metadatad.core.bootmapping import BootMapping, retraction
from metadatad.core.nodes import Node, Port
from metadatad.db.bulk import chunks_for, member_of, update_rows
from metadatad.db.dhcp_fences import (
    Orphan,
    OrphanScan,
    adopt_orphans,
    fence_withdrawals,
    orphaned_retractions,
)
from metadatad.db.schema import dhcp_pushes, node_claims, nodes

__all__ = ["DhcpPushRepository", "PushJob", "PushResult", "PushState"]

# Up to this many uuids are looked up with an IN list; more: the owner's claims are read.
_SMALL = 200
_ERROR_LENGTH = 1024


@attrs.frozen
class PushJob:
    """A mapping to push: ``previous`` is what was last pushed (None: never)."""

    node_uuid: str
    generation: int
    desired: BootMapping
    digest: str
    previous: BootMapping | None
    attempts: int


@attrs.frozen
class PushResult:
    """The outcome of one push; ``error`` None means success."""

    node_uuid: str
    generation: int
    digest: str
    error: str | None = None
    permanent: bool = False
    next_attempt: float | None = None


@attrs.frozen
class PushState:
    """A node's row, for operators."""

    owner: str
    generation: int
    desired: dict[str, Any]
    pushed: dict[str, Any] | None
    in_sync: bool
    attempts: int
    last_error: str | None
    permanent: bool
    next_attempt: float | None
    desired_at: float
    pushed_at: float | None

    def to_document(self) -> dict[str, Any]:
        status = "pushed" if self.in_sync else ("failed" if self.permanent else "pending")
        return {
            "status": status,
            "owner": self.owner,
            "generation": self.generation,
            "mapping": self.desired,
            "pushed": self.pushed,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt if not self.in_sync else None,
            "desired_at": self.desired_at,
            "pushed_at": self.pushed_at,
        }


class DhcpPushRepository:
    """Synchronous queries on ``dhcp_pushes`` (and the claims that fence them)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- what the owner holds ------------------------------------------------------

    def owned_nodes(
        self,
        owner: str,
        uuids: Iterable[str] | None = None,
        generations: Iterable[int] | None = None,
    ) -> list[tuple[Node, int]]:
        """``(node, claim generation)`` of the nodes claimed by ``owner`` (among
        ``uuids`` if given, claimed at one of ``generations`` if given).  Nodes carry
        only what a mapping needs (uuid, ports, boot), read from the stored document,
        which was validated when it was written."""
        query = (
            select(nodes.c.document, node_claims.c.generation)
            .join_from(nodes, node_claims, node_claims.c.node_uuid == nodes.c.uuid)
            .where(node_claims.c.owner == owner)
        )
        if generations is not None:
            query = query.where(node_claims.c.generation.in_(sorted(set(generations))))
        wanted = None if uuids is None else set(uuids)
        with self.engine.connect() as connection:
            if wanted is None or len(wanted) > _SMALL:
                # One scan of the owner's claims beats many IN lists (PostgreSQL plans
                # a 500-item IN join badly: ~0.5 s per chunk, measured).
                rows: list[Any] = list(connection.execute(query))
            else:
                rows = list(connection.execute(query.where(nodes.c.uuid.in_(sorted(wanted)))))
        found: list[tuple[Node, int]] = []
        for row in rows:
            node = _boot_node(json.loads(row.document))
            if wanted is None or node.uuid in wanted:
                found.append((node, int(row.generation)))
        return found

    # --- desired ---------------------------------------------------------------------

    def set_desired(self, owner: str, wanted: Sequence[tuple[BootMapping, int]], now: float) -> int:
        """Record ``(mapping, generation)`` as desired for nodes ``owner`` still holds
        at that generation; a changed mapping is due at once with a fresh retry state.
        Returns how many rows changed."""
        for attempt in range(3):
            try:
                return self._set_desired(owner, wanted, now)
            except IntegrityError:
                # Another conductor inserted one of these rows first (it held the node
                # a moment ago): the rows exist now, so the next attempt updates them.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _set_desired(
        self, owner: str, wanted: Sequence[tuple[BootMapping, int]], now: float
    ) -> int:
        changed = 0
        by_uuid = {mapping.node_uuid: (mapping, generation) for mapping, generation in wanted}
        claims = select(node_claims.c.node_uuid, node_claims.c.generation).where(
            node_claims.c.owner == owner
        )
        with self.engine.begin() as connection:
            all_held: dict[str, int] | None = None
            if len(by_uuid) > _SMALL:
                # The owner's claims in one scan (see owned_nodes).
                all_held = {
                    row.node_uuid: int(row.generation) for row in connection.execute(claims)
                }
            for chunk in chunks_for(connection, sorted(by_uuid)):
                if all_held is not None:
                    held = {uuid: all_held[uuid] for uuid in chunk if uuid in all_held}
                else:
                    held = {
                        row.node_uuid: int(row.generation)
                        for row in connection.execute(
                            claims.where(member_of(connection, node_claims.c.node_uuid, chunk))
                        )
                    }
                chunk_wanted = [
                    by_uuid[uuid] for uuid in chunk if held.get(uuid) == by_uuid[uuid][1]
                ]
                changed += self._write_desired(connection, owner, chunk_wanted, now)
        return changed

    def _write_desired(
        self,
        connection: Connection,
        owner: str,
        wanted: Sequence[tuple[BootMapping, int]],
        now: float,
    ) -> int:
        if not wanted:
            return 0
        uuids = [mapping.node_uuid for mapping, _ in wanted]
        existing = {
            row.node_uuid: row
            for row in connection.execute(
                select(
                    dhcp_pushes.c.node_uuid,
                    dhcp_pushes.c.owner,
                    dhcp_pushes.c.generation,
                    dhcp_pushes.c.desired_digest,
                ).where(member_of(connection, dhcp_pushes.c.node_uuid, uuids))
            )
        }
        fresh: list[dict[str, Any]] = []
        moved: list[dict[str, Any]] = []  # same mapping, new owner or generation
        renewed: list[dict[str, Any]] = []  # a new mapping
        for mapping, generation in wanted:
            digest = mapping.digest
            row = existing.get(mapping.node_uuid)
            values = {
                "b_uuid": mapping.node_uuid,
                "b_owner": owner,
                "b_generation": generation,
                "b_desired": mapping.to_json(),
                "b_desired_digest": digest,
            }
            if row is None:
                fresh.append(values)
            elif row.desired_digest != digest:
                renewed.append(values)
            elif row.owner != owner or int(row.generation) != generation:
                moved.append(values)
        if fresh:
            connection.execute(
                insert(dhcp_pushes),
                [
                    {
                        "node_uuid": v["b_uuid"],
                        "owner": v["b_owner"],
                        "generation": v["b_generation"],
                        "desired": v["b_desired"],
                        "desired_digest": v["b_desired_digest"],
                        "pushed": None,
                        "pushed_digest": None,
                        "attempts": 0,
                        "last_error": None,
                        "permanent": False,
                        "next_attempt": now,
                        "desired_at": now,
                        "pushed_at": None,
                    }
                    for v in fresh
                ],
            )
        update_rows(
            connection,
            dhcp_pushes,
            "node_uuid",
            [_unprefixed(v) for v in renewed],
            set_from_row=("owner", "generation", "desired", "desired_digest"),
            fixed={
                "attempts": 0,
                "last_error": None,
                "permanent": False,
                "next_attempt": now,
                "desired_at": now,
            },
        )
        # The same mapping under a newer claim: due again only if never pushed.
        update_rows(
            connection,
            dhcp_pushes,
            "node_uuid",
            [_unprefixed(v) for v in moved],
            set_from_row=("owner", "generation"),
            fixed={"permanent": False, "next_attempt": now},
        )
        return len(fresh) + len(renewed) + len(moved)

    def retract_deleted(self, owner: str, now: float) -> int:
        """Turn the desired mapping of ``owner``'s deleted nodes into a retraction
        (their MACs ignored).  Returns how many rows changed."""
        query = select(dhcp_pushes.c.node_uuid, dhcp_pushes.c.desired).where(
            dhcp_pushes.c.owner == owner,
            ~select(nodes.c.uuid).where(nodes.c.uuid == dhcp_pushes.c.node_uuid).exists(),
        )
        changed: list[dict[str, Any]] = []
        with self.engine.begin() as connection:
            for row in connection.execute(query):
                previous = BootMapping.from_document(json.loads(row.desired))
                if previous.removed:
                    continue
                mapping = retraction(previous, row.node_uuid, previous.macs)
                changed.append(
                    {
                        "b_uuid": row.node_uuid,
                        "b_desired": mapping.to_json(),
                        "b_desired_digest": mapping.digest,
                    }
                )
            if changed:
                connection.execute(
                    update(dhcp_pushes)
                    .where(dhcp_pushes.c.node_uuid == bindparam("b_uuid"))
                    .values(
                        desired=bindparam("b_desired"),
                        desired_digest=bindparam("b_desired_digest"),
                        attempts=0,
                        last_error=None,
                        permanent=False,
                        next_attempt=now,
                        desired_at=now,
                    ),
                    changed,
                )
        return len(changed)

    # --- pushing ---------------------------------------------------------------------

    def _pending(self, owner: str, failed: bool = True) -> Any:
        """``owner``'s rows not pushed yet, with a next attempt: ``failed`` includes
        permanent failures whose bounded retries are not used up."""
        retried: Any = dhcp_pushes.c.permanent.is_(False)
        if failed:
            retried = or_(retried, dhcp_pushes.c.next_attempt.is_not(None))
        return and_(
            dhcp_pushes.c.owner == owner,
            or_(
                dhcp_pushes.c.pushed_digest.is_(None),
                dhcp_pushes.c.pushed_digest != dhcp_pushes.c.desired_digest,
            ),
            retried,
        )

    def _fenced(self, owner: str) -> Any:
        """The row's claim is still ``owner``'s at the row's generation, or the node
        is gone (a retraction, pushed by the last owner)."""
        claim = select(node_claims.c.node_uuid).where(
            node_claims.c.node_uuid == dhcp_pushes.c.node_uuid,
            node_claims.c.owner == owner,
            node_claims.c.generation == dhcp_pushes.c.generation,
        )
        node = select(nodes.c.uuid).where(nodes.c.uuid == dhcp_pushes.c.node_uuid)
        return or_(claim.exists(), ~node.exists())

    def due(self, owner: str, now: float, limit: int) -> list[PushJob]:
        """Up to ``limit`` mappings ``owner`` should push now, oldest first; what they
        withdraw leaves out the MACs other nodes have now (fenced by the MAC's owner)."""
        query = (
            select(
                dhcp_pushes.c.node_uuid,
                dhcp_pushes.c.generation,
                dhcp_pushes.c.desired,
                dhcp_pushes.c.desired_digest,
                dhcp_pushes.c.pushed,
                dhcp_pushes.c.attempts,
            )
            .where(self._pending(owner), dhcp_pushes.c.next_attempt <= now, self._fenced(owner))
            .order_by(dhcp_pushes.c.next_attempt, dhcp_pushes.c.node_uuid)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
            pairs = fence_withdrawals(
                connection,
                [
                    (
                        BootMapping.from_document(json.loads(row.desired)),
                        BootMapping.from_document(json.loads(row.pushed)) if row.pushed else None,
                    )
                    for row in rows
                ],
            )
        return [
            PushJob(
                node_uuid=row.node_uuid,
                generation=int(row.generation),
                desired=desired,
                digest=row.desired_digest,
                previous=previous,
                attempts=int(row.attempts),
            )
            for row, (desired, previous) in zip(rows, pairs, strict=True)
        ]

    def orphaned_retractions(self, group: str) -> OrphanScan:
        """Deleted nodes' rows left unretracted by dead conductors of ``group``
        (see :mod:`metadatad.db.dhcp_fences`)."""
        return orphaned_retractions(self.engine, group)

    def adopt(
        self, owner: str, generation: int, orphans: Sequence[Orphan], now: float
    ) -> list[str]:
        """Take ``orphans`` over as retractions due now (compare-and-set per row)."""
        return adopt_orphans(self.engine, owner, generation, orphans, now)

    def next_due(self, owner: str) -> float | None:
        """When the next pending mapping of ``owner`` is due (None: none pending)."""
        query = select(func.min(dhcp_pushes.c.next_attempt)).where(self._pending(owner))
        with self.engine.connect() as connection:
            value = connection.execute(query).scalar()
        return float(value) if value is not None else None

    def record(self, owner: str, results: Sequence[PushResult], now: float) -> int:
        """Record push outcomes in one transaction; a result counts only while the
        row still has the same owner, generation and desired digest.  Returns how many
        were recorded."""
        if not results:
            return 0
        ok = [
            {
                "node_uuid": r.node_uuid,
                "owner": owner,
                "generation": r.generation,
                "desired_digest": r.digest,
            }
            for r in results
            if r.error is None
        ]
        failed = [
            {
                "node_uuid": r.node_uuid,
                "owner": owner,
                "generation": r.generation,
                "desired_digest": r.digest,
                "last_error": r.error[:_ERROR_LENGTH] if r.error else None,
                "permanent": r.permanent,
                "next_attempt": r.next_attempt,
            }
            for r in results
            if r.error is not None
        ]
        # Fenced: only while the row has the same owner, generation and desired digest.
        fence = ("owner", "generation", "desired_digest")
        with self.engine.begin() as connection:
            recorded = update_rows(
                connection,
                dhcp_pushes,
                "node_uuid",
                ok,
                set_from_row=(),
                fixed={
                    "pushed": dhcp_pushes.c.desired,
                    "pushed_digest": dhcp_pushes.c.desired_digest,
                    "attempts": 0,
                    "last_error": None,
                    "permanent": False,
                    "next_attempt": None,
                    "pushed_at": now,
                },
                where=fence,
            )
            recorded += update_rows(
                connection,
                dhcp_pushes,
                "node_uuid",
                failed,
                set_from_row=("last_error", "permanent", "next_attempt"),
                fixed={"attempts": dhcp_pushes.c.attempts + 1},
                where=fence,
            )
        return recorded

    # --- reads -----------------------------------------------------------------------

    def state(self, node_uuid: str) -> PushState | None:
        """The node's row, or None."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(dhcp_pushes).where(dhcp_pushes.c.node_uuid == node_uuid)
            ).first()
        if row is None:
            return None
        return PushState(
            owner=row.owner,
            generation=int(row.generation),
            desired=json.loads(row.desired),
            pushed=json.loads(row.pushed) if row.pushed else None,
            in_sync=row.pushed_digest == row.desired_digest,
            attempts=int(row.attempts),
            last_error=row.last_error,
            permanent=bool(row.permanent),
            next_attempt=row.next_attempt,
            desired_at=float(row.desired_at),
            pushed_at=row.pushed_at,
        )

    def pending_count(self, owner: str) -> int:
        """How many of ``owner``'s mappings are not pushed yet (permanent failures
        excluded)."""
        query = select(func.count()).select_from(dhcp_pushes).where(self._pending(owner, False))
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar() or 0)

    def counts(self) -> dict[str, int]:
        """Rows by status: ``pushed``, ``pending``, ``failed`` (all owners)."""
        in_sync = dhcp_pushes.c.pushed_digest == dhcp_pushes.c.desired_digest
        query = select(
            func.count(),
            func.sum(_case(in_sync)),
            func.sum(_case(and_(~_coalesce_sync(), dhcp_pushes.c.permanent.is_(True)))),
        ).select_from(dhcp_pushes)
        with self.engine.connect() as connection:
            total, pushed, failed = connection.execute(query).one()
        total, pushed, failed = int(total or 0), int(pushed or 0), int(failed or 0)
        return {"pushed": pushed, "failed": failed, "pending": total - pushed - failed}


def _unprefixed(values: dict[str, Any]) -> dict[str, Any]:
    """``b_uuid``-style keys as ``dhcp_pushes`` column names."""
    names = {"b_uuid": "node_uuid", "b_desired": "desired", "b_desired_digest": "desired_digest"}
    return {names.get(k, k.removeprefix("b_")): v for k, v in values.items()}


def _case(condition: Any) -> Any:
    from sqlalchemy import case

    return case((condition, 1), else_=0)


def _coalesce_sync() -> Any:
    return func.coalesce(dhcp_pushes.c.pushed_digest, "") == dhcp_pushes.c.desired_digest


def _boot_node(document: dict[str, Any]) -> Node:
    """The parts of a stored node document a boot mapping uses (no re-validation:
    :func:`~metadatad.core.nodes.parse_node` checked the document before it was stored)."""
    return Node(
        uuid=document["uuid"],
        name=document.get("name", ""),
        hostname=document.get("hostname", ""),
        ports=tuple(
            Port(
                mac=port["mac"],
                ip=port.get("ip"),
                pxe=bool(port.get("pxe", False)),
                neutron_port_id=port.get("neutron_port_id"),
            )
            for port in document.get("ports", ())
        ),
        boot=dict(document.get("boot") or {}),
    )
