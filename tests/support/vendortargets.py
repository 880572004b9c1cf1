"""Dynamic vendordata targets for tests, and the TLS material they and the Keystone stub
(:mod:`metadatad.testing.keystone`) need: a CA and server certificates made here with
``cryptography``.

A :class:`Target` is a twisted.web resource recording every request; serve it on
loopback with :func:`listen` (real TCP, optionally TLS) or in memory with StubTreq.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.web import server
from twisted.web.resource import Resource

# --- TLS material ---------------------------------------------------------------------


@attrs.frozen
class Issued:
    """A certificate and its key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A throw-away CA that issues server certificates for names and addresses."""

    def __init__(self, common_name: str = "metadatad test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._name = _name(common_name)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> str:
        """Write the CA certificate (what ``ca_file`` names); returns the path."""
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, *names: str) -> Issued:
        """A server certificate whose subjectAltName lists ``names`` (DNS or IP)."""
        key = ec.generate_private_key(ec.SECP256R1())
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


# --- a vendordata target ----------------------------------------------------------------


@attrs.define
class Seen:
    """One request a target received."""

    method: bytes
    path: bytes
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class Target(Resource):
    """A vendordata service: answers every POST with ``status``, ``body`` and
    ``headers``; with ``hold`` set, requests wait until :meth:`release`."""

    isLeaf = True

    def __init__(
        self,
        body: Any = None,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        super().__init__()
        self.status = status
        self.body = raw if raw is not None else json.dumps(body or {}).encode()
        self.headers = dict(headers or {})
        self.seen: list[Seen] = []
        self.hold = False
        self.held: list[server.Request] = []
        # Called with each request as it arrives (the test may fire Deferreds).
        self.on_request: Callable[[Seen], None] | None = None

    def render(self, request: server.Request) -> Any:
        assert request.content is not None
        seen = Seen(
            request.method,
            request.path,
            {
                name.decode().lower(): [v.decode("latin-1") for v in values]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            request.content.read(),
        )
        self.seen.append(seen)
        if self.on_request is not None:
            self.on_request(seen)
        if self.hold:
            self.held.append(request)
            return server.NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: server.Request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in self.headers.items():
            request.setHeader(name.encode(), value.encode())
        return self.body

    def release(self) -> None:
        """Answer every held request (those whose client is still there)."""
        self.hold = False
        held, self.held = self.held, []
        for request in held:
            if not request._disconnected:
                request.write(self._answer(request))
                request.finish()


def listen(resource: Resource, issued: Issued | None = None) -> tuple[Any, int]:
    """Serve ``resource`` on 127.0.0.1 (TLS with ``issued``): ``(port, number)``.
    Stop it with ``port.stopListening()``."""
    from twisted.internet import reactor

    site = server.Site(resource)
    if issued is None:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    else:
        from twisted.internet.ssl import PrivateCertificate

        options = PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem).options()
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, site, options, interface="127.0.0.1"
        )
    return port, port.getHost().port
