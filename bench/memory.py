# -*- test-case-name: tests.db.test_cache -*-
"""Memory: the daemon's RSS with 1,000 and 100,000 registered nodes, and what one node
cache entry costs.

Two modes.

``entry`` (in process, no daemon): one :class:`~metadatad.db.cache.NodeCache` entry is
filled through a real :class:`~metadatad.metadata.site.MetadataSite` (records parsed
from their JSON document, as the SQL store does), and ``tracemalloc`` counts what the
record and the memo of rendered answers hold: for a typical node (the boot storm's) and
for the largest node validation accepts (64 keys of 16 KiB, 64 ports, 64 security
groups of 255 characters, 128 meta items, 64 KiB of user data), after cloud-init's
paths (``latest`` only) and after a crawl of every path of every EC2 and OpenStack
version.

``daemon`` (the default): for each node count (``--nodes 1000,100000``, SQLite,
defaults, imported with ``metadatad-manage node import``) and each server (``w1`` one
process, ``w2`` ``[metadata] workers = 2``), starts ``twistd metadatad`` and records
VmRSS (``/proc/<pid>/status``) and PSS (``/proc/<pid>/smaps_rollup``) of the main
process and of each worker: at idle, after a storm of 1,000 machines replaying
cloud-init's crawl (``bench/bootstorm.py``'s client and sequence), and after a sweep
in which every registered node asks for ``meta-data/instance-id`` and
``openstack/latest/meta_data.json`` from its own address (127.x.y.z), so that the
node cache holds one entry per node.

    flock /work/bench.lock .venv/bin/python bench/memory.py entry
    flock /work/bench.lock .venv/bin/python bench/memory.py --nodes 1000
    flock /work/bench.lock .venv/bin/python bench/memory.py --nodes 100000 --servers w1
    flock /work/bench.lock .venv/bin/python bench/memory.py --nodes 100000 --servers w2

(With 100,000 nodes one server takes about 6 minutes, most of it the sweep: each node's
first request is a cache miss and a query.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/http.py would shadow the stdlib

STORM_MACHINES = 1000
SWEEP_PATHS = ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json")
SWEEP_CONCURRENCY = 200
START_DEADLINE = 300.0


def node_ip(index: int) -> str:
    """Node ``index``'s own address: bootstorm's 127.1.x.y for the first 64,000."""
    return f"127.{1 + index // 64000}.{index // 250 % 256}.{index % 250 + 1}"


def node_mac(index: int) -> str:
    return f"52:54:01:{index // 65536:02x}:{index // 256 % 256:02x}:{index % 256:02x}"


# --- one entry, in process -------------------------------------------------------------


def largest_document() -> dict[str, Any]:
    """A node at every limit of validation (metadatad/core/nodes.py)."""
    from metadatad.core.nodes import USER_DATA_MAX_BYTES
    from metadatad.testing.factories import node_document

    def text(prefix: str, length: int) -> str:
        return (prefix + "x" * length)[:length]

    return node_document(
        0,
        hostname=text("h", 60) + ".example.org",
        public_keys={
            text(f"key{i}-", 255): "ssh-rsa " + text(f"{i}", 16384 - 8) for i in range(64)
        },
        meta={text(f"k{i}-", 255): text(f"v{i}-", 255) for i in range(128)},
        ports=[{"mac": node_mac(i), "ip": f"10.1.{i}.2"} for i in range(64)],
        security_groups=[text(f"sg{i}-", 255) for i in range(64)],
        block_device_mapping={text(f"d{i}-", 64): text(f"/dev/{i}", 255) for i in range(64)},
        user_data=base64.b64encode(os.urandom(USER_DATA_MAX_BYTES)).decode("ascii"),
    )


def typical_document() -> dict[str, Any]:
    """A node of the boot storm (bench/bootstorm.py)."""
    from metadatad.testing.factories import node_document

    return node_document(0, ports=[{"mac": node_mac(0), "ip": node_ip(0)}])


class EntryProbe:
    """A metadata site over one node whose record is parsed from JSON on each load."""

    def __init__(self, document: dict[str, Any]) -> None:
        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        from metadatad.core.identity import Identifier
        from metadatad.core.nodes import parse_node
        from metadatad.core.records import NodeRecord
        from metadatad.db.cache import NodeCache
        from metadatad.metadata.site import MetadataSite
        from metadatad.testing import MemoryStore

        stored = json.dumps(parse_node(document).to_document())
        moment = datetime(2026, 1, 1, tzinfo=UTC)

        def load(_: str) -> Any:
            return succeed(NodeRecord(parse_node(json.loads(stored)), 1, moment, moment))

        self.ip = document["ports"][0]["ip"]
        self.cache = NodeCache(load, load, Clock(), 60, generation=lambda: succeed(0))
        self.site = MetadataSite(
            self.cache, MemoryStore(), Identifier([], ""), random_bytes=lambda n: b"\0" * n
        )

    def get(self, path: str) -> tuple[int, bytes]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.defer import Deferred
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest(path.encode().split(b"/")[1:])
        request.path = path.encode()
        request.method = b"GET"
        request.content = io.BytesIO()
        request.client = IPv4Address("TCP", self.ip, 40000)
        body = self.site.handle(request)
        if isinstance(body, Deferred):
            fired: list[Any] = []
            body.addBoth(fired.append)
            body = fired[0]
        return request.responseCode or 200, body

    def entry(self) -> Any:
        from twisted.internet.defer import Deferred

        found = self.cache.by_ip(self.ip)
        if isinstance(found, Deferred):
            fired: list[Any] = []
            found.addBoth(fired.append)
            found = fired[0]
        return found


def every_path(get: Callable[[str], tuple[int, bytes]]) -> Iterator[str]:
    """Every path of every EC2 and OpenStack version, by following the listings."""
    from metadatad.metadata import ec2, openstack

    def walk(directory: str) -> Iterator[str]:
        yield directory
        _, body = get(directory)
        for line in body.decode().splitlines():
            if "=" in line:  # public-keys lists "0=name": a directory
                yield from walk(directory + line.split("=", 1)[0] + "/")
            elif line.endswith("/"):
                yield from walk(directory + line)
            else:
                yield directory + line

    for version in (*ec2.VERSIONS, "latest"):
        yield from walk(f"/{version}/")
    for version in (*openstack.VERSIONS, "latest"):
        yield from walk(f"/openstack/{version}/")


def cloud_init_paths(sequence: Path) -> list[str]:
    """The GETs of cloud-init's crawl (``sequence_file``) that reach a node's tree."""
    from metadatad.metadata.reply import split_path

    paths = []
    for method, path in json.loads(sequence.read_text()):
        parts = split_path(path.encode())
        if method == "GET" and len(parts) > 1 and parts[-1] not in ("openstack", "ec2"):
            paths.append(path)
    return paths


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure_entry(document: dict[str, Any], paths: list[str] | None) -> dict[str, Any]:
    """Bytes held by one entry: its record, and its memo after ``paths``."""
    # A first probe over the same paths: what the first request allocates once per
    # process (imports, Twisted's and json's lazy state) is not the entry's.
    # The same node has the same paths: listed on that probe, outside the count.
    warm = EntryProbe(document)
    requested = paths if paths is not None else list(every_path(warm.get))
    for path in requested:
        warm.get(path)
    probe = EntryProbe(document)
    tracemalloc.start()
    try:
        before = traced()
        entry = probe.entry()
        loaded = traced()
        for path in requested:
            probe.get(path)
        filled = traced()
    finally:
        tracemalloc.stop()
    bodies = sum(len(reply.body) for reply in entry.memo.values())
    return {
        "paths": len(set(requested)),
        "memo_keys": len(entry.memo),
        "record_bytes": loaded - before,
        "memo_bytes": filled - loaded,
        "memo_body_bytes": bodies,
        "memo_estimate": entry.memo_bytes,
    }


def entry_main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="memory-"))
    try:
        crawl = cloud_init_paths(sequence_file(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "| node | paths requested | answers memoised | record | memo (the cache's count) "
        "| entry total |"
    )
    print("|---|---|---|---|---|---|")
    for name, document in (("typical", typical_document()), ("largest", largest_document())):
        for paths, requested in (("cloud-init", crawl), ("every", None)):
            r = measure_entry(document, requested)
            total = r["record_bytes"] + r["memo_bytes"]
            print(
                f"| {name} | {paths} ({r['paths']}) | {r['memo_keys']} "
                f"| {_size(r['record_bytes'])} | {_size(r['memo_bytes'])} "
                f"({_size(r['memo_estimate'])}) | {_size(total)} |",
                flush=True,
            )
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- the daemon --------------------------------------------------------------------------


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and PSS of ``pid``, in KiB (PSS 0 without smaps_rollup)."""
    found = {"rss": 0, "pss": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            found["rss"] = int(line.split()[1])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                found["pss"] = int(line.split()[1])
    except (FileNotFoundError, PermissionError):
        pass
    return found


async def sweep(port: int, nodes: int) -> dict[str, Any]:
    """Every node asks for ``SWEEP_PATHS`` from its own address, a few hundred at once."""
    from bench.bootstorm import one_request, request_bytes

    gate = asyncio.Semaphore(SWEEP_CONCURRENCY)
    errors: dict[str, int] = {}

    async def node(index: int) -> None:
        async with gate:
            for path in SWEEP_PATHS:
                _, error = await one_request(port, node_ip(index), request_bytes("GET", path))
                if error is not None:
                    errors[error] = errors.get(error, 0) + 1

    began = time.monotonic()
    await asyncio.gather(*(node(i) for i in range(nodes)))
    return {
        "requests": nodes * len(SWEEP_PATHS),
        "total_s": round(time.monotonic() - began, 1),
        "errors": errors,
    }


def settled_tree(pid: int, processes: int, deadline: float = 30.0) -> list[int]:
    """The daemon's pids once all ``processes`` are up (main first)."""
    from bench.harness import tree

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        pids = tree(pid)
        if len(pids) >= processes:
            return pids
        time.sleep(0.2)
    raise SystemExit(f"the daemon has {len(tree(pid))} processes, expected {processes}")


def cache_gauges(daemon: Any) -> dict[str, int]:
    """The metadata node cache's entries and memo bytes (summed over the workers)."""
    _, text = daemon.admin("GET", "/metrics")
    found = {}
    for line in str(text).splitlines():
        for name in ("entries", "memo_bytes"):
            if line.startswith(f'metadatad_node_cache_{name}{{cache="metadata"}}'):
                found[name] = int(float(line.split()[-1]))
    return found


def snapshot(pids: list[int]) -> list[dict[str, int]]:
    gc.collect()
    time.sleep(2)  # let the last answers and the activity writer's batch finish
    return [memory_of(p) for p in pids]


def prepare_database(tmp: Path, nodes: int) -> str:
    """A migrated SQLite database with ``nodes`` nodes, imported in chunks."""
    from metadatad.testing.daemon import Daemon
    from metadatad.testing.factories import node_document

    daemon = Daemon.create(tmp / f"import-{nodes}")
    began = time.monotonic()
    for start in range(0, nodes, 20_000):
        daemon.import_nodes(
            node_document(i, ports=[{"mac": node_mac(i), "ip": node_ip(i)}])
            for i in range(start, min(nodes, start + 20_000))
        )
    print(f"imported {nodes} nodes in {time.monotonic() - began:.0f} s", flush=True)
    return daemon.database_url


def sequence_file(tmp: Path) -> Path:
    """cloud-init's crawl, captured once from a daemon with one node at 127.0.0.1 (whose
    cache entry must not count in the runs)."""
    from bench.bootstorm import capture_sequence
    from metadatad.testing.daemon import Daemon
    from tests.daemon.test_cloudinit import CALLER_NODE, VENDORDATA

    path = tmp / "sequence.json"
    with Daemon.create(tmp / "capture", nodes=[CALLER_NODE], vendordata=VENDORDATA) as daemon:
        sequence = capture_sequence(daemon)
    path.write_text(json.dumps(sequence))
    print(f"cloud-init's crawl: {len(sequence)} requests per machine", flush=True)
    return path


def run_server(
    tmp: Path, database_url: str, nodes: int, workers: int, sequence: Path
) -> list[dict[str, Any]]:
    from bench.bootstorm import run_client
    from metadatad.testing.daemon import Daemon
    from tests.daemon.test_cloudinit import VENDORDATA

    daemon = Daemon.create(
        tmp / f"n{nodes}-w{workers}",
        database_url=database_url,
        vendordata=VENDORDATA,
        config={"metadata": {"workers": str(workers)}},
    )
    rows = []
    began = time.monotonic()
    # With 100,000 nodes, ready (healthz 200) takes longer than the tests' 20 s.
    daemon.start(deadline=START_DEADLINE)
    ready = time.monotonic() - began
    print(f"{nodes} nodes, {workers} worker(s): ready in {ready:.1f} s", flush=True)
    with daemon:
        assert daemon.process is not None
        pids = settled_tree(daemon.process.pid, 1 if workers == 1 else 1 + workers)
        time.sleep(3)  # start-up done: gc.freeze() has run, workers have settled

        def row(phase: str, extra: str) -> None:
            rows.append(
                {
                    "nodes": nodes,
                    "workers": workers,
                    "phase": phase,
                    "extra": extra,
                    "memory": snapshot(pids),
                    "cache": cache_gauges(daemon),
                    "loadavg": os.getloadavg()[0],
                }
            )
            print(json.dumps(rows[-1]), flush=True)

        row("idle", "")
        storm = run_client(daemon.metadata_port, STORM_MACHINES, sequence, None)
        row("after storm", f"{storm['requests']} requests, errors {storm['errors'] or 0}")
        swept = asyncio.run(sweep(daemon.metadata_port, nodes))
        row(
            "after sweep",
            f"{swept['requests']} requests in {swept['total_s']} s, errors {swept['errors'] or 0}",
        )
        if daemon.errors():
            raise SystemExit("the daemon logged errors:\n" + "\n".join(daemon.errors()))
    return rows


def daemon_main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="memory-"))
    try:
        print(f"load average before: {os.getloadavg()}", flush=True)
        sequence = sequence_file(tmp)
        rows = []
        for nodes in (int(n) for n in args.nodes.split(",")):
            database_url = prepare_database(tmp, nodes)
            for server in args.servers.split(","):
                rows += run_server(tmp, database_url, nodes, int(server[1:]), sequence)
        print_table(rows)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| nodes | workers | phase | main RSS (PSS) | each worker RSS (PSS) | total PSS "
        "| cache entries (memo) | requests | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        main, *workers = r["memory"]
        each = ", ".join(f"{_mib(w['rss'])} ({_mib(w['pss'])})" for w in workers) or "-"
        total = sum(m["pss"] for m in r["memory"])
        cache = r["cache"]
        held = f"{cache.get('entries', 0):,} ({_mib(cache.get('memo_bytes', 0) // 1024)})"
        print(
            f"| {r['nodes']:,} | {r['workers']} | {r['phase']} "
            f"| {_mib(main['rss'])} ({_mib(main['pss'])}) | {each} | {_mib(total)} "
            f"| {held} | {r['extra'] or '-'} | {r['loadavg']:.1f} |"
        )


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="daemon", choices=["daemon", "entry"])
    parser.add_argument("--nodes", default="1000,100000")
    parser.add_argument("--servers", default="w1,w2")
    args = parser.parse_args(argv)
    # Also when started in the background (SIGINT ignored) and on SIGTERM: stop the
    # daemons and remove the temporary directory.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupted)
    return entry_main(args) if args.mode == "entry" else daemon_main(args)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
