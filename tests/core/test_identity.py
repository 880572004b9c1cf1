"""Who is asking: direct callers, trusted proxies, signed proxy headers."""

from __future__ import annotations

import ipaddress

import pytest

from metadatad.core import identity
from metadatad.core.identity import Caller, Identifier, IdentityError, sign_instance_id

SECRET = "s3cret"
UUID = "d8e02d56-2648-49a3-bf97-6be8f1204f38"
PROXIES = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


def headers(**values: str | list[str]):  # type: ignore[no-untyped-def]
    """A header getter over ``values`` (underscores are dashes, names lower-case)."""
    table = {
        name.replace("_", "-").lower(): value if isinstance(value, list) else [value]
        for name, value in values.items()
    }
    return table.get


def test_direct_caller() -> None:
    """Without proxies, the peer address is the caller."""
    assert Identifier().identify("10.0.0.5", headers()) == Caller(ip="10.0.0.5")


def test_ipv4_mapped_and_scoped_addresses_are_normalised() -> None:
    """A dual-stack listener's ::ffff:a.b.c.d is the IPv4 caller; zone ids are dropped."""
    assert Identifier().identify("::ffff:10.0.0.5", headers()).ip == "10.0.0.5"
    assert Identifier().identify("fe80::1%eth0", headers()).ip == "fe80::1"


def test_unusable_peer_address() -> None:
    """A listener without IP peers (a UNIX socket) cannot identify anyone: 403."""
    with pytest.raises(IdentityError) as raised:
        Identifier().identify("", headers())
    assert raised.value.status == 403


def test_spoofed_forwarded_for_is_ignored() -> None:
    """X-Forwarded-For from an untrusted peer changes nothing."""
    identifier = Identifier(PROXIES)
    caller = identifier.identify("10.0.0.5", headers(x_forwarded_for="10.0.0.99"))
    assert caller == Caller(ip="10.0.0.5")


def test_trusted_proxy_forwarded_for() -> None:
    """From a trusted proxy, the right-most untrusted hop is the caller."""
    identifier = Identifier(PROXIES)
    assert identifier.identify("192.0.2.1", headers(x_forwarded_for="10.0.0.7")).ip == "10.0.0.7"
    chain = headers(x_forwarded_for="6.6.6.6, 10.0.0.7, 192.0.2.9")
    assert identifier.identify("192.0.2.1", chain).ip == "10.0.0.7"
    split = headers(x_forwarded_for=["6.6.6.6", "10.0.0.8"])
    assert identifier.identify("192.0.2.1", split).ip == "10.0.0.8"
    only_proxies = headers(x_forwarded_for="192.0.2.7, 192.0.2.8")
    assert identifier.identify("2001:db8::1", only_proxies).ip == "192.0.2.7"


def test_trusted_proxy_without_header_is_the_caller() -> None:
    """A proxy that forwards nothing is itself the caller."""
    assert Identifier(PROXIES).identify("192.0.2.1", headers()).ip == "192.0.2.1"


def test_callers_are_remembered_by_peer_but_not_a_proxy() -> None:
    """A direct caller's identity is remembered by its peer address (the memory is
    bounded); a trusted proxy's is worked out on every request, since its next one may
    forward for a node."""
    identifier = Identifier(PROXIES)
    first = identifier.identify("10.0.0.5", headers())
    assert identifier.identify("10.0.0.5", headers(x_forwarded_for="10.0.0.99")) is first
    assert identifier.identify("192.0.2.1", headers()).ip == "192.0.2.1"
    assert identifier.identify("192.0.2.1", headers(x_forwarded_for="10.0.0.7")).ip == "10.0.0.7"
    for i in range(identity._MAX_PEERS + 10):
        peer = str(ipaddress.ip_address(0x0A000000 + i))
        assert identifier.identify(peer, headers()) == Caller(ip=peer)
    assert len(identifier._by_peer) <= identity._MAX_PEERS


