"""``metadatad-manage``: every verb against every database backend, and bad input for each."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from metadatad.cli import main
from metadatad.core.nodes import USER_DATA_MAX_BYTES
from metadatad.db.migrate import current_revision, head_revision
from metadatad.db.store import make_engine
from tests.support.databases import (
    BACKENDS,
    SERVER_URLS,
    ScratchDatabase,
    empty_database,
    unavailable,
)
from tests.support.factories import make_node, node_document

READ_ONLY = (
    "revision",
    "created_at",
    "updated_at",
    "cardinal_value",
    "password_set",
    "shared_keys",
    "private_keys",
)
UNKNOWN_UUID = "0badc0de-0000-4000-8000-000000000001"


@dataclass(frozen=True)
class Result:
    """What one run of the command did."""

    status: int | str | None
    out: str
    err: str


def manage(conf: Path | str, *args: str, stdin: str = "") -> Result:
    """Run ``metadatad-manage --config CONF ARGS`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    try:
        status: int | str | None = main(
            ["--config", str(conf), *args], stdout=out, stderr=err, stdin=io.StringIO(stdin)
        )
    except SystemExit as e:
        status = e.code
    return Result(status, out.getvalue(), err.getvalue())


def ok(result: Result) -> str:
    """Assert the command succeeded quietly on stderr; return its output."""
    assert result.status == 0, result.err
    assert result.err == ""
    return result.out


def failed(result: Result) -> str:
    """Assert the command failed with status 1 and one line on stderr; return that line."""
    assert result.status == 1, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, f"not one line: {result.err!r}"
    assert lines[0].startswith("metadatad-manage: ")
    assert "Traceback" not in result.err
    return lines[0]


def write_conf(directory: Path, url: str) -> Path:
    """A configuration file whose store is ``url``."""
    conf = directory / "metadatad.conf"
    conf.write_text(f"[database]\nurl = {url}\n", encoding="utf-8")
    return conf


def write_json(directory: Path, document: Any, name: str = "nodes.json") -> Path:
    """A JSON file holding ``document``."""
    path = directory / name
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def canonical(index: int, **overrides: Any) -> dict[str, Any]:
    """The stored form of ``node_document(index, **overrides)``."""
    return make_node(index, **overrides).to_document()


def stored(conf: Path) -> list[dict[str, Any]]:
    """Every stored node document, with bookkeeping, as ``node list --json`` prints it."""
    return json.loads(ok(manage(conf, "node", "list", "--json")))


def without_read_only(document: dict[str, Any]) -> dict[str, Any]:
    """The document minus the bookkeeping fields."""
    return {k: v for k, v in document.items() if k not in READ_ONLY}


@pytest.fixture
def conf(tmp_path: Path, database_url: str) -> Path:
    """A configuration file pointing at a migrated, empty database of each backend."""
    return write_conf(tmp_path, database_url)


@pytest.fixture
def sqlite_conf(tmp_path: Path, scratch_databases: dict[str, ScratchDatabase | Exception]) -> Path:
    """A configuration file pointing at a migrated, empty SQLite database.

    For checks done before any query (argument and document validation), where the
    backend does not matter.
    """
    return write_conf(tmp_path, empty_database("sqlite", tmp_path, scratch_databases))


@pytest.fixture
def seeded(conf: Path, tmp_path: Path) -> Path:
    """``conf`` with nodes 0 and 1 already imported."""
    ok(
        manage(
            conf,
            "node",
            "import",
            str(write_json(tmp_path, [node_document(0), node_document(1)], "seed.json")),
        )
    )
    return conf


@pytest.fixture(params=BACKENDS)
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An existing but empty (never migrated) database of each backend."""
    backend = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        return
    admin_url = make_url(SERVER_URLS[backend])
    name = f"metadatad_clitest_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except Exception as e:
        unavailable(backend, e)
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        force = " WITH (FORCE)" if backend == "postgresql" else ""
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


# --- db upgrade -----------------------------------------------------------------------


def test_db_upgrade_creates_the_schema(tmp_path: Path, unmigrated_url: str) -> None:
    """`db upgrade` migrates an empty database to the head revision; node verbs then work."""
    conf = write_conf(tmp_path, unmigrated_url)
    assert "current schema" in ok(manage(conf, "db", "upgrade"))
    engine = make_engine(unmigrated_url, 1)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert stored(conf) == []


def test_db_upgrade_is_idempotent(conf: Path) -> None:
    """`db upgrade` on a migrated database with nodes succeeds and keeps the nodes."""
    ok(manage(conf, "node", "import", "-", stdin=json.dumps(node_document(0))))
    before = stored(conf)
    for _ in range(2):
        assert "current schema" in ok(manage(conf, "db", "upgrade"))
    assert stored(conf) == before


def test_db_upgrade_creates_the_sqlite_directory(tmp_path: Path) -> None:
    """For an SQLite file in directories that do not exist yet, `db upgrade` creates them."""
    database = tmp_path / "var" / "lib" / "metadatad" / "store.sqlite"
    conf = write_conf(tmp_path, f"sqlite:///{database}")
    ok(manage(conf, "db", "upgrade"))
    assert database.is_file()
    assert stored(conf) == []


def test_db_upgrade_creates_a_relative_sqlite_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default-style relative URL sqlite:///var/x.sqlite creates ./var in the cwd."""
    monkeypatch.chdir(tmp_path)
    conf = write_conf(tmp_path, "sqlite:///var/metadatad.sqlite")
    ok(manage(conf, "db", "upgrade"))
    assert (tmp_path / "var" / "metadatad.sqlite").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ("node", "list"),
        ("node", "list", "--json"),
        ("node", "show", UNKNOWN_UUID),
        ("node", "delete", UNKNOWN_UUID),
        ("node", "import", "-"),
    ],
    ids=["list", "list-json", "show", "delete", "import"],
)
def test_unmigrated_database_says_to_run_db_upgrade(
    tmp_path: Path, unmigrated_url: str, args: tuple[str, ...]
) -> None:
    """Every node verb against a database never migrated says to run `db upgrade`."""
    conf = write_conf(tmp_path, unmigrated_url)
    message = failed(manage(conf, *args, stdin=json.dumps(node_document(0))))
    assert "db upgrade" in message
    engine = make_engine(unmigrated_url, 1)
    try:
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_missing_sqlite_directory_says_to_run_db_upgrade(tmp_path: Path) -> None:
    """`node list` before any `db upgrade` points at `db upgrade`, even with no ./var yet."""
    conf = write_conf(tmp_path, f"sqlite:///{tmp_path / 'var' / 'metadatad.sqlite'}")
    assert "db upgrade" in failed(manage(conf, "node", "list"))


# --- node import ----------------------------------------------------------------------


def test_import_a_list(conf: Path, tmp_path: Path) -> None:
    """A JSON list is imported whole; the summary counts created nodes."""
    path = write_json(tmp_path, [node_document(i) for i in range(3)])
    assert ok(manage(conf, "node", "import", str(path))) == (
        "imported 3 nodes (3 created, 0 updated)\n"
    )
    documents = stored(conf)
    assert [without_read_only(d) for d in documents] == [canonical(i) for i in range(3)]
    assert all(d["revision"] == 1 for d in documents)


def test_import_a_single_object(conf: Path, tmp_path: Path) -> None:
    """A single JSON object is one node."""
    path = write_json(tmp_path, node_document(7))
    assert "1 created, 0 updated" in ok(manage(conf, "node", "import", str(path)))
    assert [without_read_only(d) for d in stored(conf)] == [canonical(7)]


def test_import_from_stdin(conf: Path) -> None:
    """`-` reads the document from standard input."""
    document = json.dumps([node_document(4), node_document(5)])
    assert "2 created" in ok(manage(conf, "node", "import", "-", stdin=document))
    assert [d["uuid"] for d in stored(conf)] == [node_document(i)["uuid"] for i in (4, 5)]


def test_import_minimal_document_fills_defaults(conf: Path) -> None:
    """A document with only a uuid is stored with the derived defaults."""
    uuid = node_document(9)["uuid"]
    ok(manage(conf, "node", "import", "-", stdin=json.dumps({"uuid": uuid})))
    (document,) = stored(conf)
    assert document["uuid"] == uuid
    assert document["reservation_id"] == "r-" + uuid.replace("-", "")[:8]
    assert document["ports"] == []
    assert document["boot"] == {"arch": "x86_64", "firmware": "uefi"}


def test_reimport_counts_updates_and_replaces(seeded: Path, tmp_path: Path) -> None:
    """Importing known and new nodes counts both; known ones are replaced, revision + 1."""
    path = write_json(tmp_path, [node_document(0, name="renamed"), node_document(2)])
    assert ok(manage(seeded, "node", "import", str(path))) == (
        "imported 2 nodes (1 created, 1 updated)\n"
    )
    by_uuid = {d["uuid"]: d for d in stored(seeded)}
    assert len(by_uuid) == 3
    zero = by_uuid[node_document(0)["uuid"]]
    assert zero["name"] == "renamed"
    assert zero["revision"] == 2
    assert by_uuid[node_document(1)["uuid"]]["revision"] == 1
    assert by_uuid[node_document(2)["uuid"]]["revision"] == 1


def test_reimport_may_move_ports_between_imported_nodes(seeded: Path) -> None:
    """Two known nodes swapping MACs and addresses in one import is not a conflict."""
    zero, one = node_document(0), node_document(1)
    swapped = [dict(zero, ports=one["ports"]), dict(one, ports=zero["ports"])]
    assert "0 created, 2 updated" in ok(
        manage(seeded, "node", "import", "-", stdin=json.dumps(swapped))
    )
    by_uuid = {d["uuid"]: d for d in stored(seeded)}
    assert by_uuid[zero["uuid"]]["ports"] == canonical(1)["ports"]
    assert by_uuid[one["uuid"]]["ports"] == canonical(0)["ports"]


def test_show_output_can_be_reimported(seeded: Path, tmp_path: Path) -> None:
    """`node show` output (with revision, created_at, ...) is accepted by `node import`."""
    uuid = node_document(0)["uuid"]
    shown = json.loads(ok(manage(seeded, "node", "show", uuid)))
    assert set(READ_ONLY) <= set(shown)
    shown["meta"] = {"role": "web"}
    path = write_json(tmp_path, shown, "shown.json")
    assert "0 created, 1 updated" in ok(manage(seeded, "node", "import", str(path)))
    again = json.loads(ok(manage(seeded, "node", "show", uuid)))
    assert again["meta"] == {"role": "web"}
    assert again["revision"] == shown["revision"] + 1
    assert again["created_at"] == shown["created_at"]


def test_list_json_output_can_be_reimported(seeded: Path, tmp_path: Path) -> None:
    """`node list --json` output re-imports as the same nodes (a backup round-trip)."""
    before = stored(seeded)
    path = write_json(tmp_path, before, "backup.json")
    assert "0 created, 2 updated" in ok(manage(seeded, "node", "import", str(path)))
    after = stored(seeded)
    assert [without_read_only(d) for d in after] == [without_read_only(d) for d in before]
    assert [d["revision"] for d in after] == [2, 2]


def test_max_size_user_data_is_accepted(conf: Path, tmp_path: Path) -> None:
    """user_data of exactly 64 KiB (decoded) is stored and shown back byte for byte."""
    data = os.urandom(USER_DATA_MAX_BYTES)
    document = node_document(0, user_data=base64.b64encode(data).decode("ascii"))
    ok(manage(conf, "node", "import", str(write_json(tmp_path, document))))
    shown = json.loads(ok(manage(conf, "node", "show", document["uuid"])))
    assert base64.b64decode(shown["user_data"]) == data


# --- node import: bad input, nothing half-written -------------------------------------

OVERSIZE = base64.b64encode(b"x" * (USER_DATA_MAX_BYTES + 1)).decode("ascii")

BAD_NODES = [
    ({"ports": [{"mac": "52:54:00:zz:00:01", "ip": "10.9.0.1"}]}, "ports[0].mac", "MAC"),
    ({"ports": [{"mac": "01:00:5e:00:00:01"}]}, "ports[0].mac", "multicast"),
    ({"ports": [{"mac": "52:54:00:00:09:01", "ip": "10.9.0.300"}]}, "ports[0].ip", "10.9.0.300"),
    ({"uuid": "not-a-uuid"}, "uuid", "not-a-uuid"),
    ({"uuid": 42}, "uuid", "string"),
    ({"colour": "blue"}, "colour", "unknown field"),
    ({"ports": [{"mac": "52:54:00:00:09:02", "vlan": 5}]}, "ports[0].vlan", "unknown field"),
    ({"user_data": OVERSIZE}, "user_data", str(USER_DATA_MAX_BYTES)),
    ({"user_data": "not base64!"}, "user_data", "base64"),
    ({"launch_index": "0"}, "launch_index", "integer"),
    ({"hostname": "bad_host!"}, "hostname", "host name"),
    ({"boot": {"firmware": "coreboot"}}, "boot.firmware", "bios"),
]
BAD_IDS = [
    "mac",
    "multicast-mac",
    "ip",
    "uuid",
    "uuid-type",
    "unknown-field",
    "unknown-port-field",
    "oversize-user-data",
    "bad-base64",
    "type",
    "hostname",
    "boot",
]


@pytest.mark.parametrize(("override", "field", "detail"), BAD_NODES, ids=BAD_IDS)
def test_bad_third_node_leaves_database_unchanged(
    seeded: Path, tmp_path: Path, override: dict[str, Any], field: str, detail: str
) -> None:
    """A list whose 3rd node is bad fails naming `[2].<field>`, and nothing is written."""
    before = stored(seeded)
    nodes = [node_document(0, name="changed"), node_document(5), node_document(6, **override)]
    message = failed(manage(seeded, "node", "import", str(write_json(tmp_path, nodes))))
    assert f"[2].{field}" in message
    assert detail in message
    assert "nothing was imported" in message
    assert stored(seeded) == before


@pytest.mark.parametrize(("override", "field", "detail"), BAD_NODES, ids=BAD_IDS)
def test_bad_single_node_names_the_field(
    sqlite_conf: Path, override: dict[str, Any], field: str, detail: str
) -> None:
    """A single bad object fails naming the field without a list index."""
    message = failed(
        manage(sqlite_conf, "node", "import", "-", stdin=json.dumps(node_document(6, **override)))
    )
    assert f"-: {field}:" in message
    assert detail in message
    assert stored(sqlite_conf) == []


@pytest.mark.parametrize("kind", ["mac", "ip"])
def test_port_conflict_with_existing_node_leaves_database_unchanged(
    seeded: Path, tmp_path: Path, kind: str
) -> None:
    """A 3rd node taking a port (MAC or IP) of a stored node fails; the 2 others are not kept."""
    before = stored(seeded)
    taken = node_document(1)["ports"][0]
    port = dict(node_document(6)["ports"][0], **{kind: taken[kind]})
    nodes = [
        node_document(0, name="changed", ports=[]),
        node_document(5),
        node_document(6, ports=[port]),
    ]
    message = failed(manage(seeded, "node", "import", str(write_json(tmp_path, nodes))))
    assert f"[2].ports[0].{kind}" in message
    assert taken[kind] in message
    assert node_document(1)["uuid"] in message
    assert "nothing was imported" in message
    assert stored(seeded) == before


def test_port_conflict_of_single_object_names_field_without_index(seeded: Path) -> None:
    """A single new node reusing a stored MAC names `ports[0].mac` and the owner."""
    document = node_document(6, ports=node_document(0)["ports"])
    message = failed(manage(seeded, "node", "import", "-", stdin=json.dumps(document)))
    assert "-: ports[0].mac:" in message
    assert node_document(0)["uuid"] in message
    assert len(stored(seeded)) == 2


def test_duplicate_ports_inside_one_import(seeded: Path) -> None:
    """Two nodes of one import sharing a MAC fail naming the second one; nothing is written."""
    before = stored(seeded)
    nodes = [node_document(5), node_document(6, ports=node_document(5)["ports"])]
    message = failed(manage(seeded, "node", "import", "-", stdin=json.dumps(nodes)))
    assert "[1].ports[0].mac" in message
    assert "also a port of node [0]" in message
    assert stored(seeded) == before


def test_duplicate_uuid_inside_one_import(seeded: Path) -> None:
    """The same uuid twice in one import fails naming the second occurrence."""
    before = stored(seeded)
    nodes = [node_document(5), node_document(6, uuid=node_document(5)["uuid"])]
    message = failed(manage(seeded, "node", "import", "-", stdin=json.dumps(nodes)))
    assert "[1].uuid" in message
    assert stored(seeded) == before


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b'[{"uuid": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
        (b"[]", "empty"),
        (b'"a node"', "node object or a list"),
        (b"[1, 2]", "[0]"),
        (b'[{"uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f05", "name": "\\ud800"}]', "surrogate"),
        (
            b'{"uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f05", "meta": {"\\udc00": "x"}}',
            "surrogate",
        ),
        (b"[" * 5000, "nested deeper"),
        (b'{"network_data": ' * 3000 + b"null" + b"}" * 3000, "nested deeper"),
    ],
    ids=[
        "truncated",
        "empty-file",
        "not-utf8",
        "empty-list",
        "string",
        "list-of-numbers",
        "lone-surrogate-value",
        "lone-surrogate-key",
        "deep-list",
        "deep-object",
    ],
)
def test_import_of_bad_json_file(seeded: Path, tmp_path: Path, content: bytes, detail: str) -> None:
    """A file that is not JSON, or not nodes, fails on one line naming the file."""
    before = stored(seeded)
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    message = failed(manage(seeded, "node", "import", str(path)))
    assert str(path) in message
    assert detail in message
    assert stored(seeded) == before


def test_import_of_bad_json_on_stdin(seeded: Path) -> None:
    """Invalid JSON on standard input fails naming `-`."""
    message = failed(manage(seeded, "node", "import", "-", stdin="{not json"))
    assert message.startswith("metadatad-manage: -: not valid JSON")
    assert len(stored(seeded)) == 2


def test_import_of_missing_file(seeded: Path, tmp_path: Path) -> None:
    """A file that does not exist fails naming it and the reason."""
    missing = tmp_path / "no-such-nodes.json"
    message = failed(manage(seeded, "node", "import", str(missing)))
    assert str(missing) in message
    assert "No such file" in message
    assert len(stored(seeded)) == 2


def test_import_of_a_directory(seeded: Path, tmp_path: Path) -> None:
    """A directory instead of a file fails on one line."""
    message = failed(manage(seeded, "node", "import", str(tmp_path)))
    assert str(tmp_path) in message


@pytest.mark.parametrize("document", ["[]", '"a node"'])
def test_whole_document_errors_have_no_empty_field(sqlite_conf: Path, document: str) -> None:
    """An empty list or a non-object is reported without an empty `: :` field name."""
    message = failed(manage(sqlite_conf, "node", "import", "-", stdin=document))
    assert ": :" not in message


# --- node list ------------------------------------------------------------------------


def test_list_table(conf: Path) -> None:
    """`node list` prints a header and one aligned row per node, by uuid; `-` for blanks."""
    bare = {"uuid": node_document(3)["uuid"], "name": "bare", "hostname": "bare.example.org"}
    two = node_document(
        2,
        ports=[
            {"mac": "52:54:00:aa:00:01", "ip": "10.5.0.1"},
            {"mac": "52:54:00:aa:00:02", "ip": "2001:db8::5"},
            {"mac": "52:54:00:aa:00:03"},
        ],
    )
    ok(manage(conf, "node", "import", "-", stdin=json.dumps([bare, node_document(1), two])))
    lines = ok(manage(conf, "node", "list")).splitlines()
    assert lines[0].split() == ["UUID", "NAME", "HOSTNAME", "PROJECT", "ADDRESSES"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        [node_document(1)["uuid"], "web-1", "web-1.example.org", "proj-a", "10.0.0.3"],
        [two["uuid"], "web-2", "web-2.example.org", "proj-a", "10.5.0.1,2001:db8::5"],
        [bare["uuid"], "bare", "bare.example.org", "-", "-"],
    ]
    names = ["NAME", "web-1", "web-2", "bare"]
    starts = {line.index(word) for line, word in zip(lines, names, strict=True)}
    assert len(starts) == 1, "the NAME column is not aligned"


def test_list_empty(conf: Path) -> None:
    """With no nodes, the table is only its header and --json is []."""
    assert ok(manage(conf, "node", "list")).split() == [
        "UUID",
        "NAME",
        "HOSTNAME",
        "PROJECT",
        "ADDRESSES",
    ]
    assert stored(conf) == []


def test_list_json(seeded: Path) -> None:
    """`node list --json` prints every document with its bookkeeping, by uuid."""
    documents = stored(seeded)
    assert [without_read_only(d) for d in documents] == [canonical(0), canonical(1)]
    for document in documents:
        assert document["revision"] == 1
        assert document["password_set"] is False
        assert document["created_at"].endswith("Z")
        assert document["updated_at"] == document["created_at"]


# --- node show ------------------------------------------------------------------------


def test_show(seeded: Path) -> None:
    """`node show UUID` prints that node's document as indented JSON."""
    uuid = node_document(1)["uuid"]
    out = ok(manage(seeded, "node", "show", uuid))
    assert out.startswith("{\n  ")
    shown = json.loads(out)
    assert without_read_only(shown) == canonical(1)
    assert shown["revision"] == 1


def test_show_accepts_upper_case_uuid(seeded: Path) -> None:
    """An upper-case uuid on the command line finds the node."""
    uuid = node_document(1)["uuid"]
    assert json.loads(ok(manage(seeded, "node", "show", uuid.upper())))["uuid"] == uuid


@pytest.mark.parametrize("verb", ["show", "delete"])
def test_unknown_uuid(seeded: Path, verb: str) -> None:
    """show/delete of a well-formed uuid that is not stored fail naming it; nothing changes."""
    before = stored(seeded)
    message = failed(manage(seeded, "node", verb, UNKNOWN_UUID))
    assert f"no node {UNKNOWN_UUID}" in message
    assert stored(seeded) == before


@pytest.mark.parametrize("verb", ["show", "delete"])
@pytest.mark.parametrize("value", ["web-0", "d8e02d56264849a3bf976be8f1204f00x", "", "' OR 1=1"])
def test_malformed_uuid(sqlite_conf: Path, verb: str, value: str) -> None:
    """show/delete of something that is not a uuid fail saying so; nothing changes."""
    ok(manage(sqlite_conf, "node", "import", "-", stdin=json.dumps(node_document(0))))
    before = stored(sqlite_conf)
    message = failed(manage(sqlite_conf, "node", verb, value))
    assert "not a UUID" in message
    assert stored(sqlite_conf) == before


def test_malformed_uuid_on_each_backend(seeded: Path) -> None:
    """A malformed uuid is refused on every backend before it reaches a query."""
    before = stored(seeded)
    assert "not a UUID" in failed(manage(seeded, "node", "delete", "web-0"))
    assert stored(seeded) == before


# --- node delete ----------------------------------------------------------------------


def test_delete(seeded: Path) -> None:
    """`node delete UUID` removes the node and frees its ports for another node."""
    uuid = node_document(0)["uuid"]
    assert ok(manage(seeded, "node", "delete", uuid)) == f"deleted node {uuid}\n"
    assert [d["uuid"] for d in stored(seeded)] == [node_document(1)["uuid"]]
    assert "no node" in failed(manage(seeded, "node", "show", uuid))
    assert "no node" in failed(manage(seeded, "node", "delete", uuid))
    reuse = node_document(8, ports=node_document(0)["ports"])
    assert "1 created" in ok(manage(seeded, "node", "import", "-", stdin=json.dumps(reuse)))


# --- configuration and database errors ------------------------------------------------

VERBS = [
    ("db", "upgrade"),
    ("node", "import", "-"),
    ("node", "list"),
    ("node", "list", "--json"),
    ("node", "show", UNKNOWN_UUID),
    ("node", "delete", UNKNOWN_UUID),
]
VERB_IDS = ["db-upgrade", "import", "list", "list-json", "show", "delete"]


@pytest.mark.parametrize("args", VERBS, ids=VERB_IDS)
def test_missing_config_file(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Every verb with a missing configuration file fails on one line naming it."""
    conf = tmp_path / "absent.conf"
    message = failed(manage(conf, *args, stdin="{}"))
    assert str(conf) in message
    assert "No such file" in message


@pytest.mark.parametrize("args", VERBS, ids=VERB_IDS)
def test_bad_config_value(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Every verb with a bad configuration value fails on one line naming [section] key."""
    conf = tmp_path / "bad.conf"
    conf.write_text(
        f"[database]\nurl = sqlite:///{tmp_path / 'db.sqlite'}\npool_size = lots\n",
        encoding="utf-8",
    )
    message = failed(manage(conf, *args, stdin="{}"))
    assert str(conf) in message
    assert "[database] pool_size:" in message
    assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.parametrize("args", VERBS, ids=VERB_IDS)
def test_unreachable_database(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A server that refuses connections is one 'database error' line without the password."""
    conf = write_conf(tmp_path, "postgresql+psycopg://metadatad:hunter2@127.0.0.1:1/metadatad")
    message = failed(manage(conf, *args, stdin="{}"))
    assert "database error" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "mysql://root@127.0.0.1:1/metadatad"],
    ids=["in-memory-sqlite", "uninstalled-driver"],
)
def test_unusable_database_url_is_one_line(tmp_path: Path, url: str) -> None:
    """`node list` with an unusable database URL fails with one line, not a traceback."""
    failed(manage(write_conf(tmp_path, url), "node", "list"))


# --- usage errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "detail"),
    [
        ((), "COMMAND"),
        (("node",), "ACTION"),
        (("db",), "ACTION"),
        (("frobnicate",), "frobnicate"),
        (("node", "show"), "uuid"),
        (("node", "delete"), "uuid"),
        (("node", "import"), "file"),
        (("node", "list", "--yaml"), "--yaml"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], detail: str
) -> None:
    """argparse usage errors exit 2 with a usage line and touch nothing."""
    result = manage(tmp_path / "absent.conf", *args)
    assert result.status == 2
    captured = capsys.readouterr()
    assert "usage: metadatad-manage" in captured.err
    assert detail in captured.err
    assert result.out == ""


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the commands and exits 0."""
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "db" in out
    assert "node" in out


# --- the real console script ----------------------------------------------------------


def console_script(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the installed ``metadatad-manage`` next to this interpreter, in ``tmp_path``."""
    script = Path(sys.executable).parent / "metadatad-manage"
    return subprocess.run(
        [str(script), *args],
        cwd=tmp_path,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed entry point migrates, imports from stdin, lists and deletes."""
    (tmp_path / "metadatad.conf").write_text("[database]\nurl = sqlite:///var/m.sqlite\n")
    base = ("--config", "metadatad.conf")
    upgraded = console_script(tmp_path, *base, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "var" / "m.sqlite").is_file()
    imported = console_script(
        tmp_path, *base, "node", "import", "-", stdin=json.dumps(node_document(0))
    )
    assert imported.returncode == 0, imported.stderr
    assert "1 created" in imported.stdout
    bad = console_script(tmp_path, *base, "node", "show", "nope")
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == ["metadatad-manage: not a UUID: 'nope'"]
    usage = console_script(tmp_path)
    assert usage.returncode == 2
    assert "usage: metadatad-manage" in usage.stderr
