"""Migration 0010 on every backend: down to 0006 and up again, and members that
existed before it get unique cardinal values (their launch index where it is free)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, inspect, select

from metadatad.db import schema
from metadatad.db.migrate import _alembic_config, current_revision, head_revision, upgrade
from metadatad.db.store import make_engine
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node


@pytest.mark.parametrize("backend", BACKENDS)
def test_downgrade_and_upgrade_assign_existing_members(
    backend: str, tmp_path: Any, scratch_databases: Any
) -> None:
    url = empty_database(backend, tmp_path, scratch_databases)
    engine = make_engine(url, 1)
    try:
        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0006")
        assert current_revision(engine) == "0006"
        assert "service_members" not in inspect(engine).get_table_names()
        nodes = [
            make_node(0, launch_index=0),
            make_node(1, launch_index=0),
            make_node(2, launch_index=4),
            make_node(3, launch_index=0, service={"name": "db"}),
            make_node(4, service=None),
        ]
        moment = datetime(2026, 12, 6)
        nodes_table = schema.nodes.c  # 0006 has the same nodes columns
        rows = [
            {
                "uuid": n.uuid,
                "name": n.name,
                "hostname": n.hostname,
                "project_id": n.project_id,
                "conductor_group": n.conductor_group,
                "document": json.dumps(n.to_document()),
                "password": None,
                "revision": 1,
                "created_at": moment,
                "updated_at": moment,
            }
            for n in nodes
        ]
        assert set(rows[0]) <= {c.name for c in nodes_table}
        with engine.begin() as connection:
            connection.execute(insert(schema.nodes), rows)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            found = {
                row.node_uuid: (row.service_name, row.cardinal)
                for row in connection.execute(select(schema.service_members))
            }
        assert found == {
            nodes[0].uuid: ("web", 0),
            nodes[1].uuid: ("web", 1),
            nodes[2].uuid: ("web", 4),
            nodes[3].uuid: ("db", 0),
        }
        assert "changed_at" in {c["name"] for c in inspect(engine).get_columns("peer_index")}
    finally:
        engine.dispose()
