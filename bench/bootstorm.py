"""Boot storm: N machines run cloud-init's metadata crawl at once against the daemon.

The request sequence is cloud-init's own: Debian's cloud-init (22.4) crawls a
``twistd metadatad`` once through the driver of ``tests/daemon/test_cloudinit.py``
(OpenStack datasource, then EC2), and every URL its ``url_helper.readurl`` was asked
for, in order, is what each machine replays.  Each machine has its own source address
(127.1.x.y, registered as its port address), opens a new TCP connection per request as
cloud-init does, and waits for each answer before the next (10 s at most, cloud-init's
time-out); all machines start together.

One run, each server in turn on the same sequence and the same machines:

* ``metadatad workers=1``: the daemon (defaults, SQLite, N nodes) pinned to core 0;
* ``metadatad workers=2``: the daemon with two workers, not pinned (both cores, which
  the client shares: the client is throttled by nothing, so read its figures as a
  lower bound);
* ``bare twisted.web``: a leaf resource answering a constant (``bench/peers.py bare``)
  pinned to core 0;
* ``floor``: the client floor, nginx (Debian's nginx-light, one worker, master and
  worker pinned to core 0) answering every path and method with the same 36-byte
  constant (``return 200``), closing each connection as the daemon does.  nginx's cost
  per request is a small fraction of the client's, so its total time is the client's
  own: what one client core needs for the N machines, whatever the server.

The client (this script's ``--client`` mode, asyncio on uvloop) runs pinned to core 1
for the pinned servers.  Printed per server: total time, requests/s, p50/p99/max
latency, every error by kind, the server's CPU time per request (all its processes)
and the client's (its CPU time during the storm, and the share of its core it used).

After the table, with ``floor`` in the run, the bound the client sets: the client is
one process, so no server on this machine makes it finish much sooner than against
nginx (floor's total, about the client's CPU per request times the requests).  Its
cost per request is lower against a slower server (more answers per turn of its event
loop: 40-60 us against bare, 60-90 against nginx), but a server as fast as nginx
brings it back to nginx's figure.  With ``bare`` in the run too,
that total as a ratio to bare's (the issue's goal: at most 0.6x bare), and the server
CPU per request the goal leaves: the goal's time per request on a core of the server's
own, or twice that less the client's cost when the server shares both cores with it
(with ``--quota Q``: Q times the goal's time per request, per capped process).

    .venv/bin/python bench/bootstorm.py [--machines 1000] [--servers w1,w2,bare,floor]
        [--cache-ttl S] [--quota Q] [--bare-backlog N] [--py-spy DIR] [--save-sequence FILE]

``--bare-backlog N``: the bare server listens with a queue of N instead of Twisted's 50
(the daemon asks for 65535, metadatad.core.backlog, which the kernel caps at
``net.core.somaxconn``, 4096 here): with 50, a storm's dropped SYNs stall bare's
machines for 1 s, 3 s and 7 s (time-outs at 10 s) while its core idles, and its total is
no longer what its CPU allows.

``--quota Q`` is bench/workers.py's fair method on 2 cores: no pinning, every server
process (the bare server; nginx's master and its worker; the daemon's main process and
each worker) capped at Q of a core in a cpu cgroup of its own, and the client on what is
left: a scaled-down machine with a core per server process and the rest for the booting
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: bench/http.py would shadow the stdlib

from bench.harness import (  # noqa: E402 (after the path is set)
    CpuQuota,
    cpu_seconds,
    nginx_argv,
    tree,
)

TIMEOUT = 10.0  # cloud-init's per-request time-out
GOAL = 0.6  # the goal: a total at most 0.6x bare's


def machine_ip(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 1}"


def machine_nodes(machines: int) -> list[dict[str, Any]]:
    """The node documents of ``machines`` booting machines, each at its ``machine_ip``."""
    from metadatad.testing.factories import node_document

    return [
        node_document(
            i,
            ports=[{"mac": f"52:54:01:{i // 65536:02x}:{i // 256 % 256:02x}:{i % 256:02x}",
                    "ip": machine_ip(i)}],
        )
        for i in range(machines)
    ]


# --- the client ----------------------------------------------------------------------


class _Exchange(asyncio.Protocol):
    """One request on its own connection: send it once connected, collect the answer
    until the server closes (``Connection: close``).  A protocol, not asyncio streams:
    the client must cost the server's core as little as possible."""

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._chunks: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            if exc is None:
                self._done.set_result(b"".join(self._chunks))
            else:
                self._done.set_exception(exc)


