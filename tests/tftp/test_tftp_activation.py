"""TFTP on sockets passed by systemd: the ``systemd:`` syntax, finding the inherited
descriptor by index or name, refusing the wrong kind of socket, and adopting a real
UDP socket into the reactor (wildcard sockets with IP_PKTINFO)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from metadatad.core.systemd import SystemdSocket, parse
from metadatad.tftp import listening
from metadatad.tftp.listening import ActivationError, PktinfoPort


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Two sockets on consecutive descriptors, like systemd passes: TCP, then UDP."""
    made: list[socket.socket] = []
    try:
        for _ in range(20):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            made += [tcp, udp]
            if udp.fileno() == tcp.fileno() + 1:
                tcp.bind(("127.0.0.1", 0))
                udp.bind(("127.0.0.1", 0))
                yield [tcp, udp]
                return
        pytest.fail("no two consecutive descriptors")
    finally:
        for s in made:
            s.close()


def environ(count: int, names: str) -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(count), "LISTEN_FDNAMES": names}


def test_parse() -> None:
    """Index or name, INET or INET6; anything else is a ValueError naming the form."""
    assert parse("systemd:domain=INET:index=1") == SystemdSocket(
        "systemd:domain=INET:index=1", "INET", 1, None
    )
    assert parse("systemd:domain=INET6:name=tftp").name == "tftp"
    for bad in (
        "systemd:domain=INET",
        "systemd:index=0",
        "systemd:domain=INET:index=0:index=1",
        "systemd:domain=INET:port=69",
        "tcp:69",
    ):
        with pytest.raises(ValueError):
            parse(bad)


def test_find_by_index_and_name(sockets: list[socket.socket]) -> None:
    """LISTEN_FDS/LISTEN_FDNAMES of this process give the descriptor; another
    process's variables (LISTEN_PID) or a missing index or name are one-line errors."""
    tcp, udp = sockets
    env = environ(2, "metadata:tftp")
    start = tcp.fileno()
    assert listening.find_descriptor(parse("systemd:domain=INET:index=1"), env, start) == (
        udp.fileno()
    )
    assert listening.find_descriptor(parse("systemd:domain=INET:name=tftp"), env, start) == (
        udp.fileno()
    )
    with pytest.raises(ActivationError, match="passed 2 sockets, no index 2"):
        listening.find_descriptor(parse("systemd:domain=INET:index=2"), env, start)
    with pytest.raises(ActivationError, match=r"no socket named 'boot' \(names: metadata, tftp\)"):
        listening.find_descriptor(parse("systemd:domain=INET:name=boot"), env, start)
    elsewhere = dict(env, LISTEN_PID="1")
    with pytest.raises(ActivationError, match="passed 0 sockets"):
        listening.find_descriptor(parse("systemd:domain=INET:index=0"), elsewhere, start)


def test_inspect_refuses_the_wrong_socket(sockets: list[socket.socket]) -> None:
    """A TCP socket, or a socket of the other family, is refused; a UDP one is
    described by its family and bound address."""
    tcp, udp = sockets
    with pytest.raises(ActivationError, match="not a INET UDP socket"):
        listening.inspect(tcp.fileno(), parse("systemd:domain=INET:index=0"))
    with pytest.raises(ActivationError, match="not a INET6 UDP socket"):
        listening.inspect(udp.fileno(), parse("systemd:domain=INET6:index=1"))
    family, host, port = listening.inspect(udp.fileno(), parse("systemd:domain=INET:index=1"))
    assert (family, host, port) == (socket.AF_INET, "127.0.0.1", udp.getsockname()[1])


class Echo:
    """A datagram protocol that hands the first datagram to a Deferred."""

    def __init__(self) -> None:
        self.received: Deferred[tuple[bytes, Any]] = Deferred()
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.callback((datagram, addr))

    def pktinfoReceived(self, datagram: bytes, addr: Any, local: Any, dest: Any) -> None:
        self.received.callback((datagram, (local, dest)))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest_twisted.inlineCallbacks
def test_adopted_socket_receives(host: str) -> Iterator[Any]:
    """A socket on one address is adopted as a plain UDP port; one on 0.0.0.0 becomes a
    PktinfoPort that learns the address each datagram was sent to."""
    from twisted.internet import reactor

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    port_number = sock.getsockname()[1]
    protocol = Echo()
    port = listening.adopt(reactor, sock.fileno(), socket.AF_INET, host, protocol)
    try:
        assert isinstance(port, PktinfoPort) == (host == "0.0.0.0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"\x00\x01hello\x00octet\x00", ("127.0.0.1", port_number))
            datagram, where = yield protocol.received
        assert datagram.startswith(b"\x00\x01hello")
        if host == "0.0.0.0":
            assert where == ("127.0.0.1", "127.0.0.1")
    finally:
        yield port.stopListening()
        sock.close()
