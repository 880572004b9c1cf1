"""Migration 0008 on every backend: stored port addresses take the form identity uses
(IPv4-mapped becomes IPv4, zones dropped), in the ports table and the documents; two
ports that would share an address stop the upgrade and change nothing."""

from __future__ import annotations

import json

import attrs
import pytest
from alembic import command
from sqlalchemy import select

from metadatad.core.nodes import Port
from metadatad.db import schema
from metadatad.db.migrate import (
    SchemaError,
    _alembic_config,
    current_revision,
    head_revision,
    upgrade,
)
from metadatad.db.store import NodeRepository, make_engine
from tests.support.factories import make_node

# The revision before the one under test (0008 rewrites the port addresses).
BEFORE = "0007"


def _before_the_rewrite(engine):  # type: ignore[no-untyped-def]
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), BEFORE)


def _stored_ports(engine) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        return {row.mac: row.ip for row in connection.execute(select(schema.ports))}


def _document_ips(engine, uuid: str) -> list[str | None]:  # type: ignore[no-untyped-def]
    with engine.connect() as connection:
        text = connection.execute(
            select(schema.nodes.c.document).where(schema.nodes.c.uuid == uuid)
        ).scalar_one()
    return [port["ip"] for port in json.loads(text)["ports"]]


def _old_form(index: int, *ports: tuple[str, str]):  # type: ignore[no-untyped-def]
    """A node as an older version stored it (validation did not normalise then)."""
    return attrs.evolve(make_node(index), ports=tuple(Port(mac, ip) for mac, ip in ports))


def test_old_port_addresses_are_rewritten(database_url: str) -> None:
    engine = make_engine(database_url, 1)
    try:
        repository = NodeRepository(engine)
        repository.upsert_nodes(
            [
                _old_form(
                    0,
                    ("52:54:00:00:00:01", "::ffff:10.9.0.1"),
                    ("52:54:00:00:00:02", "fe80::2%eth0"),
                ),
                _old_form(1, ("52:54:00:00:00:03", "10.9.0.3")),
            ]
        )
        _before_the_rewrite(engine)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert _stored_ports(engine) == {
            "52:54:00:00:00:01": "10.9.0.1",
            "52:54:00:00:00:02": "fe80::2",
            "52:54:00:00:00:03": "10.9.0.3",
        }
        assert _document_ips(engine, make_node(0).uuid) == ["10.9.0.1", "fe80::2"]
        assert repository.node_by_ip("10.9.0.1") is not None
    finally:
        engine.dispose()


def test_a_clash_stops_the_upgrade_and_changes_nothing(database_url: str) -> None:
    engine = make_engine(database_url, 1)
    try:
        NodeRepository(engine).upsert_nodes(
            [
                _old_form(0, ("52:54:00:00:00:01", "::ffff:10.9.0.1")),
                _old_form(1, ("52:54:00:00:00:03", "10.9.0.1")),
            ]
        )
        _before_the_rewrite(engine)
        with pytest.raises(SchemaError) as raised:
            upgrade(engine)
        assert make_node(0).uuid in str(raised.value) and make_node(1).uuid in str(raised.value)
        assert current_revision(engine) == BEFORE
        assert _stored_ports(engine)["52:54:00:00:00:01"] == "::ffff:10.9.0.1"
    finally:
        # Leave the shared scratch database at the head for the tests after this one.
        with engine.begin() as connection:
            connection.execute(schema.ports.delete())
            connection.execute(schema.nodes.delete())
        upgrade(engine)
        engine.dispose()
