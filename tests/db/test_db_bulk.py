"""Set-at-a-time SQL helpers on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from metadatad.db.bulk import chunks_for, member_of, update_rows
from metadatad.db.schema import dhcp_pushes
from metadatad.db.store import make_engine


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = make_engine(database_url, 1)
    yield e
    e.dispose()


def _row(i: int) -> dict[str, object]:
    return {
        "node_uuid": f"u{i:05d}",
        "owner": "a",
        "generation": 1,
        "desired": "{}",
        "desired_digest": "d",
        "pushed": None,
        "pushed_digest": None,
        "attempts": 0,
        "last_error": None,
        "permanent": False,
        "next_attempt": 1.0,
        "desired_at": 1.0,
        "pushed_at": None,
    }


def test_update_rows_sets_per_row_values_only_where_the_fence_matches(engine: Engine) -> None:
    """Each row gets its own values (NULLs too), fixed expressions apply, a row whose
    fence columns differ is left alone; more rows than one statement holds."""
    count = 2500
    with engine.begin() as connection:
        connection.execute(insert(dhcp_pushes), [_row(i) for i in range(count)])
        rows = [
            {
                "node_uuid": f"u{i:05d}",
                "owner": "a",
                "generation": 2 if i == 7 else 1,  # u00007: fenced out
                "last_error": None,
                "next_attempt": None,
                "permanent": i % 2 == 0,
            }
            for i in range(count)
        ]
        matched = update_rows(
            connection,
            dhcp_pushes,
            "node_uuid",
            rows,
            set_from_row=("last_error", "next_attempt", "permanent"),
            fixed={"attempts": dhcp_pushes.c.attempts + 1},
            where=("owner", "generation"),
        )
        assert matched == count - 1
        assert update_rows(connection, dhcp_pushes, "node_uuid", [], set_from_row=(), fixed={}) == 0
    with engine.connect() as connection:
        stored = {
            row.node_uuid: row
            for row in connection.execute(
                select(dhcp_pushes.c.node_uuid, dhcp_pushes.c.attempts, dhcp_pushes.c.next_attempt,
                       dhcp_pushes.c.permanent)
            )
        }  # fmt: skip
    assert (stored["u00007"].attempts, stored["u00007"].next_attempt) == (0, 1.0)
    assert (stored["u00008"].attempts, stored["u00008"].next_attempt) == (1, None)
    assert bool(stored["u00008"].permanent) and not bool(stored["u00009"].permanent)


def test_member_of_in_chunks_finds_exactly_the_listed_rows(engine: Engine) -> None:
    """``chunks_for`` + ``member_of`` select the listed keys (more than one IN list)."""
    with engine.begin() as connection:
        connection.execute(insert(dhcp_pushes), [_row(i) for i in range(1200)])
    wanted = [f"u{i:05d}" for i in range(0, 2400, 2)]  # half of them do not exist
    found: list[str] = []
    with engine.connect() as connection:
        for chunk in chunks_for(connection, wanted):
            found.extend(
                connection.execute(
                    select(dhcp_pushes.c.node_uuid).where(
                        member_of(connection, dhcp_pushes.c.node_uuid, chunk)
                    )
                ).scalars()
            )
    assert sorted(found) == [f"u{i:05d}" for i in range(0, 1200, 2)]