async def one_request(port: int, source: str, request: bytes) -> tuple[float, str | None]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    transport = None
    try:
        async with asyncio.timeout(TIMEOUT):
            done: asyncio.Future[bytes] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: _Exchange(request, done), "127.0.0.1", port, local_addr=(source, 0)
            )
            response = await done
        status = response[9:12]
        error = None if status in (b"200", b"404") else f"status {status.decode()}"
    except TimeoutError:
        error = "time-out (10 s)"
    except OSError as e:
        error = type(e).__name__
    finally:
        if transport is not None:
            transport.close()
    return time.monotonic() - started, error


def request_bytes(method: str, path: str) -> bytes:
    extra = "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n" if method == "PUT" else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        f"User-Agent: Cloud-Init/22.4\r\nAccept: */*\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


async def machine(
    port: int, source: str, sequence: list[list[str]], start: asyncio.Event, out: list[Any]
) -> None:
    requests = [request_bytes(method, path) for method, path in sequence]
    await start.wait()
    for request in requests:
        out.append(await one_request(port, source, request))


async def storm(port: int, machines: int, sequence: list[list[str]]) -> dict[str, Any]:
    start = asyncio.Event()
    results: list[tuple[float, str | None]] = []
    tasks = [
        asyncio.create_task(machine(port, machine_ip(i), sequence, start, results))
        for i in range(machines)
    ]
    await asyncio.sleep(0.2)
    began = time.monotonic()
    cpu_began = time.process_time()
    start.set()
    await asyncio.gather(*tasks)
    total = time.monotonic() - began
    client_cpu = time.process_time() - cpu_began
    latencies = sorted(t for t, _ in results)
    errors = Counter(e for _, e in results if e is not None)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(results),
        "total_s": round(total, 2),
        "rps": round(len(results) / total),
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "errors": dict(errors),
        # The client's own cost: a client near 100 % of its core is what limits the run.
        "client_cpu_us_per_req": round(client_cpu / len(results) * 1e6),
        "client_core_share": round(client_cpu / total, 2),
    }


def client_main(args: argparse.Namespace) -> int:
    sequence = json.loads(Path(args.sequence).read_text())
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(storm(args.port, args.machines, sequence))
        result["client_loop"] = "asyncio"
    else:
        result = uvloop.run(storm(args.port, args.machines, sequence))
        result["client_loop"] = "uvloop"
    print(json.dumps(result))
    return 0


# --- the servers and the run -----------------------------------------------------------


