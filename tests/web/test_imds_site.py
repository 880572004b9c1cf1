"""IMDSv2 tokens, rate limits and the security matrix of the metadata site (StubTreq).

Node A (``HERE``) calls from 127.0.0.1, StubTreq's peer address.  Node B (``OTHER``,
10.0.0.3, another project) is reached through a trusted proxy's ``X-Forwarded-For``
where a test needs a second caller.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from metadatad.core.identity import Identifier, sign_instance_id
from metadatad.core.ratelimit import RateLimiter
from metadatad.core.tokens import TokenSigner
from metadatad.db.cache import NodeCache
from metadatad.hardening import HardenedSite, Limits
from metadatad.metadata.guard import Guard
from metadatad.metadata.site import MetadataSite
from metadatad.testing import MemoryStore
from tests.support.factories import make_node
from tests.support.sites import Answer, Client

HERE = make_node(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
OTHER = make_node(1, project_id="proj-b")  # 10.0.0.3
SECRET = "token-secret"
PROXY_SECRET = "proxy-secret"
NOW = 1_700_000_000.0
TTL = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}


class Setup:
    """A site with a controllable clock, and helpers for tokens."""

    def __init__(self, trusted: str = "", **guard: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore()
        self.store.repository.upsert_nodes([HERE, OTHER])
        cache = NodeCache(
            self.store.node_by_ip,
            self.store.get_node,
            self.clock,
            15,
            generation=self.store.node_generation,
        )
        self.store.add_change_listener(cache.invalidate)
        proxies = [ipaddress.ip_network(trusted)] if trusted else []
        self.signer = TokenSigner(SECRET)
        self.guard = Guard(self.clock, self.signer, **guard)
        site = MetadataSite(
            cache,
            self.store,  # type: ignore[arg-type]
            Identifier(proxies, PROXY_SECRET),
            random_bytes=lambda n: b"\x01" * n,
            guard=self.guard,
        )
        self.resource = site.resource()
        self.client = Client(self.resource)

    def put_token(
        self, headers: dict[str, str] | None = None, path: str = "/latest/api/token"
    ) -> Answer:
        return self.client.request("PUT", path, headers=TTL if headers is None else headers)

    def token(self) -> str:
        answer = self.put_token()
        assert answer.status == 200, answer.text
        return answer.text

    def get(self, path: str, token: str | None = None, **headers: str) -> Answer:
        if token is not None:
            headers["X-aws-ec2-metadata-token"] = token
        return self.client.get(path, headers=headers)


# --- the token PUT -----------------------------------------------------------------


def test_token_put_returns_a_token_and_echoes_the_ttl() -> None:
    """200, the token as text, and the TTL header echoed (the Go SDK needs it)."""
    setup = Setup()
    answer = setup.put_token({"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    assert answer.status == 200
    assert answer.header("X-aws-ec2-metadata-token-ttl-seconds") == "300"
    assert answer.header("content-type").startswith("text/plain")
    assert setup.signer.verify(answer.text, NOW) == (HERE.uuid, int(NOW) + 300)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 400),
        ({"X-aws-ec2-metadata-token-ttl-seconds": "0"}, 400),
        ({"X-aws-ec2-metadata-token-ttl-seconds": "21601"}, 400),
        ({"X-aws-ec2-metadata-token-ttl-seconds": "ten"}, 400),
        ({"X-aws-ec2-metadata-token-ttl-seconds": "1"}, 200),
        ({"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, 200),
        ({**TTL, "X-Forwarded-For": "127.0.0.1"}, 403),
        ({"X-Forwarded-For": "10.0.0.3"}, 403),
    ],
)
def test_token_put_statuses(headers: dict[str, str], status: int) -> None:
    """TTL 1..21600 else 400; any X-Forwarded-For is 403 (a proxy relayed it)."""
    assert Setup().put_token(headers).status == status


@pytest.mark.parametrize("path", ["/2021-03-23/api/token", "/2009-04-04/api/token/"])
def test_token_put_on_a_dated_version_is_403(path: str) -> None:
    """As AWS: only /latest/api/token issues tokens."""
    assert Setup().put_token(path=path).status == 403


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
def test_other_methods_on_the_token_path_are_405(method: str) -> None:
    """405 with Allow: PUT (botocore and the Go SDK then fall back to IMDSv1)."""
    answer = Setup().client.request(method, "/latest/api/token", headers=TTL)
    assert answer.status == 405
    assert answer.header("allow") == "PUT"


def test_put_elsewhere_is_still_405() -> None:
    """Only the token path takes PUT."""
    answer = Setup().client.request("PUT", "/latest/meta-data/", headers=TTL)
    assert answer.status == 405


def test_unknown_caller_gets_no_token() -> None:
    """A token is bound to a node: an address no node has gets 404."""
    setup = Setup()
    setup.store.repository.delete_node(HERE.uuid)
    assert setup.put_token().status == 404


# --- using tokens -------------------------------------------------------------------


def test_a_token_reads_every_tree() -> None:
    """The token works on EC2 and OpenStack paths alike, and on the listings."""
    setup = Setup(require_tokens=True)
    token = setup.token()
    assert setup.get("/latest/meta-data/instance-id", token).text == HERE.uuid
    assert setup.get("/2021-03-23/meta-data/instance-id", token).text == HERE.uuid
    document = json.loads(setup.get("/openstack/latest/meta_data.json", token).body)
    assert document["uuid"] == HERE.uuid
    for path in ("/", "/openstack", "/latest"):
        assert setup.get(path, token).status == 200, path


def test_without_require_tokens_imdsv1_still_works() -> None:
    """Default mode: IMDSv1 (no token) and IMDSv2 both read."""
    setup = Setup()
    assert setup.get("/latest/meta-data/instance-id").text == HERE.uuid
    assert setup.get("/latest/meta-data/instance-id", setup.token()).text == HERE.uuid


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/instance-id",
        "/2009-04-04/meta-data/",
        "/latest/user-data",
        "/latest/dynamic/instance-identity/document",
        "/openstack/latest/meta_data.json",
        "/openstack/2018-08-27/user_data",
        "/openstack/latest/password",
        "/service/latest/",
        "/openstack/latest/shared.json",
    ],
)
def test_require_tokens_refuses_imdsv1_everywhere(path: str) -> None:
    """require_tokens: a request without a token is 401 on every per-node path."""
    assert Setup(require_tokens=True).get(path).status == 401


def test_require_tokens_leaves_the_public_listings_open() -> None:
    """/ and /openstack carry no node data: they answer without a token."""
    setup = Setup(require_tokens=True)
    assert setup.get("/").status == 200
    assert setup.get("/openstack").status == 200


def test_require_tokens_refuses_a_password_post_without_a_token() -> None:
    """The write is refused and nothing is stored."""
    setup = Setup(require_tokens=True)
    answer = setup.client.request("POST", "/openstack/latest/password", data=b"hunter2")
    assert answer.status == 401
    assert setup.store.repository.get_password(HERE.uuid) is None
    token = setup.token()
    answer = setup.client.request(
        "POST",
        "/openstack/latest/password",
        data=b"hunter2",
        headers={"X-aws-ec2-metadata-token": token},
    )
    assert answer.status == 200
    assert setup.store.repository.get_password(HERE.uuid) == "hunter2"


# --- the security matrix ---------------------------------------------------------------


def test_matrix_node_a_token_used_by_node_b_is_401() -> None:
    """A's token presented by B (through a trusted proxy) is 401, on every tree."""
    setup = Setup(trusted="127.0.0.1/32")
    token = setup.token()  # A's, asked directly (no X-Forwarded-For)
    for path in ("/latest/meta-data/instance-id", "/openstack/latest/meta_data.json", "/"):
        answer = setup.get(path, token, **{"X-Forwarded-For": "10.0.0.3"})
        assert answer.status == 401, path
        assert OTHER.uuid.encode() not in answer.body
    # B itself, without a token, still reads its own data (IMDSv1 allowed).
    answer = setup.get("/latest/meta-data/instance-id", **{"X-Forwarded-For": "10.0.0.3"})
    assert answer.text == OTHER.uuid


