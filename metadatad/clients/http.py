# -*- test-case-name: tests.web.test_vendordata_http -*-
"""The outbound HTTP client factory: a keep-alive pool, TLS verified against the
system's or an operator's CA file, a connect timeout."""

from __future__ import annotations

import re
from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool


def trust_policy(ca_file: str) -> BrowserLikePolicyForHTTPS:
    """HTTPS verified against the certificates of ``ca_file`` (else the system's),
    with service-identity hostname checks."""
    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    with open(ca_file, "rb") as f:
        pem = f.read()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, flags=re.DOTALL
    )
    roots = [Certificate.loadPEM(block) for block in blocks]
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(roots))


def make_http_client(
    reactor: Any,
    ca_file: str = "",
    connect_timeout: float | None = None,
    max_persistent_per_host: int | None = None,
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq HTTPClient with its own keep-alive pool, verified TLS and a connect
    timeout; the pool is returned to be closed at stop."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    if max_persistent_per_host is not None:
        pool.maxPersistentPerHost = max_persistent_per_host
    agent = Agent(
        reactor,
        contextFactory=trust_policy(ca_file),
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return HTTPClient(agent), pool
