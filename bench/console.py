"""The console's nodes table at 10,000 nodes on PostgreSQL, next to the admin API's
node listing (the way to find a node before the console), in one run.

    .venv/bin/python bench/console.py [--nodes 10000] [--repeat 30]

It makes a scratch PostgreSQL database (``METADATAD_BENCH_POSTGRESQL_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), imports the nodes, gives a
third of them a last boot outcome, runs ``VACUUM ANALYZE`` (as autovacuum would after
the import), starts one real daemon (``twistd -n metadatad``,
conductor c1) and waits until it holds every node.  Then, one request at a time over
loopback with the bearer token, ``--repeat`` times each (alternating), it times:

* console pages: the first page, a deep page, search by MAC, by part of an IP, by
  name, the owner + boot outcome filter, the push state filter, and a node's page;
* the peer: ``GET /v1/nodes`` (every node as JSON), what an operator greps today.

Each figure is the request's wall time on this host (an upper bound of the server's
time: loopback, one client), median and 95th percentile, and for the table pages the
database part the page reports ("queried in"); the ratio is the console page's
median over the peer's.  Target (issue 18): every console page's median under
200 ms (the 95th percentile is printed next to it: on a shared machine it measures
the neighbours as much as the console).  The load
average is printed at start and end.  The daemon is stopped and the database dropped.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: bench/http.py would shadow the stdlib's http.
sys.path[0] = str(ROOT)

from sqlalchemy import insert, text  # noqa: E402

from bench.failover import Scratch  # noqa: E402
from metadatad.db.schema import node_boot_status  # noqa: E402
from metadatad.db.store import make_engine  # noqa: E402
from tests.support.daemon import Daemon, http_request  # noqa: E402
from tests.support.factories import node_document  # noqa: E402

TARGET = 0.200


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"load average at start: {_load()}")
    with Scratch() as scratch, tempfile.TemporaryDirectory() as tmp:
        documents = [node_document(i) for i in range(args.nodes)]
        daemon = Daemon.create(
            Path(tmp) / "c1",
            nodes=documents,
            database_url=scratch.url,
            config={"conductor": {"hostname": "c1"}},
        )
        engine = make_engine(scratch.url, 1)
        outcomes = ("complete", "timeout", "metadata")
        with engine.begin() as connection:
            connection.execute(
                insert(node_boot_status),
                [
                    {
                        "node_uuid": d["uuid"],
                        "outcome": outcomes[i % 3],
                        "detail": "bench",
                        "at": datetime(2026, 12, 6),
                    }
                    for i, d in enumerate(documents)
                    if i % 3 == 0 or i % 5 == 0
                ],
            )
        # What autovacuum does after a bulk import (visibility map, statistics): the
        # steady state an operator's console sees.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
        engine.dispose()
        daemon.start(deadline=120)
        try:
            return _measure(daemon, documents, args.repeat)
        finally:
            daemon.stop()
            print(f"load average at end: {_load()}")


def _measure(daemon: Daemon, documents: list[dict[str, object]], repeat: int) -> int:
    bearer = {"Authorization": f"Bearer {daemon.admin_token}"}
    give_up = time.monotonic() + 120
    while True:
        status, body = daemon.admin("GET", "/v1/ring")
        if status == 200 and body["pending"] == 0 and body["nodes"] == len(documents):
            break
        if time.monotonic() > give_up:
            raise SystemExit(f"console bench: c1 did not claim every node: {body}")
        time.sleep(0.5)  # poll-with-deadline on a real daemon
    target = documents[7777 % len(documents)]
    mac = target["ports"][0]["mac"]  # type: ignore[index]
    pages = {
        "first page": "/console/nodes",
        "page 150": "/console/nodes?page=150",
        "search MAC": f"/console/nodes?q={str(mac).upper()}",
        "search IP part": "/console/nodes?q=10.0.31.",
        "search name": "/console/nodes?q=web-99",
        "owner + outcome": "/console/nodes?owner=c1&outcome=timeout",
        "push state": "/console/nodes?push=none&page=3",
        "node page": f"/console/nodes/{target['uuid']}",
        "peer: GET /v1/nodes": "/v1/nodes",
    }
    walls: dict[str, list[float]] = {name: [] for name in pages}
    queried: dict[str, list[float]] = {name: [] for name in pages}
    for _ in range(repeat):
        for name, path in pages.items():
            started = time.perf_counter()
            status, _, body = http_request(daemon.admin_url + path, headers=bearer)
            walls[name].append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"console bench: {path} answered {status}")
            found = re.search(rb"queried in ([0-9.]+) ms", body)
            if found:
                queried[name].append(float(found.group(1)) / 1000)
    peer = statistics.median(walls["peer: GET /v1/nodes"])
    print(f"\n{len(documents)} nodes, PostgreSQL, {repeat} requests each, one at a time\n")
    print("| request | median | p95 | database part (median) | vs peer |")
    print("|---|---|---|---|---|")
    missed = False
    for name in pages:
        times = sorted(walls[name])
        median = statistics.median(times)
        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
        db = f"{statistics.median(queried[name]) * 1000:.1f} ms" if queried[name] else "-"
        ratio = f"{median / peer:.3f}x" if not name.startswith("peer") else "1x"
        print(f"| {name} | {median * 1000:.1f} ms | {p95 * 1000:.1f} ms | {db} | {ratio} |")
        if not name.startswith("peer") and median > TARGET:
            missed = True
    print(f"\ntarget: every console page under {TARGET * 1000:.0f} ms (median): "
          + ("MISSED" if missed else "ok"))  # fmt: skip
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
