"""TFTP throughput of metadatad next to tftp-hpa's in.tftpd, fbtftp and py3tftp, in one run.

    .venv/bin/python bench/tftp.py [--runs 5] [--size-mib 64] [--concurrent 32]
                                   [--concurrent-size-mib 16]
                                   [--server-cpu 0] [--client-cpu 1]

Serves one random file of --size-mib MiB (and one of --concurrent-size-mib MiB for
the concurrent row) from a temporary root with, each pinned to one core
(``taskset -c 0``) on a free loopback port:

* the real daemon, ``twistd -n --pidfile= metadatad`` (fresh SQLite database, TFTP on
  127.0.0.1, default [tftp] settings otherwise: max_blksize 1468, max_windowsize 64);
* tftp-hpa's ``in.tftpd -L -s`` (C, a forked process per transfer);
* fbtftp 0.5 (Python, a forked process per transfer; ``pip install fbtftp``), through
  the minimal file server in this file (``bench/tftp.py fbtftp-peer``), and
* py3tftp 1.3 (Python, asyncio, one process; ``pip install py3tftp``), as shipped.

The client is always atftp (the one Debian client with RFC 7440 windowsize), pinned to
the other core, writing to a file that is compared with the source after every run.
Rows: lock-step at blksize 512 and 1468, windowsize 16 at 1468 (metadatad and py3tftp:
in.tftpd 5.2 and fbtftp do not implement windowsize and would run lock-step), and
--concurrent parallel transfers at 1468 (aggregate MiB/s).  The runs of a row go
round the servers in turn (A B C D A B C D ...), so a change in the machine's load
hits every server alike; each figure is the median of --runs runs of wall time
(client start to exit), printed with the slowest and fastest run.  Targets, checked
at the end: metadatad >= 0.9x in.tftpd at 1468 lock-step, ahead of both Python
peers there, and windowsize 16 >= 3x its own lock-step.
Exit status 1 if any download was not byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import BenchError, Processes, run_bench

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MIB = 1024 * 1024


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def atftp(port: int, name: str, out: Path, options: list[str], cpu: str) -> subprocess.Popen[bytes]:
    argv = ["taskset", "-c", cpu, "atftp", "--tftp-timeout", "1"]
    for option in options:
        argv += ["--option", option]
    argv += ["-g", "-r", name, "-l", str(out), HOST, str(port)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until_serving(procs: Processes, port: int, tmp: Path, cpu: str) -> None:
    """Fetch the probe file until it arrives (the servers start asynchronously)."""
    deadline = time.monotonic() + 60
    out = tmp / "probe.out"
    while True:
        procs.check_alive()
        proc = atftp(port, "probe.txt", out, [], cpu)
        proc.communicate(timeout=30)
        if out.exists() and out.read_bytes() == b"probe\n":
            out.unlink()
            return
        if time.monotonic() > deadline:
            raise BenchError(f"nothing served probe.txt on {HOST}:{port}")
        time.sleep(0.2)  # poll-with-deadline on a real subprocess


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def measure(
    port: int, name: str, options: list[str], *, parallel: int, size: int, want: str,
    tmp: Path, cpu: str,
) -> tuple[float, list[str]]:
    """Aggregate MiB/s of ``parallel`` simultaneous downloads of ``name``, and any problems."""
    outs = [tmp / f"out-{i}" for i in range(parallel)]
    for out in outs:
        out.unlink(missing_ok=True)
    start = time.monotonic()
    procs = [atftp(port, name, out, options, cpu) for out in outs]
    texts = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    elapsed = time.monotonic() - start
    problems = []
    for proc, out, text in zip(procs, outs, texts, strict=True):
        if proc.returncode != 0 or not out.exists() or out.stat().st_size != size:
            problems.append(f"atftp {options} exit {proc.returncode}: {text.strip()[-300:]}")
        elif digest(out) != want:
            problems.append(f"atftp {options}: downloaded bytes differ")
        out.unlink(missing_ok=True)
    return parallel * size / MIB / elapsed, problems


def fbtftp_peer(port: int, root: str) -> None:
    """A minimal fbtftp file server (the README's example shape)."""
    from fbtftp.base_handler import BaseHandler, ResponseData
    from fbtftp.base_server import BaseServer

    class FileData(ResponseData):
        def __init__(self, path: str) -> None:
            self._file = open(path, "rb")
            self._size = os.fstat(self._file.fileno()).st_size

        def read(self, n: int) -> bytes:
            return self._file.read(n)

        def size(self) -> int:
            return self._size

        def close(self) -> None:
            self._file.close()

    class Handler(BaseHandler):  # type: ignore[misc]
        def get_response_data(self) -> Any:
            return FileData(os.path.join(root, self._path))

    class Server(BaseServer):  # type: ignore[misc]
        def get_handler(self, server_addr: Any, peer: Any, path: str, options: Any) -> Any:
            return Handler(server_addr, peer, path, options, lambda stats: None)

    Server(HOST, port, 5, 1, lambda stats: None).run()


def write_config(tmp: Path, root: Path, tftp_port: int) -> Path:
    http, admin = free_tcp_port(), free_tcp_port()
    (tmp / "templates").mkdir()
    token = tmp / "admin-token"
    token.write_text("bench-" + os.urandom(16).hex() + "\n")
    conf = tmp / "metadatad.conf"
    conf.write_text(
        f"[database]\nurl = sqlite:///{tmp / 'metadatad.sqlite'}\n"
        f"[metadata]\nlisten = tcp:{http}:interface={HOST}\nworkers = 1\n"
        f"[admin]\nlisten = tcp:{admin}:interface={HOST}\ntoken_file = {token}\n"
        f"[tftp]\nlisten = {HOST}:{tftp_port}\nroot = {root}\ntemplates = {tmp / 'templates'}\n"
        # Every bench client comes from 127.0.0.1: the per-source cap (16) would drop
        # the 17th concurrent request, which the peers (no such cap) would not.
        "max_transfers_per_source = 1000\n"
    )
    return conf


def fmt(runs: list[float]) -> str:
    return f"{statistics.median(runs):.1f} [{min(runs):.1f}-{max(runs):.1f}]"


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    for program in ("atftp", "taskset", "in.tftpd"):
        if shutil.which(program) is None:
            raise BenchError(f"{program} is needed (apt-get install atftp tftpd-hpa util-linux)")
    root = tmp / "root"
    root.mkdir()
    files = {"big.bin": args.size_mib, "many.bin": args.concurrent_size_mib}
    for name, mib in files.items():
        with open(root / name, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
    (root / "probe.txt").write_text("probe\n")
    # in.tftpd drops to nobody after chroot: everything must be world-readable.
    os.chmod(tmp, 0o755)
    os.chmod(root, 0o755)
    for path in root.iterdir():
        path.chmod(0o644)
    wants = {name: digest(root / name) for name in files}

    pin = ["taskset", "-c", args.server_cpu]
    ports = {name: free_udp_port() for name in ("metadatad", "in.tftpd", "fbtftp", "py3tftp")}
    conf = write_config(tmp, root, ports["metadatad"])
    manage = [str(BIN / "metadatad-manage"), "--config", str(conf), "db", "upgrade"]
    subprocess.run(manage, cwd=ROOT, check=True, capture_output=True)
    procs.start("metadatad", [*pin, str(BIN / "twistd"), "-n", "--pidfile=", "metadatad",
                              "--config", str(conf)])
    procs.start("in.tftpd", [*pin, "in.tftpd", "-L", "-u", "nobody", "-s",
                             "-a", f"{HOST}:{ports['in.tftpd']}", str(root)])
    peers = ["metadatad", "in.tftpd"]
    try:
        import fbtftp  # noqa: F401
    except ImportError:
        print("fbtftp is not installed (pip install fbtftp): not in this run\n")
    else:
        procs.start("fbtftp", [*pin, sys.executable, str(Path(__file__).resolve()),
                               "fbtftp-peer", "--port", str(ports["fbtftp"]), "--root", str(root)])
        peers.append("fbtftp")
    if (BIN / "py3tftp").exists():
        # py3tftp serves its working directory.
        procs.start("py3tftp", [*pin, str(BIN / "py3tftp"), "--host", HOST,
                                "-p", str(ports["py3tftp"])], cwd=root)
        peers.append("py3tftp")
    else:
        print("py3tftp is not installed (pip install py3tftp): not in this run\n")
    for name in peers:
        wait_until_serving(procs, ports[name], tmp, args.client_cpu)

    windowed = [n for n in peers if n in ("metadatad", "py3tftp")]
    rows = [
        ("lock-step blksize 512", ["blksize 512"], 1, "big.bin", peers),
        ("lock-step blksize 1468", ["blksize 1468"], 1, "big.bin", peers),
        ("windowsize 16 blksize 1468", ["blksize 1468", "windowsize 16"], 1, "big.bin",
         windowed),
        (f"{args.concurrent} concurrent, blksize 1468", ["blksize 1468"], args.concurrent,
         "many.bin", peers),
    ]
    load = os.getloadavg()
    print(f"file: {args.size_mib} MiB ({args.concurrent_size_mib} MiB for each concurrent "
          f"transfer); client: atftp pinned to cpu {args.client_cpu}; servers pinned to cpu "
          f"{args.server_cpu}; median [min-max] of {args.runs} run(s), servers in turn; "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} cpus)\n", flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    problems: list[str] = []
    for label, options, parallel, name, servers in rows:
        for _ in range(args.runs):
            for server in servers:
                rate, found = measure(ports[server], name, options, parallel=parallel,
                                      size=files[name] * MIB, want=wants[name], tmp=tmp,
                                      cpu=args.client_cpu)
                results.setdefault((label, server), []).append(rate)
                problems += [f"{server} {label}: {p}" for p in found]
                procs.check_alive()
        for server in servers:
            print(f"  {label:<32} {server:<10} {fmt(results[(label, server)]):>22} MiB/s  "
                  f"runs: {' '.join(f'{r:.1f}' for r in results[(label, server)])}", flush=True)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")

    median = {key: statistics.median(runs) for key, runs in results.items()}
    others = peers[1:]
    header = f"| {'transfer':<32} |" + "".join(f" {n + ' MiB/s':>22} |" for n in peers)
    header += "".join(f" metadatad / {n} |" for n in others)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, *_ in rows:
        line = f"| {label:<32} |" + "".join(
            f" {fmt(results[(label, n)]):>22} |" if (label, n) in results else f" {'n/a':>22} |"
            for n in peers
        )
        ours = median.get((label, "metadatad"))
        for peer in others:
            theirs = median.get((label, peer))
            cell = f"{ours / theirs:.2f}x" if ours and theirs else "n/a"
            line += f" {cell:>{len(peer) + 12}} |"
        print(line)
    print()
    lock = median[("lock-step blksize 1468", "metadatad")]
    hpa = median[("lock-step blksize 1468", "in.tftpd")]
    window = median[("windowsize 16 blksize 1468", "metadatad")]
    verdicts = [
        (f"lock-step 1468 >= 0.9x in.tftpd: {lock / hpa:.2f}x", lock >= 0.9 * hpa),
        (f"windowsize 16 >= 3x own lock-step: {window / lock:.2f}x", window >= 3 * lock),
    ]
    for peer in ("fbtftp", "py3tftp"):
        if peer in peers:
            theirs = median[("lock-step blksize 1468", peer)]
            verdicts.append(
                (f"ahead of {peer} at lock-step 1468: {lock / theirs:.2f}x", lock > theirs)
            )
    for text, ok in verdicts:
        print(f"target {text}: {'met' if ok else 'NOT met'}")
    if problems:
        print("\nINVALID RUN:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("every download was byte-identical to the source")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("fbtftp-peer", help="run the fbtftp file server (internal)")
    peer.add_argument("--port", type=int, required=True)
    peer.add_argument("--root", required=True)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (5)")
    parser.add_argument("--size-mib", type=int, default=64, help="file size in MiB (64)")
    parser.add_argument("--concurrent", type=int, default=32, help="parallel transfers (32)")
    parser.add_argument("--concurrent-size-mib", type=int, default=16,
                        help="file size of each concurrent transfer in MiB (16)")
    parser.add_argument("--server-cpu", default="0", help="core of the servers (0)")
    parser.add_argument("--client-cpu", default="1", help="core of the clients (1)")
    args = parser.parse_args(argv)
    if args.command == "fbtftp-peer":
        fbtftp_peer(args.port, args.root)
        return 0

    return run_bench(bench, args, "metadatad-bench-tftp-")


if __name__ == "__main__":
    sys.exit(main())
