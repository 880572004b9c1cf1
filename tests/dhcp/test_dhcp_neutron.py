"""The Neutron provider against the checked Neutron/Keystone stub, over real HTTP on
loopback: token handling, 5xx and timeouts retried, 404 recorded as permanent, no
duplicate PUTs (also through the durable pusher)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import maybeDeferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from metadatad.clients.keystone import KeystoneTokenClient, StaticToken
from metadatad.config import KeystoneConfig
from metadatad.core.bootmapping import BootDefaults, boot_mapping, retraction
from metadatad.core.conductors import ConductorInfo
from metadatad.db.cluster import ClusterRepository
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.db.store import NodeRepository, make_engine
from metadatad.dhcp.neutron import NeutronProvider
from metadatad.dhcp.provider import PushError
from metadatad.dhcp.pusher import DhcpPusher
from metadatad.testing import NeutronStub
from tests.support.factories import make_node

CREDENTIALS = {
    "username": "metadatad",
    "password": "s3cret",
    "user_domain_name": "Default",
    "project_name": "service",
    "project_domain_name": "Default",
}
KEYSTONE = KeystoneConfig(
    auth_url="", username="metadatad", password="s3cret", project_name="service"
)


class Loopback:
    """The stub listening on 127.0.0.1 and a treq client for it."""

    def __init__(self) -> None:
        self.stub = NeutronStub(ports=[f"port-{i}" for i in range(40)], credentials=CREDENTIALS)
        reactor: Any = global_reactor
        self.reactor = reactor
        self.port = reactor.listenTCP(0, Site(self.stub.resource()), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.stub.neutron_url = self.url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def provider(self, keystone: bool = True, **kwargs: Any) -> NeutronProvider:
        tokens: Any
        if keystone:
            settings = KeystoneConfig(**{**_fields(KEYSTONE), "auth_url": self.url + "/v3"})
            tokens = KeystoneTokenClient(settings, self.http, self.reactor)
            url = ""  # from the catalog
        else:
            self.stub.static_tokens.add("static-token")
            tokens = StaticToken("static-token")
            url = self.url
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("backoff", 0.01)
        return NeutronProvider(self.http, self.reactor, tokens, url, **kwargs)

    def close(self) -> Any:
        for request in self.stub.hanging:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        d = self.pool.closeCachedConnections()
        d.addCallback(lambda _: self.port.stopListening())
        return d


def _fields(settings: KeystoneConfig) -> dict[str, Any]:
    import attrs

    return attrs.asdict(settings)


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    lb = Loopback()
    yield lb
    pytest_twisted.blockon(lb.close())


def mapping_for(index: int, ports: list[str]) -> Any:
    node = make_node(
        index,
        ports=[
            {"mac": f"52:54:00:00:{index:02x}:{p:02x}", "pxe": True, "neutron_port_id": port}
            for p, port in enumerate(ports)
        ],
    )
    return boot_mapping(node, "10.0.0.5", "", BootDefaults())


@pytest_twisted.inlineCallbacks
def test_push_with_keystone_token_sets_ironics_options(loopback: Loopback) -> Any:
    """Each port gets Ironic's options in one PUT; one Keystone request serves all;
    the Neutron URL comes from the catalog."""
    provider = loopback.provider()
    yield provider.push(mapping_for(0, ["port-0", "port-1"]), None, 1)
    yield provider.push(mapping_for(1, ["port-2"]), None, 1)
    assert [port for port, _ in loopback.stub.puts] == ["port-0", "port-1", "port-2"]
    assert loopback.stub.auth_requests == 1
    assert loopback.stub.ports["port-0"] == {
        ("tag:!ipxe,67", 4): "snponly.efi",
        ("tag:ipxe,67", 4): f"tftp://10.0.0.5/{make_node(0).uuid}.ipxe",
        ("66", 4): "10.0.0.5",
        ("150", 4): "10.0.0.5",
        ("255", 4): "10.0.0.5",
    }


@pytest_twisted.inlineCallbacks
def test_5xx_and_timeouts_are_retried_without_duplicates(loopback: Loopback) -> Any:
    """A 500, a 503 and a request that never answers (timeout) are retried; only the
    failing port is sent again; each port's options are applied once."""
    provider = loopback.provider(keystone=False, timeout=0.3, retries=3)
    loopback.stub.faults = [500, 503, "hang"]
    yield provider.push(mapping_for(0, ["port-0"]), None, 1)
    assert [port for port, _ in loopback.stub.puts] == ["port-0"] * 4
    assert [port for port, _ in loopback.stub.accepted] == ["port-0"]
    loopback.stub.faults = [503]
    yield provider.push(mapping_for(1, ["port-1", "port-2"]), None, 1)
    assert [port for port, _ in loopback.stub.puts[4:]] == ["port-1", "port-2", "port-1"]
    assert sorted(port for port, _ in loopback.stub.accepted[1:]) == ["port-1", "port-2"]


