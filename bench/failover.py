"""Failover of DHCP boot mappings: 10,000 nodes over 3 conductors on PostgreSQL, one
killed with -9; how long until every one of its nodes points at a survivor.

    .venv/bin/python bench/failover.py [--nodes 10000] [--providers dnsmasq,neutron]
        [--concurrency 50] [--heartbeat-interval 1] [--heartbeat-timeout 3] [--no-peer]

For each provider it makes a scratch PostgreSQL database (``METADATAD_BENCH_POSTGRESQL_URL``,
default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), imports the nodes,
starts three real daemons (``twistd -n metadatad``, conductors c1..c3, tftp addresses
10.9.0.1..3), waits until every mapping is pushed and held by its ring owner, then
SIGKILLs c1 and measures, on this host's clock:

* detection: kill -> first takeover claim of a c1 node (the database's ``claimed_at``;
  bounded by heartbeat_timeout plus a poll),
* push: that claim -> the last c1 node's mapping written to the network service (the
  newest mtime of its dnsmasq files, or the Neutron stub's time of its last PUT),
* total, and how many nodes moved.

Providers: ``dnsmasq`` (files in shared hostsdir/optsdir, as dnsmasq would read them)
and ``neutron`` (metadatad.testing.NeutronStub on loopback, in a process of its own,
bench/neutron_stub.py; static token; ``[dhcp] concurrency`` PUTs in flight per
survivor).  The peer, measured in the same run unless --no-peer: the Neutron stub
with concurrency 1, one PUT at a time as Ironic does per node.  Ironic's default
takeover is modelled for comparison: ``ceil(moved / (8 * survivors)) * 180 s`` after
its 60 s detection.

Targets (issue 4): push phase < 2 s with dnsmasq, < 10 s against the Neutron stub.
Every process started here is stopped and the scratch database dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: bench/http.py would shadow the stdlib's http.
sys.path[0] = str(ROOT)

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from metadatad.db.migrate import upgrade  # noqa: E402
from metadatad.db.schema import dhcp_pushes, node_claims  # noqa: E402
from metadatad.db.store import make_engine  # noqa: E402
from metadatad.testing.daemon import Daemon  # noqa: E402
from metadatad.testing.factories import node_document  # noqa: E402

ADMIN_URL = os.environ.get(
    "METADATAD_BENCH_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IRONIC_PER_RUN, IRONIC_PERIOD, IRONIC_DETECTION = 8, 180.0, 60.0


class Scratch:
    """A PostgreSQL database for one scenario."""

    def __init__(self) -> None:
        self.admin = create_engine(make_url(ADMIN_URL), isolation_level="AUTOCOMMIT")
        self.name = f"metadatad_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.url = make_url(ADMIN_URL).set(database=self.name).render_as_string(False)

    def __enter__(self) -> Scratch:
        with self.admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {self.name}"))
        engine = make_engine(self.url, 1)
        upgrade(engine)
        engine.dispose()
        return self

    def __exit__(self, *_: object) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"))
        self.admin.dispose()


class StubProcess:
    """The Neutron stub on loopback, in its own process (bench/neutron_stub.py): in
    this one, it would share the interpreter with the polling and skew the numbers."""

    def __init__(self, ports: list[str], tmp: Path) -> None:
        listed = tmp / "ports"
        listed.write_text("\n".join(ports) + "\n")
        self.result = tmp / "accepted.json"
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "neutron_stub.py"), str(listed),
             "bench-token", str(self.result)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if line[:1] != ["listening"]:
            self.process.kill()
            raise SystemExit("failover bench: the Neutron stub did not start")
        self.url = f"http://127.0.0.1:{line[1]}"
        self.accepted_at: dict[str, float] = {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
            if self.result.exists():
                self.accepted_at = json.loads(self.result.read_text())


def wait(what: str, condition: Any, deadline: float, interval: float = 0.5) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            raise SystemExit(f"failover bench: timed out waiting for {what}")
        time.sleep(interval)  # polling real processes


def settled(engine: Any, total: int) -> bool:
    """Every mapping pushed, and held (pushed) by its claim's owner."""
    query = (
        select(func.count())
        .select_from(
            dhcp_pushes.join(node_claims, node_claims.c.node_uuid == dhcp_pushes.c.node_uuid)
        )
        .where(
            dhcp_pushes.c.owner == node_claims.c.owner,
            dhcp_pushes.c.generation == node_claims.c.generation,
            dhcp_pushes.c.pushed_digest == dhcp_pushes.c.desired_digest,
        )
    )
    with engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0) == total


