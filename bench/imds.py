"""What IMDSv2 tokens and the hardening cost the metadata site, measured in one run.

    .venv/bin/python -P bench/imds.py [--requests 20000] [--rounds 7]

(``-P`` keeps bench/ off sys.path: bench/http.py would shadow the stdlib's ``http``.)

In one process, the real :class:`~metadatad.metadata.site.MetadataSite` (a warm node
cache over an in-memory store, the node at 127.0.0.1) is served to keep-alive
connections over ``StringTransport``: every request goes through twisted.web's HTTP
parser, the Site, Klein and the site, as in the daemon, with no sockets and no other
process in the measurement.  Variants, each timed in CPU time per request over the same
``GET /latest/meta-data/instance-id`` (rounds interleaved; the median over the rounds,
and the minimum, the steadier figure when other processes share the machine):

* **baseline**: the site with the gate doing nothing, served by ``QuietSite`` (the
  daemon's Site before this work);
* **+ gate**: the gate as the daemon builds it by default (token checks, the per-node
  bucket kept on every request; the rate set so high it never refuses);
* **+ hardened channel**: also ``HardenedSite`` (header/body limits, the per-request
  deadline, per-source counting);
* **+ IMDSv2 token**: also an ``X-aws-ec2-metadata-token`` header, verified per request;
* **token PUT**: ``PUT /latest/api/token`` (HMAC signing; no socket here, so no TTL).

Every response is checked to be the expected 200.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from metadatad.core.identity import Identifier
from metadatad.core.nodes import parse_node
from metadatad.core.ratelimit import RateLimiter
from metadatad.core.tokens import TokenSigner
from metadatad.db.cache import NodeCache
from metadatad.hardening import HardenedSite, Limits
from metadatad.metadata.guard import Guard, Screened
from metadatad.metadata.site import MetadataSite
from metadatad.tap import QuietSite
from metadatad.testing import MemoryStore

UUID = "d8e02d56-2648-49a3-bf97-6be8f1204f38"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
GET = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
PUT = (
    b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"X-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\n\r\n"
)


class NoGate(Guard):
    """A gate that lets everything through without looking: the baseline."""

    def screen(self, request: Any, parts: list[str]) -> Screened:  # type: ignore[override]
        return Screened(token_request=parts[1:] == ["api", "token"], ttl=21600)

    def admit(self, caller: Any, screened: Screened) -> None:  # type: ignore[override]
        return None

    def authorise(self, screened: Screened, node_uuid: str | None) -> None:  # type: ignore[override]
        return None


def make_site(gate: Callable[[Clock], Guard]) -> Any:
    store = MemoryStore()
    store.repository.upsert_nodes(
        [
            parse_node(
                {
                    "uuid": UUID,
                    "name": "bench",
                    "ports": [{"mac": "52:54:00:12:34:56", "ip": "127.0.0.1"}],
                }
            )
        ]
    )
    clock = Clock()
    clock.advance(time.time())
    cache = NodeCache(
        store.node_by_ip, store.get_node, clock, 1e9, generation=store.node_generation
    )
    return MetadataSite(cache, store, Identifier(), guard=gate(clock)).resource(), clock


def default_gate(clock: Clock) -> Guard:
    # As make_guard builds it, but a rate no loop here reaches: the bucket is kept, never empty.
    return Guard(clock, TokenSigner("bench-secret"), limiter=RateLimiter(1e9, 1e9))


class Variant:
    """One server set-up and the request it is sent; ``us`` holds CPU µs per request."""

    def __init__(self, name: str, factory: Any, request: bytes, expect: bytes) -> None:
        self.name = name
        self.request = request
        self.expect = expect
        self.us: list[float] = []
        self.channel = factory.buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)

    def once(self) -> bytes:
        self.transport.clear()
        self.channel.dataReceived(self.request)
        return self.transport.value()

    def check(self) -> None:
        response = self.once()
        if not response.startswith(b"HTTP/1.1 200 ") or not response.endswith(self.expect):
            raise SystemExit(f"{self.name}: unexpected response {response[:300]!r}")

    def run(self, n: int) -> None:
        data = self.channel.dataReceived
        clear = self.transport.clear
        request = self.request
        start = time.process_time()
        for _ in range(n):
            clear()
            data(request)
        self.us.append((time.process_time() - start) / n * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (7)")
    args = parser.parse_args(argv)

    plain_resource, _ = make_site(NoGate)
    gated_resource, gated_clock = make_site(default_gate)
    token = TokenSigner("bench-secret").issue(UUID, 21600, gated_clock.seconds())
    limits = Limits()
    get = GET + b"\r\n"
    with_token = GET + b"X-aws-ec2-metadata-token: " + token.encode() + b"\r\n\r\n"
    # The global reactor (not running) schedules the per-request deadline, as in the
    # daemon: Clock's callLater sorts a list and would overstate it.
    from twisted.internet import reactor

    hardened = HardenedSite(gated_resource, limits, "bench", reactor=reactor)
    variants = [
        Variant("baseline (no gate, QuietSite)", QuietSite(plain_resource), get, UUID.encode()),
        Variant("+ gate (QuietSite)", QuietSite(gated_resource), get, UUID.encode()),
        Variant("+ hardened channel (HardenedSite)", hardened, get, UUID.encode()),
        Variant("+ IMDSv2 token on every GET", hardened, with_token, UUID.encode()),
    ]
    # The hardened site caps connections per source: the token PUT gets its own channel.
    put = Variant("token PUT (HardenedSite)", hardened, PUT, b"")
    variants.append(put)
    for variant in variants:
        variant.check()
    print(f"python {sys.version.split()[0]}; {args.rounds} rounds x {args.requests} requests")
    gc.collect()
    for _ in range(args.rounds):
        for variant in variants:
            variant.run(args.requests)
    base = statistics.median(variants[0].us)
    base_min = min(variants[0].us)
    print(
        f"{'variant':<38} {'cpu us/req':>10} {'x baseline':>10} {'+us':>6} "
        f"{'min us':>7} {'+us min':>7}   us of each round"
    )
    for variant in variants:
        us, low = statistics.median(variant.us), min(variant.us)
        rounds = " ".join(f"{u:.0f}" for u in variant.us)
        print(
            f"{variant.name:<38} {us:>10.1f} {base / us:>10.2f} {us - base:>+6.1f} "
            f"{low:>7.1f} {low - base_min:>+7.1f}   {rounds}"
        )
    for variant in variants:
        variant.check()
    print("every response was the expected 200")
    return 0


if __name__ == "__main__":
    sys.exit(main())
