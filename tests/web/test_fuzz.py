"""Hypothesis against every route of the metadata and admin sites (StubTreq).

Generated methods, paths (route prefixes plus noise, percent-escapes, dot segments),
query strings, headers (including the identity, token and auth headers, sometimes
valid, sometimes raw bytes that are not UTF-8) and bodies (JSON with lone surrogates
in keys and values, nesting thousands deep).  Whatever arrives: never a 500, never a
traceback in the answer, no failure logged, and a refused request (4xx/5xx) leaves
the database exactly as it was.  Every example runs against a real database (SQLite,
PostgreSQL, MariaDB), queried synchronously through the repository.  The same
documents go through ``metadatad-manage node import``: exit 0, or exit 1 with one
line and nothing imported.
"""

from __future__ import annotations

import io
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from metadatad.admin.site import AdminSite
from metadatad.cli import main
from metadatad.core.identity import Identifier, sign_instance_id
from metadatad.core.ratelimit import RateLimiter
from metadatad.core.tokens import TokenSigner
from metadatad.db import schema
from metadatad.db.cache import NodeCache
from metadatad.db.peers import PeerRepository, PeerStore
from metadatad.db.store import NodeRepository, make_engine
from metadatad.metadata.guard import Guard
from metadatad.metadata.peersite import PeerLimits, PeerRoutes
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.watch import WatchHub
from metadatad.testing import MemoryStore
from tests.support.factories import make_node, node_document
from tests.support.sites import Client

HERE = make_node(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
OTHER = make_node(1, project_id="proj-b")
ADMIN_TOKEN = "fuzz-admin-token"
PROXY_SECRET = "fuzz-proxy"
NOW = 1_700_000_000.0
SIGNER = TokenSigner("fuzz-token-secret")
EXAMPLES = 200

METADATA_PREFIXES = [
    "/",
    "/latest",
    "/latest/meta-data/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/meta-data/placement/availability-zone/",
    "/latest/meta-data/block-device-mapping/",
    "/latest/user-data",
    "/latest/dynamic/instance-identity/document",
    "/latest/api/token",
    "/2021-03-23/api/token",
    "/2009-04-04/meta-data/instance-id",
    "/ec2/latest/meta-data/",
    "/openstack",
    "/openstack/latest/",
    "/openstack/2018-08-27/meta_data.json",
    "/openstack/latest/user_data",
    "/openstack/latest/vendor_data.json",
    "/openstack/latest/vendor_data2.json",
    "/openstack/latest/network_data.json",
    "/openstack/latest/password",
    "/openstack/latest/metadata",
    "/openstack/latest/shared.json",
    "/service/latest/",
]
ADMIN_PREFIXES = [
    "/healthz",
    "/metrics",
    "/v1/nodes",
    f"/v1/nodes/{HERE.uuid}",
    f"/v1/nodes/{HERE.uuid}/boot",
    f"/v1/nodes/{OTHER.uuid.upper()}",
    "/v1/nodes/not-a-uuid",
    "/v1/conductors",
    "/v1/ring",
    f"/v1/nodes/{HERE.uuid}/shared_keys",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

_noise = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="#?"),
    max_size=24,
)


def paths(prefixes: list[str]) -> st.SearchStrategy[str]:
    """A route prefix, maybe with noise, dot segments or doubled slashes after it."""
    suffix = st.one_of(
        st.just(""),
        st.just("/"),
        _noise.map(lambda s: "/" + s),
        st.sampled_from(["/..", "/../..", "//", "/.", "/%2e%2e/", "/%00", "/%ff%fe", "/~"]),
    )
    return st.builds(lambda p, s: quote(p + s, safe="/%~"), st.sampled_from(prefixes), suffix)


def queries() -> st.SearchStrategy[str]:
    pairs = st.lists(
        st.tuples(st.sampled_from(["shared", "wait", "index", "x", ""]), _noise), max_size=3
    )
    return pairs.map(
        lambda items: "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in items) if items else ""
    )


_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
).map(str.strip)


# Raw header bytes: Latin-1 range and beyond-ASCII octets that are not UTF-8 (\xff,
# lone continuation bytes, truncated sequences); never CR, LF or NUL.
_raw_header_value = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\x00").strip()
) | st.sampled_from([b"\xff", b"\xfe\xff", b"\x80abc", b"\xc3", b"\xed\xa0\x80"])