def test_matrix_node_b_token_used_by_node_a_is_401() -> None:
    """The other direction: a token minted for B is refused when A presents it."""
    setup = Setup()
    token_b = setup.signer.issue(OTHER.uuid, 60, NOW)
    assert setup.get("/latest/meta-data/instance-id", token_b).status == 401


def test_matrix_expired_token_is_401() -> None:
    """A token past its TTL is 401; one second earlier it worked."""
    setup = Setup()
    token = setup.put_token({"X-aws-ec2-metadata-token-ttl-seconds": "5"}).text
    setup.clock.advance(4)
    assert setup.get("/latest/meta-data/instance-id", token).status == 200
    setup.clock.advance(1)
    assert setup.get("/latest/meta-data/instance-id", token).status == 401
    assert setup.get("/openstack/latest/meta_data.json", token).status == 401


def test_matrix_forged_signature_is_401() -> None:
    """A token signed with another secret, or with a changed signature, is 401."""
    setup = Setup()
    forged = TokenSigner("guessed-secret").issue(HERE.uuid, 60, NOW)
    assert setup.get("/latest/meta-data/instance-id", forged).status == 401
    good = setup.token()
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    assert setup.get("/latest/meta-data/instance-id", tampered).status == 401
    assert setup.get("/latest/meta-data/instance-id", "garbage").status == 401
    assert setup.get("/", "garbage").status == 401
    assert setup.get("/openstack", "garbage").status == 401


