"""Boot files over HTTP: metadatad's ``/boot/`` route next to nginx, in one run.

1. One large file (512 MiB by default) over loopback by curl, from the daemon's
   ``<http_address>/boot/`` and from nginx (Debian's nginx-light, one worker,
   ``sendfile on``) serving the same directory: MiB/s each, and the ratio (goal:
   metadatad >= 0.5x nginx).
2. 50 concurrent curl downloads from the daemon while a metadata client asks
   ``/latest/meta-data/instance-id`` in a loop: its p50/p99 latency, against the same
   client on the idle daemon (goal: p99 < 50 ms during the downloads); the same 50
   downloads from nginx for the aggregate throughput.

Every download is checked for its size; servers and curl share this machine's cores
(no pinning: the daemon and nginx each use one process).  Usage::

    .venv/bin/python bench/bootfiles.py [--size-mib 512] [--runs 3] [--concurrent 50]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ leads sys.path and bench/http.py would shadow the standard
# library's http package: the checkout's root takes its place.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.harness import ROOT, BenchError, Processes, nginx_argv, run_bench  # noqa: E402

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MIB = 1 << 20
UUID = "d8e02d56-2648-49a3-bf97-6be8f1204f38"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_file(path: Path, mib: int) -> None:
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 7 :] + block[: i % 7])  # not one repeated page


def start_daemon(tmp: Path, root: Path, procs: Processes) -> int:
    port, admin = free_port(), free_port()
    token = tmp / "admin-token"
    token.write_text("bench-" + os.urandom(16).hex() + "\n")
    (tmp / "templates").mkdir()
    conf = tmp / "metadatad.conf"
    conf.write_text(
        f"[database]\nurl = sqlite:///{tmp / 'metadatad.sqlite'}\n"
        f"[metadata]\nlisten = tcp:{port}:interface={HOST}\nrate_limit = 0\nworkers = 1\n"
        # 50 downloads and the metadata client all come from 127.0.0.1.
        "max_connections_per_source = 1000\n"
        f"[admin]\nlisten = tcp:{admin}:interface={HOST}\ntoken_file = {token}\n"
        f"[conductor]\nhttp_address = http://{HOST}:{port}\n"
        f"[tftp]\nlisten = {HOST}:{free_port(socket.SOCK_DGRAM)}\nroot = {root}\n"
        f"templates = {tmp / 'templates'}\n"
    )
    nodes = tmp / "nodes.json"
    node = {"uuid": UUID, "name": "bench", "ports": [{"mac": "52:54:00:00:00:01", "ip": HOST}]}
    nodes.write_text(json.dumps([node]))
    manage = [str(BIN / "metadatad-manage"), "--config", str(conf)]
    subprocess.run([*manage, "db", "upgrade"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(
        [*manage, "node", "import", str(nodes)], cwd=ROOT, check=True, capture_output=True
    )
    procs.start(
        "metadatad", [str(BIN / "twistd"), "-n", "--pidfile=", "metadatad", "--config", str(conf)]
    )
    return port


def start_nginx(tmp: Path, root: Path, procs: Processes) -> int:
    port = free_port()
    prefix = tmp / "nginx"
    prefix.mkdir()
    argv = nginx_argv(
        prefix,
        "  sendfile on;\n  tcp_nopush on;\n"
        f"  server {{\n    listen {HOST}:{port};\n    location /boot/ {{ alias {root}/; }}\n"
        "  }\n",
    )
    procs.start("nginx", argv)
    return port


def wait_serving(procs: Processes, port: int, path: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=1)
            connection.request("HEAD", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"nothing serves {path} on port {port}")


def curl(port: int, path: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download}",
         f"http://{HOST}:{port}{path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def download(port: int, path: str, size: int, parallel: int) -> float:
    """MiB/s of ``parallel`` simultaneous downloads, all checked for their size."""
    started = time.monotonic()
    clients = [curl(port, path) for _ in range(parallel)]
    for client in clients:
        out, err = client.communicate(timeout=600)
        if client.returncode != 0 or int(out or 0) != size:
            raise BenchError(f"download from {port}: {client.returncode} {out} {err}")
    return parallel * size / MIB / (time.monotonic() - started)


class MetadataClient(threading.Thread):
    """Sequential ``GET /latest/meta-data/instance-id`` on one keep-alive connection,
    recording each latency, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
        while not self.halt.is_set():
            started = time.perf_counter()
            try:
                connection.request("GET", "/latest/meta-data/instance-id")
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                self.errors += 1
                connection.close()
                connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
                continue
            if response.status != 200 or body.decode() != UUID:
                self.errors += 1
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.005)  # a client pacing itself, not a load generator

    def stop(self) -> list[float]:
        self.halt.set()
        self.join(timeout=20)
        return self.latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def latency_during(port: int, action: object) -> tuple[list[float], int, object]:
    client = MetadataClient(port)
    client.start()
    time.sleep(0.5)
    result = action() if callable(action) else None
    latencies = client.stop()
    return latencies, client.errors, result


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    for program in ("curl", "nginx"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            raise BenchError(f"{program} is needed (apt-get install curl nginx-light)")
    root = tmp / "root"
    root.mkdir()
    write_file(root / "big.bin", args.size_mib)
    write_file(root / "each.bin", args.concurrent_size_mib)
    os.chmod(tmp, 0o755)
    os.chmod(root, 0o755)
    for path in root.iterdir():
        path.chmod(0o644)
    ours = start_daemon(tmp, root, procs)
    nginx = start_nginx(tmp, root, procs)
    servers = {"metadatad": ours, "nginx": nginx}
    for port in servers.values():
        wait_serving(procs, port, "/boot/big.bin")
    load = os.getloadavg()
    print(
        f"{args.size_mib} MiB file, then {args.concurrent} x {args.concurrent_size_mib} MiB "
        f"concurrent; median [min-max] of {args.runs} run(s), servers in turn; load "
        f"average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"({os.cpu_count()} cpus)\n",
        flush=True,
    )
    single: dict[str, list[float]] = {n: [] for n in servers}
    many: dict[str, list[float]] = {n: [] for n in servers}
    idle, busy = [], []
    errors = 0
    for _ in range(args.runs):
        for name, port in servers.items():
            single[name].append(download(port, "/boot/big.bin", args.size_mib * MIB, 1))
            procs.check_alive()
        got, bad, _ = latency_during(ours, lambda: time.sleep(3))
        idle += got
        errors += bad
        for name, port in servers.items():
            if name == "metadatad":
                got, bad, rate = latency_during(
                    ours,
                    lambda: download(
                        ours, "/boot/each.bin", args.concurrent_size_mib * MIB, args.concurrent
                    ),
                )
                busy += got
                errors += bad
                many[name].append(float(rate))  # type: ignore[arg-type]
            else:
                many[name].append(
                    download(
                        port, "/boot/each.bin", args.concurrent_size_mib * MIB, args.concurrent
                    )
                )
            procs.check_alive()
    load = os.getloadavg()

    def fmt(runs: list[float]) -> str:
        return f"{statistics.median(runs):.0f} [{min(runs):.0f}-{max(runs):.0f}]"

    print("| transfer | metadatad MiB/s | nginx MiB/s | metadatad / nginx |")
    print("|---|---|---|---|")
    ratios = {}
    for label, table in (
        (f"one {args.size_mib} MiB file", single),
        (f"{args.concurrent} concurrent", many),
    ):
        ratio = statistics.median(table["metadatad"]) / statistics.median(table["nginx"])
        ratios[label] = ratio
        print(f"| {label} | {fmt(table['metadatad'])} | {fmt(table['nginx'])} | {ratio:.2f}x |")
    print()
    ms = 1000.0
    print("| metadata client | requests | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for label, values in (("idle daemon", idle), (f"during {args.concurrent} downloads", busy)):
        print(
            f"| {label} | {len(values)} | {percentile(values, 50) * ms:.1f} | "
            f"{percentile(values, 99) * ms:.1f} | {max(values) * ms:.1f} |"
        )
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    one = ratios[f"one {args.size_mib} MiB file"]
    p99 = percentile(busy, 99) * ms
    print(
        f"target >= 0.5x nginx ({args.size_mib} MiB file): {one:.2f}x: "
        f"{'met' if one >= 0.5 else 'NOT met'}"
    )
    print(
        f"target metadata p99 < 50 ms during downloads: {p99:.1f} ms: "
        f"{'met' if p99 < 50 else 'NOT met'}"
    )
    if errors:
        print(f"INVALID RUN: {errors} metadata requests failed", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="the large file (512)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (3)")
    parser.add_argument("--concurrent", type=int, default=50, help="parallel downloads (50)")
    parser.add_argument(
        "--concurrent-size-mib",
        type=int,
        default=32,
        help="file of each parallel download, MiB (32)",
    )
    args = parser.parse_args(argv)
    return run_bench(bench, args, "metadatad-bootfiles-")


if __name__ == "__main__":
    sys.exit(main())
