"""The pure peer checks and renderers: no reactor, no store."""

from __future__ import annotations

import pytest

from metadatad.core import peers as rules
from metadatad.core.peers import INVALID, OVER_QUOTA, PeerError
from metadatad.metadata import peers
from metadatad.metadata.reply import json_reply, text


def test_scope() -> None:
    """Absent is private, ``project`` is shared, anything else is a 400."""
    assert rules.parse_scope(None) is False
    assert rules.parse_scope([]) is False
    assert rules.parse_scope(["project"]) is True
    for bad in (["Project"], ["instance"], ["project", "project"]):
        with pytest.raises(PeerError) as caught:
            rules.parse_scope(bad)
        assert caught.value.kind == INVALID


def test_entries_keep_order_and_accept_the_meta_wrapper() -> None:
    """A flat object or Nova's ``{"meta": {...}}``; values must be strings."""
    assert rules.parse_entries(b'{"b": "2", "a": "1"}') == {"b": "2", "a": "1"}
    assert rules.parse_entries(b'{"meta": {"a": "1"}}') == {"a": "1"}
    # "meta" with a string value is an ordinary key.
    assert rules.parse_entries(b'{"meta": "x"}') == {"meta": "x"}
    with pytest.raises(PeerError):
        rules.parse_entries(b'{"a": true}')


def test_quota_boundaries() -> None:
    """Exactly at the limits passes; one over is a 413 naming the limit."""
    rules.check_quota({"a": "1"}, {"b": "2"}, max_keys=2, max_bytes=4)
    with pytest.raises(PeerError) as caught:
        rules.check_quota({"a": "1"}, {"b": "2"}, max_keys=1, max_bytes=4)
    assert (caught.value.kind, "at most 1" in caught.value.message) == (OVER_QUOTA, True)
    with pytest.raises(PeerError) as caught:
        rules.check_quota({"a": "1"}, {"b": "23"}, max_keys=5, max_bytes=4)
    assert "at most 4" in caught.value.message
    assert rules.entry_bytes("k", "é") == 3


def test_shared_document() -> None:
    """Prefixed keys, sorted; nodes without entries left out."""
    assert rules.shared_document([("u1", {"b": "2", "a": "1"}), ("u2", {})]) == [
        {"meta": {"from_server_a": "1", "from_server_b": "2"}, "uuid": "u1"}
    ]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("application/json", True),
        ("text/plain, application/json", False),
        ("application/json;q=0.9, text/plain", True),
        ("*/*", False),
        ("application/*", True),
    ],
)
def test_wants_json(accept: str | None, expected: bool) -> None:
    """The first known media type in Accept decides; text is the default."""
    assert peers.wants_json(accept) is expected


def test_parse_watch() -> None:
    """``index`` starts a watch; ``wait`` defaults to and is capped by the maximum."""
    assert rules.parse_watch({}, 300) is None
    assert rules.parse_watch({"index": ["4"]}, 300) == rules.WatchRequest(4, 300)
    assert rules.parse_watch({"index": ["4"], "wait": ["10s"]}, 300) == rules.WatchRequest(4, 10)
    assert rules.parse_watch({"index": ["4"], "wait": ["9999"]}, 300) == rules.WatchRequest(4, 300)
    assert rules.parse_watch({"index": ["0"], "wait": ["0.5"]}, 300) == rules.WatchRequest(0, 0.5)


def test_jitter_is_at_most_a_sixteenth() -> None:
    """Consul's rule: wait plus up to wait/16."""
    assert rules.jittered(160, 0.0) == 160
    assert rules.jittered(160, 0.999) < 170


def test_etag_follows_content() -> None:
    """Same content, same tag; other content or type, another tag."""
    assert peers.etag(text("a")) == peers.etag(text("a"))
    assert peers.etag(text("a")) != peers.etag(text("b"))
    assert peers.etag(text("1")) != peers.etag(json_reply(1))


def test_watch_headers_and_304() -> None:
    """200s get ETag and index; a matching If-None-Match (or ``*``, or a weak form) is a
    304 without body; errors get the index only."""
    reply = peers.with_watch_headers(text("x"), 7, None)
    headers = dict(reply.headers)
    assert headers["X-Metadatad-Index"] == "7"
    tag = headers["ETag"]
    for condition in (tag, f'"other", {tag}', "*", f"W/{tag}"):
        cached = peers.with_watch_headers(text("x"), 7, condition)
        assert (cached.status, cached.body) == (304, b"")
    missing = peers.with_watch_headers(peers.error(404, "Not Found"), 7, "*")
    assert missing.status == 404
    assert "ETag" not in dict(missing.headers)
