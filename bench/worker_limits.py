"""Per-node limits across metadata workers: what one node is allowed, against its ideal.

With ``[metadata] workers = N`` each worker enforces ``rate_limit / N``, ``rate_burst /
N`` and ``max_connections_per_source / N`` (rounded up) on its own: the kernel, not the
node, picks the worker of each connection.  This bench measures how far from the
configured totals a node really gets, on a real ``twistd metadatad`` with 1 process
and with 2 workers, one node (its own source address, a new one for every trial):

* **rate limit** (a daemon with ``rate_limit``/``rate_burst`` set, ``--rate``/``--burst``):
  the node asks ``/latest/meta-data/instance-id`` for ``--seconds``, one new TCP
  connection per request as cloud-init does, either
  ``sequential`` (one request at a time, as fast as answers come),
  ``paced`` (one at a time, at ``--paced`` requests/s; default twice the limit) or
  ``concurrent`` (``--concurrency`` connections at a time, as fast as it can).
  Its ideal allowance is ``burst + rate x T`` (T: first request to last); admitted is
  the number of 200s; the rest were 429s.
* **connection cap** (a daemon with the default cap of 64 and no rate limit): the node
  opens ``--connections`` keep-alive connections and holds them, each with one request
  answered (one that is closed without an answer was refused), either ``sequential``
  (one after the other) or ``concurrent`` (all at once).  Ideal: ``min(count, cap)``.

Which worker answered is read from the access log (``worker`` field of the JSON log).
Run it under the bench lock::

    flock /work/bench.lock .venv/bin/python bench/worker_limits.py \\
        [--trials 3] [--seconds 5] [--rate 50] [--burst 100] [--concurrency 8] \\
        [--connections 64,96] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/http.py would shadow the stdlib

from bench.harness import BenchError, Processes, run_bench  # noqa: E402

PATH = "/latest/meta-data/instance-id"
TIMEOUT = 10.0
DEFAULT_CAP = 64
ACCESS = re.compile(r'^"(?P<peer>[^"]+)" .*" (?P<status>\d{3}) ')
REFUSED = 0  # a connection closed (or reset) without an answer


def source(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 1}"


# --- the client ----------------------------------------------------------------------


async def ask(
    port: int, address: str, keep: list[asyncio.StreamWriter] | None = None
) -> int:
    """One request on a new connection from ``address``: its status, or REFUSED.  With
    ``keep`` the connection stays open (keep-alive) and its writer is added to it."""
    writer = None
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0)
            )
            close = "" if keep is not None else "Connection: close\r\n"
            writer.write(
                f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n{close}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            if keep is not None:
                keep.append(writer)
                writer = None
            return status
    except (asyncio.IncompleteReadError, ConnectionError):
        return REFUSED
    finally:
        if writer is not None:
            writer.close()


@dataclass
class Outcome:
    statuses: Counter[int] = field(default_factory=Counter)
    first: float = 0.0
    last: float = 0.0  # start of the last request

    @property
    def seconds(self) -> float:
        return self.last - self.first


async def for_a_while(
    port: int, address: str, *, seconds: float, concurrency: int = 1, pace: float | None = None
) -> Outcome:
    """``concurrency`` loops of one request after another for ``seconds``; with
    ``pace`` (one loop only), requests start every ``1 / pace`` s."""
    outcome = Outcome()
    began = time.monotonic()
    outcome.first = began
    end = began + seconds

    async def loop() -> None:
        n = 0
        while True:
            now = time.monotonic()
            if pace is not None:
                due = began + n / pace
                if due >= end:
                    return
                if due > now:
                    await asyncio.sleep(due - now)
            elif now >= end:
                return
            outcome.last = max(outcome.last, time.monotonic())
            outcome.statuses[await ask(port, address)] += 1
            n += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcome


async def hold(port: int, address: str, *, count: int, concurrent: bool) -> Outcome:
    """``count`` keep-alive connections from ``address``, each with one request
    answered, all held open at the end; then closed."""
    outcome = Outcome()
    outcome.first = time.monotonic()
    kept: list[asyncio.StreamWriter] = []
    if concurrent:
        statuses = await asyncio.gather(*(ask(port, address, kept) for _ in range(count)))
    else:
        statuses = [await ask(port, address, kept) for _ in range(count)]
    outcome.last = time.monotonic()
    outcome.statuses.update(statuses)
    for writer in kept:
        writer.close()
    return outcome


# --- the access log --------------------------------------------------------------------


def answered_by_worker(daemon: Any, address: str, expected: int) -> dict[str, Counter[int]]:
    """Status counts of ``address``'s requests per worker (``-``: the main process),
    once the log holds ``expected`` of them (workers log through the main process)."""
    give_up = time.monotonic() + 15
    while True:
        found: dict[str, Counter[int]] = {}
        total = 0
        for raw in daemon.output().splitlines():
            line = raw.lstrip("\x1e")
            if address not in line or not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            match = ACCESS.match(str(event.get("message", "")))
            if match is None or match["peer"] != address:
                continue
            worker = str(event.get("worker", "-"))
            found.setdefault(worker, Counter())[int(match["status"])] += 1
            total += 1
        if total >= expected:
            return found
        if time.monotonic() > give_up:
            raise BenchError(f"{address}: {total} of {expected} requests in the access log")
        time.sleep(0.2)  # poll-with-deadline on the daemon's log


# --- the run ---------------------------------------------------------------------------


@dataclass
class Row:
    limit: str
    workers: int
    client: str
    trial: int
    sent: int
    admitted: int
    refused: int
    other: int
    ideal: float
    split: str
    seconds: float
    loadavg: float

    @property
    def ratio(self) -> float:
        return self.admitted / self.ideal


def split_text(found: dict[str, Counter[int]], workers: int) -> str:
    if workers == 1:
        return "-"
    parts = []
    for worker in [str(i) for i in range(workers)]:
        counts = found.get(worker, Counter())
        parts.append(f"{counts[200]}/{sum(counts.values()) - counts[200]}")
    return " ; ".join(parts)


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    from metadatad.testing.daemon import Daemon
    from metadatad.testing.factories import node_document

    workers_list = [int(w) for w in args.workers.split(",")]
    connections = [int(c) for c in args.connections.split(",")]
    per_daemon = args.trials * max(3, 2 * len(connections))
    nodes = [
        node_document(
            i, ports=[{"mac": f"52:54:03:00:{i // 256:02x}:{i % 256:02x}", "ip": source(i)}]
        )
        for i in range(per_daemon)
    ]
    pace = args.paced or 2 * args.rate
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows: list[Row] = []
    for workers in workers_list:
        common = {"workers": str(workers), "access_log": "true"}
        rated = {**common, "rate_limit": str(args.rate), "rate_burst": str(args.burst)}
        capped = {**common, "rate_limit": "0"}
        for limit, metadata in (("rate", rated), ("cap", capped)):
            daemon = Daemon.create(
                tmp / f"{limit}-w{workers}",
                nodes=nodes,
                config={"metadata": metadata, "logging": {"format": "json"}},
            )
            with daemon:
                settle(daemon, workers)
                index = 0
                port = daemon.metadata_port
                runs: list[tuple[str, Callable[[str], Coroutine[Any, Any, Outcome]]]]
                if limit == "rate":
                    runs = [
                        ("sequential", partial(for_a_while, port, seconds=args.seconds)),
                        (f"paced {pace:g}/s",
                         partial(for_a_while, port, seconds=args.seconds, pace=pace)),
                        (f"concurrent x{args.concurrency}",
                         partial(for_a_while, port, seconds=args.seconds,
                                 concurrency=args.concurrency)),
                    ]
                else:
                    runs = []
                    for count in connections:
                        runs.append((f"sequential {count}",
                                     partial(hold, port, count=count, concurrent=False)))
                        runs.append((f"concurrent {count}",
                                     partial(hold, port, count=count, concurrent=True)))
                for trial in range(1, args.trials + 1):
                    for client, run in runs:
                        address = source(index)
                        index += 1
                        outcome = asyncio.run(run(address))
                        rows.append(row(daemon, address, outcome, args, limit=limit,
                                        workers=workers, client=client, trial=trial))
                        print(json.dumps(rows[-1].__dict__), flush=True)
    print_tables(rows, args)
    return 0


def settle(daemon: Any, workers: int) -> None:
    """Wait until every worker serves (the harness waits for one answer only)."""
    if workers == 1:
        return
    give_up = time.monotonic() + 20
    while True:
        _, document = daemon.admin("GET", "/healthz")
        if isinstance(document, dict) and document.get("workers", {}).get("running") == workers:
            return
        if time.monotonic() > give_up:
            raise BenchError(f"not all {workers} workers running: {document}")
        time.sleep(0.1)  # poll-with-deadline on a real subprocess


def row(
    daemon: Any, address: str, outcome: Outcome, args: argparse.Namespace, *,
    limit: str, workers: int, client: str, trial: int,
) -> Row:
    statuses = outcome.statuses
    sent = sum(statuses.values())
    answered = sent - statuses[REFUSED]
    found = answered_by_worker(daemon, address, answered)
    if limit == "rate":
        ideal = min(sent, args.burst + args.rate * outcome.seconds)
        refused = statuses[429]
    else:
        ideal = min(sent, DEFAULT_CAP)
        refused = statuses[REFUSED]
    admitted = statuses[200]
    return Row(
        limit=limit, workers=workers, client=client, trial=trial, sent=sent,
        admitted=admitted, refused=refused, other=sent - admitted - refused,
        ideal=round(ideal, 1), split=split_text(found, workers),
        seconds=round(outcome.seconds, 2), loadavg=os.getloadavg()[0],
    )


def print_tables(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(f"Rate limit: rate_limit {args.rate:g}, rate_burst {args.burst}, "
          f"{args.seconds:g} s per trial; ideal = burst + rate x T")
    print()
    print("| workers | client | trial | T | requests | 200 | 429 | other | ideal | 200/ideal "
          "| by worker (200/429) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.limit == "rate":
            print(f"| {r.workers} | {r.client} | {r.trial} | {r.seconds:.2f} s | {r.sent} "
                  f"| {r.admitted} | {r.refused} | {r.other} | {r.ideal:g} | {r.ratio:.2f} "
                  f"| {r.split} | {r.loadavg:.1f} |")
    print()
    print(f"Connection cap: max_connections_per_source {DEFAULT_CAP} (no rate limit); "
          "ideal = min(connections, cap)")
    print()
    print("| workers | client | trial | connections | answered | refused | other | ideal "
          "| answered/ideal | by worker (answered) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.limit == "cap":
            split = " ; ".join(s.split("/")[0] for s in r.split.split(" ; "))
            print(f"| {r.workers} | {r.client} | {r.trial} | {r.sent} | {r.admitted} "
                  f"| {r.refused} | {r.other} | {r.ideal:g} | {r.ratio:.2f} | {split} "
                  f"| {r.loadavg:.1f} |")
    print()
    summary: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        summary.setdefault((r.limit, r.workers, r.client), []).append(r.ratio)
    print("| limit | workers | client | admitted/ideal: min | mean | max |")
    print("|---|---|---|---|---|---|")
    for (limit, workers, client), ratios in summary.items():
        print(f"| {limit} | {workers} | {client} | {min(ratios):.2f} "
              f"| {sum(ratios) / len(ratios):.2f} | {max(ratios):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--paced", type=float, default=None,
                        help="requests/s of the paced client (default: twice --rate)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--connections", default="64,96")
    parser.add_argument("--workers", default="1,2")
    return run_bench(bench, parser.parse_args(argv), "worker-limits-")


if __name__ == "__main__":
    sys.exit(main())
