"""Cost of one keep-alive request in the daemon's process, next to bare twisted.web.

    .venv/bin/python bench/request_cost.py [--requests 20000] [--rounds 5]
    .venv/bin/python bench/request_cost.py --callgrind [--requests 2000]
    .venv/bin/python bench/request_cost.py --storm SEQUENCE [--machines 200] [--callgrind]

No sockets and no client: one process builds the real daemon (``tap.makeService`` on
the configuration bench/http.py uses: SQLite, the demo node, ``workers = 1``) and the
bare peer of bench/peers.py, each served by its own Site factory, and feeds each the
same request (``GET`` with ``Host`` and ``User-Agent`` headers, as wrk sends) over a
``StringTransport`` on one keep-alive connection from the demo node's address, after
300 warm-up requests.  Every response is checked to be a 200 (and the right body for the
instance id).  What is left out (the reactor's epoll loop and the socket calls) is the
same for both servers, so the ratio here is higher than under wrk, where that shared
part dilutes it.

Targets: the bare constant, ``GET /latest/meta-data/instance-id`` and
``GET /openstack/latest/meta_data.json``.  Printed per target:

* default: CPU microseconds per request (``time.process_time``; the best and the median
  of the rounds, the targets interleaved) and bare's over this one's;
* ``--callgrind``: instructions per request, counted by valgrind's callgrind around the
  request loop only (``--toggle-collect`` on the loop's ``functools.reduce``), one
  valgrind process per target, ``PYTHONHASHSEED=0``.  Counts repeat within about 0.1 %
  and do not move with the machine's load: the instrument for small changes.

``--storm FILE`` measures a boot storm's request instead: ``--machines M`` nodes (200)
registered at bench/bootstorm.py's addresses, each of them sending cloud-init's
sequence (FILE: a JSON list of ``[method, path]``, as ``bootstorm.py --save-sequence
FILE`` writes it) with one new connection per request (``Connection: close``, then the
connection lost), machine after machine: every request is the first of its path for
its node, and every connection is built, used and closed.  Each node is looked up once
before (the store's thread pool is not measured).  Targets: the bare constant and the
daemon.

``--what-if NAME`` (repeatable) switches one part of the daemon off first, to price it:
``no-notes`` (activity and last-seen notes), ``no-gate`` (the gate's screen and
admission), ``constant-site`` (the site answers a constant: what is left is the
hardened channel and site).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/ first: bench/http.py would shadow the stdlib
sys.path.append(str(ROOT / "bench"))  # last: bench/http.py's own ``import harness``

from bench.harness import BenchError, Processes, run_bench  # noqa: E402 (after the path)

INSTANCE_ID = b"d8e02d56-2648-49a3-bf97-6be8f1204f38"
BODY = b"00000000-0000-0000-0000-000000000000"
# name -> (path, the body every answer must have, or None when it varies)
TARGETS = {
    "bare": (b"/latest/meta-data/instance-id", BODY),
    "instance-id": (b"/latest/meta-data/instance-id", INSTANCE_ID),
    "meta_data.json": (b"/openstack/latest/meta_data.json", None),
}
WARM_UP = 300
WHAT_IFS = ("no-notes", "no-gate", "constant-site")


def _daemon_site(tmp: Path, what_ifs: list[str], nodes: Path | None = None) -> Any:
    """The real daemon's metadata Site, its services started (no reactor running), with
    the demo node or the nodes of the file ``nodes``.  Its node cache never revalidates
    during a run (``cache_ttl`` an hour): the reactor does not run while requests are
    measured, so a lookup waiting on the store would never be answered (under valgrind a
    run outlasts the default 15 s)."""
    from twisted.internet import reactor

    from bench.http import DEMO_NODES, free_port, manage, write_config
    from metadatad.tap import Options, makeService

    # Listening is part of starting the services; nothing connects there.
    port = free_port()
    conf = write_config(tmp, port, free_port(taken=(port,)), cache_ttl=3600)
    manage(conf, "db", "upgrade")
    manage(conf, "node", "import", str(nodes or DEMO_NODES))
    options = Options()
    options.parseOptions(["--config", str(conf)])
    root = makeService(options, reactor)
    root.startService()
    site = root.getServiceNamed("metadata-http").factory
    _what_if(site, what_ifs)
    return site


def _what_if(site: Any, what_ifs: list[str]) -> None:
    from metadatad.metadata.guard import Screened
    from metadatad.metadata.reply import text
    from metadatad.metadata.site import MetadataSite

    metadata = site.resource._site
    plain = Screened()
    reply = text(INSTANCE_ID)
    for name in what_ifs:
        if name == "no-notes":
            metadata._observe = metadata._seen = None
        elif name == "no-gate":
            metadata._guard.screen = lambda request, parts: plain
            metadata._guard.admit = lambda caller, screened: None
        elif name == "constant-site":
            metadata.handle = lambda request: MetadataSite._write(request, reply)


def _bare_site() -> Any:
    from bench.peers import bare_resource
    from metadatad.tap import make_site

    return make_site(bare_resource(BODY), access_log=False)


def _connection(
    site: Any, path: bytes, body: bytes | None
) -> tuple[Callable[[object, object], None], Any]:
    """A keep-alive connection from the demo node to ``site``: the function that sends
    one request (``functools.reduce``'s shape), and the transport."""
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 80))
    channel.makeConnection(transport)
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wrk\r\n\r\n" % path

    def send(_: object, __: object) -> None:
        channel.dataReceived(request)

    # The first request may wait for the store: let the reactor answer it.
    send(None, None)
    deadline = time.monotonic() + 10
    while not transport.value() and time.monotonic() < deadline:
        reactor.iterate(0.01)
    for _ in range(WARM_UP):
        send(None, None)
    _check(transport, path, WARM_UP + 1, body)
    return send, transport


