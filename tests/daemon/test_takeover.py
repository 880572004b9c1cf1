"""Three real ``twistd metadatad`` daemons sharing PostgreSQL or MariaDB, 300 nodes:
kill -9, SIGSTOP/SIGCONT and SIGTERM of a conductor, and what the others do.

Timings (heartbeat every 1 s, dead after 5 s) are measured from the signal to the
claims seen in the database, polled every 50 ms, and printed (``pytest -s``) and
appended to ``takeover-times.txt`` in the test's directory.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from metadatad.core.conductors import Claim
from metadatad.db.cluster import ClusterRepository
from metadatad.db.store import make_engine
from tests.support.daemon import Daemon
from tests.support.databases import empty_database
from tests.support.factories import node_document

pytestmark = pytest.mark.slow

INTERVAL = 1.0
TIMEOUT = 5.0
NODES = 300
POLL = 0.05


class Cluster:
    """The daemons, and a view of the database from the test."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory
        self.engine = make_engine(url, 2)
        self.repository = ClusterRepository(self.engine)
        self.daemons: dict[str, Daemon] = {}
        self.times: list[str] = []

    def create(self, name: str, nodes: list[dict[str, Any]]) -> Daemon:
        daemon = Daemon.create(
            self.directory / name,
            nodes=nodes,
            database_url=self.url,
            config={
                "conductor": {
                    "hostname": name,
                    "tftp_address": "127.0.0.1",
                    "heartbeat_interval": str(INTERVAL),
                    "heartbeat_timeout": str(TIMEOUT),
                }
            },
        )
        self.daemons[name] = daemon
        return daemon

    def claims(self) -> dict[str, Claim]:
        return self.repository.claims()

    def owned_by(self, name: str) -> set[str]:
        return {u for u, c in self.claims().items() if c.owner == name}

    def report(self, name: str) -> dict[str, Any]:
        """``GET /v1/ring`` of daemon ``name``."""
        status, body = self.daemons[name].admin("GET", "/v1/ring")
        assert status == 200, body
        return dict(body)

    def settled(self, members: set[str]) -> bool:
        """The current generation's members are ``members`` and, by the ring a member
        daemon computes, every node is claimed by its ring owner."""
        state = self.repository.ring_state()
        if {name for _group, name in state.members} != members:
            return False
        report = self.report(sorted(members)[0])
        return (
            report["generation"] == state.generation
            and report["pending"] == 0
            and report["nodes"] == NODES
            and len(self.claims()) == NODES
        )

    def same_ring_everywhere(self, members: set[str]) -> None:
        """Every live daemon reports the same generation and the same assignment."""
        reports = {name: self.report(name) for name in members}
        views = {
            name: (
                r["generation"],
                [(c["name"], c["assigned"], c["claimed"]) for c in r["conductors"]],
            )
            for name, r in reports.items()
        }
        assert len(set(map(repr, views.values()))) == 1, views

    def wait(self, condition: Callable[[], bool], limit: float, what: str) -> float:
        """Poll ``condition`` every 50 ms; the seconds it took (fails past ``limit``)."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > limit:
                logs = "\n".join(f"--- {n}:\n{d.output()[-3000:]}" for n, d in self.daemons.items())
                raise AssertionError(f"{what}: not within {limit} s\n{logs}")
            time.sleep(POLL)  # poll-with-deadline on real subprocesses
        return time.monotonic() - start

    def record(self, line: str) -> None:
        self.times.append(line)
        print(line)
        with open(self.directory / "takeover-times.txt", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def close(self) -> None:
        for daemon in self.daemons.values():
            process = daemon.process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stopped daemon cannot exit
            daemon.stop()
        self.engine.dispose()


@pytest.fixture(params=["postgresql", "mysql"])
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, scratch_databases: Any
) -> Iterator[Cluster]:
    url = empty_database(request.param, tmp_path, scratch_databases)
    built = Cluster(url, tmp_path)
    try:
        yield built
    finally:
        built.close()


def signal_daemon(daemon: Daemon, signum: int) -> None:
    assert daemon.process is not None
    os.kill(daemon.process.pid, signum)


def test_takeovers(cluster: Cluster, request: pytest.FixtureRequest) -> None:
    """kill -9, SIGSTOP then SIGCONT, and SIGTERM of one of three conductors."""
    backend = request.node.callspec.params["cluster"]
    nodes = [node_document(i) for i in range(NODES)]
    for name in ("c1", "c2", "c3"):
        cluster.create(name, nodes if name == "c1" else [])
    for daemon in cluster.daemons.values():
        daemon.start()
    all_three = {"c1", "c2", "c3"}
    cluster.wait(lambda: cluster.settled(all_three), 10, "start-up")
    cluster.same_ring_everywhere(all_three)

    # --- kill -9: c3's nodes go to survivors within timeout + 2 intervals -------------
    lost = cluster.owned_by("c3")
    assert 50 <= len(lost) <= 150
    before = cluster.repository.ring_state().generation
    signal_daemon(cluster.daemons["c3"], signal.SIGKILL)
    started = time.monotonic()
    cluster.wait(lambda: not cluster.owned_by("c3"), TIMEOUT + 2 * INTERVAL + 1, "kill -9")
    took = time.monotonic() - started
    cluster.record(f"{backend}: kill -9: {len(lost)} nodes taken over in {took:.2f} s")
    assert took <= TIMEOUT + 2 * INTERVAL
    claims = cluster.claims()
    assert len(claims) == NODES  # the primary key: one claim, one owner per node
    assert {claims[u].owner for u in lost} <= {"c1", "c2"}
    assert all(claims[u].generation > before for u in lost)
    cluster.wait(lambda: cluster.settled({"c1", "c2"}), 2, "settle after kill -9")
    cluster.daemons["c3"].stop()  # reap it

    # --- c3 comes back and takes its share again ----------------------------------
    cluster.daemons["c3"].start()
    took = cluster.wait(lambda: cluster.settled(all_three), 5, "c3 rejoins")
    cluster.record(f"{backend}: restart: c3 holds its nodes again {took:.2f} s after ready")

    # --- SIGSTOP c2 past the timeout, then SIGCONT -----------------------------------
    paused = cluster.owned_by("c2")
    signal_daemon(cluster.daemons["c2"], signal.SIGSTOP)
    started = time.monotonic()
    cluster.wait(lambda: not cluster.owned_by("c2"), TIMEOUT + 2 * INTERVAL + 1, "SIGSTOP")
    took = time.monotonic() - started
    cluster.record(f"{backend}: SIGSTOP: {len(paused)} nodes taken over in {took:.2f} s")
    assert took <= TIMEOUT + 2 * INTERVAL
    cluster.wait(lambda: cluster.settled({"c1", "c3"}), 2, "settle after SIGSTOP")
    takeover = cluster.repository.ring_state().generation
    snapshot = cluster.claims()
    time.sleep(INTERVAL)  # stay stopped a little past the takeover
    signal_daemon(cluster.daemons["c2"], signal.SIGCONT)
    resumed = time.monotonic()
    seen = dict(snapshot)
    overwritten: list[str] = []

    def rejoined() -> bool:
        # On every look: no claim generation goes back, and the others' claims are
        # replaced only by claims newer than the takeover's generation.
        for uuid, claim in cluster.claims().items():
            assert claim.generation >= seen[uuid].generation, (uuid, seen[uuid], claim)
            if claim != snapshot[uuid] and claim.generation <= takeover:
                overwritten.append(uuid)
            seen[uuid] = claim
        return cluster.settled(all_three)

    took = cluster.wait(rejoined, 5, "c2 rejoins after SIGCONT")
    assert overwritten == []
    claims = cluster.claims()
    back = cluster.owned_by("c2")
    assert back == paused  # the same ring: the same nodes, by new claims
    assert all(claims[u].generation > takeover for u in back)
    assert cluster.repository.ring_state().generation > takeover
    cluster.record(
        f"{backend}: SIGCONT: c2 rejoined, {len(back)} nodes back by claims at generation "
        f"> {takeover}, {took:.2f} s after SIGCONT"
    )
    assert time.monotonic() - resumed < 5

    # --- SIGTERM c1: survivors start taking over within 2 s --------------------------
    leaving = cluster.owned_by("c1")
    daemon = cluster.daemons["c1"]
    signal_daemon(daemon, signal.SIGTERM)
    started = time.monotonic()
    first = cluster.wait(lambda: bool(leaving - cluster.owned_by("c1")), 3, "SIGTERM start")
    cluster.wait(lambda: not cluster.owned_by("c1"), 3, "SIGTERM all")
    all_moved = time.monotonic() - started
    cluster.record(
        f"{backend}: SIGTERM: takeover started after {first:.2f} s, all {len(leaving)} "
        f"nodes moved after {all_moved:.2f} s"
    )
    assert first <= 2.0
    assert all_moved <= 3.0
    assert daemon.process is not None
    assert daemon.process.wait(timeout=10) == -signal.SIGTERM
    daemon.stop()
    c1 = [r for r in cluster.repository.conductors(TIMEOUT) if r.name == "c1"]
    assert [(r.online, r.live) for r in c1] == [(False, False)]
    cluster.wait(lambda: cluster.settled({"c2", "c3"}), 2, "settle after SIGTERM")
    cluster.same_ring_everywhere({"c2", "c3"})

    for name, daemon in cluster.daemons.items():
        assert daemon.errors() == [], f"{name}:\n" + "\n\n".join(daemon.errors())
