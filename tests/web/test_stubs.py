"""The Keystone and Neutron stubs of metadatad.testing check what they receive: one
Keystone stub, whose tokens the Neutron stub accepts until they expire."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock

from metadatad.testing import KEYSTONE_PROJECT, KEYSTONE_USER, KeystoneStub, NeutronStub
from tests.support.sites import fired

CREDENTIALS = {
    "username": "neutron-user",
    "password": "neutron-pw",
    "user_domain_name": "Default",
    "project_name": "service",
    "project_domain_name": "Default",
}
OPTIONS = {"port": {"extra_dhcp_opts": [{"opt_name": "66", "opt_value": "10.0.0.5"}]}}


def auth(user: str, password: str, project: str = KEYSTONE_PROJECT["name"]) -> dict[str, Any]:
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"name": "Default"}, "password": password}
                },
            },
            "scope": {"project": {"name": project, "domain": {"name": "Default"}}},
        }
    }


def call(treq: StubTreq, method: str, url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    response = fired(treq.request(method, url, **kwargs))
    body = fired(response.content())
    treq.flush()
    return response.code, response.headers, json.loads(body) if body else None


def test_keystone_stub_issues_tokens_that_expire() -> None:
    """Password auth issues a token valid for the lifetime; wrong credentials are 401,
    a malformed body 400, another media type 415."""
    clock = Clock()
    keystone = KeystoneStub(clock.seconds, lifetime=60)
    treq = StubTreq(keystone)
    url = "http://keystone/v3/auth/tokens"
    json_type = {"Content-Type": "application/json"}
    body = json.dumps(auth(KEYSTONE_USER["name"], KEYSTONE_USER["password"]))
    status, headers, document = call(treq, "POST", url, data=body, headers=json_type)
    assert status == 201
    token = headers.getRawHeaders("X-Subject-Token")[0]
    assert keystone.issued == [token] and keystone.valid(token)
    assert document["token"]["expires_at"] == "1970-01-01T00:01:00.000000Z"
    clock.advance(60)
    assert not keystone.valid(token)
    wrong = json.dumps(auth(KEYSTONE_USER["name"], "nope"))
    assert call(treq, "POST", url, data=wrong, headers=json_type)[0] == 401
    assert call(treq, "POST", url, data=b"{}", headers=json_type)[0] == 400
    assert call(treq, "POST", url, data=body, headers={"Content-Type": "text/plain"})[0] == 415
    assert keystone.requests == 4 and len(keystone.refused) == 3


def test_neutron_stub_accepts_its_keystone_tokens_until_they_expire() -> None:
    """The Neutron stub's Keystone is a KeystoneStub with the given credentials and a
    catalog naming this Neutron; a PUT with its token is applied, with an expired or
    revoked token it is 401."""
    clock = Clock()
    stub = NeutronStub(["port-0"], CREDENTIALS, now=clock.seconds, token_lifetime=60)
    stub.neutron_url = "http://neutron"
    assert isinstance(stub.keystone, KeystoneStub)
    treq = StubTreq(stub.resource())
    json_type = {"Content-Type": "application/json"}
    assert (
        call(treq, "POST", "http://neutron/v3/auth/tokens",
             data=json.dumps(auth(KEYSTONE_USER["name"], KEYSTONE_USER["password"])),
             headers=json_type)[0]
        == 401
    )  # fmt: skip
    status, headers, document = call(
        treq,
        "POST",
        "http://neutron/v3/auth/tokens",
        data=json.dumps(auth("neutron-user", "neutron-pw")),
        headers=json_type,
    )
    assert status == 201 and stub.auth_requests == 2
    assert document["token"]["catalog"] == [
        {"type": "network", "endpoints": [{"interface": "public", "url": "http://neutron"}]}
    ]
    token = headers.getRawHeaders("X-Subject-Token")[0]
    put = {"data": json.dumps(OPTIONS), "headers": {**json_type, "X-Auth-Token": token}}
    assert call(treq, "PUT", "http://neutron/v2.0/ports/port-0", **put)[0] == 200
    assert stub.ports["port-0"] == {("66", 4): "10.0.0.5"}
    clock.advance(60)
    assert call(treq, "PUT", "http://neutron/v2.0/ports/port-0", **put)[0] == 401
    assert len(stub.puts) == 2 and len(stub.accepted) == 1