def test_matrix_two_tokens_are_401() -> None:
    """A repeated token header is refused rather than guessed at."""
    setup = Setup()
    token = setup.token()
    answer = setup.client.get(
        "/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": [token, token]},
    )
    assert answer.status == 401


def test_matrix_spoofed_forwarded_for_from_an_untrusted_source() -> None:
    """From an untrusted peer X-Forwarded-For is ignored (A reads A, never B), and a
    token PUT carrying it is 403."""
    setup = Setup()
    answer = setup.get("/latest/meta-data/instance-id", **{"X-Forwarded-For": "10.0.0.3"})
    assert (answer.status, answer.text) == (200, HERE.uuid)
    assert setup.put_token({**TTL, "X-Forwarded-For": "10.0.0.3"}).status == 403


def test_matrix_signed_proxy_headers_with_a_wrong_secret_are_403() -> None:
    """A Neutron-style request signed with another secret is 403, with or without a token."""
    setup = Setup()
    headers = {
        "X-Instance-ID": OTHER.uuid,
        "X-Tenant-ID": "proj-b",
        "X-Instance-ID-Signature": sign_instance_id("wrong", OTHER.uuid),
    }
    assert setup.client.get("/latest/meta-data/instance-id", headers=headers).status == 403
    good = {**headers, "X-Instance-ID-Signature": sign_instance_id(PROXY_SECRET, OTHER.uuid)}
    assert setup.client.get("/latest/meta-data/instance-id", headers=good).text == OTHER.uuid


def test_matrix_cross_project_reads_are_404() -> None:
    """A proxy naming another project than the node's gets nothing (404), on the EC2,
    OpenStack and peer paths."""
    setup = Setup()
    headers = {
        "X-Instance-ID": OTHER.uuid,
        "X-Tenant-ID": "proj-a",
        "X-Instance-ID-Signature": sign_instance_id(PROXY_SECRET, OTHER.uuid),
    }
    for path in (
        "/latest/meta-data/instance-id",
        "/openstack/latest/meta_data.json",
        "/openstack/latest/shared.json",
    ):
        answer = setup.client.get(path, headers=headers)
        assert answer.status == 404, path
        assert OTHER.uuid.encode() not in answer.body
    # No token for that node either.
    assert (
        setup.client.request("PUT", "/latest/api/token", headers={**TTL, **headers}).status == 404
    )