def headers() -> st.SearchStrategy[dict[Any, Any]]:
    valid_token = SIGNER.issue(HERE.uuid, 600, NOW)
    foreign_token = SIGNER.issue(OTHER.uuid, 600, NOW)
    values = {
        "X-aws-ec2-metadata-token": st.one_of(
            _header_value, st.sampled_from([valid_token, foreign_token, valid_token[:-3]])
        ),
        "X-aws-ec2-metadata-token-ttl-seconds": st.one_of(
            _header_value, st.sampled_from(["1", "21600", "0", "21601", "-5"])
        ),
        "X-Forwarded-For": st.one_of(
            _header_value, st.sampled_from(["10.0.0.3", "127.0.0.1, 10.0.0.3", "::1", "bogus"])
        ),
        "X-Instance-ID": st.one_of(_header_value, st.just(OTHER.uuid)),
        "X-Tenant-ID": st.one_of(_header_value, st.sampled_from(["proj-a", "proj-b"])),
        "X-Instance-ID-Signature": st.one_of(
            _header_value, st.just(sign_instance_id(PROXY_SECRET, OTHER.uuid))
        ),
        "Authorization": st.one_of(_header_value, st.just(f"Bearer {ADMIN_TOKEN}")),
        "Content-Type": st.one_of(
            _header_value, st.sampled_from(["application/json", "multipart/form-data; b=x"])
        ),
        "Accept": st.one_of(_header_value, st.just("application/json")),
        "Content-Length": _header_value,
    }
    known = st.fixed_dictionaries({}, optional=values)
    other = st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True), _header_value, max_size=3
    )
    # Any of the headers above, as raw bytes instead.
    raw = st.dictionaries(
        st.sampled_from([name.encode("ascii") for name in values]), _raw_header_value, max_size=3
    )
    return st.builds(_merged_headers, known, other, raw)


def _merged_headers(
    known: dict[str, str], other: dict[str, str], raw: dict[bytes, bytes]
) -> dict[Any, Any]:
    merged: dict[Any, Any] = {**other, **known}
    for name, value in raw.items():
        merged.pop(name.decode("ascii"), None)
        merged[name] = [value]
    return merged


_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
# Text that may hold lone surrogates (valid JSON escapes, invalid Unicode).
_bad_text = st.builds(
    lambda a, s, b: a + s + b, st.text(max_size=8), _surrogate, st.text(max_size=8)
)


def _nested(depth: int, leaf: Any, as_object: bool) -> bytes:
    """``depth`` arrays (or objects) around ``leaf``, written out directly: building
    such a document in Python would exhaust the stack of json.dumps and repr."""
    opening, closing = (b'{"network_data": ', b"}") if as_object else (b"[", b"]")
    return opening * depth + json.dumps(leaf).encode() + closing * depth


def hostile_documents() -> st.SearchStrategy[bytes]:
    """JSON no store can hold or no parser should recurse through: node documents with
    a lone surrogate in one field, peer entries with one, and nesting from shallow to
    far over any sane depth."""
    node = node_document(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])
    with_bad_field = st.builds(
        lambda field, text: {**node, field: text},
        st.sampled_from(
            ["name", "project_id", "availability_zone", "image_id", "root_device_name"]
        ),
        _bad_text,
    )
    with_bad_map = st.builds(
        lambda field, key, value: {**node, field: {key: value}},
        st.sampled_from(["meta", "public_keys", "block_device_mapping"]),
        st.one_of(_bad_text, st.just("k")),
        st.one_of(_bad_text, st.just("v")),
    )
    bad_entries = st.dictionaries(
        st.one_of(_bad_text, st.just("k")), _bad_text, min_size=1, max_size=3
    )
    documents = st.one_of(
        with_bad_field,
        with_bad_map,
        with_bad_field.map(lambda d: [d]),
        bad_entries,
        bad_entries.map(lambda entries: {"meta": entries}),
    )
    nested = st.builds(
        _nested, st.integers(1, 3000), st.one_of(st.just(None), _bad_text), st.booleans()
    )
    return st.one_of(documents.map(lambda d: json.dumps(d).encode()), nested)


def bodies() -> st.SearchStrategy[bytes]:
    documents = st.one_of(
        st.just(node_document(0, ports=[{"mac": "52:54:00:00:00:01", "ip": "127.0.0.1"}])),
        st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=20), st.integers())),
        st.lists(st.integers(), max_size=3),
    )
    return st.one_of(
        st.binary(max_size=300),
        documents.map(lambda d: json.dumps(d).encode()),
        st.text(max_size=100).map(str.encode),
        hostile_documents(),
        st.integers(1, 20_000).map(lambda n: b"[" * n),
    )


def snapshot(engine: Engine) -> list[Any]:
    """Every row of every table, in a stable order."""
    dump = []
    with engine.connect() as connection:
        for table in schema.metadata.sorted_tables:
            rows = connection.execute(select(table)).all()
            dump.append((table.name, sorted(repr(tuple(row)) for row in rows)))
    return dump


def check(  # noqa: PLR0917 (one fuzzed request, spelled out)
    client: Client,
    engine: Engine,
    method: str,
    path: str,
    query: str,
    sent: dict[Any, Any],
    body: bytes,
    refused_if: Callable[[int], bool],
) -> None:
    # A request whose body never comes (a Content-Length beyond it) never completes:
    # the hardened channel answers it 408 after client_timeout (tests/web/test_hardening).
    assume(not _promises_more(sent, body))
    before = snapshot(engine)
    with capturedLogs() as events:
        answer = client.request(method, path + query, headers=sent, data=body or None)
    event(f"status {answer.status}")
    assert answer.status != 500, (method, path, query, sent, answer.body)
    assert answer.status < 600
    assert b"Traceback" not in answer.body
    assert not [e for e in events if "log_failure" in e], [e.get("log_format") for e in events]
    if refused_if(answer.status):
        assert snapshot(engine) == before, (method, path, answer.status)


