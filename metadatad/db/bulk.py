# -*- test-case-name: tests.db.test_db_bulk -*-
"""Set-at-a-time SQL for the takeover path: many rows per statement, not per row.

A takeover moves thousands of nodes at once.  On PostgreSQL a membership test against
a single array parameter (``= ANY(:uuids)``) is planned like one value, where a
500-item ``IN`` list is planned badly; and one ``UPDATE ... FROM unnest(arrays)`` does in
one statement what an ``executemany`` does in one statement per row.  SQLite and
MariaDB keep the portable forms (chunked ``IN`` lists, ``executemany``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import String, Text, and_, any_, bindparam, column, func, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.schema import Table

__all__ = ["chunks_for", "member_of", "update_rows"]

_CHUNK = 500


def chunks_for(connection: Connection, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``items`` at once on PostgreSQL (see :func:`member_of`), else in IN-list sized
    chunks."""
    if not items:
        return
    if connection.dialect.name == "postgresql":
        yield items
        return
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def member_of(connection: Connection, target: Any, items: Sequence[str]) -> ColumnElement[bool]:
    """``target`` is one of ``items`` (strings): ``= ANY(array)`` on PostgreSQL, else
    an IN list (keep ``items`` to a chunk from :func:`chunks_for`)."""
    if connection.dialect.name == "postgresql":
        array = bindparam(None, list(items), type_=postgresql.ARRAY(String))
        return target == any_(array)
    return target.in_(list(items))


def update_rows(
    connection: Connection,
    table: Table,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    set_from_row: Sequence[str],
    fixed: Mapping[str, Any],
    where: Sequence[str] = (),
) -> int:
    """Update ``table`` row by row: in each of ``rows`` (dicts with ``key``,
    ``set_from_row`` and ``where`` columns of ``table``), the row whose ``key`` and
    ``where`` columns equal the dict's gets the dict's ``set_from_row`` values and the
    ``fixed`` values (SQL expressions allowed).  Returns how many rows matched."""
    if not rows:
        return 0
    names = [key, *where, *(c for c in set_from_row if c not in where and c != key)]
    long_text = any(isinstance(table.c[name].type, Text) for name in names)
    # psycopg dumps a text array escaping element by element: for long text (JSON
    # documents) that costs more than the statements it saves.
    if connection.dialect.name == "postgresql" and not long_text:
        # One array parameter per column, unnested into rows: a statement of constant
        # size, compiled once (a VALUES list of thousands of rows costs SQLAlchemy
        # seconds to compile, and PostgreSQL caps a statement at 65,535 parameters).
        arrays = [
            bindparam(
                f"a_{name}", [row[name] for row in rows], type_=postgresql.ARRAY(table.c[name].type)
            )
            for name in names
        ]
        source = (
            func.unnest(*arrays)
            .table_valued(*(column(name, table.c[name].type) for name in names))
            .render_derived(name="v")
        )
        statement = (
            update(table)
            .where(and_(*(table.c[name] == source.c[name] for name in [key, *where])))
            .values({**{name: source.c[name] for name in set_from_row}, **fixed})
        )
        return max(0, connection.execute(statement).rowcount)
    statement = (
        update(table)
        .where(and_(*(table.c[name] == bindparam(f"b_{name}") for name in [key, *where])))
        .values({**{name: bindparam(f"b_{name}") for name in set_from_row}, **fixed})
    )
    params = [{f"b_{name}": row[name] for name in names} for row in rows]
    return max(0, connection.execute(statement, params).rowcount)
