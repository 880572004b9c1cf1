"""Small pieces shared by the Klein sites."""

from __future__ import annotations

from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException


def routing_error(failure: Failure) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """werkzeug's routing error (404, 405) in ``failure``: its status, name and ``Allow``
    header; None when the failure is anything else (a bug)."""
    if not failure.check(HTTPException):
        return None
    exception = failure.value
    assert isinstance(exception, HTTPException)
    allow = tuple(
        ("Allow", value)
        for name, value in exception.get_response().headers.items()
        if name.lower() == "allow"
    )
    return exception.code or 500, exception.name, allow