def _check(transport: Any, path: bytes, count: int, body: bytes | None) -> None:
    answers = transport.value()
    transport.clear()
    if answers.count(b"HTTP/1.1 200 OK\r\n") != count:
        raise BenchError(f"{path.decode()}: not every answer was a 200: {answers[:300]!r}")
    if body is not None and answers.count(b"\r\n\r\n" + body) != count:
        raise BenchError(f"{path.decode()}: wrong body: {answers[:300]!r}")


def _sites(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[Any, bytes, bytes | None]]:
    daemon = _daemon_site(tmp, args.what_if)
    # As the daemon does once running (tap.freeze_heap): start-up objects out of the
    # collector's sight.
    gc.collect()
    gc.freeze()
    return {
        name: (_bare_site() if name == "bare" else daemon, path, body)
        for name, (path, body) in TARGETS.items()
        if args.target in (None, name)
    }


def _timed(args: argparse.Namespace, tmp: Path) -> None:
    sites = _sites(args, tmp)
    connections = {name: _connection(*target) for name, target in sites.items()}
    seconds: dict[str, list[float]] = {name: [] for name in sites}
    for _ in range(args.rounds):
        for name, (send, transport) in connections.items():
            started = time.process_time()
            functools.reduce(send, range(args.requests), None)
            seconds[name].append((time.process_time() - started) / args.requests)
            _, path, body = sites[name]
            _check(transport, path, args.requests, body)
    _print_times(seconds)


def _print_times(seconds: dict[str, list[float]]) -> None:
    bare = min(seconds["bare"]) if "bare" in seconds else None
    print(f"{'target':16} {'best us':>8} {'median us':>10} {'bare/this':>10}")
    for name, values in seconds.items():
        ratio = f"{bare / min(values):10.2f}" if bare else ""
        print(f"{name:16} {min(values) * 1e6:8.1f} {statistics.median(values) * 1e6:10.1f} {ratio}")


def _counted(args: argparse.Namespace, tmp: Path) -> None:
    """Inside valgrind: one target's loop, collected."""
    sites = _sites(args, tmp)
    ((site, path, body),) = sites.values()
    send, transport = _connection(site, path, body)
    functools.reduce(send, range(args.requests), None)
    _check(transport, path, args.requests, body)


