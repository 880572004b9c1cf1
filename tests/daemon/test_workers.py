"""``[metadata] workers = 2`` on the real daemon: two worker processes behind one
listening socket, tokens and cache invalidation and watches across them, a worker killed
with SIGKILL under load, SIGHUP, stopping, and the default per-node limits (divided
among the workers) against cloud-init's crawl."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.daemon.test_cloudinit import (
    CALLER_NODE,
    VENDORDATA,
    run_driver,
    system_python,  # noqa: F401  (the fixture, shared)
)
from tests.support.daemon import Daemon, DaemonFactory, http_request
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

NODE = node_document(0, ports=[{"mac": "52:54:00:00:02:01", "ip": "127.0.0.1"}])
PEER = node_document(1, ports=[{"mac": "52:54:00:00:02:02", "ip": "127.0.0.2"}])
UUID = NODE["uuid"]
DEADLINE = 15.0
ACCESS = re.compile(r'^"[^"]*" .*" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"$')


def start(daemon_factory: DaemonFactory, count: int = 2, **metadata: str) -> Daemon:
    config = {
        "metadata": {"workers": "2", "access_log": "true", "rate_limit": "0", **metadata},
        "logging": {"format": "json"},
    }
    daemon = daemon_factory([NODE, PEER], config=config, vendordata={"v": 1})
    wait_for(lambda: health(daemon)["workers"]["running"] == count, f"{count} workers running")
    # Running is not yet serving: a worker adopts the socket once it has started up.
    wait_for(
        lambda: workers_that_logged(daemon, "serving") == set(range(count)),
        f"all {count} serving",
    )
    return daemon


def health(daemon: Daemon) -> dict[str, Any]:
    _, document = daemon.admin("GET", "/healthz")
    assert isinstance(document, dict), document
    return document


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"not within {deadline} s: {what}"
        time.sleep(0.05)  # poll-with-deadline on a real subprocess


def events(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log events that came from a worker."""
    found = []
    for raw in daemon.output().splitlines():
        line = raw.lstrip("\x1e")
        if '"worker"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "worker" in event:
            found.append(event)
    return found


def held(daemon: Daemon) -> int:
    """Watches the workers have started holding (their debug log says so)."""
    return len([e for e in events(daemon) if "holding a watch" in json.dumps(e)])


def held_is(daemon: Daemon, count: int) -> bool:
    return held(daemon) == count


def workers_that_logged_each(daemon: Daemon, needle: str) -> list[int]:
    return [e["worker"] for e in events(daemon) if needle in json.dumps(e)]


def workers_that_logged(daemon: Daemon, needle: str) -> set[int]:
    return {e["worker"] for e in events(daemon) if needle in json.dumps(e)}


@contextlib.contextmanager
def busy(daemon: Daemon, threads: int = 3) -> Iterator[None]:
    """Requests from other threads meanwhile.  An idle worker is woken for a new
    connection only when the one woken first is busy (EPOLLEXCLUSIVE), so without load
    one worker may serve everything."""
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                daemon.get("/latest/meta-data/?load")

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(load)
        try:
            yield
        finally:
            stop.set()


def until_both_serve(
    daemon: Daemon, request: Callable[[int], tuple[int, bytes]], tag: str
) -> list[tuple[int, bytes]]:
    """Repeat ``request(n)`` (its path carries ``?<tag>=n``) on new connections, under
    load, until each worker answered one; every answer is returned."""
    answers = []
    n = 0
    give_up = time.monotonic() + DEADLINE
    with busy(daemon):
        while workers_that_logged(daemon, f"{tag}=") != {0, 1}:
            assert time.monotonic() < give_up, "one worker served every request"
            answers.append(request(n))
            n += 1
    return answers


def test_two_workers_behind_one_socket(daemon_factory: DaemonFactory) -> None:
    """Both workers accept on the one port; /healthz reports them; stopping the daemon
    stops them."""
    daemon = start(daemon_factory)
    workers = health(daemon)["workers"]
    assert workers["configured"] == 2 and len(set(workers["pids"])) == 2
    assert daemon.process is not None and daemon.process.pid not in workers["pids"]

    def get(n: int) -> tuple[int, bytes]:
        status, _, body = daemon.get(f"/latest/meta-data/instance-id?both={n}")
        return status, body

    answers = until_both_serve(daemon, get, "both")
    assert set(answers) == {(200, UUID.encode())}
    # /metrics adds up both workers (each reports every second): every 200 they logged.
    wait_for(
        lambda: metadata_200s(daemon) == len(workers_that_logged_each(daemon, '" 200 ')),
        "/metrics counting both workers' answers",
    )
    assert metadata_200s(daemon) >= len(answers)
    daemon.stop()
    for pid in workers["pids"]:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def test_auto_starts_a_worker_per_usable_cpu(daemon_factory: DaemonFactory) -> None:
    """``workers = auto`` (the default) on this machine: as many workers as the CPUs the
    daemon may run on (one process on a single CPU), and they answer."""
    cpus = min(len(os.sched_getaffinity(0)), 64)  # the daemon inherits this affinity
    if cpus == 1:
        daemon = daemon_factory([NODE], config={"metadata": {"workers": "auto"}})
        assert "workers" not in health(daemon)
    else:
        daemon = start(daemon_factory, cpus, workers="auto")
        assert health(daemon)["workers"]["configured"] == cpus
    status, _, body = daemon.get("/latest/meta-data/instance-id")
    assert (status, body) == (200, UUID.encode())


