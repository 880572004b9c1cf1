"""HTTP throughput of the metadata site next to its limits, measured in one run.

    .venv/bin/python bench/http.py [--duration 10] [--connections 50] [--threads 1]
                                   [--runs 3] [--warmup 2] [--branch-peer] [--measured-peer]

Starts, each as its own process pinned to one core (``taskset -c 0``) on a free
loopback port:

* the real daemon, ``twistd -n --pidfile= metadatad --config <tmp conf>``, on a fresh
  SQLite database (``metadatad-manage db upgrade`` + ``node import
  conf/demo-nodes.json``, whose node has the port address 127.0.0.1) and the default
  settings otherwise (cache_ttl 15, access_log false), but for the rate limit: wrk's
  connections are all one node, so ``rate_limit`` is set far above what it can send
  (the per-node bucket is still kept on every request, never refusing);
* a bare ``twisted.web`` leaf resource returning a constant (the limit), and
* a Klein app with one route returning the same constant (the framework's own cost),
  both from bench/peers.py, served by the daemon's own Site factory (QuietSite);
* the daemon's instance-id read with an IMDSv2 session token (``PUT /latest/api/token``
  once, then every request carries ``X-aws-ec2-metadata-token``), next to the same read
  without one: what checking a token costs;
* with --branch-peer, also that constant behind a catch-all branch route like the
  metadata site's (what the site's routing costs before any of its own work);
* with --measured-peer, also that constant counted for /metrics by a resource around it
  (metadatad.telemetry.MeasuredResource, for a plain Site; the daemon's own sites count
  in HardenedSite since 2026-12-06, without that layer).

Then, for each round, it runs wrk (pinned to the other core, ``taskset -c 1``) against
each target in turn, a warm-up run first, and prints requests/s and latency p50/p99
(median over the rounds) with the ratio to the Klein constant and to the bare constant,
and the share of its core the server used during the run ("cpu"; a saturated server
uses all of it: less means another process shared the core and the run is suspect) and
the server's CPU time per response ("cpu us/req", less moved than req/s by other load on
the machine, though not immune; "x klein cpu" is the Klein constant's over this one's).
Every response must be a 200: each target is probed before and after its runs, wrk's
count of error statuses and socket errors must be zero and wrk's bytes per response must
match the probed 200; otherwise the run is flagged and the exit status is 1.  Every
process started here is stopped (also on Ctrl-C or SIGTERM) and the temporary directory
removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from harness import (
    BenchError,
    Processes,
    cpu_seconds,
    run_bench,
    signal_group,
    signals_held,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
DEMO_NODES = ROOT / "conf" / "demo-nodes.json"
VENDORDATA = ROOT / "conf" / "vendordata.json"
DEMO_INSTANCE_ID = b"d8e02d56-2648-49a3-bf97-6be8f1204f38"
# What both peers answer: as long as an instance id.
BODY = b"00000000-0000-0000-0000-000000000000"
TARGET_RATIO = 0.9
MIN_SERVER_CPU = 0.9

REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%.0f duration_us=%.0f bytes=%.0f connect=%.0f read=%.0f write=%.0f "
    .. "status=%.0f timeout=%.0f p50_us=%.1f p99_us=%.1f max_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Target:
    name: str
    server: str
    port: int
    path: str
    expect_body: bytes | None = None  # exact body, when it is constant
    expect_size: int = 0  # bytes of a whole 200 response, from the probe
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request
    runs: list[dict[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"


def free_port(taken: Collection[int] = ()) -> int:
    """A loopback port free now, below the ephemeral range (where clients' ports come from)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(10000, max(low, 10001))
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise BenchError("no free loopback port")


def start_server(
    procs: Processes, name: str, argv_for: Callable[[int], list[str]], path: str
) -> int:
    """Start a server on a free port and wait for a 200 on ``path``; returns the port.

    Another program may take the port between the check and the bind: then again.
    """
    for attempt in range(1, 4):
        port = free_port()
        procs.start(name, argv_for(port))
        try:
            wait_until_up(procs, port, path)
            return port
        except BenchError:
            if attempt == 3 or "Address already in use" not in procs.log(name):
                raise
            procs.discard(name)
    raise AssertionError("unreachable")


def probe(
    port: int,
    path: str,
    timeout: float = 5.0,
    headers: tuple[tuple[str, str], ...] = (),
    method: str = "GET",
) -> tuple[int, int, bytes]:
    """One request over a fresh connection: (status, bytes of the whole response, body)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n".encode("ascii")
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError(f"connection closed before the headers from port {port}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in lines[1:])
        }
        if b"content-length" not in headers:
            raise BenchError(f"no Content-Length from {HOST}:{port}{path}: {head!r}")
        length = int(headers[b"content-length"])
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, len(head) + 4 + length, body[:length]


def wait_until_up(procs: Processes, port: int, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        try:
            status, _, _ = probe(port, path, timeout=2)
            if status == 200:
                return
        except (OSError, BenchError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"nothing answered 200 on {HOST}:{port}{path} in {timeout:.0f}s")
        time.sleep(0.1)


def write_config(
    tmp: Path, port: int, admin_port: int, workers: int = 1, cache_ttl: float | None = None
) -> Path:
    token = tmp / "admin-token"
    token.write_text("bench-" + os.urandom(16).hex() + "\n")
    token.chmod(0o600)
    conf = tmp / "metadatad.conf"
    # The node cache revalidates once per cache_ttl (the default unless given).
    ttl = "" if cache_ttl is None else f"cache_ttl = {cache_ttl}\n"
    conf.write_text(
        "[database]\n"
        f"url = sqlite:///{tmp / 'metadatad.sqlite'}\n"
        "[metadata]\n"
        f"listen = tcp:{port}:interface={HOST}\n"
        "rate_limit = 1000000\n"
        "rate_burst = 1000000\n"
        # One process pinned to one core unless asked (the default, auto, is one per CPU).
        f"workers = {workers}\n"
        f"{ttl}"
        "[admin]\n"
        f"listen = tcp:{admin_port}:interface={HOST}\n"
        f"token_file = {token}\n"
        "[vendordata]\n"
        f"static_file = {VENDORDATA}\n"
    )
    return conf


def manage(conf: Path, *args: str) -> None:
    argv = [str(BIN / "metadatad-manage"), "--config", str(conf), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout}")


def run_wrk(
    procs: Processes, target: Target, args: argparse.Namespace, lua: Path, seconds: int
) -> dict[str, float]:
    argv = [
        "taskset", "-c", args.client_cpu, "wrk",
        "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
        "--timeout", "5s", "-s", str(lua),
        *[arg for name, value in target.headers for arg in ("-H", f"{name}: {value}")],
        target.url,
    ]
    server = procs.pid(target.server)
    cpu_before, wall_before = cpu_seconds(server), time.monotonic()
    proc = None
    try:
        with signals_held():
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        out, _ = proc.communicate(timeout=seconds + 30)
        cpu_used = cpu_seconds(server) - cpu_before
        cpu = cpu_used / (time.monotonic() - wall_before)
    finally:
        if proc is not None and proc.poll() is None:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
    text = out.decode(errors="replace")
    match = re.search(r"^BENCH (.*)$", text, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed on {target.url} (status {proc.returncode}):\n{text}")
    procs.check_alive()
    result = {k: float(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # A saturated single-threaded server uses its whole core; less means it was shared.
    result["cpu"] = cpu
    # Server CPU per response: unlike req/s, hardly moved by a busy machine.
    result["cpu_us"] = cpu_used * 1e6 / max(result["requests"], 1)
    return result


def check_probe(target: Target, when: str) -> None:
    status, size, body = probe(target.port, target.path, headers=target.headers)
    if status != 200:
        target.problems.append(f"{when}: probe answered {status}: {body[:200]!r}")
    elif target.expect_body is not None and body != target.expect_body:
        target.problems.append(f"{when}: probe body {body[:80]!r} != {target.expect_body!r}")
    elif target.expect_size and size != target.expect_size:
        target.problems.append(
            f"{when}: probe response of {size} bytes, {target.expect_size} before"
        )
    else:
        target.expect_size = size


def check_run(target: Target, result: dict[str, float], label: str) -> None:
    """wrk counts statuses >= 400 and socket errors; the size check catches the rest."""
    errors = {k: int(result[k]) for k in ("status", "timeout", "connect", "read", "write")}
    if any(errors.values()):
        shown = ", ".join(f"{k} {v}" for k, v in errors.items() if v)
        target.problems.append(f"{label}: wrk errors: {shown} (status = non-2xx/3xx responses)")
    if result["requests"] <= 0:
        target.problems.append(f"{label}: no complete response")
        return
    # Responses cut off when wrk stops add at most one response per connection.
    per_response = result["bytes"] / result["requests"]
    if not target.expect_size <= per_response <= target.expect_size * 1.01 + 1:
        target.problems.append(
            f"{label}: {per_response:.1f} bytes per response, a 200 is {target.expect_size}"
        )


def versions() -> list[str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0].split(" Copyright")[0]
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )
    return [
        f"metadatad: {git.stdout.strip() or 'unknown revision'} ({ROOT})",
        f"machine: {os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()} · Twisted {version('Twisted')} · "
        f"Klein {version('klein')} · Werkzeug {version('Werkzeug')} · {wrk_version}",
    ]


def reactor_of(procs: Processes, name: str) -> str:
    text = procs.log(name)
    found = re.search(r"reactor class: ([\w.]+)", text) or re.search(
        r"^ready \S+ \d+ (\S+)", text, re.MULTILINE
    )
    return found.group(1).rstrip(".").rsplit(".", 1)[-1] if found else "?"


def affinity(pid: int) -> str:
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
    except OSError:
        return "?"


def median(t: Target, key: str) -> float:
    return statistics.median(r[key] for r in t.runs)


def table(targets: list[Target], klein: Target, bare: Target) -> Iterator[str]:
    yield (
        f"{'target':<44} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'x klein':>8} {'x bare':>7}"
        f" {'cpu':>5} {'cpu us/req':>10} {'x klein cpu':>11}   req/s of each round"
    )
    for t in targets:
        rps = median(t, "rps")
        rounds = " ".join(f"{r['rps']:.0f}" for r in t.runs)
        yield (
            f"{t.name:<44} {rps:>8.0f} {median(t, 'p50_us') / 1000:>7.2f} "
            f"{median(t, 'p99_us') / 1000:>7.2f} {rps / median(klein, 'rps'):>8.2f} "
            f"{rps / median(bare, 'rps'):>7.2f} {median(t, 'cpu'):>5.0%} "
            f"{median(t, 'cpu_us'):>10.0f} {median(klein, 'cpu_us') / median(t, 'cpu_us'):>11.2f}"
            f"   {rounds}"
        )


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        raise BenchError("wrk and taskset are needed (apt-get install wrk util-linux)")
    lua = tmp / "report.lua"
    lua.write_text(REPORT_LUA)
    pin = ["taskset", "-c", args.server_cpu]
    # -P: bench/ stays off sys.path, where this file would shadow the stdlib's http.
    peer = [sys.executable, "-P", str(ROOT / "bench" / "peers.py"), "--body", BODY.decode()]

    db_ready: list[Path] = []

    def daemon_argv(port: int) -> list[str]:
        conf = write_config(tmp, port, free_port(taken=(port,)))
        if not db_ready:
            manage(conf, "db", "upgrade")
            manage(conf, "node", "import", str(DEMO_NODES))
            db_ready.append(conf)
        twistd = [str(BIN / "twistd"), "-n", "--pidfile=", "metadatad", "--config", str(conf)]
        return [*pin, *twistd]

    def peer_argv(kind: str) -> Callable[[int], list[str]]:
        return lambda port: [*pin, *peer, kind, "--port", str(port)]

    daemon_port = start_server(procs, "metadatad", daemon_argv, "/latest/meta-data/instance-id")
    klein_port = start_server(procs, "klein", peer_argv("klein"), "/constant")
    bare_port = start_server(procs, "bare", peer_argv("bare"), "/constant")
    instance_id = Target("metadatad /latest/meta-data/instance-id", "metadatad", daemon_port,
                         "/latest/meta-data/instance-id", DEMO_INSTANCE_ID)
    meta_data = Target("metadatad /openstack/latest/meta_data.json", "metadatad", daemon_port,
                       "/openstack/latest/meta_data.json")
    status, _, token = probe(
        daemon_port,
        "/latest/api/token",
        headers=(("X-aws-ec2-metadata-token-ttl-seconds", "21600"),),
        method="PUT",
    )
    if status != 200:
        raise BenchError(f"the token PUT answered {status}: {token[:200]!r}")
    with_token = Target("metadatad instance-id, IMDSv2 token", "metadatad", daemon_port,
                        "/latest/meta-data/instance-id", DEMO_INSTANCE_ID,
                        headers=(("X-aws-ec2-metadata-token", token.decode("ascii")),))
    klein = Target("klein constant (one route)", "klein", klein_port, "/constant", BODY)
    bare = Target("bare twisted.web constant (leaf resource)", "bare", bare_port, "/constant", BODY)
    targets = [instance_id, with_token, meta_data, klein, bare]
    if args.branch_peer:
        path = "/latest/meta-data/instance-id"
        port = start_server(procs, "klein-branch", peer_argv("klein-branch"), path)
        targets.insert(3, Target(
            "klein constant (catch-all branch route)", "klein-branch", port, path, BODY
        ))
    if args.measured_peer:
        port = start_server(procs, "klein-measured", peer_argv("klein-measured"), "/constant")
        targets.insert(3, Target(
            "klein constant counted for /metrics", "klein-measured", port, "/constant", BODY
        ))
    for t in targets:
        wait_until_up(procs, t.port, t.path)

    print("\n".join(versions()))
    print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for name in dict.fromkeys(t.server for t in targets):
        pid = procs.pid(name)
        print(f"{name}: pid {pid}, cpu {affinity(pid)}, reactor {reactor_of(procs, name)}")
    print(
        f"wrk: cpu {args.client_cpu}, {args.threads} thread(s), {args.connections} connections, "
        f"{args.runs} round(s) of {args.warmup:g}s warm-up + {args.duration:g}s per target\n"
    )

    for t in targets:
        check_probe(t, "before")
    for round_ in range(1, args.runs + 1):
        for t in targets:
            if args.warmup:
                run_wrk(procs, t, args, lua, args.warmup)
            result = run_wrk(procs, t, args, lua, args.duration)
            check_run(t, result, f"round {round_}")
            t.runs.append(result)
            print(
                f"  round {round_}: {t.name:<44} {result['rps']:>8.0f} req/s, "
                f"server cpu {result['cpu']:.0%}",
                flush=True,
            )
    for t in targets:
        check_probe(t, "after")

    print()
    for line in table(targets, klein, bare):
        print(line)
    print()
    shared = [
        f"{t.name} round {i}: {r['cpu']:.0%}"
        for t in targets for i, r in enumerate(t.runs, 1) if r["cpu"] < MIN_SERVER_CPU
    ]
    if shared:
        print(
            f"WARNING: a server had less than {MIN_SERVER_CPU:.0%} of its core during a run: "
            "another process shared it, so req/s (and its ratios) are noisy; the CPU time "
            "per response (x klein cpu) is the steadier comparison.  Rerun on an idle "
            "machine.  " + "; ".join(shared) + "\n"
        )
    token_cost = median(with_token, "cpu_us") - median(instance_id, "cpu_us")
    token_ratio = median(with_token, "rps") / median(instance_id, "rps")
    print(
        f"IMDSv2 token read vs IMDSv1 read: {token_ratio:.2f}x in req/s, "
        f"{token_cost:+.1f} us of server CPU per response"
    )
    for t in (instance_id, meta_data):
        ratio = median(t, "rps") / median(klein, "rps")
        by_cpu = median(klein, "cpu_us") / median(t, "cpu_us")
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(
            f"target {t.name} >= {TARGET_RATIO}x klein constant: {verdict} "
            f"({ratio:.2f}x in req/s, {by_cpu:.2f}x in CPU time per response)"
        )

    problems = [f"{t.name}: {p}" for t in targets for p in t.problems]
    if problems:
        print("\nINVALID RUN: not every response was a 200", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("every response was a 200 (wrk: no error status, no socket error, sizes match)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--runs", type=int, default=3, help="rounds over every target (3)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="warm-up seconds before each run, 0: none (2)"
    )
    parser.add_argument(
        "--branch-peer", action="store_true",
        help="also measure a Klein constant behind the daemon's catch-all branch route",
    )
    parser.add_argument(
        "--measured-peer", action="store_true",
        help="also measure the Klein constant behind the daemon's request metrics",
    )
    parser.add_argument("--server-cpu", default="0", help="core of the servers (0)")
    parser.add_argument("--client-cpu", default="1", help="core of wrk (1)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.runs < 1:
        parser.error("--duration and --runs must be at least 1, --warmup at least 0")

    return run_bench(bench, args, "metadatad-bench-")


if __name__ == "__main__":
    sys.exit(main())
