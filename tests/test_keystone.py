"""The Keystone v3 token client against a stub of Keystone's token API (StubTreq and a
fake clock): the request it sends, X-Subject-Token, expires_at, caching, refresh
before expiry, shared concurrent fetches and failures."""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from metadatad.config import KeystoneConfig
from metadatad.keystone import (
    KeystoneError,
    KeystoneTokenClient,
    auth_request_body,
    parse_expiry,
    refresh_at,
    tokens_url,
)
from tests.sites import fired
from tests.vendortargets import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub

START = 1_800_000_000.0
CONFIG = KeystoneConfig(
    auth_url="http://keystone.example.org:5000/v3",
    username=KEYSTONE_USER["name"],
    password=KEYSTONE_USER["password"],
    project_name=KEYSTONE_PROJECT["name"],
)


class Harness:
    def __init__(self, config: KeystoneConfig = CONFIG, lifetime: float = 3600.0) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.keystone = KeystoneStub(self.clock.seconds, lifetime)
        self.stub = StubTreq(self.keystone)
        self.client = KeystoneTokenClient(config, self.stub, self.clock)

    def token(self) -> Any:
        d = self.client.token()
        self.stub.flush()
        return fired(d)


def test_request_body_is_v3_password_auth_scoped_to_the_project() -> None:
    """The document Keystone's API reference gives for password auth with a
    project scope, users and projects named with their domains."""
    assert auth_request_body(CONFIG) == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": "metadatad",
                        "domain": {"name": "Default"},
                        "password": "s3cret-service-pw",
                    }
                },
            },
            "scope": {"project": {"name": "service", "domain": {"name": "Default"}}},
        }
    }


@pytest.mark.parametrize(
    "auth_url",
    ["http://k:5000", "http://k:5000/", "http://k:5000/v3", "http://k:5000/v3/"],
)
def test_tokens_url(auth_url: str) -> None:
    assert tokens_url(auth_url) == "http://k:5000/v3/auth/tokens"


def test_parse_expiry_and_refresh_time() -> None:
    """expires_at with microseconds and Z; refresh 5 min early, or half-way for short
    tokens; a time without zone is refused."""
    assert parse_expiry("2027-01-15T08:00:00.000000Z") == START
    assert parse_expiry("2027-01-15T09:00:00+01:00") == START
    with pytest.raises(ValueError):
        parse_expiry("2027-01-15T08:00:00")
    assert refresh_at(0, 3600) == 3300
    assert refresh_at(0, 120) == 60


def test_token_from_x_subject_token_is_cached_until_refresh() -> None:
    """The token comes from the header; it is reused until shortly before expiry."""
    harness = Harness()
    assert harness.token() == "gAAAAA-test-token-0"
    assert harness.keystone.refused == []
    harness.clock.advance(3299)
    assert harness.token() == "gAAAAA-test-token-0"
    assert harness.client.requests == 1
    harness.clock.advance(1)
    assert harness.token() == "gAAAAA-test-token-1"
    assert harness.client.requests == 2


def test_concurrent_callers_share_one_request() -> None:
    harness = Harness()
    pending = [harness.client.token() for _ in range(50)]
    harness.stub.flush()
    assert {fired(d) for d in pending} == {"gAAAAA-test-token-0"}
    assert harness.keystone.issued == ["gAAAAA-test-token-0"]


def test_wrong_password_is_an_error() -> None:
    """Keystone's 401 fails the call with KeystoneError; the password is not in it."""
    harness = Harness(KeystoneConfig(**{**_as_dict(CONFIG), "password": "wrong-pw"}))
    with pytest.raises(KeystoneError) as caught:
        harness.token()
    assert "401" in str(caught.value)
    assert "wrong-pw" not in str(caught.value)
    assert harness.keystone.refused == ["The request you have made requires authentication."]


def test_failed_refresh_keeps_the_valid_token() -> None:
    """Keystone down at refresh time: the old token is used until it expires."""
    harness = Harness()
    assert harness.token() == "gAAAAA-test-token-0"
    harness.keystone.status_override = 503
    harness.clock.advance(3400)
    assert harness.token() == "gAAAAA-test-token-0"
    harness.clock.advance(200)  # now past expires_at
    with pytest.raises(KeystoneError):
        harness.token()


def test_answer_without_subject_token_or_expiry_is_an_error() -> None:
    """201 without X-Subject-Token, or without token.expires_at: refused."""
    from twisted.web.resource import Resource

    class Odd(Resource):
        isLeaf = True

        def __init__(self, header: bool, body: bytes) -> None:
            super().__init__()
            self.header, self.body = header, body

        def render_POST(self, request: Any) -> bytes:
            request.setResponseCode(201)
            if self.header:
                request.setHeader(b"X-Subject-Token", b"tok")
            return self.body

    for header, body, detail in [
        (False, b'{"token": {"expires_at": "2030-01-01T00:00:00Z"}}', "X-Subject-Token"),
        (True, b'{"token": {}}', "expires_at"),
        (True, b"not json", "expires_at"),
    ]:
        clock = Clock()
        stub = StubTreq(Odd(header, body))
        client = KeystoneTokenClient(CONFIG, stub, clock)
        d = client.token()
        stub.flush()
        with pytest.raises(KeystoneError, match=detail):
            fired(d)


def test_invalidate_fetches_a_new_token() -> None:
    harness = Harness()
    assert harness.token() == "gAAAAA-test-token-0"
    harness.client.invalidate()
    assert harness.token() == "gAAAAA-test-token-1"


def _as_dict(config: KeystoneConfig) -> dict[str, Any]:
    import attrs

    return attrs.asdict(config)