def metadata_200s(daemon: Daemon) -> float:
    _, text = daemon.admin("GET", "/metrics")
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith("metadatad_http_requests_total{") and 'site="metadata"' in line:
            if 'code="200"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_token_from_one_worker_is_good_on_the_other(daemon_factory: DaemonFactory) -> None:
    """Without [metadata] token_secret the pool hands every worker the same secret."""
    daemon = start(daemon_factory, require_tokens="true")
    status, _, token = daemon.request(
        "PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    assert status == 200

    def get(n: int) -> tuple[int, bytes]:
        status, _, body = daemon.get(
            f"/latest/meta-data/instance-id?token={n}",
            headers={"X-aws-ec2-metadata-token": token.decode()},
        )
        return status, body

    answers = until_both_serve(daemon, get, "token")
    assert set(answers) == {(200, UUID.encode())}


def test_an_admin_write_reaches_every_workers_cache_at_once(
    daemon_factory: DaemonFactory,
) -> None:
    """With a cache TTL of an hour, both workers answer the new hostname right after
    the admin API's write returns."""
    daemon = start(daemon_factory, cache_ttl="3600")

    def hostname(n: int) -> tuple[int, bytes]:
        status, _, body = daemon.get(f"/latest/meta-data/hostname?{tag[0]}={n}")
        return status, body

    tag = ["before"]
    assert set(until_both_serve(daemon, hostname, "before")) == {
        (200, NODE["hostname"].encode())
    }
    renamed = {**NODE, "hostname": "renamed.example.org"}
    status, _ = daemon.admin("PUT", f"/v1/nodes/{UUID}", renamed)
    assert status == 200
    tag[0] = "after"
    assert set(until_both_serve(daemon, hostname, "after")) == {(200, b"renamed.example.org")}


def test_watches_in_both_workers_wake_within_2s(daemon_factory: DaemonFactory) -> None:
    """Watchers held by either worker wake within 2 s of a post through any worker."""
    daemon = start(daemon_factory)
    _, headers, _ = daemon.get("/openstack/latest/shared.json")
    index = headers["X-Metadatad-Index"]
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def watch(n: int) -> None:
        status, _, _ = http_request(
            f"{daemon.metadata_url}/openstack/latest/shared.json?index={index}&wait=60&w={n}",
            timeout=60,
        )
        with lock:
            results.append((time.monotonic(), status))

    with ThreadPoolExecutor(32) as pool, busy(daemon):
        # Watchers one at a time until each worker holds some (the kernel decides who
        # accepts a connection).
        futures = []
        give_up = time.monotonic() + DEADLINE
        while workers_that_logged(daemon, "holding a watch") != {0, 1}:
            assert len(futures) < 32 and time.monotonic() < give_up, "one worker took all"
            futures.append(pool.submit(watch, len(futures)))
            wait_for(functools.partial(held_is, daemon, len(futures)), "the watch held")
        holders = workers_that_logged(daemon, "holding a watch")
        posted = time.monotonic()
        status, _, _ = daemon.request(
            "POST",
            "/openstack/latest/metadata?shared=project",
            body=b'{"ip": "10.0.0.5"}',
            headers={"Content-Type": "application/json"},
            source="127.0.0.2",
        )
        assert status == 200
        for future in futures:
            future.result(timeout=DEADLINE)
    assert holders == {0, 1}
    assert len(results) == len(futures) and {s for _, s in results} == {200}
    assert max(t for t, _ in results) - posted < 2.0


def test_a_killed_worker_is_restarted_and_loses_only_its_own(
    daemon_factory: DaemonFactory,
) -> None:
    """SIGKILL to one worker under load: it is started again; the requests that fail
    are at most those in flight (one per client thread), the rest are answered."""
    daemon = start(daemon_factory, rate_limit="0")
    before = health(daemon)["workers"]
    victim = before["pids"][0]
    stop = threading.Event()
    outcomes: list[bool] = []
    errors: list[str] = []
    lock = threading.Lock()
    threads = 4

    def load() -> None:
        while not stop.is_set():
            try:
                status, _, body = daemon.get("/latest/meta-data/instance-id")
                ok = status == 200
                why = f"{status} {body[:80]!r}"
            except OSError as e:
                ok = False
                why = repr(e)
            with lock:
                outcomes.append(ok)
                if not ok:
                    errors.append(why)

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):
            pool.submit(load)
        wait_for(lambda: len(outcomes) > 200, "load running")
        os.kill(victim, signal.SIGKILL)
        killed_at = len(outcomes)

        def restarted() -> bool:
            # One reading: two separate ones could straddle the main process noticing
            # the death (the first still counting the victim, the second not yet
            # counting its replacement).
            workers = health(daemon)["workers"]
            return (
                workers["restarts"] == 1
                and workers["running"] == 2
                and victim not in workers["pids"]
            )

        wait_for(restarted, "the worker started again")
        wait_for(lambda: len(outcomes) > killed_at + 200, "load after the restart")
        stop.set()
    failed = outcomes.count(False)
    assert failed <= threads, f"{failed} of {len(outcomes)} requests failed: {errors[:5]}"
    after = health(daemon)["workers"]
    assert after["restarts"] == 1 and len(set(after["pids"])) == 2, daemon.output()[-5000:]


