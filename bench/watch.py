"""Long-poll watches at scale: memory per held watcher and the time to wake them all.

    .venv/bin/python -P bench/watch.py [--watchers 1000] [--runs 3] [--database URL]

(``-P`` keeps bench/ off sys.path: bench/http.py would shadow the stdlib's ``http``.)

Each run starts real daemons (``twistd -n metadatad``, the harness of
:mod:`metadatad.testing.daemon`) on a fresh database (SQLite in a temporary directory
unless ``--database`` names a migrated PostgreSQL or MariaDB one) with two nodes of one
project, 127.0.0.1 (the watchers) and 127.0.0.2 (the writer), and measures, each on a
daemon of its own so one measurement's freed memory does not hide the next one's:

* **peer: idle connections**: N TCP connections opened to the metadata port and left
  idle (the least a held request can cost: a socket, a transport, an HTTP channel);
  once the daemon holds N more descriptors, its RSS growth / N;
* **watchers**: N ``GET /openstack/latest/shared.json?index=<current>&wait=120``
  held open; once the daemon's log says it holds all N, its RSS growth / N;
* **wake all**: one ``POST /openstack/latest/metadata?shared=project`` from the
  writer, and the time from sending it to the last of the N watchers' complete
  answers (each checked: 200, the new index, the posted key);
* **peer: wake one**: the same with a single watcher;
* **peer: held bare requests**: a bare ``twisted.web`` resource, served by the
  daemon's own Site factory (``metadatad.tap.make_site``, no access log) in a process of
  its own (``bench/watch.py --serve-held``), that holds every GET (``NOT_DONE_YET``)
  and answers them all, with a constant, when it gets a POST: what N held HTTP
  requests cost in Twisted before any of metadatad's work (identity, Klein, the
  store, the hub, the re-read).  Memory per held request and POST-to-last-answer are
  measured exactly as for the watchers.

Prints one table (median over the runs) with the ratios to the peers.  Every process
started here is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metadatad.testing.daemon import Daemon, http_request  # noqa: E402
from metadatad.testing.factories import node_document  # noqa: E402

WATCHER = node_document(0, ports=[{"mac": "52:54:00:00:02:01", "ip": "127.0.0.1"}])
WRITER = node_document(1, ports=[{"mac": "52:54:00:00:02:02", "ip": "127.0.0.2"}])
SHARED = "/openstack/latest/shared.json"
DEADLINE = 120.0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sockets(pid: int) -> int:
    """How many sockets ``pid`` holds open."""
    found = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:  # closed since listed
            pass
    return found


def established(port: int) -> int:
    """Established TCP connections whose server side is 127.0.0.1:``port``."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        return sum(1 for line in f if line.split()[1] == local and line.split()[3] == "01")


def wait_until(condition, what: str, deadline: float = DEADLINE) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)  # poll-with-deadline on a real subprocess


@contextmanager
def daemon(database: str | None, workdir: Path) -> Iterator[Daemon]:
    """A started daemon with both nodes (imported once per database)."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    d = Daemon.create(directory, nodes=[WATCHER, WRITER], database_url=database)
    d.start()
    try:
        # Warm: the node cache, the pool's threads and connections, the code paths.
        for _ in range(20):
            assert d.get(SHARED)[0] == 200
        yield d
    finally:
        d.stop()


def current_index(d: Daemon) -> int:
    status, headers, _ = d.get(SHARED)
    assert status == 200
    return int(headers["X-Metadatad-Index"])


def settle(pid: int) -> int:
    """RSS once two reads 50 ms apart agree (the daemon finished what it was doing)."""
    last = rss_kib(pid)
    while True:
        time.sleep(0.05)  # measuring a real subprocess, not synchronising with it
        now = rss_kib(pid)
        if now == last:
            return now
        last = now


async def _open_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    return writers


def measure_idle(d: Daemon, count: int) -> float:
    """KiB of daemon RSS per idle connection."""
    assert d.process is not None
    pid = d.process.pid
    base = settle(pid)
    loop = asyncio.new_event_loop()
    writers = loop.run_until_complete(_open_idle(d.metadata_port, count))
    # Connected (the kernel's count), and accepted: the daemon holds a socket for each,
    # besides its two listening ports.
    wait_until(
        lambda: established(d.metadata_port) >= count and sockets(pid) >= count + 2,
        "idle connections accepted",
    )
    grown = settle(pid)
    for writer in writers:
        writer.close()
    loop.close()
    return (grown - base) / count


class Watchers:
    """N watch requests on one event loop; collects each answer's arrival time."""

    def __init__(self, port: int, index: int, count: int) -> None:
        self.port = port
        self.request = (
            f"GET {SHARED}?index={index}&wait=120 HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.count = count
        self.answers: list[tuple[float, bytes]] = []

    async def one(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.request)
        await writer.drain()
        data = await reader.read()
        self.answers.append((time.monotonic(), data))
        writer.close()

    async def run(self, started: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.one()) for _ in range(self.count)]
        started.set()
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)


