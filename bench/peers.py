"""Peer servers for bench/http.py: the limits metadatad is compared against.

    .venv/bin/python -P bench/peers.py bare  --port PORT   # bare twisted.web leaf resource
    .venv/bin/python -P bench/peers.py klein --port PORT   # one Klein route, GET /constant
    .venv/bin/python -P bench/peers.py klein-branch --port PORT  # catch-all, as the daemon

(``-P`` keeps bench/ off sys.path: bench/http.py would shadow the stdlib's ``http``.)

Both return the same constant body with the same headers the metadata site sends for a
text leaf (Content-Type text/plain, explicit Content-Length), are served by the daemon's
own Site factory (``metadatad.tap.make_site`` with ``access_log=False``: a QuietSite, no
access log line, no tracebacks shown), listen through a Twisted endpoint string as the
daemon does, and run on the default reactor (epoll on Linux, as under twistd).  When the
port is listening one line is printed: ``ready <kind> <port> <reactor class>``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource

from metadatad.tap import make_site

CONTENT_TYPE = b"text/plain; charset=utf-8"


def _constant(request: Any, body: bytes) -> bytes:
    request.setHeader(b"Content-Type", CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


class Constant(Resource):
    """A bare leaf: every path, GET or HEAD, gets the constant."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        return _constant(request, self.body)

    render_HEAD = render_GET


def bare_resource(body: bytes) -> Any:
    return Constant(body)


def klein_resource(body: bytes) -> Any:
    from klein import Klein

    app = Klein()

    @app.route("/constant")
    def constant(request: Any) -> bytes:
        return _constant(request, body)

    return app.resource()


def klein_branch_resource(body: bytes) -> Any:
    """The metadata site's routing without its work: one catch-all branch route."""
    from klein import Klein

    app = Klein()

    @app.route("/", branch=True)  # as metadatad.metadata.site.MetadataSite.handle
    def constant(request: Any) -> bytes:
        return _constant(request, body)

    return app.resource()


def klein_measured_resource(body: bytes) -> Any:
    """The Klein constant counted for /metrics by a resource around it (the daemon's
    own sites count in HardenedSite instead)."""
    from twisted.internet import reactor

    from metadatad.telemetry import MeasuredResource

    return MeasuredResource(klein_resource(body), "bench", reactor)


RESOURCES = {
    "bare": bare_resource,
    "klein": klein_resource,
    "klein-branch": klein_branch_resource,
    "klein-measured": klein_measured_resource,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(RESOURCES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--body", default="constant", help="the constant answered")
    parser.add_argument(
        "--backlog",
        type=int,
        help="listen queue (default: Twisted's, 50; the daemon's: 65535, capped by the kernel)",
    )
    args = parser.parse_args(argv)
    body = args.body.encode()

    from twisted.internet import reactor

    resource = RESOURCES[args.kind](body)
    site = make_site(resource, access_log=False)
    description = f"tcp:{args.port}:interface={args.interface}"
    if args.backlog is not None:
        description += f":backlog={args.backlog}"
    endpoint = serverFromString(reactor, description)

    def listening(port: Any) -> None:
        name = f"{type(reactor).__module__}.{type(reactor).__qualname__}"
        print(f"ready {args.kind} {port.getHost().port} {name}", flush=True)

    failures = []

    def failed(failure: Any) -> None:
        failures.append(failure)
        print(f"peers: cannot listen: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    # Listen once running, so that a failure can stop the reactor.
    reactor.callWhenRunning(lambda: endpoint.listen(site).addCallbacks(listening, failed))
    reactor.run()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