def scenario(
    args: argparse.Namespace, provider: str, concurrency: int, tmp: Path
) -> dict[str, Any]:
    nodes = []
    for i in range(args.nodes):
        document = node_document(i)
        document["ports"][0]["neutron_port_id"] = f"port-{i}"
        nodes.append(document)
    stub = (
        StubProcess([f"port-{i}" for i in range(args.nodes)], tmp)
        if provider == "neutron"
        else None
    )
    token = tmp / "token"
    token.write_text("bench-token\n")
    hostsdir, optsdir = tmp / "hostsdir", tmp / "optsdir"
    hostsdir.mkdir(exist_ok=True)
    optsdir.mkdir(exist_ok=True)
    if provider == "dnsmasq":
        dhcp = {"dnsmasq_hostsdir": str(hostsdir), "dnsmasq_optsdir": str(optsdir)}
    else:
        assert stub is not None
        dhcp = {"neutron_url": stub.url, "neutron_token_file": str(token)}
    daemons: list[Daemon] = []
    with Scratch() as database:
        try:
            engine = make_engine(database.url, 1)
            for n in (1, 2, 3):
                config = {
                    "conductor": {
                        "hostname": f"c{n}",
                        "tftp_address": f"10.9.0.{n}",
                        "heartbeat_interval": str(args.heartbeat_interval),
                        "heartbeat_timeout": str(args.heartbeat_timeout),
                    },
                    "dhcp": {"provider": provider, "concurrency": str(concurrency), **dhcp},
                }
                daemon = Daemon.create(
                    tmp / f"c{n}", nodes=nodes if n == 1 else (), database_url=database.url,
                    config=config,
                )  # fmt: skip
                daemons.append(daemon)
            for daemon in daemons:
                daemon.start(deadline=120)
            wait("the initial pushes", lambda: settled(engine, args.nodes), 900)
            with engine.connect() as connection:
                victim_nodes = list(
                    connection.execute(
                        select(node_claims.c.node_uuid).where(node_claims.c.owner == "c1")
                    ).scalars()
                )
            victim = daemons[0]
            assert victim.process is not None
            killed = time.time()
            victim.process.send_signal(signal.SIGKILL)
            victim.stop()

            def moved() -> bool:
                # Every other row was pushed and settled before the kill.
                query = select(func.count()).where(
                    (dhcp_pushes.c.owner == "c1")
                    | dhcp_pushes.c.pushed_digest.is_(None)
                    | (dhcp_pushes.c.pushed_digest != dhcp_pushes.c.desired_digest)
                )
                with engine.connect() as connection:
                    return int(connection.execute(query).scalar() or 0) == 0

            # Polled slowly: the times come from claimed_at and the writes themselves,
            # and a busy poll would take CPU from the conductors.
            wait("the takeover pushes", moved, 600, interval=0.5)
            recorded = time.time()
            with engine.connect() as connection:
                first_claim = connection.execute(
                    select(func.min(node_claims.c.claimed_at)).where(
                        node_claims.c.node_uuid.in_(victim_nodes)
                    )
                ).scalar()
                claims = {
                    row.node_uuid: (row.owner, row.claimed_at.replace(tzinfo=UTC).timestamp())
                    for row in connection.execute(
                        select(
                            node_claims.c.node_uuid, node_claims.c.owner, node_claims.c.claimed_at
                        ).where(node_claims.c.node_uuid.in_(victim_nodes))
                    )
                }
                holders = {uuid: owner for uuid, (owner, _) in claims.items()}
                pushed_at = dict(
                    connection.execute(
                        select(dhcp_pushes.c.node_uuid, dhcp_pushes.c.pushed_at).where(
                            dhcp_pushes.c.node_uuid.in_(victim_nodes)
                        )
                    ).all()
                )
            engine.dispose()
            claimed = first_claim.replace(tzinfo=UTC).timestamp()
            if provider == "dnsmasq":
                by_uuid = {n["uuid"]: n for n in nodes}

                def written(uuid: str) -> float:
                    mac = by_uuid[uuid]["ports"][0]["mac"].replace(":", "-")
                    return max(
                        (optsdir / f"metadatad-{uuid}.conf").stat().st_mtime,
                        (hostsdir / f"metadatad-{mac}.conf").stat().st_mtime,
                    )

                times = {uuid: written(uuid) for uuid in victim_nodes}
                last = max(times.values())
                # Where the time goes, per survivor (seconds after the first claim).
                for owner in sorted(set(holders.values())):
                    mine = [u for u in victim_nodes if holders.get(u) == owner]
                    files = sorted(times[u] - claimed for u in mine)
                    recorded_at = sorted(float(pushed_at[u]) - claimed for u in mine)
                    claimed_at = sorted(claims[u][1] - claimed for u in mine)
                    print(
                        f"  {owner}: {len(mine)} nodes, claimed {claimed_at[0]:.2f}-"
                        f"{claimed_at[-1]:.2f} s, files written {files[0]:.2f}-"
                        f"{files[-1]:.2f} s, recorded {recorded_at[0]:.2f}-{recorded_at[-1]:.2f} s",
                        file=sys.stderr,
                    )
            else:
                assert stub is not None
                stub.stop()
                ports = {n["uuid"]: n["ports"][0]["neutron_port_id"] for n in nodes}
                last = max(stub.accepted_at[ports[uuid]] for uuid in victim_nodes)
            for daemon in daemons[1:]:
                errors = daemon.errors()
                if errors:
                    print(errors[0], file=sys.stderr)
        finally:
            for daemon in daemons:
                daemon.stop()
                if args.keep_logs:
                    keep = Path(args.keep_logs) / f"{provider}-{concurrency}"
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{daemon.directory.name}.log").write_text(daemon.output())
            if stub is not None:
                stub.stop()
    return {
        "provider": provider,
        "concurrency": concurrency,
        "moved": len(victim_nodes),
        "detection": claimed - killed,
        "push": last - claimed,
        "total": last - killed,
        "recorded": recorded - killed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--providers", default="dnsmasq,neutron")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--no-peer", action="store_true", help="skip the concurrency-1 peer")
    parser.add_argument("--keep-logs", default="", help="copy the daemons' logs here")
    args = parser.parse_args()
    runs: list[tuple[str, int]] = [(p, args.concurrency) for p in args.providers.split(",")]
    if not args.no_peer and "neutron" in args.providers:
        runs.append(("neutron", 1))
    results = []
    for provider, concurrency in runs:
        with tempfile.TemporaryDirectory(prefix="metadatad-failover-") as tmp:
            print(f"running {provider} (concurrency {concurrency})...", file=sys.stderr)
            results.append(scenario(args, provider, concurrency, Path(tmp)))
    targets = {"dnsmasq": 2.0, "neutron": 10.0}
    print(
        f"\n{args.nodes} nodes, 3 conductors on PostgreSQL, c1 killed -9; heartbeat "
        f"{args.heartbeat_interval:g} s, timeout {args.heartbeat_timeout:g} s\n"
    )
    header = (
        "provider",
        "conc",
        "moved",
        "detect s",
        "push s",
        "total s",
        "target",
        "ironic s",
        "x faster",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    status = 0
    for r in results:
        ironic = IRONIC_DETECTION + math.ceil(r["moved"] / (IRONIC_PER_RUN * 2)) * IRONIC_PERIOD
        target = targets.get(r["provider"]) if r["concurrency"] == args.concurrency else None
        verdict = (
            "-"
            if target is None
            else (f"< {target:g} ok" if r["push"] < target else f"< {target:g} MISSED")
        )
        if target is not None and r["push"] >= target:
            status = 1
        print(
            f"| {r['provider']} | {r['concurrency']} | {r['moved']} | {r['detection']:.2f} | "
            f"{r['push']:.2f} | {r['total']:.2f} | {verdict} | {ironic:.0f} | "
            f"{ironic / r['total']:.0f} |"
        )
    peer = [r for r in results if r["concurrency"] == 1]
    main_neutron = [r for r in results if r["provider"] == "neutron" and r["concurrency"] != 1]
    if peer and main_neutron:
        print(
            f"\nneutron push phase, concurrency {args.concurrency} vs 1 (sequential, Ironic's "
            f"way per node): {peer[0]['push'] / main_neutron[0]['push']:.1f}x faster"
        )
    print(json.dumps(results), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
