"""Two real daemons sharing PostgreSQL or MariaDB: a post through one wakes watchers on
the other within 2 s, concurrent posts through both store exactly one value, and
held watchers hold no database thread."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.daemon import Daemon, DaemonFactory
from tests.support.databases import empty_database
from tests.support.factories import node_document

WATCHER = node_document(0, ports=[{"mac": "52:54:00:00:01:01", "ip": "127.0.0.1"}])
POSTER = node_document(1, ports=[{"mac": "52:54:00:00:01:02", "ip": "127.0.0.2"}])
OTHER = node_document(
    2, project_id="proj-b", ports=[{"mac": "52:54:00:00:01:03", "ip": "127.0.0.3"}]
)
SHARED = "/openstack/latest/shared.json"
WATCHERS = 20


def watchers_held(daemon: Daemon) -> int:
    """How many watches the daemon has started holding (its debug log says so)."""
    return daemon.output().count("holding a watch of")


def wait_for_watchers(daemon: Daemon, count: int, deadline: float = 10.0) -> None:
    give_up = time.monotonic() + deadline
    while watchers_held(daemon) != count:
        assert time.monotonic() < give_up, f"{watchers_held(daemon)} watchers, not {count}"
        time.sleep(0.02)  # poll-with-deadline on a real subprocess


def post(daemon: Daemon, entries: dict[str, str], source: str) -> tuple[int, dict[str, str]]:
    status, headers, _ = daemon.request(
        "POST",
        "/openstack/latest/metadata?shared=project",
        body=json.dumps(entries).encode(),
        headers={"Content-Type": "application/json"},
        source=source,
    )
    return status, headers


def timed_get(daemon: Daemon, path: str, source: str) -> tuple[float, int, dict[str, str], bytes]:
    from tests.support.daemon import http_request

    status, headers, body = http_request(daemon.metadata_url + path, source=source, timeout=60)
    return time.monotonic(), status, headers, body


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_two_daemons_share_peers_and_watches(
    backend: str, daemon_factory: DaemonFactory, tmp_path: Any, scratch_databases: Any
) -> None:
    """The whole story on one shared database, through two real conductors."""
    url = empty_database(backend, tmp_path, scratch_databases)
    # One database thread for the site: a watcher holding it would starve every read.
    one = daemon_factory(
        [WATCHER, POSTER, OTHER],
        database_url=url,
        config={"conductor": {"hostname": "c1"}, "database": {"pool_size": "1"}},
    )
    two = daemon_factory(database_url=url, config={"conductor": {"hostname": "c2"}})

    status, headers, body = one.get(SHARED)
    assert (status, body) == (200, b"[]")
    index = int(headers["X-Metadatad-Index"])
    _, b_headers, _ = one.get(SHARED, source="127.0.0.3")
    b_index = int(b_headers["X-Metadatad-Index"])

    with ThreadPoolExecutor(WATCHERS + 1) as pool:
        held = [
            pool.submit(timed_get, one, f"{SHARED}?index={index}&wait=30", "127.0.0.1")
            for _ in range(WATCHERS)
        ]
        # Project B's watcher must not be woken by A's post (isolation through watches).
        started_b = time.monotonic()
        b_watch = pool.submit(timed_get, one, f"{SHARED}?index={b_index}&wait=4", "127.0.0.3")
        wait_for_watchers(one, WATCHERS + 1)

        # No thread is held: with a one-thread pool, reads still answer at once.
        started = time.monotonic()
        for path in (SHARED, "/service/latest/all_hosts", "/openstack/latest/password"):
            assert one.get(path)[0] == 200, path
        assert time.monotonic() - started < 2.0

        posted_at = time.monotonic()
        status, post_headers = post(two, {"ip": "127.0.0.2", "port": "7000"}, "127.0.0.2")
        assert status == 200
        new_index = int(post_headers["X-Metadatad-Index"])
        assert new_index > index
        for future in held:
            returned_at, status, headers, body = future.result(timeout=30)
            assert status == 200
            assert returned_at - posted_at < 2.0, returned_at - posted_at
            assert int(headers["X-Metadatad-Index"]) == new_index
            (entry,) = json.loads(body)
            # The poster's last request, written within the flush interval (or not yet).
            last_seen = entry.pop("last_seen_at")
            assert last_seen is None or last_seen.endswith("Z"), last_seen
            assert entry == {
                "meta": {"from_server_ip": "127.0.0.2", "from_server_port": "7000"},
                "uuid": POSTER["uuid"],
            }
        returned_at, status, headers, body = b_watch.result(timeout=30)
        assert (status, body) == (200, b"[]")
        assert returned_at - started_b >= 3.9
        assert int(headers["X-Metadatad-Index"]) == b_index

    # Write-once across conductors: the same node posts two values for one key through
    # both daemons at the same instant; exactly one is stored, the other is a 409.
    for round_ in range(5):
        key = f"leader{round_}"
        barrier = threading.Barrier(2)

        def race(daemon: Daemon, value: str, key: str = key, barrier: Any = barrier) -> int:
            barrier.wait()
            return post(daemon, {key: value}, "127.0.0.1")[0]

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(race, one, "one")
            second = pool.submit(race, two, "two")
            statuses = sorted([first.result(timeout=30), second.result(timeout=30)])
        assert statuses == [200, 409], statuses
        _, _, body = two.get(SHARED)
        values = {
            entry["meta"].get(f"from_server_{key}")
            for entry in json.loads(body)
            if entry["uuid"] == WATCHER["uuid"]
        }
        assert values in ({"one"}, {"two"})

    # Operators see the keys, and can clear the shared ones.
    status, document = two.admin("GET", f"/v1/nodes/{WATCHER['uuid']}")
    assert status == 200
    assert set(document["shared_keys"]) == {f"leader{i}" for i in range(5)}
    assert two.admin("DELETE", f"/v1/nodes/{WATCHER['uuid']}/shared_keys") == (200, {"deleted": 5})
    shown = json.loads(one.manage("node", "show", WATCHER["uuid"]).stdout)
    assert shown["shared_keys"] == {}
    assert one.errors() == [] and two.errors() == []