def test_sighup_reloads_every_worker(daemon_factory: DaemonFactory) -> None:
    """SIGHUP to the daemon: both workers serve the new static vendordata."""
    daemon = start(daemon_factory)
    path = daemon.directory / "vendordata.json"
    path.write_text(json.dumps({"v": 2}), encoding="utf-8")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: workers_that_logged(daemon, "reloaded") == {0, 1}, "both reloaded")

    def vendordata(n: int) -> tuple[int, bytes]:
        status, _, body = daemon.get(f"/openstack/latest/vendor_data.json?hup={n}")
        return status, body

    answers = until_both_serve(daemon, vendordata, "hup")
    assert {json.loads(body)["v"] for _, body in answers} == {2}


def test_default_limits_never_refuse_a_boot_that_lands_on_one_worker(
    daemon_factory: DaemonFactory, system_python: str  # noqa: F811
) -> None:
    """The defaults (rate_limit 100, rate_burst 1000, max_connections_per_source 64)
    are divided between 2 workers: 50/s, 500 at once and 32 connections each.  The worst
    case, every connection of the node on one worker, is forced by stopping the other
    (SIGSTOP: it leaves epoll_wait, so the kernel wakes worker 0 for every connection).
    cloud-init's crawl (its OpenStack datasource, then its EC2 one: 84 requests with
    cloud-init 22.4, one connection each), twice in a row as a boot and a reboot would,
    is answered without a 429 or a refused connection, all of it by worker 0.  (With
    rate_limit 10 and rate_burst 100, 5/s and 50 at once per worker, it fails.)"""
    daemon = daemon_factory(
        [CALLER_NODE],
        config={"metadata": {"workers": "2", "access_log": "true"}, "logging": {"format": "json"}},
        vendordata=VENDORDATA,
    )
    wait_for(lambda: health(daemon)["workers"]["running"] == 2, "two workers running")
    stopped = health(daemon)["workers"]["pids"][1]
    jobs = [{"name": "openstack", "kind": "openstack"}, {"name": "ec2", "kind": "ec2"}]
    os.kill(stopped, signal.SIGSTOP)
    try:
        boots = [run_driver(system_python, daemon, f"boot-{n}", jobs) for n in (1, 2)]
    finally:
        os.kill(stopped, signal.SIGCONT)
    requested = sum(len(boot[job["name"]]["requested"]) for boot in boots for job in jobs)
    for boot in boots:
        for job in jobs:
            assert boot[job["name"]]["found"], (job, boot[job["name"]].get("error"))

    def crawl() -> list[tuple[int, str]]:
        """(worker, status) of each request cloud-init made (the harness sends no
        User-Agent)."""
        found = []
        for event in events(daemon):
            line = ACCESS.match(str(event.get("message", "")))
            if line is not None and line["agent"] != "-":
                found.append((event["worker"], line["status"]))
        return found

    wait_for(lambda: len(crawl()) >= requested, f"the {requested} requests logged")
    answered = crawl()
    assert {status for _, status in answered} <= {"200", "404"}, Counter(answered)
    assert {worker for worker, _ in answered} == {0}, "worker 1 answered while stopped"
    assert len(answered) == requested, (len(answered), requested)  # no retries
    assert workers_that_logged(daemon, "refusing connections") == set()
    # /metrics adds up both workers: nothing refused before reaching the site either.
    wait_for(
        lambda: metadata_200s(daemon) == len(workers_that_logged_each(daemon, '" 200 ')),
        "/metrics counting both workers' answers",
    )
    assert metric_sum(daemon, "metadatad_http_refused_total{", 'site="metadata"') == 0
    assert metric_sum(daemon, "metadatad_metadata_denied_total{", "") == 0


def metric_sum(daemon: Daemon, prefix: str, label: str) -> float:
    _, text = daemon.admin("GET", "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in str(text).splitlines()
        if line.startswith(prefix) and label in line
    )
