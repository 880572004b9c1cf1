"""Small pieces shared by the Klein sites."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException


def handle_failure(request: Request, failure: Failure, log: Logger) -> bytes:
    """Answer a failed request: werkzeug's routing errors keep their status (404, 405);
    any other exception is a bug, logged with its traceback and answered with a bare 500.
    """
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    if failure.check(HTTPException):
        exception = failure.value
        assert isinstance(exception, HTTPException)
        request.setResponseCode(exception.code or 500)
        for name, value in exception.get_response().headers.items():
            if name.lower() == "allow":
                request.setHeader(b"Allow", value.encode("ascii"))
        return f"{exception.name}\n".encode()
    log.failure(
        "unhandled error answering {method} {path}",
        failure,
        method=request.method,
        path=request.path,
    )
    request.setResponseCode(500)
    return b"Internal Server Error\n"