def measure_watchers(d: Daemon, count: int, key: str) -> tuple[float, float]:
    """(KiB of RSS per held watcher, seconds from the POST to the last answer)."""
    import threading

    assert d.process is not None
    pid = d.process.pid
    index = current_index(d)
    held_before = d.output().count("holding a watch of")
    base = settle(pid)
    watchers = Watchers(d.metadata_port, index, count)
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    runner = threading.Thread(target=loop.run_until_complete, args=(watchers.run(started),))
    runner.start()
    wait_until(
        lambda: d.output().count("holding a watch of") >= held_before + count, "watchers held"
    )
    grown = settle(pid)
    assert not watchers.answers, "a watcher returned before the write"
    posted_at = time.monotonic()
    status, headers, _ = http_request(
        d.metadata_url + "/openstack/latest/metadata?shared=project",
        "POST",
        body=json.dumps({key: "10.0.0.9"}).encode(),
        source="127.0.0.2",
    )
    assert status == 200, status
    new_index = headers["X-Metadatad-Index"]
    runner.join(DEADLINE)
    loop.close()
    assert len(watchers.answers) == count, f"{len(watchers.answers)} of {count} answered"
    for _, data in watchers.answers:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        assert f"X-Metadatad-Index: {new_index}".encode() in head
        assert f'"from_server_{key}"'.encode() in body
    last = max(at for at, _ in watchers.answers)
    return (grown - base) / count, last - posted_at


# --- the peer: held requests on a bare twisted.web resource ---------------------------


