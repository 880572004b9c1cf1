"""Schema migrations with Alembic, run on a connection we own."""

from __future__ import annotations

import os

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from metadatad.errors import SetupError

_SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")


class SchemaError(SetupError):
    """The database schema is not the one this version of metadatad needs."""


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", _SCRIPTS)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this version ships."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or migrate the schema up to ``revision``."""
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaError` unless the database is at the head revision."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and not os.path.exists(url.database):
        raise SchemaError(
            f"the database file {url.database} does not exist: "
            "run 'metadatad-manage --config CONF db upgrade'"
        )
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        found = "an empty database" if current is None else f"schema revision {current}"
        raise SchemaError(
            f"{engine.url.render_as_string(hide_password=True)} has {found}, this version "
            f"needs {head}: run 'metadatad-manage --config CONF db upgrade'"
        )