def _promises_more(sent: dict[Any, Any], body: bytes) -> bool:
    """Whether ``sent`` has a Content-Length larger than ``body``."""
    for raw, value in sent.items():
        name = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        if name.lower() != "content-length":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        try:
            if int(text.strip()) > len(body):
                return True
        except ValueError:
            pass
    return False


def _engine(database_url: str) -> tuple[Engine, MemoryStore]:
    engine = make_engine(database_url, 2)
    store = MemoryStore(NodeRepository(engine))
    store.repository.upsert_nodes([HERE, OTHER])
    return engine, store


def test_metadata_site_survives_anything(database_url: str) -> None:
    """Fuzzed requests on every metadata route: no 500; refusals change nothing."""
    engine, store = _engine(database_url)
    clock = Clock()
    clock.advance(NOW)
    sites = {}
    for require in (False, True):
        cache = NodeCache(
            store.node_by_ip, store.get_node, clock, 15, generation=store.node_generation
        )
        store.add_change_listener(cache.invalidate)
        guard = Guard(
            clock,
            SIGNER,
            require_tokens=require,
            limiter=RateLimiter(1000, 1_000_000),
            require_header=("Metadata-Flavor", None) if require else None,
            max_body_bytes=1024,
        )
        # Peer routes on the real database; held watches run on a clock of their own,
        # advanced past the longest wait after each request (tokens keep their time).
        watch_clock = Clock()
        routes = PeerRoutes(
            PeerStore(PeerRepository(engine), store.run), WatchHub(watch_clock), PeerLimits()
        )
        site = MetadataSite(
            cache,
            store,  # type: ignore[arg-type]
            Identifier([ipaddress.ip_network("127.0.0.1/32")], PROXY_SECRET),
            guard=guard,
            peer_routes=routes,
        )
        sites[require] = Client(
            site.resource(),
            settle=lambda c=watch_clock: c.advance(2 * PeerLimits().max_wait),
            forms=False,
        )

    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(
        st.booleans(),
        st.sampled_from(METHODS),
        paths(METADATA_PREFIXES),
        queries(),
        headers(),
        bodies(),
    )
    def run(  # noqa: PLR0917 (hypothesis fills every argument)
        require: bool, method: str, path: str, query: str, sent: dict[Any, Any], body: bytes
    ) -> None:
        check(sites[require], engine, method, path, query, sent, body, lambda s: s >= 400)

    try:
        run()
    finally:
        engine.dispose()


def test_admin_site_survives_anything(database_url: str) -> None:
    """Fuzzed requests on every admin route, with and without the bearer token: no
    500; anything but a 2xx changes nothing."""
    engine, store = _engine(database_url)
    peers = PeerStore(PeerRepository(engine), store.run)
    admin = AdminSite(store, ADMIN_TOKEN, peers=peers)  # type: ignore[arg-type]
    client = Client(admin.resource(), base="http://127.0.0.1:8776")

    @settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.sampled_from(METHODS), paths(ADMIN_PREFIXES), queries(), headers(), bodies())
    def run(method: str, path: str, query: str, sent: dict[Any, Any], body: bytes) -> None:
        check(client, engine, method, path, query, sent, body, lambda s: not 200 <= s < 300)

    try:
        run()
    finally:
        engine.dispose()


def test_node_import_survives_anything(database_url: str, tmp_path: Path) -> None:
    """``metadatad-manage node import`` of generated files (node documents, lone
    surrogates, deep nesting, random bytes): exit 0, or exit 1 with one line naming
    the file and the database unchanged; never a traceback."""
    engine, _ = _engine(database_url)
    conf = tmp_path / "metadatad.conf"
    conf.write_text(f"[database]\nurl = {database_url}\n", encoding="utf-8")
    path = tmp_path / "nodes.json"

    @settings(
        max_examples=EXAMPLES // 2, suppress_health_check=[HealthCheck.too_slow], database=None
    )
    @given(st.one_of(hostile_documents(), bodies()))
    def run(content: bytes) -> None:
        path.write_bytes(content)
        before = snapshot(engine)
        out, err = io.StringIO(), io.StringIO()
        status = main(["--config", str(conf), "node", "import", str(path)], stdout=out, stderr=err)
        event(f"exit {status}")
        assert "Traceback" not in err.getvalue()
        if status == 0:
            assert err.getvalue() == ""
            return
        assert status == 1
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"metadatad-manage: {path}: "), lines
        assert snapshot(engine) == before

    try:
        run()
    finally:
        engine.dispose()
