"""The daemon's one Keystone v3 token client, against the Keystone stub (StubTreq and a
fake clock; real TLS on loopback for ``ca_file``): the request body it sends,
X-Subject-Token, expires_at, caching and refresh before expiry, shared concurrent
fetches, invalidation, the service catalog, permanent and transient failures, the
static token, and one client shared by dynamic vendordata and the Neutron provider.
The stub validates every request body it receives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from metadatad.clients.keystone import (
    KeystoneError,
    KeystoneTokenClient,
    StaticToken,
    auth_request_body,
    catalog_endpoint,
    make_keystone_client,
    parse_expiry,
    refresh_at,
    tokens_url,
)
from metadatad.config import Config, ConfigError, KeystoneConfig, load_config
from metadatad.testing.keystone import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub
from tests.app.test_tap import build, migrated_url, services, write_conf
from tests.support.sites import fired
from tests.support.vendortargets import CertificateAuthority, listen

__all__ = ["migrated_url", "services"]  # fixtures, used here by name

START = 1_800_000_000.0
CONFIG = KeystoneConfig(
    auth_url="http://keystone.example.org:5000/v3",
    username=KEYSTONE_USER["name"],
    password=KEYSTONE_USER["password"],
    project_name=KEYSTONE_PROJECT["name"],
)
NEUTRON = "http://neutron.example.org:9696"
CATALOG = [
    {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k:5000/v3"}]},
    {
        "type": "network",
        "endpoints": [
            {"interface": "internal", "url": "http://10.0.0.9:9696"},
            {"interface": "public", "url": NEUTRON + "/"},
        ],
    },
]


class Harness:
    """A client over StubTreq on the Keystone stub, with a fake clock at START."""

    def __init__(
        self,
        config: KeystoneConfig = CONFIG,
        lifetime: float = 3600.0,
        catalog: list[dict[str, Any]] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.keystone = KeystoneStub(self.clock.seconds, lifetime, catalog)
        self.stub = StubTreq(self.keystone)
        self.client = KeystoneTokenClient(config, self.stub, self.clock)

    def token(self) -> Any:
        d = self.client.token()
        self.stub.flush()
        return fired(d)


# --- pure parts -------------------------------------------------------------------------


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
    """auth_url is accepted with or without its /v3 and trailing slash."""
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


def test_catalog_endpoint() -> None:
    """The URL of the asked interface, without trailing slash; None when the type or
    interface is missing; malformed entries are skipped."""
    assert catalog_endpoint(CATALOG, "network", "public") == NEUTRON
    assert catalog_endpoint(CATALOG, "network", "internal") == "http://10.0.0.9:9696"
    assert catalog_endpoint(CATALOG, "network", "admin") is None
    assert catalog_endpoint(CATALOG, "compute", "public") is None
    odd = ["x", {"type": "network"}, {"type": "network", "endpoints": ["y", {"url": 3}]}]
    assert catalog_endpoint(odd, "network", "public") is None


# --- the client ----------------------------------------------------------------------------


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
    assert harness.keystone.issued == ["gAAAAA-test-token-0", "gAAAAA-test-token-1"]


def test_concurrent_callers_share_one_request() -> None:
    """Fifty callers while no token is cached: one POST, the same token for all."""
    harness = Harness()
    pending = [harness.client.token() for _ in range(50)]
    harness.stub.flush()
    assert {fired(d) for d in pending} == {"gAAAAA-test-token-0"}
    assert harness.keystone.issued == ["gAAAAA-test-token-0"]


def test_catalog_gives_the_endpoint_after_the_first_token() -> None:
    """endpoint() is None before a token is fetched, then the catalog's URL."""
    harness = Harness(catalog=CATALOG)
    assert harness.client.endpoint("network") is None
    harness.token()
    assert harness.client.endpoint("network") == NEUTRON
    assert harness.client.endpoint("network", "internal") == "http://10.0.0.9:9696"
    assert harness.client.endpoint("image") is None


def test_a_token_without_catalog_has_no_endpoints() -> None:
    """Keystone may leave the catalog out (``?nocatalog``): no endpoint, no error."""
    harness = Harness()
    harness.token()
    assert harness.client.endpoint("network") is None