def test_matrix_oversize_body_is_413_and_nothing_is_stored() -> None:
    """A body over max_body_bytes is 413 before anything else looks at it."""
    setup = Setup(max_body_bytes=1024)
    answer = setup.client.request("POST", "/openstack/latest/password", data=b"x" * 1025)
    assert answer.status == 413
    assert setup.store.repository.get_password(HERE.uuid) is None
    assert (
        setup.client.request("PUT", "/latest/api/token", headers=TTL, data=b"x" * 2000).status
        == 413
    )


def test_oversize_body_is_413_behind_the_daemons_channel_too() -> None:
    """Behind a HardenedSite whose own limit is higher, the gate reads the size the
    request counted as it read its body: over the gate's limit, 413 and nothing stored."""
    setup = Setup(max_body_bytes=16)
    site = HardenedSite(setup.resource, Limits(max_body_bytes=2048), reactor=setup.clock)
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    body = b"x" * 17
    channel.dataReceived(
        b"POST /openstack/latest/password HTTP/1.1\r\nHost: a\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert setup.store.repository.get_password(HERE.uuid) is None


def test_matrix_flood_past_the_rate_limit_is_429_with_retry_after() -> None:
    """Past the burst, 429 with Retry-After; the other node is not affected; after the
    wait the caller is served again."""
    setup = Setup(trusted="127.0.0.1/32", limiter=RateLimiter(rate=2, burst=5))
    statuses = [setup.get("/latest/meta-data/instance-id").status for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    limited = setup.get("/latest/meta-data/instance-id")
    assert limited.status == 429
    assert limited.header("retry-after") == "1"
    # Tokens do not buy more requests, and the token path counts too.
    assert setup.put_token().status == 429
    other = setup.get("/latest/meta-data/instance-id", **{"X-Forwarded-For": "10.0.0.3"})
    assert other.status == 200
    setup.clock.advance(0.5)
    assert setup.get("/latest/meta-data/instance-id").status == 200
    assert setup.get("/latest/meta-data/instance-id").status == 429


def test_required_header_guards_against_ssrf() -> None:
    """require_header: without it 403 (token PUT included); listings stay open."""
    setup = Setup(require_header=("Metadata-Flavor", "metadatad"))
    assert setup.get("/latest/meta-data/instance-id").status == 403
    assert setup.get("/latest/meta-data/instance-id", **{"Metadata-Flavor": "other"}).status == 403
    answer = setup.get("/latest/meta-data/instance-id", **{"Metadata-Flavor": "metadatad"})
    assert answer.text == HERE.uuid
    assert setup.put_token().status == 403
    assert setup.put_token({**TTL, "Metadata-Flavor": "metadatad"}).status == 200
    assert setup.get("/").status == 200
    any_value = Setup(require_header=("Metadata", None))
    assert any_value.get("/latest/meta-data/instance-id", Metadata="true").status == 200


# --- audit ---------------------------------------------------------------------------


def test_denials_and_writes_are_audited_without_secrets() -> None:
    """Denied requests log method, path, node and reason; a password post logs the node;
    neither the token nor the password appears."""
    setup = Setup()
    token = setup.token()
    token_b = setup.signer.issue(OTHER.uuid, 60, NOW)
    with capturedLogs() as events:
        setup.get("/latest/meta-data/instance-id", token_b)
        setup.get("/latest/meta-data/instance-id", "garbage-token")
        setup.client.request(
            "POST",
            "/openstack/latest/password",
            data=b"hunter2",
            headers={"X-aws-ec2-metadata-token": token},
        )
    audit = [e for e in events if e.get("log_namespace") == "metadatad.audit"]
    reasons = [e.get("reason") for e in audit if "reason" in e]
    assert reasons == ["token of another node", "malformed token"]
    assert audit[0]["node"] == HERE.uuid
    assert audit[0]["status"] == 401
    writes = [e for e in audit if e.get("what")]
    assert [(e["node"], e["what"]) for e in writes] == [(HERE.uuid, "its password")]
    shown = repr(events)
    for secret in (token, token_b, "garbage-token", "hunter2"):
        assert secret not in shown


def test_a_flood_is_logged_once() -> None:
    """The first 429 of a flood is audit-logged; the repeats are only counted; after the
    caller is served again, a new flood is logged again."""
    setup = Setup(limiter=RateLimiter(rate=1, burst=1))
    with capturedLogs() as events:
        statuses = [setup.get("/latest/meta-data/instance-id").status for _ in range(50)]
        setup.clock.advance(1)
        statuses += [setup.get("/latest/meta-data/instance-id").status for _ in range(3)]
    assert statuses == [200] + [429] * 49 + [200, 429, 429]
    limited = [e for e in events if e.get("reason") == "rate limit"]
    assert len(limited) == 2
    assert limited[0]["node"] == "-" and limited[0]["peer"] == "127.0.0.1"


def test_bad_tokens_count_against_the_rate_limit() -> None:
    """A flood of bad tokens is a flood: 401 while the bucket lasts, then 429."""
    setup = Setup(limiter=RateLimiter(rate=1, burst=2))
    statuses = [setup.get("/latest/meta-data/instance-id", "junk").status for _ in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert setup.get("/", "junk").status == 429
    setup.clock.advance(1)
    assert setup.get("/", "junk").status == 401


def test_repeated_denials_are_logged_sparingly() -> None:
    """One peer repeating one refusal: a few audit lines, then one per 10 s; every one
    is still answered 401."""
    setup = Setup()
    with capturedLogs() as events:
        statuses = [setup.get("/latest/meta-data/instance-id", "junk").status for _ in range(30)]
        setup.clock.advance(10)
        statuses.append(setup.get("/latest/meta-data/instance-id", "junk").status)
    assert statuses == [401] * 31
    logged = [e for e in events if e.get("reason") == "malformed token"]
    assert len(logged) == 6


# --- bytes that are not UTF-8 -------------------------------------------------------

_RAW_HEADERS = [
    ("X-aws-ec2-metadata-token", "GET", "/latest/meta-data/instance-id"),
    ("X-aws-ec2-metadata-token-ttl-seconds", "PUT", "/latest/api/token"),
    ("X-Forwarded-For", "GET", "/latest/meta-data/instance-id"),
    ("X-Instance-ID", "GET", "/latest/meta-data/instance-id"),
    ("X-Instance-ID-Signature", "GET", "/latest/meta-data/instance-id"),
]


@pytest.mark.parametrize(("name", "method", "path"), _RAW_HEADERS)
def test_a_non_utf8_header_is_a_4xx_counted_against_the_rate(
    name: str, method: str, path: str
) -> None:
    """A ``\\xff`` in a token, TTL, forwarding or signed-identity header is a clear 4xx
    (never a 500 with a traceback); a flood of them runs into 429 like any other."""
    setup = Setup(trusted="127.0.0.1/32", limiter=RateLimiter(rate=1, burst=3))
    headers = {name.encode("ascii"): b"\xff\xfe"}
    if name != "X-aws-ec2-metadata-token-ttl-seconds" and method == "PUT":
        headers[b"X-aws-ec2-metadata-token-ttl-seconds"] = b"60"
    with capturedLogs() as events:
        answers = [setup.client.request(method, path, headers=headers) for _ in range(5)]
    statuses = [a.status for a in answers]
    assert all(400 <= s < 500 for s in statuses[:3]), statuses
    assert statuses[3:] == [429, 429]
    assert not [e for e in events if "log_failure" in e]
    assert all(b"Traceback" not in a.body for a in answers)


def test_refusals_of_unusable_identity_headers_are_logged_sparingly() -> None:
    """A flood of bad signatures from one address: every one answered, a few audit
    lines (not one per request)."""
    setup = Setup()
    headers = {
        b"X-Instance-ID": OTHER.uuid.encode(),
        b"X-Tenant-ID": b"proj-b",
        b"X-Instance-ID-Signature": b"\xff" * 64,
    }
    with capturedLogs() as events:
        statuses = {
            setup.client.get("/latest/meta-data/", headers=headers).status for _ in range(200)
        }
    assert statuses == {403}
    assert len(events) <= 10, [e.get("log_format") for e in events]
