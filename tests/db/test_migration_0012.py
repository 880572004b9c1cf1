"""Migration 0012 on every backend: the node generation's one row, at 0, and back down."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, select

from metadatad.db import schema
from metadatad.db.migrate import _alembic_config, current_revision, head_revision, upgrade
from metadatad.db.store import NodeRepository, make_engine
from tests.support.databases import BACKENDS, empty_database
from tests.support.factories import make_node


@pytest.mark.parametrize("backend", BACKENDS)
def test_downgrade_and_upgrade(backend: str, tmp_path: Any, scratch_databases: Any) -> None:
    url = empty_database(backend, tmp_path, scratch_databases)
    engine = make_engine(url, 1)
    try:
        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0011")
        assert "node_generation" not in inspect(engine).get_table_names()
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.connect() as connection:
            rows = connection.execute(select(schema.node_generation)).all()
        assert [(row.id, row.generation) for row in rows] == [(1, 0)]
        repository = NodeRepository(engine)
        repository.upsert_nodes([make_node()])
        assert repository.node_generation() == 1
    finally:
        engine.dispose()
