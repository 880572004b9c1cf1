# -*- test-case-name: tests.app.test_cli -*-
"""``metadatad-manage``: schema migrations, node registration, and a look at the
conductors and their ring, from the shell.

Runs without a reactor: it calls the synchronous repository directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from metadatad.cluster.commands import CommandError as ClusterCommandError
from metadatad.cluster.commands import add_commands as add_cluster_commands
from metadatad.cluster.commands import run_command as run_cluster_command
from metadatad.config import Config, load_config
from metadatad.core.jsoninput import JSONInputError, parse_json
from metadatad.core.nodes import NodeValidationError, parse_node, parse_nodes, strip_read_only
from metadatad.core.records import ConflictError
from metadatad.db.cluster import ClusterRepository
from metadatad.db.migrate import check_schema, upgrade
from metadatad.db.peers import PeerRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.errors import SetupError


class CommandError(Exception):
    """A failure to report on one line; the command exits 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metadatad-manage",
        description="Manage the metadatad database and nodes; show conductors and the ring.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default="/etc/metadatad/metadatad.conf",
        help="configuration file (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    db.add_parser("upgrade", help="create or migrate the schema to this version")

    node = commands.add_parser("node", help="registered nodes").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    node_import = node.add_parser(
        "import", help="create or replace nodes from a JSON file (a list or one object)"
    )
    node_import.add_argument("file", help="JSON file, or - for standard input")
    node_list = node.add_parser("list", help="list nodes")
    node_list.add_argument("--json", action="store_true", help="print JSON documents")
    node_show = node.add_parser("show", help="print one node as JSON")
    node_show.add_argument("uuid")
    node_delete = node.add_parser("delete", help="delete a node")
    node_delete.add_argument("uuid")
    node_unshare = node.add_parser(
        "delete-shared-keys", help="delete the keys a node shared with its project"
    )
    node_unshare.add_argument("uuid")
    node_clear = node.add_parser(
        "clear-password", help="forget the password a node posted (it may post a new one)"
    )
    node_clear.add_argument("uuid")
    add_cluster_commands(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
    stdin: TextIO = sys.stdin,
) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return _run(args, config, stdout, stdin)
    except (SetupError, CommandError) as e:
        print(f"metadatad-manage: {e}", file=stderr)
        return 1
    except SQLAlchemyError as e:
        message = " ".join(str(getattr(e, "orig", None) or e).split())
        print(f"metadatad-manage: database error: {message}", file=stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`node list | head`): not an error worth a traceback.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def _run(args: argparse.Namespace, config: Config, stdout: TextIO, stdin: TextIO) -> int:
    if args.command == "db":
        _ensure_sqlite_directory(config.database.url)
        engine = make_engine(config.database.url, 1)
        upgrade(engine)
        print("database is at the current schema", file=stdout)
        return 0
    engine = make_engine(config.database.url, 1)
    check_schema(engine)
    if args.command in ("conductor", "ring"):
        try:
            return run_cluster_command(args, config, ClusterRepository(engine), stdout)
        except ClusterCommandError as e:
            raise CommandError(str(e)) from None
    repository = NodeRepository(engine)
    if args.action == "import":
        return _import(repository, args.file, stdout, stdin)
    if args.action == "list":
        records = repository.list_nodes()
        if args.json:
            json.dump([r.to_document() for r in records], stdout, indent=2, sort_keys=True)
            print(file=stdout)
            return 0
        rows = [("UUID", "NAME", "HOSTNAME", "PROJECT", "ADDRESSES")]
        rows += [
            (
                r.node.uuid,
                r.node.name,
                r.node.hostname,
                r.node.project_id or "-",
                ",".join(r.node.ips) or "-",
            )
            for r in records
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
            print("  ".join([*cells, row[4]]), file=stdout)
        return 0
    uuid = _uuid_argument(args.uuid)
    if args.action == "show":
        record = repository.get_node(uuid)
        if record is None:
            raise CommandError(f"no node {uuid}")
        document = record.to_document()
        entries = PeerRepository(engine).node_entries(uuid)
        document["shared_keys"] = entries["shared"]
        document["private_keys"] = entries["private"]
        json.dump(document, stdout, indent=2, sort_keys=True)
        print(file=stdout)
        return 0
    if args.action == "delete-shared-keys":
        count = PeerRepository(engine).delete_shared(uuid)
        if count is None:
            raise CommandError(f"no node {uuid}")
        print(f"deleted {count} shared keys of node {uuid}", file=stdout)
        return 0
    if args.action == "clear-password":
        cleared = repository.clear_password(uuid)
        if cleared is None:
            raise CommandError(f"no node {uuid}")
        message = "cleared the password of" if cleared else "no password was set for"
        print(f"{message} node {uuid}", file=stdout)
        return 0
    assert args.action == "delete"
    if not repository.delete_node(uuid):
        raise CommandError(f"no node {uuid}")
    print(f"deleted node {uuid}", file=stdout)
    return 0


def _import(repository: NodeRepository, filename: str, stdout: TextIO, stdin: TextIO) -> int:
    try:
        if filename == "-":
            text: str | bytes = stdin.read()
        else:
            with open(filename, "rb") as f:
                text = f.read()
        document: Any = parse_json(text)
    except OSError as e:
        raise CommandError(f"{filename}: {e.strerror}") from None
    except (JSONInputError, UnicodeDecodeError) as e:
        raise CommandError(f"{filename}: {e}; nothing was imported") from None
    try:
        new_nodes = parse_nodes(strip_read_only(document))
        created = repository.upsert_nodes(new_nodes, as_list=isinstance(document, list))
    except (NodeValidationError, ConflictError) as e:
        raise CommandError(f"{filename}: {e}; nothing was imported") from None
    made = sum(created)
    print(
        f"imported {len(new_nodes)} nodes ({made} created, {len(new_nodes) - made} updated)",
        file=stdout,
    )
    return 0


def _uuid_argument(value: str) -> str:
    try:
        return parse_node({"uuid": value}).uuid
    except NodeValidationError as e:
        raise CommandError(e.message) from None


def _ensure_sqlite_directory(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        directory = os.path.dirname(parsed.database)
        if directory:
            os.makedirs(directory, exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
