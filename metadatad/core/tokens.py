# -*- test-case-name: tests.core.test_tokens -*-
"""IMDSv2 session tokens: stateless HMAC tokens bound to a node and an expiry.

A token is ``<payload>.<mac>``, both base64url without padding: the payload is
``v1:<node uuid>:<expiry>`` (expiry in whole Unix seconds) and the MAC is HMAC-SHA256
of the payload under a key derived from ``token_secret``.  Nothing is stored, so every
conductor sharing the secret accepts every other conductor's tokens.

Rotation: a signer built with ``previous`` also accepts tokens signed with the
previous secret, but only until ``previous_until`` (the moment the new secret took
over plus one maximum TTL): no token issued before the rotation can outlive that.

Pure: every check takes ``now``; no clock, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re

MIN_TTL = 1
MAX_TTL = 21600
_VERSION = "v1"
_MAX_TOKEN_CHARS = 512
# Tokens already verified, remembered until they expire (clients reuse one for hours).
_CACHE_SIZE = 10_000
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class TokenError(Exception):
    """A token that is not accepted; ``reason`` is short, safe to log (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TTLError(ValueError):
    """A ``X-aws-ec2-metadata-token-ttl-seconds`` value that is missing or out of range."""


def parse_ttl(values: list[str] | None) -> int:
    """The requested TTL from the header's values: one integer from 1 to 21600."""
    if not values:
        raise TTLError("missing X-aws-ec2-metadata-token-ttl-seconds header")
    if len(values) != 1:
        raise TTLError("X-aws-ec2-metadata-token-ttl-seconds given more than once")
    raw = values[0].strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise TTLError(f"X-aws-ec2-metadata-token-ttl-seconds must be {MIN_TTL}..{MAX_TTL}")
    ttl = int(raw)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise TTLError(f"X-aws-ec2-metadata-token-ttl-seconds must be {MIN_TTL}..{MAX_TTL}")
    return ttl


def _key(secret: str) -> bytes:
    # A derived key: the operator's secret is never used raw for two purposes.
    return hmac.new(secret.encode("utf-8"), b"metadatad imdsv2 token key", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TokenError("malformed token")
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    # Base64 ignores the unused low bits of the last character: without this check a
    # token with its last character changed would still verify (one token, one text).
    if _b64(decoded) != text:
        raise TokenError("malformed token")
    return decoded


class TokenSigner:
    """Issues and checks tokens with ``secret`` (and, for a while, ``previous``)."""

    def __init__(self, secret: str, previous: str = "", previous_until: float = 0.0) -> None:
        if not secret:
            raise ValueError("a token secret must not be empty")
        self._key = _key(secret)
        self._previous = _key(previous) if previous and previous != secret else None
        self._previous_until = previous_until
        # token -> (node, expiry, usable until): a hit skips the decoding and the HMAC.
        self._verified: dict[str, tuple[str, int, float]] = {}

    def issue(self, node_uuid: str, ttl: int, now: float) -> str:
        """A token for ``node_uuid`` valid for ``ttl`` seconds from ``now``."""
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be {MIN_TTL}..{MAX_TTL}, got {ttl}")
        payload = f"{_VERSION}:{node_uuid}:{int(now) + ttl}".encode("ascii")
        mac = hmac.digest(self._key, payload, "sha256")
        return f"{_b64(payload)}.{_b64(mac)}"

    def verify(self, token: str, now: float) -> tuple[str, int]:
        """``(node uuid, expiry)`` of a valid token, else :class:`TokenError`.

        The node is the one the token was issued to: the caller must still check that
        it is the node asking.
        """
        known = self._verified.get(token)
        if known is not None:
            node, expiry, until = known
            if now < until and expiry <= now + MAX_TTL + 1:
                return node, expiry
            del self._verified[token]
        node, expiry, until = self._check(token, now)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (node, expiry, until)
        return node, expiry

    def _check(self, token: str, now: float) -> tuple[str, int, float]:
        if not token or len(token) > _MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenError("malformed token")
        encoded_payload, encoded_mac = token.split(".")
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
        keys = [self._key]
        if self._previous is not None and now < self._previous_until:
            keys.append(self._previous)
        signed_by = None
        for index, key in enumerate(keys):
            if hmac.compare_digest(hmac.digest(key, payload, "sha256"), mac):
                signed_by = index
                break
        if signed_by is None:
            raise TokenError("bad token signature")
        try:
            version, node, raw_expiry = payload.decode("ascii").split(":")
            expiry = int(raw_expiry)
        except ValueError:
            raise TokenError("malformed token") from None
        if version != _VERSION or not _UUID.match(node):
            raise TokenError("malformed token")
        if now >= expiry:
            raise TokenError("expired token")
        if expiry > now + MAX_TTL + 1 or (signed_by == 1 and expiry > self._previous_until):
            # Signed, but no signer of ours issues such a token: refuse it all the same.
            raise TokenError("token expiry out of range")
        # A token of the previous secret is usable only while that secret is.
        until = float(expiry) if signed_by == 0 else min(float(expiry), self._previous_until)
        return node, expiry, until
