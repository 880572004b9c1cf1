"""The listen backlog in endpoint strings (pure)."""

from __future__ import annotations

import pytest

from metadatad.core.backlog import METADATA_BACKLOG, endpoint_backlog, with_default_backlog


@pytest.mark.parametrize(
    ("description", "backlog"),
    [
        ("tcp:8775", None),
        ("tcp:8775:interface=127.0.0.1", None),
        ("tcp:8775:backlog=1024", "1024"),
        ("tcp:8775:interface=127.0.0.1:backlog=77", "77"),
        ("tcp:8775:127.0.0.1:99", "99"),
        ("tcp6:8775:interface=\\:\\:", None),
        ("tcp6:8775:backlog=300:interface=\\:\\:1", "300"),
        ("tcp6:8775:300", "300"),
        ("unix:/run/m.sock", None),
        ("unix:/run/m.sock:mode=660:backlog=9", "9"),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", None),
        ("ssl:8443:privateKey=k.pem:backlog=12", "12"),
        ("systemd:domain=INET:index=0", None),
    ],
)
def test_endpoint_backlog(description: str, backlog: str | None) -> None:
    assert endpoint_backlog(description) == backlog


def test_default_is_added_only_where_none_is_given() -> None:
    assert with_default_backlog("tcp:8775", 4096) == "tcp:8775:backlog=4096"
    assert (
        with_default_backlog("tcp6:8775:interface=\\:\\:", 10)
        == "tcp6:8775:interface=\\:\\::backlog=10"
    )
    assert with_default_backlog("tcp:8775:backlog=5", 4096) == "tcp:8775:backlog=5"
    assert with_default_backlog("tcp:8775:127.0.0.1:7", 4096) == "tcp:8775:127.0.0.1:7"
    # systemd binds (and sizes the queue of) the sockets it passes in.
    assert with_default_backlog("systemd:domain=INET:index=0", 9) == "systemd:domain=INET:index=0"


def test_metadata_default_is_well_above_twisteds_50() -> None:
    assert METADATA_BACKLOG >= 1024