def test_malformed_forwarded_for_from_trusted_proxy() -> None:
    """A trusted proxy sending garbage is a 400, not a guess."""
    with pytest.raises(IdentityError) as raised:
        Identifier(PROXIES).identify("192.0.2.1", headers(x_forwarded_for="10.0.0.7, nonsense"))
    assert raised.value.status == 400


def signed(**overrides: str | list[str]):  # type: ignore[no-untyped-def]
    values: dict[str, str | list[str]] = {
        "x_instance_id": UUID,
        "x_tenant_id": "proj-a",
        "x_instance_id_signature": sign_instance_id(SECRET, UUID),
    }
    values.update(overrides)
    return headers(**{k: v for k, v in values.items() if v != "-"})


def test_signed_headers_good() -> None:
    """A correct signature identifies the instance and tenant, whatever the peer."""
    caller = Identifier(shared_secret=SECRET).identify("10.9.9.9", signed())
    assert caller == Caller(instance_id=UUID, tenant_id="proj-a")


def test_signed_headers_bad_signature() -> None:
    """A wrong signature, or one made with another secret, is a 403."""
    identifier = Identifier(shared_secret=SECRET)
    for signature in ("0" * 64, sign_instance_id("other", UUID), ""):
        with pytest.raises(IdentityError) as raised:
            identifier.identify("10.0.0.1", signed(x_instance_id_signature=signature or "-"))
        assert raised.value.status in (400, 403)
    with pytest.raises(IdentityError) as raised:
        identifier.identify("10.0.0.1", signed(x_instance_id_signature="0" * 64))
    assert raised.value.status == 403
    assert "signature" in raised.value.message.lower()


@pytest.mark.parametrize(
    ("missing", "title"),
    [
        ("x_instance_id", "X-Instance-ID"),
        ("x_tenant_id", "X-Tenant-ID"),
        ("x_instance_id_signature", "X-Instance-ID-Signature"),
    ],
)
def test_signed_headers_missing(missing: str, title: str) -> None:
    """Any one of the three headers missing is a 400 naming it."""
    with pytest.raises(IdentityError) as raised:
        Identifier(shared_secret=SECRET).identify("10.0.0.1", signed(**{missing: "-"}))
    assert raised.value.status == 400
    assert raised.value.message == f"Missing header {title}"


@pytest.mark.parametrize("header", ["x_instance_id", "x_tenant_id", "x_instance_id_signature"])
def test_signed_headers_duplicate(header: str) -> None:
    """A header sent twice (or comma-joined) is a 400."""
    identifier = Identifier(shared_secret=SECRET)
    good = {
        "x_instance_id": UUID,
        "x_tenant_id": "proj-a",
        "x_instance_id_signature": sign_instance_id(SECRET, UUID),
    }
    for duplicate in ([good[header], good[header]], f"{good[header]},{good[header]}"):
        with pytest.raises(IdentityError) as raised:
            identifier.identify("10.0.0.1", signed(**{header: duplicate}))
        assert raised.value.status == 400
        assert raised.value.message.startswith("Duplicate header")


def test_signed_headers_ignored_without_secret() -> None:
    """Without a configured secret the headers prove nothing: the address decides."""
    caller = Identifier().identify("10.0.0.5", signed())
    assert caller == Caller(ip="10.0.0.5")


def test_a_caller_is_remembered_by_its_peer_unless_headers_can_change_it() -> None:
    """Without a signing proxy's secret a peer's caller is remembered once identified
    (headers cannot change it); with one, never (signed headers may name anyone). The
    rate limiter's bucket: the instance id when one was vouched for, else the address."""
    plain = Identifier(PROXIES)
    assert plain.remembered("10.0.0.5") is None
    caller = plain.identify("10.0.0.5", headers())
    assert plain.remembered("10.0.0.5") is caller
    assert caller.rate_key == "ip:10.0.0.5"
    assert caller == Caller(ip="10.0.0.5")
    signing = Identifier(PROXIES, "secret")
    signing.identify("10.0.0.5", headers())
    assert signing.remembered("10.0.0.5") is None
    assert Caller(instance_id="i-1", tenant_id="p").rate_key == "id:i-1"
