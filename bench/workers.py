"""What a second worker buys: wrk against the daemon with 1 and with 2 metadata workers.

    .venv/bin/python bench/workers.py [--duration 10] [--runs 3] [--connections 50]

Starts the real daemon twice on a fresh SQLite database (the demo node, the settings of
bench/http.py: rate limit and per-source connection cap out of wrk's reach):
``[metadata] workers = 1`` (one process) pinned to core 0 with wrk pinned to core 1, as
bench/http.py measures it; and ``workers = 2``, main process and workers free to use
both cores, wrk too.  On a 2-core machine the second run's wrk takes its share from the
workers' cores, so its req/s is a lower bound of what two workers do with a core each;
the table therefore also prints the CPU each side used per response, the share of the
serving CPU each worker used, and ``capacity``: what the servers would answer per second
with two whole cores at the measured CPU cost per response (2 / cost), next to one
process with one core (1 / cost).

Targets: ``GET /latest/meta-data/instance-id`` and ``GET /openstack/latest/meta_data.json``
(keep-alive connections, wrk's default).  Each response is checked as bench/http.py
checks it (status 200, size).  Every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
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
    Processes,
    cpu_seconds,
    run_bench,
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


def wrk(
    lua: Path, port: int, path: str, args: argparse.Namespace, *, pin: str | None, seconds: int
) -> tuple[dict[str, float], float]:
    """One wrk run: its parsed report and the CPU seconds wrk itself used."""
    argv = ["wrk", "-t", "1", "-c", str(args.connections), "-d", f"{seconds}s",
            "--timeout", "5s", "-s", str(lua), f"http://{web.HOST}:{port}{path}"]
    if pin is not None:
        argv = ["taskset", "-c", pin, *argv]
    before = os.times()
    with signals_held():
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
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
    return result, client_cpu


def measure(
    procs: Processes, name: str, port: int, path: str, args: argparse.Namespace,
    *, lua: Path, pin: str | None,
) -> dict[str, Any]:
    target = web.Target(f"{name} {path}", name, port, path)
    web.check_probe(target, "before")
    if args.warmup:
        wrk(lua, port, path, args, pin=pin, seconds=args.warmup)
    pids = tree(procs.pid(name))
    before = {pid: cpu_seconds(pid) for pid in pids}
    result, client_cpu = wrk(lua, port, path, args, pin=pin, seconds=args.duration)
    after = {pid: cpu_seconds(pid) for pid in pids}
    web.check_run(target, result, "run")
    web.check_probe(target, "after")
    procs.check_alive()
    if target.problems:
        raise BenchError("; ".join(target.problems))
    requests = max(result["requests"], 1)
    used = {pid: after[pid] - before[pid] for pid in pids}
    server_cpu = sum(used.values())
    workers = pids[1:] or pids
    return {
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "server_us": server_cpu / requests * 1e6,
        "client_us": client_cpu / requests * 1e6,
        # The workers' shares of the serving CPU: how evenly the kernel spread the work.
        "split": [used[p] / max(sum(used[w] for w in workers), 1e-9) for p in workers],
        "p99_ms": result["p99_us"] / 1000,
    }


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    lua = tmp / "report.lua"
    lua.write_text(web.REPORT_LUA)
    rows: dict[tuple[int, str], list[dict[str, Any]]] = {}
    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for count in (1, 2):
        name = f"w{count}"
        directory = tmp / name
        directory.mkdir()

        def argv(port: int, directory: Path = directory, count: int = count) -> list[str]:
            conf = web.write_config(directory, port, web.free_port(taken=(port,)))
            # wrk's connections are all one node: the per-source cap out of its reach too
            # (with 2 workers each enforces half of it).
            text = conf.read_text().replace(
                "[metadata]\n",
                f"[metadata]\nworkers = {count}\nmax_connections_per_source = 1000\n",
            )
            conf.write_text(text)
            web.manage(conf, "db", "upgrade")
            web.manage(conf, "node", "import", str(web.DEMO_NODES))
            twistd = [str(web.BIN / "twistd"), "-n", "--pidfile=", "metadatad", "--config",
                      str(conf)]
            return ["taskset", "-c", "0", *twistd] if count == 1 else twistd

        port = web.start_server(procs, name, argv, PATHS[0])
        if count == 2:
            deadline = time.monotonic() + 30
            while len(tree(procs.pid(name))) < 3:
                if time.monotonic() > deadline:
                    raise BenchError("the two workers did not start")
                time.sleep(0.1)
        for round_ in range(args.runs):
            for path in PATHS:
                row = measure(
                    procs, name, port, path, args, lua=lua, pin="1" if count == 1 else None
                )
                rows.setdefault((count, path), []).append(row)
                print(f"  {name} round {round_ + 1} {path}: {row['rps']:.0f} req/s, "
                      f"server {row['server_us']:.0f} us/req, split "
                      f"{'/'.join(f'{s:.0%}' for s in row['split'])}", flush=True)
        procs.discard(name)

    def med(count: int, path: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[(count, path)])

    print()
    print("| target | server | req/s | p99 | server CPU us/req | wrk CPU us/req "
          "| split between workers | capacity req/s | x one process (req/s) "
          "| x one process (capacity) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in PATHS:
        for count in (1, 2):
            rps, cost = med(count, path, "rps"), med(count, path, "server_us")
            capacity = count / cost * 1e6
            base_rps = med(1, path, "rps")
            base_capacity = 1 / med(1, path, "server_us") * 1e6
            split = rows[(count, path)][-1]["split"]
            how = "1 process (core 0), wrk core 1" if count == 1 else "2 workers + wrk, 2 cores"
            print(f"| `{path}` | {how} "
                  f"| {rps:.0f} | {med(count, path, 'p99_ms'):.1f} ms | {cost:.0f} "
                  f"| {med(count, path, 'client_us'):.0f} "
                  f"| {'/'.join(f'{s:.0%}' for s in split)} | {capacity:.0f} "
                  f"| {rps / base_rps:.2f} | {capacity / base_capacity:.2f} |")
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    return run_bench(bench, parser.parse_args(argv), "metadatad-workers-bench-")


if __name__ == "__main__":
    sys.exit(main())