def _callgrind(
    args: argparse.Namespace, tmp: Path, targets: tuple[str, ...], requests: int
) -> None:
    counts = {}
    for name in targets:
        out = tmp / f"callgrind.{len(counts)}.out"
        argv = [
            "valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce",
            f"--callgrind-out-file={out}",
            sys.executable, __file__, "--counted", "--target", name,
            "--requests", str(args.requests),
            *[arg for what in args.what_if for arg in ("--what-if", what)],
            *(["--storm", args.storm, "--machines", str(args.machines)] if args.storm else []),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise BenchError(f"{name} under valgrind failed: {done.stderr[-2000:]}")
        totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
        counts[name] = int(totals[0].split()[1]) / requests
        print(f"  {name}: {counts[name]:,.0f} instructions per request", flush=True)
    print(f"{'target':16} {'instructions':>13} {'bare/this':>10}")
    for name, count in counts.items():
        print(f"{name:16} {count:13,.0f} {counts['bare'] / count:10.2f}")


# --- a boot storm's requests (--storm) ------------------------------------------------


def _storm_requests(args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """(machine address, request) for every machine's crawl, machine after machine."""
    from bench.bootstorm import machine_ip, request_bytes

    sequence = json.loads(Path(args.storm).read_text())
    return [
        (machine_ip(i), request_bytes(method, path))
        for i in range(args.machines)
        for method, path in sequence
    ]


def _storm_site(args: argparse.Namespace, tmp: Path, target: str) -> Any:
    """``target``'s Site; the daemon's with the storm's nodes, each looked up once."""
    if target == "bare":
        return _bare_site()
    from twisted.internet import reactor

    from bench.bootstorm import machine_ip, machine_nodes

    nodes = tmp / "storm-nodes.json"
    nodes.write_text(json.dumps(machine_nodes(args.machines)))
    site = _daemon_site(tmp, args.what_if, nodes)
    warm = b"GET /2009-04-04/meta-data/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + 30
    while True:
        answers = [_one_connection(site, machine_ip(i), warm) for i in range(args.machines)]
        if all(a.startswith(b"HTTP/1.1 200") for a in answers):
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the storm's nodes were not found: {answers[0][:200]!r}")
        reactor.iterate(0.05)  # the lookups run on the store's pool: let them answer
    return site


def _one_connection(site: Any, address: str, request: bytes) -> bytes:
    """``request`` on a connection of its own from ``address``: built, used, closed."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    peer = IPv4Address("TCP", address, 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 80))
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(Failure(ConnectionDone()))
    return bytes(transport.value())


def _storm_loop(site: Any, requests: list[tuple[str, bytes]]) -> list[bytes]:
    """Every request of the storm (inside ``functools.reduce``, for callgrind)."""
    answers: list[bytes] = []

    def send(_: object, item: tuple[str, bytes]) -> None:
        answers.append(_one_connection(site, *item))

    functools.reduce(send, requests, None)
    bad = [a[:120] for a in answers if not a.startswith((b"HTTP/1.1 200", b"HTTP/1.1 404"))]
    if bad:
        raise BenchError(f"{len(bad)} answers were neither 200 nor 404: {bad[0]!r}")
    return answers


def _storm(args: argparse.Namespace, tmp: Path) -> None:
    requests = _storm_requests(args)
    if args.counted:
        site = _storm_site(args, tmp, args.target)
        gc.collect()
        gc.freeze()
        _storm_loop(site, requests)
        return
    if args.callgrind:
        _callgrind(args, tmp, ("bare", "daemon"), len(requests))
        return
    sites = {target: _storm_site(args, tmp, target) for target in ("bare", "daemon")}
    gc.collect()
    gc.freeze()
    seconds: dict[str, list[float]] = {name: [] for name in sites}
    for _ in range(args.rounds):
        for name, site in sites.items():
            if name == "daemon":
                # Every round a storm's first reads: the answers (and the meta-data
                # trees) the last round memoised are forgotten, the nodes kept.
                site.resource._site._cache._forget_memos()
            started = time.process_time()
            _storm_loop(site, requests)
            seconds[name].append((time.process_time() - started) / len(requests))
    _print_times(seconds)


def bench(args: argparse.Namespace, tmp: Path, procs: Processes) -> int:
    if args.storm:
        _storm(args, tmp)
    elif args.counted:
        _counted(args, tmp)
    elif args.callgrind:
        _callgrind(args, tmp, tuple(TARGETS), args.requests)
    else:
        _timed(args, tmp)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, help="per target and round (20000; 2000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true", help="count instructions")
    parser.add_argument("--what-if", action="append", default=[], choices=WHAT_IFS)
    parser.add_argument(
        "--storm", metavar="SEQUENCE", help="a boot storm's requests (see above) instead"
    )
    parser.add_argument("--machines", type=int, default=200, help="with --storm")
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", choices=[*sorted(TARGETS), "daemon"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = 2000 if args.callgrind or args.counted else 20000
    return run_bench(bench, args, "request-cost-")


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The daemon's services hold threads (the store's pool): leave without waiting.
    os._exit(code)