def test_invalidate_fetches_a_new_token() -> None:
    """After a service refused the token (vendordata: no argument; Neutron: the token
    it sent), the next call authenticates again."""
    harness = Harness()
    assert harness.token() == "gAAAAA-test-token-0"
    harness.client.invalidate()
    assert harness.token() == "gAAAAA-test-token-1"
    harness.client.invalidate("gAAAAA-test-token-1")
    assert harness.token() == "gAAAAA-test-token-2"
    assert harness.client.requests == 3


def test_invalidating_an_old_token_keeps_the_new_one() -> None:
    """A 401 for a token already replaced does not throw the new token away."""
    harness = Harness()
    old = harness.token()
    harness.client.invalidate(old)
    new = harness.token()
    harness.client.invalidate(old)
    assert harness.token() == new
    assert harness.client.requests == 2


def test_wrong_password_is_a_permanent_error() -> None:
    """Keystone's 401 fails the call with a permanent KeystoneError; the password is
    not in it."""
    harness = Harness(attrs.evolve(CONFIG, password="wrong-pw"))
    with pytest.raises(KeystoneError) as caught:
        harness.token()
    assert caught.value.permanent
    assert "401" in str(caught.value)
    assert "wrong-pw" not in str(caught.value)
    assert harness.keystone.refused == ["The request you have made requires authentication."]


def test_unavailable_keystone_is_a_transient_error() -> None:
    """A 503 is worth retrying: not permanent; the next call asks again."""
    harness = Harness()
    harness.keystone.status_override = 503
    with pytest.raises(KeystoneError) as caught:
        harness.token()
    assert not caught.value.permanent and "503" in str(caught.value)
    harness.keystone.status_override = None
    assert harness.token() == "gAAAAA-test-token-0"


