"""Driving the Klein sites in memory with StubTreq."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred


@attrs.frozen
class Answer:
    """A response, read completely."""

    status: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return (
            values[0].decode()
            if values and isinstance(values[0], bytes)
            else (values[0] if values else None)
        )

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the request did not finish"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


class Client:
    """Synchronous requests against a resource, as 127.0.0.1 (StubTreq's peer)."""

    def __init__(
        self,
        resource: Any,
        base: str = "http://169.254.169.254",
        settle: Callable[[], object] | None = None,
        *,
        forms: bool = True,
    ) -> None:
        self._treq = StubTreq(resource)
        if not forms:
            # As the daemon's metadata site (HardenedSite(forms=False)): twisted.web
            # leaves POST bodies alone.  StubTreq has no setting for it.
            self._treq._agent._serverFactory._parsePOSTFormSubmission = False
        self._base = base
        # Called once the request is in, before the answer is read: lets a test run
        # the clock of what holds requests (watches) so every request finishes.
        self._settle = settle

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        d = self._treq.request(method, self._base + path, **kwargs)
        self._treq.flush()
        if self._settle is not None:
            self._settle()
            self._treq.flush()
        response = fired(d)
        body = fired(response.content())
        return Answer(response.code, response.headers, body)

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)
