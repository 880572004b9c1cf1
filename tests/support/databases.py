"""Real databases for tests: SQLite files, and scratch databases on the PostgreSQL and
MariaDB servers of the machine.

A server that cannot be reached skips its tests with the reason, except under CI
(``CI`` set), where every backend is mandatory and an unreachable one fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, delete, text
from sqlalchemy.engine import Engine, make_url

from metadatad.db import schema
from metadatad.db.migrate import upgrade
from metadatad.db.store import make_engine

BACKENDS = ("sqlite", "postgresql", "mysql")

SERVER_URLS = {
    "postgresql": os.environ.get(
        "METADATAD_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("METADATAD_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


class ScratchDatabase:
    """A database created on a server for this test session, dropped at its end."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.admin_url = make_url(SERVER_URLS[backend])
        self.name = f"metadatad_test_{os.getpid()}_{secrets.token_hex(3)}"
        self.url = self.admin_url.set(database=self.name).render_as_string(hide_password=False)
        self._admin: Engine | None = None

    def create(self) -> None:
        self._admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {self.name}"))
        upgrade(make_engine(self.url, 1))

    def drop(self) -> None:
        if self._admin is None:
            return
        with self._admin.connect() as connection:
            if self.backend == "postgresql":
                connection.execute(text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
            else:
                connection.execute(text(f"DROP DATABASE IF EXISTS {self.name}"))
        self._admin.dispose()


def unavailable(backend: str, error: Exception) -> None:
    """Skip (or, under CI, fail) the tests of an unreachable server."""
    reason = f"{backend} server unreachable at {SERVER_URLS[backend]}: {error}".splitlines()[0]
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI requires every database backend)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def scratch_databases() -> Iterator[dict[str, ScratchDatabase | Exception]]:
    """One migrated scratch database per reachable server, for the whole session."""
    found: dict[str, ScratchDatabase | Exception] = {}
    yield found
    for database in found.values():
        if isinstance(database, ScratchDatabase):
            database.drop()


@pytest.fixture(params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest,
    tmp_path: os.PathLike[str],
    scratch_databases: dict[str, ScratchDatabase | Exception],
) -> str:
    """A migrated, empty database of each backend."""
    return empty_database(request.param, tmp_path, scratch_databases)


def empty_database(
    backend: str,
    tmp_path: os.PathLike[str],
    scratch_databases: dict[str, ScratchDatabase | Exception],
) -> str:
    """The URL of a migrated, empty database of ``backend``."""
    if backend == "sqlite":
        url = f"sqlite:///{os.path.join(tmp_path, 'metadatad.sqlite')}"
        engine = make_engine(url, 1)
        upgrade(engine)
        engine.dispose()
        return url
    if backend not in scratch_databases:
        database = ScratchDatabase(backend)
        try:
            database.create()
        except Exception as e:
            scratch_databases[backend] = e
        else:
            scratch_databases[backend] = database
    database_or_error = scratch_databases[backend]
    if isinstance(database_or_error, Exception):
        unavailable(backend, database_or_error)
    assert isinstance(database_or_error, ScratchDatabase)
    engine = make_engine(database_or_error.url, 1)
    with engine.begin() as connection:
        # Children first: the foreign keys point at nodes.
        for table in reversed(schema.metadata.sorted_tables):
            connection.execute(delete(table))
    engine.dispose()
    return database_or_error.url
