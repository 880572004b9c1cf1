"""What a second worker buys: wrk against the daemon with 1 and with 2 metadata workers.

    flock /work/bench.lock .venv/bin/python bench/workers.py [--duration 10] [--runs 3]
        [--connections 50] [--quota 0.4]

Starts the real daemon twice on a fresh SQLite database (the demo node, the settings of
bench/http.py: rate limit and per-source connection cap out of wrk's reach), with
``[metadata] workers = 1`` (one process) and with ``workers = 2``, and runs wrk (1
thread, keep-alive connections) against each on ``GET /latest/meta-data/instance-id``
and ``GET /openstack/latest/meta_data.json``.  Each response is checked as bench/http.py
checks it (status 200, size).

Measuring fairly on 2 cores.  Two workers need a core each and wrk needs a third, and
this machine has two, shared with other work.  Worse, the scheduler shares the CPU
among sessions (autogroup), not processes: the daemon's main process and its workers
are one session, so against any other busy session two workers get no more CPU than
one process.  So by default (``--quota 0.4``) every server process (the one process;
with 2 workers the main process and each worker) runs in a cpu cgroup of its own,
capped at 0.4 of a core (CFS bandwidth, 10 ms period): a scaled-down machine with a
core per worker (0.4 of one) and the rest for wrk.  Nothing is pinned.  Then two
workers should answer twice what one process does, unless something serialises them.
The cgroups need root and a cgroup v1 ``cpu`` hierarchy or cgroup v2 with the cpu
controller; ``--quota 0`` measures the old way instead: the one process pinned to core
0 with wrk on core 1, the two workers and wrk unpinned on both cores (req/s then tells
more about the machine's other load than about the workers).

Per run the bench also records, for each server process (from /proc/PID/schedstat):
the share of the run it spent on a CPU, waiting for one (runnable, or held back by
its quota) and asleep (waiting for work: a worker that sleeps while wrk has 50 requests
out is held back by something other than CPU); and the keep-alive connections each
worker holds half-way through (a connection stays with the worker that accepted it).
A quota run in which a server process got less than 90 % of its quota without
sleeping was starved by other load and is marked.  Every process and cgroup created
is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    BenchError,
    CpuQuota,
    Processes,
    cpu_seconds,
    read_text,
    run_bench,
    schedstat,
    signal_group,
    signals_held,
    tree,
)

_spec = importlib.util.spec_from_file_location("bench_http", Path(__file__).with_name("http.py"))
assert _spec is not None and _spec.loader is not None
web = importlib.util.module_from_spec(_spec)
sys.modules["bench_http"] = web  # its dataclasses look their module up
_spec.loader.exec_module(web)

PATHS = ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json")
STARVED = 0.9  # of the quota, without sleeping: other load took the CPU


def connections(port: int, pids: list[int]) -> list[int]:
    """The established connections to ``port`` each of ``pids`` holds."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read_text(Path(table)).splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    counts = []
    for pid in pids:
        held = 0
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    held += link.startswith("socket:[") and link[8:-1] in inodes
        counts.append(held)
    return counts


