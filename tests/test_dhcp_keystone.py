"""Keystone v3 password tokens: cached until expiry, shared by concurrent callers,
renewed after invalidation; bad credentials are a permanent error.  Driven in memory
(StubTreq over the checked Keystone stub) with a Clock."""

from __future__ import annotations

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from metadatad.config import KeystoneConfig
from metadatad.dhcp.keystone import EXPIRY_MARGIN, KeystoneError, KeystoneTokens
from metadatad.testing import NeutronStub
from tests.sites import fired

SETTINGS = KeystoneConfig(
    auth_url="http://keystone.test/v3",
    username="metadatad",
    password="s3cret",
    project_name="service",
)
CREDENTIALS = {
    "username": "metadatad",
    "password": "s3cret",
    "user_domain_name": "Default",
    "project_name": "service",
    "project_domain_name": "Default",
}


def make(
    settings: KeystoneConfig = SETTINGS,
) -> tuple[KeystoneTokens, NeutronStub, Clock, StubTreq]:
    clock = Clock()
    clock.advance(1_800_000_000)
    stub = NeutronStub(
        credentials=CREDENTIALS, now=clock.seconds, neutron_url="http://neutron.test:9696"
    )
    http = StubTreq(stub.resource())
    return KeystoneTokens(settings, http, clock), stub, clock, http


def test_token_is_cached_until_shortly_before_expiry() -> None:
    """One request for any number of calls until expires_at minus the margin; the
    catalog gives Neutron's endpoint."""
    tokens, stub, clock, http = make()
    first, second = tokens.token(), tokens.token()  # concurrent: one request
    http.flush()
    token = fired(first)
    assert fired(second) == token and stub.auth_requests == 1
    assert token in stub.tokens
    assert tokens.endpoint("network") == "http://neutron.test:9696"
    clock.advance(3600 - EXPIRY_MARGIN - 1)
    assert fired(tokens.token()) == token and stub.auth_requests == 1
    clock.advance(2)
    d = tokens.token()
    http.flush()
    assert fired(d) != token and stub.auth_requests == 2


def test_invalidated_token_is_renewed() -> None:
    """After a 401 the caller invalidates the token: the next call authenticates."""
    tokens, stub, _, http = make()
    d = tokens.token()
    http.flush()
    token = fired(d)
    tokens.invalidate(token)
    d = tokens.token()
    http.flush()
    assert fired(d) != token and stub.auth_requests == 2


def test_wrong_password_is_a_permanent_error() -> None:
    """Keystone's 401 is a permanent KeystoneError that never shows the password."""
    tokens, _stub, _, http = make(attrs.evolve(SETTINGS, password="nope"))
    d = tokens.token()
    http.flush()
    with pytest.raises(KeystoneError) as caught:
        fired(d)
    assert caught.value.permanent and "401" in str(caught.value)
    assert "nope" not in str(caught.value)