def capture_sequence(daemon: Any) -> list[list[str]]:
    """cloud-init's crawl of ``daemon`` (OpenStack, then EC2), as [method, path]."""
    from tests.daemon import test_cloudinit as ci

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    spec = json.dumps(
        {
            "base": daemon.metadata_url,
            "jobs": [{"name": "openstack", "kind": "openstack"}, {"name": "ec2", "kind": "ec2"}],
        }
    )
    done = subprocess.run(
        [ci.SYSTEM_PYTHON, "-I", "-c", ci.DRIVER, spec],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=daemon.directory,
    )
    if done.returncode != 0:
        raise SystemExit(f"the cloud-init driver failed:\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout)
    sequence = []
    for job in ("openstack", "ec2"):
        if not results[job]["found"]:
            raise SystemExit(f"cloud-init's {job} datasource found nothing")
        for url in results[job]["requested"]:
            path = url[len(daemon.metadata_url) :] or "/"
            sequence.append(["PUT" if path.endswith("/api/token") else "GET", path])
    return sequence


def run_client(port: int, machines: int, sequence_file: Path, pin: str | None) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--client", "--port", str(port)]
    argv += ["--machines", str(machines), "--sequence", str(sequence_file)]
    if pin:
        argv = ["taskset", "-c", pin, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        raise SystemExit(f"client failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def measured_client(
    server_pid: int,
    port: int,
    machines: int,
    sequence_file: Path,
    pin: str | None,
    *,
    profile: Path | None = None,
) -> dict[str, Any]:
    """The client's result plus the server's CPU time per request (all its processes);
    with ``profile``, py-spy's samples of the server during the storm (collapsed
    stacks) are written there."""
    pids = tree(server_pid)
    spy = None
    if profile is not None:
        # Sampled without stopping the server (--nonblocking): its CPU figure stays
        # close to an unprofiled run's, and the shares of the samples are what to read.
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250",
             "--nonblocking", "--subprocesses", "-f", "raw", "-o", str(profile),
             "-p", str(server_pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached before the storm starts
    before = [cpu_seconds(pid) for pid in pids]
    try:
        result = run_client(port, machines, sequence_file, pin)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)
    used = [cpu_seconds(pid) - then for pid, then in zip(pids, before, strict=True)]
    result["cpu_us_per_req"] = round(sum(used) / result["requests"] * 1e6)
    # Main process first, then each worker.
    result["cpu_us_per_req_each"] = [round(u / result["requests"] * 1e6) for u in used]
    return result


def bench(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bootstorm-"))
    quota = CpuQuota(args.quota) if args.quota else None
    try:
        return _bench(args, tmp, quota)
    finally:
        if quota is not None:
            quota.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def place(pid: int, expected: int, pin: set[int] | None, quota: CpuQuota | None) -> None:
    """Pin the server's processes (``expected`` of them: main and workers) to ``pin``,
    or cap each at the quota in a cgroup of its own (unpinned)."""
    give_up = time.monotonic() + 30
    while len(pids := tree(pid)) < expected:
        if time.monotonic() > give_up:
            raise SystemExit(f"server {pid}: {len(pids)} processes, not {expected}")
        time.sleep(0.1)  # poll-with-deadline: the workers are real subprocesses
    for each in pids:
        if quota is not None:
            quota.cap(each)
        elif pin is not None:
            os.sched_setaffinity(each, pin)


def _profile(args: argparse.Namespace, server: str) -> Path | None:
    if args.py_spy is None:
        return None
    directory = Path(args.py_spy)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{server}-{args.machines}.txt"


def start_floor(prefix: Path, port: int, body: str, machines: int) -> subprocess.Popen[bytes]:
    """nginx answering ``body`` to every path and method, one connection per request;
    returned once it accepts connections.  Room for a connection per machine: past its
    ``worker_connections`` nginx closes new connections unanswered."""
    prefix.mkdir()
    argv = nginx_argv(
        prefix,
        # Connection: close as the daemon answers (the client asks for it anyway);
        # the daemon's backlog (metadatad.core.backlog), so no SYN is dropped.
        '  keepalive_timeout 0;\n  default_type "text/plain; charset=utf-8";\n'
        f"  server {{\n    listen 127.0.0.1:{port} backlog=65535;\n"
        f'    location / {{ return 200 "{body}"; }}\n  }}\n',
        connections=max(4096, machines + 1024),
    )
    with open(prefix / "stderr.log", "wb") as log:  # nginx keeps its own copy
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    give_up = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            errors = (prefix / "stderr.log").read_text() + (prefix / "error.log").read_text()
            raise SystemExit(f"nginx exited with status {proc.returncode}:\n{errors}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > give_up:
                proc.kill()
                proc.wait()
                raise SystemExit(f"nginx does not listen on port {port}") from None
            time.sleep(0.1)  # poll-with-deadline: nginx is a real subprocess


def start_bare(port: int, body: str, backlog: int | None) -> subprocess.Popen[bytes]:
    """bench/peers.py's bare twisted.web constant; returned once it listens."""
    argv = [sys.executable, "-P", str(ROOT / "bench" / "peers.py"),
            "bare", "--port", str(port), "--body", body]
    if backlog is not None:
        argv += ["--backlog", str(backlog)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready ..."
    return proc


def floor_bound(rows: list[dict[str, Any]], machines: int, quota: float) -> list[str]:
    """The bound the client sets, from the floor row (and bare's, for the goal)."""
    by = {r["server"]: r for r in rows}
    floor = by.get("floor")
    if floor is None:
        return []
    requests, client_us = floor["requests"], floor["client_cpu_us_per_req"]
    share = floor["client_core_share"]
    lines = [
        f"client floor: against nginx ({floor['cpu_us_per_req']} us of server CPU per "
        f"request) the client is the limit ({share:.0%} of its core, "
        f"{client_us} us of CPU per request): {machines:,} machines in {floor['total_s']} s."
        " The client is one process, so no server makes it finish much sooner."
    ]
    if share < 0.9:  # the client waited for its core, not for nginx
        lines.append(
            f"  WARNING: the client had only {share:.0%} of its core against nginx: other "
            "work on the machine? This floor is higher than the client's own."
        )
    bare = by.get("bare")
    if bare is not None:
        goal = GOAL * bare["total_s"]
        ratio = floor["total_s"] / bare["total_s"]
        reach = "within reach of" if ratio <= GOAL else "out of reach for"
        # What a server may spend per request to finish within the goal: on core 0
        # with the client on core 1, the goal's time per request; on both cores shared
        # with the client (costing what it costs against nginx), twice that less the
        # client's share.
        alone = goal / requests * 1e6
        shared = 2 * goal / requests * 1e6 - client_us
        if quota:
            budget = (
                f"{quota * alone:.0f} us per request in one process capped at {quota:g} "
                f"core, {2 * quota * alone:.0f} in two"
            )
        else:
            budget = (
                f"{alone:.0f} us per request on a core of its own; {shared:.0f} us sharing "
                f"both cores with the client ({client_us} us)"
            )
        lines += [
            f"  = {ratio:.2f}x bare's {bare['total_s']} s: the goal (at most {GOAL}x bare, "
            f"{goal:.2f} s) is {reach} this client.",
            f"  server CPU budget for the goal: {budget}.",
        ]
    return lines


def _bench(args: argparse.Namespace, tmp: Path, quota: CpuQuota | None) -> int:

    from metadatad.testing.daemon import Daemon, free_port
    from tests.daemon.test_cloudinit import CALLER_NODE, VENDORDATA

    nodes = [CALLER_NODE, *machine_nodes(args.machines)]
    sequence_file = tmp / "sequence.json"

    def record_sequence(daemon: Any) -> None:
        sequence = capture_sequence(daemon)
        sequence_file.write_text(json.dumps(sequence))
        if args.save_sequence:
            Path(args.save_sequence).write_text(json.dumps(sequence))
        print(f"cloud-init's sequence: {len(sequence)} requests per machine", flush=True)
        for method, path in sequence:
            print(f"  {method} {path}")

    rows = []
    print(f"machines: {args.machines}; load average before: {os.getloadavg()}", flush=True)
    for server in args.servers.split(","):
        if server in ("bare", "floor"):
            if not sequence_file.exists():  # no daemon ran yet: one just for the crawl
                with Daemon.create(
                    tmp / "crawl", nodes=[CALLER_NODE], vendordata=VENDORDATA
                ) as daemon:
                    record_sequence(daemon)
            port = free_port()
            if server == "bare":
                proc = start_bare(port, CALLER_NODE["uuid"], args.bare_backlog)
            else:
                proc = start_floor(tmp / server, port, CALLER_NODE["uuid"], args.machines)
            try:
                place(proc.pid, 1 if server == "bare" else 2, {0}, quota)
                result = measured_client(
                    proc.pid, port, args.machines, sequence_file, None if quota else "1",
                    profile=_profile(args, server),
                )
            finally:
                proc.terminate()  # nginx's master stops its worker first
                proc.wait(10)
        else:
            workers = int(server.removeprefix("w"))
            extra = {"cache_ttl": str(args.cache_ttl)} if args.cache_ttl is not None else {}
            daemon = Daemon.create(
                tmp / server,
                nodes=nodes,
                vendordata=VENDORDATA,
                config={"metadata": {"workers": str(workers), **extra}},
            )
            with daemon:
                if not sequence_file.exists():
                    record_sequence(daemon)
                assert daemon.process is not None
                place(
                    daemon.process.pid,
                    1 if workers == 1 else 1 + workers,
                    {0} if workers == 1 else None,
                    quota,
                )
                result = measured_client(
                    daemon.process.pid, daemon.metadata_port, args.machines, sequence_file,
                    "1" if workers == 1 and quota is None else None,
                    profile=_profile(args, server),
                )
        result["server"] = server
        result["loadavg"] = os.getloadavg()[0]
        rows.append(result)
        print(json.dumps(result), flush=True)
    print()
    print("| server | requests | total | req/s | p50 | p99 | max | errors | server CPU us/req "
          "| client CPU us/req (share of its core) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if quota is None:
        names = {"w1": "metadatad, 1 process (core 0)",
                 "w2": "metadatad, 2 workers (both cores)", "bare": "bare twisted.web (core 0)",
                 "floor": "client floor: nginx constant (core 0)"}
    else:
        cap = f"{args.quota:g} core"
        names = {"w1": f"metadatad, 1 process ({cap})",
                 "w2": f"metadatad, 2 workers ({cap} each)", "bare": f"bare twisted.web ({cap})",
                 "floor": f"client floor: nginx constant ({cap} each process)"}
    if args.bare_backlog is not None:
        names["bare"] = names["bare"][:-1] + f", backlog {args.bare_backlog})"
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {names.get(r['server'], r['server'])} | {r['requests']} | {r['total_s']} s "
              f"| {r['rps']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {r['max_ms']} ms "
              f"| {errors} | {r['cpu_us_per_req']} "
              f"| {r['client_cpu_us_per_req']} ({r['client_core_share']:.0%}) "
              f"| {r['loadavg']:.1f} |")
    print(f"client event loop: {rows[0]['client_loop'] if rows else '-'}")
    for line in floor_bound(rows, args.machines, args.quota):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--servers", default="w1,w2,bare,floor")
    parser.add_argument(
        "--cache-ttl", type=float, help="[metadata] cache_ttl of the daemon (its default: 15)"
    )
    parser.add_argument(
        "--quota", type=float, default=0.0,
        help="cap each server process at this share of a core in a cgroup of its own, "
        "nothing pinned (as bench/workers.py; 0: pin one-process servers to core 0)",
    )
    parser.add_argument(
        "--bare-backlog", type=int, metavar="N",
        help="the bare server's listen queue (default: Twisted's, 50, which a storm of "
        "1,000 overflows: dropped SYNs, retried after 1, 3, 7 s; the daemon's is the kernel's cap)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="record each server with py-spy during its storm, into DIR/<server>-<N>.txt "
        "(collapsed stacks; pip install py-spy into the venv)",
    )
    parser.add_argument(
        "--save-sequence",
        metavar="FILE",
        help="also write cloud-init's recorded sequence to FILE (JSON [[method, path], ...]; "
        "bench/request_cost.py --storm reads it)",
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sequence", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