@pytest_twisted.inlineCallbacks
def test_404_is_permanent_and_not_retried(loopback: Loopback) -> Any:
    """A port Neutron does not know is a permanent error with Neutron's message."""
    provider = loopback.provider(keystone=False)
    with pytest.raises(PushError) as caught:
        yield provider.push(mapping_for(0, ["no-such-port"]), None, 1)
    assert caught.value.permanent
    assert "404" in caught.value.message and "could not be found" in caught.value.message
    assert len(loopback.stub.puts) == 1


@pytest_twisted.inlineCallbacks
def test_exhausted_retries_fail_retryably_and_revoked_tokens_renew(loopback: Loopback) -> Any:
    """Five 503s exhaust 3 retries (a retryable PushError); a revoked token (401) is
    renewed from Keystone and the PUT succeeds."""
    provider = loopback.provider(retries=3)
    loopback.stub.faults = [503] * 4
    with pytest.raises(PushError) as caught:
        yield provider.push(mapping_for(0, ["port-0"]), None, 1)
    assert not caught.value.permanent and "after 4 attempts" in caught.value.message
    loopback.stub.tokens.clear()  # revoked
    yield provider.push(mapping_for(0, ["port-0"]), None, 1)
    assert loopback.stub.auth_requests == 2
    assert loopback.stub.accepted[-1][0] == "port-0"


@pytest_twisted.inlineCallbacks
def test_retraction_deletes_the_options(loopback: Loopback) -> Any:
    """A deleted node's options are removed with opt_value null."""
    provider = loopback.provider(keystone=False)
    mapping = mapping_for(0, ["port-0"])
    yield provider.push(mapping, None, 1)
    yield provider.push(retraction(mapping, mapping.node_uuid, ()), mapping, 1)
    assert loopback.stub.ports["port-0"] == {}


@pytest_twisted.inlineCallbacks
def test_pusher_pushes_each_port_once(loopback: Loopback, tmp_path: Any) -> Any:
    """Through the durable pusher: 30 nodes with 503s sprinkled in are each applied
    exactly once, a 404 node is recorded as failed, and a reconcile sends nothing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'n.sqlite'}", 2)
    from metadatad.db.migrate import upgrade

    upgrade(engine)
    nodes = [
        make_node(
            i,
            ports=[
                {
                    "mac": f"52:54:00:01:00:{i:02x}",
                    "pxe": True,
                    "neutron_port_id": f"port-{i}" if i < 30 else "gone",
                }
            ],
        )
        for i in range(31)
    ]
    NodeRepository(engine).upsert_nodes(nodes)
    cluster = ClusterRepository(engine)
    info = ConductorInfo("a", "", "10.0.0.5")
    cluster.heartbeat(info, "x")
    generation = cluster.observe(60).generation
    cluster.claim("a", "", generation, [n.uuid for n in nodes])
    repository = DhcpPushRepository(engine)
    loopback.stub.faults = [503, 500, 503]
    pusher = DhcpPusher(
        repository,
        loopback.provider(keystone=False),
        info,
        BootDefaults(),
        loopback.reactor,
        concurrency=10,
        retry_min=60,  # the 404's bounded retries fall after the test
        retry_max=60,
        run=maybeDeferred,
    )
    pusher.running = True  # driven directly: no timers, no threads
    try:
        yield pusher._run_cycle()  # the start-up reconcile, driven directly
        pusher._want_full = True
        yield pusher._run_cycle()
    finally:
        engine.dispose()
    applied = sorted(port for port, _ in loopback.stub.accepted)
    assert applied == sorted(f"port-{i}" for i in range(30))
    assert len(loopback.stub.puts) == 31 + 3
    assert repository.counts() == {"pushed": 30, "failed": 1, "pending": 0}
    state = repository.state(nodes[30].uuid)
    assert state is not None and "PortNotFound" not in (state.last_error or "")
    assert "could not be found" in (state.last_error or "")
