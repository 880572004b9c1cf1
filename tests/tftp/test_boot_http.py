"""Boot files over HTTP (``<http_address>/boot/...``): the pure rules (ranges,
validators) without a reactor, then the real daemon on loopback: downloads, ranges,
conditional requests, HEAD, the path-safety rules shared with TFTP, rendered configs,
boot events, and files truncated or deleted under a download."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from metadatad.testing.daemon import Daemon, http_request
from metadatad.tftp.http import Validators, parse_range, plan, request_name
from tests.daemon.test_tftp_daemon import free_udp_port
from tests.support.factories import node_document

MAC = "52:54:00:12:34:56"
NODE = node_document(0, ports=[{"mac": MAC, "ip": "127.0.0.1", "pxe": True}])
HTTP_ADDRESS = "http://boot.example.org:8775"
TEMPLATE = "#!ipxe\nkernel ${boot_url}/$uuid/kernel\ninitrd ${boot_url}/$uuid/ramdisk\nboot\n"


# --------------------------------------------------------------------------- pure


def _headers(**values: str) -> Any:
    named = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lambda name: named.get(name.lower())


V = Validators('"abc"', 1_700_000_000.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=-100", (900, 1000)),
        ("bytes=-5000", (0, 1000)),  # a suffix longer than the file: all of it
        ("bytes=990-5000", (990, 1000)),  # the end is clipped
        ("BYTES = 5 - 9", (5, 10)),
        ("bytes=1000-", False),  # starts past the end: 416
        ("bytes=5000-6000", False),
        ("bytes=-0", False),
        # Malformed or unsupported: ignored (the whole file), as RFC 9110 allows.
        ("bytes=9-5", None),
        ("bytes=abc", None),
        ("bytes=-", None),
        ("bytes=", None),
        ("bytes=1-2-3", None),
        ("bytes=0-1,5-6", None),
        ("items=0-5", None),
        ("bytes=0x10-20", None),
    ],
)
def test_parse_range(header: str | None, expected: Any) -> None:
    assert parse_range(header, 1000) == expected


def test_an_empty_file_satisfies_no_range() -> None:
    assert parse_range("bytes=0-", 0) is False
    assert parse_range("bytes=-1", 0) is False


def test_plan_full_partial_head_and_416() -> None:
    full = plan(b"GET", _headers(), 1000, V)
    assert (full.status, full.start, full.end) == (200, 0, 1000)
    assert dict(full.headers)["Content-Length"] == "1000"
    assert dict(full.headers)["ETag"] == '"abc"'
    assert dict(full.headers)["Last-Modified"] == formatdate(V.modified, usegmt=True)
    partial = plan(b"GET", _headers(range="bytes=10-19"), 1000, V)
    assert (partial.status, partial.start, partial.end) == (206, 10, 20)
    assert dict(partial.headers)["Content-Range"] == "bytes 10-19/1000"
    head = plan(b"HEAD", _headers(range="bytes=10-19"), 1000, V)
    assert (head.status, head.start, head.end) == (206, 0, 0)
    assert dict(head.headers)["Content-Length"] == "10"
    past = plan(b"GET", _headers(range="bytes=1000-"), 1000, V)
    assert past.status == 416 and dict(past.headers)["Content-Range"] == "bytes */1000"
    assert past.end == past.start


def test_plan_conditional_requests() -> None:
    assert plan(b"GET", _headers(if_none_match='"abc"'), 10, V).status == 304
    assert plan(b"GET", _headers(if_none_match='W/"abc", "x"'), 10, V).status == 304
    assert plan(b"GET", _headers(if_none_match="*"), 10, V).status == 304
    assert plan(b"GET", _headers(if_none_match='"other"'), 10, V).status == 200
    later = formatdate(V.modified + 60, usegmt=True)
    earlier = formatdate(V.modified - 60, usegmt=True)
    assert plan(b"GET", _headers(if_modified_since=later), 10, V).status == 304
    assert plan(b"GET", _headers(if_modified_since=earlier), 10, V).status == 200
    assert plan(b"GET", _headers(if_modified_since="garbage"), 10, V).status == 200
    # If-None-Match wins over If-Modified-Since.
    both = _headers(if_none_match='"other"', if_modified_since=later)
    assert plan(b"GET", both, 10, V).status == 200
    # If-Range: the range only while the file is the same version.
    same = _headers(range="bytes=0-1", if_range='"abc"')
    assert plan(b"GET", same, 10, V).status == 206
    changed = _headers(range="bytes=0-1", if_range='"old"')
    assert plan(b"GET", changed, 10, V).status == 200
    dated = _headers(range="bytes=0-1", if_range=formatdate(V.modified, usegmt=True))
    assert plan(b"GET", dated, 10, V).status == 206
    weak = _headers(range="bytes=0-1", if_range='W/"abc"')
    assert plan(b"GET", weak, 10, V).status == 200  # If-Range compares strongly


def test_downloads_share_a_per_turn_budget() -> None:
    """A lone download moves 1 MiB chunks, a storm 64 KiB ones; within one turn of the
    reactor at most the budget is spent, the rest waits for the next turn."""
    from twisted.internet.task import Clock

    from metadatad.tftp.http import _Turns

    clock = Clock()
    turns = _Turns(clock, 2 << 20)
    assert turns.chunk() == 1 << 20
    turns.downloads = 8
    assert turns.chunk() == 256 << 10
    turns.downloads = 50
    assert turns.chunk() == 64 << 10  # the floor: syscalls must stay large enough
    spent = [turns.spend(64 << 10) for _ in range(40)]
    assert spent == [True] * 32 + [False] * 8  # 2 MiB this turn

    class Waiting:
        def __init__(self) -> None:
            self.resumed = 0

        def resumeProducing(self) -> None:
            self.resumed += 1
            if not turns.spend(64 << 10):
                turns.wait(self)  # type: ignore[arg-type]

    first, second = Waiting(), Waiting()
    turns.wait(first)  # type: ignore[arg-type]
    turns.wait(second)  # type: ignore[arg-type]
    clock.advance(0)  # the next turn: those waiting go first, in order
    assert (first.resumed, second.resumed) == (1, 1)
    assert turns.spend(64 << 10)
    assert clock.getDelayedCalls() and len(clock.getDelayedCalls()) == 1  # one per turn
    clock.advance(0)
    assert not clock.getDelayedCalls()  # nothing spent, nobody waiting: idle


def test_request_names_are_percent_decoded_per_segment() -> None:
    assert request_name(b"/boot/a/b.bin") == "a/b.bin"
    assert request_name(b"/boot/%2e%2e/etc/passwd") == "../etc/passwd"
    assert request_name(b"/boot/a%2F..%2F..%2Fx") == "a/../../x"
    assert request_name(b"/boot/") == ""
    with pytest.raises(ValueError):
        request_name(b"/boot/%ff")


def test_validators_change_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = Validators.of_file(os.stat(path))
    path.write_bytes(b"three")
    assert Validators.of_file(os.stat(path)).etag != first.etag
    assert Validators.of_bytes(b"x") != Validators.of_bytes(b"y")


def test_the_default_ipxe_template_fetches_over_http_when_there_is_an_http_address() -> None:
    """conf/templates/ipxe.tmpl: kernel and initrd from ``<http_address>/boot`` when the
    conductor has one, else from its TFTP server."""
    from metadatad.tftp.bootconfig import Templates, variables
    from tests.tftp.test_tftp_bootconfig import RECORD

    template = Templates(Path(__file__).parents[2] / "conf" / "templates").find(
        "ipxe", "x86_64", "bios"
    )
    assert template is not None
    uuid = RECORD.node.uuid
    over_http = template.substitute(
        variables(RECORD, None, "10.0.0.9", "10.0.0.5", "c1", http_address="http://10.0.0.5:8775")
    )
    assert f"kernel http://10.0.0.5:8775/boot/{uuid}/kernel " in over_http
    assert f"initrd http://10.0.0.5:8775/boot/{uuid}/ramdisk" in over_http
    over_tftp = template.substitute(variables(RECORD, None, "10.0.0.9", "10.0.0.5", "c1"))
    assert f"kernel tftp://10.0.0.5/{uuid}/kernel " in over_tftp
    assert f"initrd tftp://10.0.0.5/{uuid}/ramdisk" in over_tftp
    v6 = variables(RECORD, None, "fd00::9", "fd00::5", "c1")
    assert v6["boot_url"] == "tftp://[fd00::5]"


# --------------------------------------------------------------------------- daemon


class Served:
    def __init__(self, daemon: Daemon, root: Path) -> None:
        self.daemon = daemon
        self.root = root

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
        return http_request(self.daemon.metadata_url + path, method, headers=headers)

    def events(self, filename: str, count: int = 1) -> list[dict[str, Any]]:
        """The boot events of ``filename`` (events are written in batches)."""
        deadline = time.monotonic() + 20
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            status, boot = self.daemon.admin("GET", f"/v1/nodes/{NODE['uuid']}/boot")
            assert status == 200, boot
            found = [e for e in boot["events"] if e["filename"] == filename]
            if len(found) >= count:
                return found
            time.sleep(0.1)  # poll-with-deadline on a real subprocess
        raise AssertionError(f"no event for {filename}: {found}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("boothttp")
    root = base / "root"
    templates = base / "templates"
    (root / NODE["uuid"]).mkdir(parents=True)
    (root / "sub").mkdir()
    templates.mkdir()
    (templates / "ipxe.tmpl").write_text(TEMPLATE)
    (root / NODE["uuid"] / "kernel").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (root / "sub" / "x.bin").write_bytes(b"x" * 100)
    (root / "empty.bin").write_bytes(b"")
    (base / "secret").write_text("outside the root\n")
    os.symlink(base / "secret", root / "escape")
    os.symlink(base, root / "escape-dir")
    os.symlink("sub/x.bin", root / "inside-link")
    daemon = Daemon.create(
        base / "daemon",
        nodes=[NODE],
        config={
            "conductor": {"hostname": "c1", "http_address": HTTP_ADDRESS},
            "tftp": {
                "listen": f"127.0.0.1:{free_udp_port()}",
                "root": str(root),
                "templates": str(templates),
                "event_retention": "1",
            },
            "metadata": {"rate_limit": "0"},
        },
    )
    with daemon:
        yield Served(daemon, root)
        assert daemon.errors() == []


@pytest.mark.slow
def test_a_kernel_downloads_whole_and_by_ranges(served: Served) -> None:
    kernel = (served.root / NODE["uuid"] / "kernel").read_bytes()
    path = f"/boot/{NODE['uuid']}/kernel"
    status, headers, body = served.get(path)
    assert status == 200 and body == kernel
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Accept-Ranges"] == "bytes" and headers["ETag"] and headers["Last-Modified"]
    status, headers, body = served.get(path, {"Range": "bytes=1000-1999"})
    assert status == 206 and body == kernel[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(kernel)}"
    status, _, body = served.get(path, {"Range": "bytes=-10"})
    assert status == 206 and body == kernel[-10:]
    # Range past the end: 416 with the size.
    status, headers, body = served.get(path, {"Range": f"bytes={len(kernel)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(kernel)}"
    assert body == b""
    # Malformed ranges are ignored: the whole file.
    for bad in ("bytes=9-5", "bytes=x-y", "bytes=", "pages=1-2", "bytes=0-1,4-5"):
        status, _, body = served.get(path, {"Range": bad})
        assert (status, len(body)) == (200, len(kernel)), bad
    # HEAD: the headers of the GET, no body.
    status, headers, body = served.get(path, method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(kernel))
    # Validators: 304 while unchanged.
    _, headers, _ = served.get(path, method="HEAD")
    status, _, body = served.get(path, {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b""
    status, _, _ = served.get(path, {"If-Modified-Since": headers["Last-Modified"]})
    assert status == 304
    status, _, body = served.get(path, {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert status == 200 and len(body) == len(kernel)
    events = served.events(f"{NODE['uuid']}/kernel")
    complete = [e for e in events if e["outcome"] == "complete" and e["bytes_sent"] == len(kernel)]
    assert complete and complete[0]["protocol"] == "http" and complete[0]["conductor"] == "c1"
    assert complete[0]["client"] == "127.0.0.1" and complete[0]["size"] == len(kernel)


@pytest.mark.slow
def test_an_empty_file_and_a_link_inside_the_root(served: Served) -> None:
    assert served.get("/boot/empty.bin")[::2] == (200, b"")
    assert served.get("/boot/inside-link")[::2] == (200, b"x" * 100)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/boot/../etc/passwd", 403),
        ("/boot/sub/../../secret", 403),
        ("/boot/%2e%2e/secret", 403),
        ("/boot/%2E%2E%2Fsecret", 403),
        ("/boot/sub%2F..%2F..%2Fsecret", 403),
        ("/boot/sub\\..\\..\\secret", 403),
        ("/boot/escape", 403),  # a symlink out of the root
        ("/boot/escape-dir/secret", 403),
        ("/boot/", 403),  # no listing of the root
        ("/boot", 403),
        ("/boot/sub", 403),  # nor of a directory
        ("/boot/sub/", 403),
        ("/boot/missing.bin", 404),
        ("/boot/%ff", 400),
        ("/boot/a%00b", 403),
    ],
)
def test_unsafe_and_missing_paths_are_refused(served: Served, path: str, status: int) -> None:
    got, _, body = served.get(path)
    assert got == status, (path, body)
    assert b"outside the root" not in body


@pytest.mark.slow
def test_only_get_and_head(served: Served) -> None:
    status, headers, _ = http_request(
        served.daemon.metadata_url + "/boot/sub/x.bin", "POST", body=b"x"
    )
    assert status == 405 and headers["Allow"] == "GET, HEAD"


@pytest.mark.slow
def test_a_rendered_ipxe_script_points_at_the_http_route(served: Served) -> None:
    status, headers, body = served.get(f"/boot/{NODE['uuid']}.ipxe")
    assert status == 200, body
    assert body.decode() == (
        f"#!ipxe\nkernel {HTTP_ADDRESS}/boot/{NODE['uuid']}/kernel\n"
        f"initrd {HTTP_ADDRESS}/boot/{NODE['uuid']}/ramdisk\nboot\n"
    )
    assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    (event,) = served.events(f"{NODE['uuid']}.ipxe")[:1]
    assert (event["kind"], event["protocol"]) == ("ipxe", "http")


@pytest.mark.slow
def test_the_metadata_site_still_answers_beside_the_route(served: Served) -> None:
    status, _, body = served.get("/latest/meta-data/instance-id")
    assert (status, body.decode()) == (200, NODE["uuid"])
    assert served.get("/bootx")[0] == 404  # only /boot/ is the route


def _start_download(served: Served, path: str) -> tuple[socket.socket, int, bytes]:
    """A raw GET that reads only the headers: the server stalls on a full socket."""
    port = int(served.daemon.metadata_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return sock, length, rest


def _read_to_close(sock: socket.socket, have: bytes, length: int) -> bytes:
    deadline = time.monotonic() + 30
    while len(have) < length and time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break  # closed by the server: a reset is a close too
        if not chunk:
            break
        have += chunk
    return have


@pytest.mark.slow
def test_a_file_truncated_mid_download_closes_the_connection(served: Served) -> None:
    big = served.root / "shrinking.bin"
    big.write_bytes(os.urandom(48 * 1024 * 1024))
    sock, length, body = _start_download(served, "/boot/shrinking.bin")
    with sock:
        os.truncate(big, 1024)
        body = _read_to_close(sock, body, length)
        assert len(body) < length  # a short body, then the connection closed
    # Nothing crashed: the next request is served.
    assert served.get("/boot/sub/x.bin")[0] == 200
    assert served.daemon.running


@pytest.mark.slow
def test_a_file_deleted_mid_download_is_read_to_the_end(served: Served) -> None:
    """Deleting a file keeps it readable through the open descriptor: the download
    completes with the bytes it started with."""
    path = served.root / "deleted.bin"
    content = os.urandom(48 * 1024 * 1024)
    path.write_bytes(content)
    sock, length, body = _start_download(served, "/boot/deleted.bin")
    with sock:
        path.unlink()
        body = _read_to_close(sock, body, length)
    assert len(body) == length == len(content)
    mismatch = next(
        (i for i in range(0, length, 4096) if body[i : i + 4096] != content[i : i + 4096]), None
    )
    assert mismatch is None, mismatch
    assert served.get("/boot/deleted.bin")[0] == 404
    assert served.daemon.running
