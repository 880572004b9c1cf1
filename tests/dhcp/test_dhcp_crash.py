"""Crash safety with a real daemon: kill -9 while 1,000 pushes are in flight; after a
plain restart every node's pushed mapping equals its desired mapping (no manual step).

The ``script`` provider runs a real shell script per push: it reads the mapping, then
waits on a lock the test holds (so all 1,000 are in flight at once), then renames its
output into place.  After the kill the orphaned scripts are told to give up, so what
the network service "has" is exactly what completed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from metadatad.db.dhcp import DhcpPushRepository
from metadatad.db.store import make_engine
from tests.support.daemon import DaemonFactory
from tests.support.factories import node_document

NODES = 1000
DEADLINE = 120.0

SCRIPT = """#!/bin/sh
# A "network service": records the pushed mapping as OUT/<uuid>.json.
out="$1"
tmp=$(mktemp "$out/.push-XXXXXX")
cat > "$tmp"
flock -s "$out/../gate" true        # held by the test: the push stays in flight
if [ -e "$out/../abort" ]; then rm -f "$tmp"; exit 1; fi
uuid=$(sed -n 's/.*"node_uuid": "\\([^"]*\\)".*/\\1/p' "$tmp")
mv "$tmp" "$out/$uuid.json"
"""


def _wait(what: str, condition: Any, deadline: float = DEADLINE) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.1)  # poll-with-deadline on real subprocesses


@pytest.mark.slow
def test_kill_9_with_1000_pushes_in_flight_loses_nothing(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """All 1,000 pushes in flight, kill -9, restart: pushed == desired for every node,
    and the service holds exactly the desired mappings."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "push.sh"
    script.write_text(SCRIPT)
    gate = tmp_path / "gate"
    gate.touch()
    database = tmp_path / "db.sqlite"
    nodes = [node_document(i) for i in range(NODES)]
    config = {
        "conductor": {
            "hostname": "solo",
            "tftp_address": "10.0.0.5",
            "heartbeat_interval": "1",
            "heartbeat_timeout": "5",
        },
        "dhcp": {
            "provider": "script",
            "script_command": f"/bin/sh {script} {out}",
            "script_timeout": "300",
            "concurrency": str(NODES),
            "retry_min": "0.2",
            "retry_max": "1",
        },
    }
    with open(gate, "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        daemon = daemon_factory(nodes, database_url=f"sqlite:///{database}", config=config)
        in_flight = lambda: sum(1 for p in out.iterdir() if p.name.startswith(".push-"))  # noqa: E731
        started = time.monotonic()
        _wait("1,000 pushes in flight", lambda: in_flight() >= NODES)
        print(f"1,000 pushes in flight after {time.monotonic() - started:.1f} s")
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        assert daemon.stop() == -signal.SIGKILL
        (tmp_path / "abort").touch()
        fcntl.flock(lock, fcntl.LOCK_UN)
    started = time.monotonic()
    _wait("the orphaned scripts to give up", lambda: in_flight() == 0)
    print(f"orphans gave up in {time.monotonic() - started:.1f} s")
    os.unlink(tmp_path / "abort")
    assert not [p for p in out.iterdir() if p.suffix == ".json"]

    engine = make_engine(f"sqlite:///{database}", 1)
    repository = DhcpPushRepository(engine)
    try:
        assert repository.counts() == {"pushed": 0, "failed": 0, "pending": NODES}
        started = time.monotonic()
        daemon.start()
        _wait("every mapping pushed", lambda: repository.counts()["pushed"] == NODES)
        print(f"restarted and pushed everything in {time.monotonic() - started:.1f} s")
        for node in nodes:
            state = repository.state(node["uuid"])
            assert state is not None and state.in_sync and state.pushed == state.desired
            held = json.loads((out / f"{node['uuid']}.json").read_text())
            assert (held.pop("owner"), held.pop("generation")) == ("solo", state.generation)
            assert held == state.desired
    finally:
        engine.dispose()
    assert daemon.errors() == []