def wrk(
    lua: Path, port: int, path: str, args: argparse.Namespace, *, pin: str | None,
    seconds: int, servers: list[int] | None = None,
) -> tuple[dict[str, float], float, list[int]]:
    """One wrk run: its parsed report, the CPU seconds wrk itself used and, when
    ``servers`` are given, the connections each holds half-way through."""
    argv = ["wrk", "-t", "1", "-c", str(args.connections), "-d", f"{seconds}s",
            "--timeout", "5s", "-s", str(lua), f"http://{web.HOST}:{port}{path}"]
    if pin is not None:
        argv = ["taskset", "-c", pin, *argv]
    before = os.times()
    with signals_held():
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    held: list[int] = []
    try:
        if servers:
            time.sleep(seconds / 2)
            held = connections(port, servers)
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            signal_group(proc, 9)
            proc.wait()
    after = os.times()
    text = out.decode(errors="replace")
    line = next((x for x in text.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (status {proc.returncode}):\n{text}")
    result = {k: float(v) for k, v in (kv.split("=") for kv in line[6:].split())}
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return result, client_cpu, held


def measure(
    procs: Processes, name: str, port: int, path: str, args: argparse.Namespace,
    *, lua: Path, pin: str | None,
) -> dict[str, Any]:
    target = web.Target(f"{name} {path}", name, port, path)
    web.check_probe(target, "before")
    if args.warmup:
        wrk(lua, port, path, args, pin=pin, seconds=args.warmup)
    pids = tree(procs.pid(name))
    # The serving processes: the workers, or the one process.
    workers = pids[1:] or pids
    before = {pid: cpu_seconds(pid) for pid in pids}
    sched_before = {pid: schedstat(pid) for pid in workers}
    wall_before = time.monotonic()
    result, client_cpu, held = wrk(
        lua, port, path, args, pin=pin, seconds=args.duration, servers=workers
    )
    wall = time.monotonic() - wall_before
    after = {pid: cpu_seconds(pid) for pid in pids}
    sched_after = {pid: schedstat(pid) for pid in workers}
    web.check_run(target, result, "run")
    web.check_probe(target, "after")
    procs.check_alive()
    if target.problems:
        raise BenchError("; ".join(target.problems))
    requests = max(result["requests"], 1)
    server_cpu = sum(after[pid] - before[pid] for pid in pids)
    shares = []
    for pid in workers:
        on = (sched_after[pid][0] - sched_before[pid][0]) / wall
        wait = (sched_after[pid][1] - sched_before[pid][1]) / wall
        shares.append((on, wait, max(0.0, 1 - on - wait)))
    starved = bool(args.quota) and any(
        on < STARVED * args.quota and asleep < 1 - STARVED for on, _, asleep in shares
    )
    return {
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "server_us": server_cpu / requests * 1e6,
        "client_us": client_cpu / requests * 1e6,
        "main_us": (after[pids[0]] - before[pids[0]]) / requests * 1e6 if pids[1:] else 0.0,
        "connections": held,
        "shares": shares,
        "starved": starved,
        "p99_ms": result["p99_us"] / 1000,
    }


def _shares(row: dict[str, Any]) -> str:
    return ", ".join(f"{on:.2f} / {wait:.2f} / {asleep:.2f}" for on, wait, asleep in row["shares"])


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    quota = CpuQuota(args.quota) if args.quota else None
    try:
        return _bench(args, tmp, procs, quota)
    finally:
        if quota is not None:
            procs.stop_all()
            quota.remove()


def _bench(
    args: argparse.Namespace, tmp: Path, procs: Processes, quota: CpuQuota | None
) -> int:
    lua = tmp / "report.lua"
    lua.write_text(web.REPORT_LUA)
    rows: dict[tuple[int, str], list[dict[str, Any]]] = {}
    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if quota is not None:
        print(f"each server process capped at {quota.cores} of a core; nothing pinned")
    for count in (1, 2):
        name = f"w{count}"
        directory = tmp / name
        directory.mkdir()

        def argv(port: int, directory: Path = directory, count: int = count) -> list[str]:
            conf = web.write_config(directory, port, web.free_port(taken=(port,)), count)
            # wrk's connections are all one node: the per-source cap out of its reach too
            # (with 2 workers each enforces half of it).
            text = conf.read_text().replace(
                "[metadata]\n", "[metadata]\nmax_connections_per_source = 1000\n"
            )
            conf.write_text(text)
            web.manage(conf, "db", "upgrade")
            web.manage(conf, "node", "import", str(web.DEMO_NODES))
            twistd = [str(web.BIN / "twistd"), "-n", "--pidfile=", "metadatad", "--config",
                      str(conf)]
            pinned = quota is None and count == 1
            return ["taskset", "-c", "0", *twistd] if pinned else twistd

        port = web.start_server(procs, name, argv, PATHS[0])
        if count == 2:
            deadline = time.monotonic() + 30
            while len(tree(procs.pid(name))) < 3:
                if time.monotonic() > deadline:
                    raise BenchError("the two workers did not start")
                time.sleep(0.1)
        if quota is not None:
            for pid in tree(procs.pid(name)):
                quota.cap(pid)
        pin = "1" if quota is None and count == 1 else None
        for round_ in range(args.runs):
            for path in PATHS:
                row = measure(procs, name, port, path, args, lua=lua, pin=pin)
                rows.setdefault((count, path), []).append(row)
                print(f"  {name} round {round_ + 1} {path}: {row['rps']:.0f} req/s, "
                      f"server {row['server_us']:.0f} us/req (main process "
                      f"{row['main_us']:.1f}), connections "
                      f"{'/'.join(map(str, row['connections']))}, on CPU / waiting / "
                      f"asleep {_shares(row)}{' STARVED' if row['starved'] else ''}",
                      flush=True)
        procs.discard(name)

    def med(count: int, path: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[(count, path)])

    print()
    print("| target | server | req/s | x one process | p99 | server CPU us/req "
          "| wrk CPU us/req | connections per worker | each worker: on CPU / waiting / asleep |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in PATHS:
        for count in (1, 2):
            runs = rows[(count, path)]
            rps = med(count, path, "rps")
            # The round whose req/s is the median's (the lower one for an even count).
            shown = sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]
            if quota is not None:
                how = f"{count} {'process' if count == 1 else 'workers'}, {quota.cores} core each"
            else:
                how = ("1 process (core 0), wrk core 1" if count == 1
                       else "2 workers + wrk, 2 cores")
            starved = sum(r["starved"] for r in runs)
            print(f"| `{path}` | {how} | {rps:.0f} | {rps / med(1, path, 'rps'):.2f} "
                  f"| {med(count, path, 'p99_ms'):.1f} ms | {med(count, path, 'server_us'):.0f} "
                  f"| {med(count, path, 'client_us'):.0f} "
                  f"| {'/'.join(map(str, shown['connections']))} | {_shares(shown)}"
                  f"{f' ({starved} of {len(runs)} rounds starved)' if starved else ''} |")
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--quota", type=float, default=0.4,
                        help="cores each server process may use (0: no cap, old layout)")
    return run_bench(bench, parser.parse_args(argv), "metadatad-workers-bench-")


if __name__ == "__main__":
    sys.exit(main())