def test_no_answer_times_out_as_a_transient_error() -> None:
    """A Keystone that never answers fails the call after the timeout (on the
    injected clock), not permanently."""

    class Hang(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> Any:
            return NOT_DONE_YET

    clock = Clock()
    stub = StubTreq(Hang())
    client = KeystoneTokenClient(CONFIG, stub, clock, timeout=5.0)
    d = client.token()
    stub.flush()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(KeystoneError) as caught:
        fired(d)
    assert not caught.value.permanent


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


def test_neither_password_nor_token_is_logged() -> None:
    """Success, refusal and outage are logged without the password or a token."""
    with capturedLogs() as events:
        harness = Harness()
        token = harness.token()
        harness.keystone.status_override = 503
        harness.clock.advance(3400)
        harness.token()
        refused = Harness(attrs.evolve(CONFIG, password="wrong-pw"))
        with pytest.raises(KeystoneError):
            refused.token()
    assert len(events) >= 3
    for event in events:
        text = formatEvent(event) + repr(event)
        for secret in (CONFIG.password, "wrong-pw", token):
            assert secret not in text, event


# --- the static token -------------------------------------------------------------------


def test_static_token() -> None:
    """The same interface: the token, a no-op invalidate, no catalog; repr hides it."""
    static = StaticToken("static-secret")
    assert fired(static.token()) == "static-secret"
    static.invalidate("static-secret")
    assert fired(static.token()) == "static-secret"
    assert static.endpoint("network") is None
    assert "static-secret" not in repr(static)


# --- construction: [keystone] ca_file, one client for the daemon ----------------------------


def _config(tmp_path: Path, text: str) -> Config:
    conf = tmp_path / "k.conf"
    conf.write_text(text, encoding="utf-8")
    return load_config(conf)


def test_no_client_without_auth_url(tmp_path: Path) -> None:
    """Without [keystone] auth_url there is no Keystone client."""
    assert make_keystone_client(_config(tmp_path, "[keystone]\n"), global_reactor) is None


def test_unusable_ca_file_is_a_config_error() -> None:
    """A CA file that is not PEM stops start-up with a line naming [keystone] ca_file."""
    config = Config(path="k.conf", keystone=attrs.evolve(CONFIG, ca_file="/dev/null/ca.pem"))
    with pytest.raises(ConfigError, match=r"^k.conf: \[keystone\] ca_file: "):
        make_keystone_client(config, global_reactor)


@pytest_twisted.ensureDeferred
async def test_https_keystone_is_trusted_through_ca_file(tmp_path: Path) -> None:
    """Over real TLS on loopback: the CA of [keystone] ca_file verifies Keystone's
    certificate; without it (the system's trust store) the call fails."""
    import time

    ca = CertificateAuthority()
    keystone = KeystoneStub(time.time)
    port, number = listen(keystone, ca.issue("localhost", "127.0.0.1"))
    base = (
        "[keystone]\n"
        f"auth_url = https://127.0.0.1:{number}/v3\n"
        f"username = {KEYSTONE_USER['name']}\npassword = {KEYSTONE_USER['password']}\n"
        f"project_name = {KEYSTONE_PROJECT['name']}\n"
    )
    trusted = make_keystone_client(
        _config(tmp_path, base + f"ca_file = {ca.write(tmp_path / 'ca.pem')}\n"),
        global_reactor,
    )
    untrusted = make_keystone_client(_config(tmp_path, base), global_reactor)
    assert trusted is not None and untrusted is not None
    try:
        assert await trusted.token() == "gAAAAA-test-token-0"
        with pytest.raises(KeystoneError) as caught:
            await untrusted.token()
        assert not caught.value.permanent
        assert keystone.issued == ["gAAAAA-test-token-0"]
    finally:
        for client in (trusted, untrusted):
            await client._http._agent._pool.closeCachedConnections()
        await port.stopListening()


def test_neutron_timeout_applies_to_keystone_when_neutron_uses_it(tmp_path: Path) -> None:
    """The Neutron provider's requests (Keystone's too) time out after
    neutron_timeout; otherwise Keystone gets 10 s."""
    keystone = (
        "[keystone]\nauth_url = http://127.0.0.1:5000/v3\nusername = md\npassword = pw\n"
        "project_name = service\n"
    )
    plain = make_keystone_client(_config(tmp_path, keystone), global_reactor)
    assert plain is not None and plain._timeout == 10.0
    neutron = make_keystone_client(
        _config(
            tmp_path,
            keystone + "[dhcp]\nprovider = neutron\nneutron_timeout = 4\n"
            "[conductor]\ntftp_address = 10.0.0.5\n",
        ),
        global_reactor,
    )
    assert neutron is not None and neutron._timeout == 4.0


def test_keystone_timeout_key_wins(tmp_path: Path) -> None:
    """``[keystone] timeout`` sets Keystone's own time-out, with or without Neutron."""
    keystone = (
        "[keystone]\nauth_url = http://127.0.0.1:5000/v3\nusername = md\npassword = pw\n"
        "project_name = service\ntimeout = 2.5\n"
    )
    plain = make_keystone_client(_config(tmp_path, keystone), global_reactor)
    assert plain is not None and plain._timeout == 2.5
    neutron = make_keystone_client(
        _config(
            tmp_path,
            keystone + "[dhcp]\nprovider = neutron\nneutron_timeout = 4\n"
            "[conductor]\ntftp_address = 10.0.0.5\n",
        ),
        global_reactor,
    )
    assert neutron is not None and neutron._timeout == 2.5


def test_vendordata_and_neutron_share_one_client(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """makeService builds one Keystone client (one token) for dynamic vendordata and
    the Neutron DHCP provider."""
    conf = write_conf(tmp_path, migrated_url)
    conf.write_text(
        conf.read_text(encoding="utf-8")
        + "[vendordata]\ndynamic_targets = testing@http://127.0.0.1:9/vd\n"
        "[dhcp]\nprovider = neutron\n[conductor]\ntftp_address = 10.0.0.5\n"
        "[keystone]\nauth_url = http://127.0.0.1:5000/v3\nusername = md\npassword = pw\n"
        "project_name = service\n",
        encoding="utf-8",
    )
    root = build(conf, services)
    vendordata = root.getServiceNamed("vendordata")
    provider = root.getServiceNamed("dhcp").provider  # type: ignore[attr-defined]
    assert isinstance(vendordata._token_source, KeystoneTokenClient)  # type: ignore[attr-defined]
    assert provider._tokens is vendordata._token_source  # type: ignore[attr-defined]