def serve_held() -> None:
    """``--serve-held``: hold every GET until a POST answers them all."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    from metadatad.tap import make_site

    class Held(Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.held: list[object] = []

        def render_GET(self, request):  # type: ignore[no-untyped-def]
            if request.path == b"/held":  # how many are held: the bench waits for all
                return b"%d" % len(self.held)
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET

        def render_POST(self, request):  # type: ignore[no-untyped-def]
            held, self.held = self.held, []
            for waiting in held:
                waiting.setHeader(b"Content-Type", b"application/json")  # type: ignore[attr-defined]
                waiting.setHeader(b"Content-Length", b"%d" % len(BARE_BODY))  # type: ignore[attr-defined]
                waiting.write(BARE_BODY)  # type: ignore[attr-defined]
                waiting.finish()  # type: ignore[attr-defined]
            return b"{}"

    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")

    def listening(port) -> None:  # type: ignore[no-untyped-def]
        print(f"ready {port.getHost().port}", flush=True)

    reactor.callWhenRunning(
        lambda: endpoint.listen(make_site(Held(), access_log=False)).addCallback(listening)
    )
    reactor.run()


BARE_BODY = (
    b'[{"meta":{"from_server_ip":"10.0.0.9"},"uuid":"00000000-0000-0000-0000-000000000000"}]'
)


@contextmanager
def held_peer() -> Iterator[tuple[int, int]]:
    """The peer server: (pid, port)."""
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-P", str(Path(__file__).resolve()), "--serve-held"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError("the peer did not start")
        port = int(line[1])
        # Warm the same way as the daemon.
        for _ in range(20):
            http_request(f"http://127.0.0.1:{port}/", "POST", body=b"")
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(10)


def measure_held(pid: int, port: int, count: int) -> tuple[float, float]:
    """(KiB of RSS per held bare request, seconds from the POST to the last answer)."""
    import threading

    base = settle(pid)
    watchers = Watchers(port, 0, count)
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    runner = threading.Thread(target=loop.run_until_complete, args=(watchers.run(started),))
    runner.start()
    wait_until(
        lambda: http_request(f"http://127.0.0.1:{port}/held")[2] == b"%d" % count,
        "bare requests held",
    )
    grown = settle(pid)
    posted_at = time.monotonic()
    status, _, _ = http_request(f"http://127.0.0.1:{port}/", "POST", body=b"")
    assert status == 200
    runner.join(DEADLINE)
    loop.close()
    assert len(watchers.answers) == count
    for _, data in watchers.answers:
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(BARE_BODY)
    return (grown - base) / count, max(at for at, _ in watchers.answers) - posted_at


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", default=None, help="a migrated database URL")
    parser.add_argument("--serve-held", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_held:
        serve_held()
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.watchers * 2 + 256
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))

    rows: dict[str, list[float]] = {
        name: [] for name in ("idle", "watcher", "wake_all", "wake_one", "held", "held_all")
    }
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        workdir = Path(tmp)
        for run in range(args.runs):
            with daemon(args.database, workdir) as d:
                rows["idle"].append(measure_idle(d, args.watchers))
            with daemon(args.database, workdir) as d:
                per_watcher, wake_all = measure_watchers(d, args.watchers, f"all{run}")
                rows["watcher"].append(per_watcher)
                rows["wake_all"].append(wake_all)
                ones = [measure_watchers(d, 1, f"one{run}_{i}")[1] for i in range(5)]
                rows["wake_one"].append(statistics.median(ones))
            with held_peer() as (pid, port):
                per_held, held_all = measure_held(pid, port, args.watchers)
                rows["held"].append(per_held)
                rows["held_all"].append(held_all)
            print(
                f"run {run + 1}: "
                + ", ".join(f"{name} {values[-1]:.4g}" for name, values in rows.items()),
                flush=True,
            )
    idle = statistics.median(rows["idle"])
    watcher = statistics.median(rows["watcher"])
    wake_all = statistics.median(rows["wake_all"])
    wake_one = statistics.median(rows["wake_one"])
    held = statistics.median(rows["held"])
    held_all = statistics.median(rows["held_all"])
    backend = (args.database or "sqlite").split(":", 1)[0]
    print()
    print(f"{args.watchers} watchers, {backend}, median of {args.runs} runs")
    print("| measure | value | peer | peer value | ratio |")
    print("|---|---|---|---|---|")
    n = args.watchers
    print(
        f"| RSS per held watcher | {watcher:.2f} KiB | per held bare twisted.web request | "
        f"{held:.2f} KiB | {watcher / held:.2f} |"
    )
    print(
        f"| RSS per held watcher | {watcher:.2f} KiB | per idle connection to the daemon | "
        f"{idle:.2f} KiB | {watcher / idle:.2f} |"
    )
    print(
        f"| POST to last of {n} watchers' answers | {wake_all * 1000:.1f} ms | "
        f"POST to last of {n} held bare requests' answers | {held_all * 1000:.1f} ms | "
        f"{wake_all / held_all:.2f} |"
    )
    print(
        f"| POST to last of {n} watchers' answers | {wake_all * 1000:.1f} ms | "
        f"POST to 1 watcher's answer | {wake_one * 1000:.1f} ms | {wake_all / wake_one:.1f} |"
    )


if __name__ == "__main__":
    main()
