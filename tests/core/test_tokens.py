"""IMDSv2 session tokens: pure issue/verify, expiry, forgery, rotation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metadatad.core.tokens import MAX_TTL, TokenError, TokenSigner, TTLError, parse_ttl

NODE_A = "d8e02d56-2648-49a3-bf97-6be8f1204f00"
NODE_B = "d8e02d56-2648-49a3-bf97-6be8f1204f01"
NOW = 1_700_000_000.0


def test_a_token_names_its_node_until_it_expires() -> None:
    """verify() gives back the node and expiry; one second before expiry it still works."""
    signer = TokenSigner("secret")
    token = signer.issue(NODE_A, 60, NOW)
    assert signer.verify(token, NOW) == (NODE_A, int(NOW) + 60)
    assert signer.verify(token, NOW + 59.9) == (NODE_A, int(NOW) + 60)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, NOW + 60)


def test_any_conductor_with_the_secret_accepts_it() -> None:
    """Stateless: a second signer with the same secret accepts; another secret does not."""
    token = TokenSigner("shared").issue(NODE_A, 21600, NOW)
    assert TokenSigner("shared").verify(token, NOW + 100)[0] == NODE_A
    with pytest.raises(TokenError, match="signature"):
        TokenSigner("other").verify(token, NOW + 100)


def test_the_token_does_not_contain_the_secret() -> None:
    """Nothing of the secret shows in the token."""
    token = TokenSigner("very-secret-value").issue(NODE_A, 10, NOW)
    assert "very-secret-value" not in token


def test_forged_payload_is_refused() -> None:
    """Swapping the node or stretching the expiry breaks the signature."""
    import base64

    signer = TokenSigner("secret")
    token = signer.issue(NODE_A, 60, NOW)
    _, mac = token.split(".")
    for payload in (f"v1:{NODE_B}:{int(NOW) + 60}", f"v1:{NODE_A}:{int(NOW) + 99999}"):
        forged = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode() + "." + mac
        with pytest.raises(TokenError, match="signature"):
            signer.verify(forged, NOW)


@pytest.mark.parametrize(
    "token", ["", ".", "a.b.c", "x" * 600, "!!!.???", "abc", "YWJj.", "é.é", "YQ.YQ"]
)
def test_malformed_tokens_are_refused(token: str) -> None:
    """Garbage is a TokenError, never another exception."""
    with pytest.raises(TokenError):
        TokenSigner("secret").verify(token, NOW)


@given(st.text(max_size=300))
def test_no_text_is_accepted_or_crashes(token: str) -> None:
    """Arbitrary text is refused with TokenError (a forgery would need the key)."""
    with pytest.raises(TokenError):
        TokenSigner("secret").verify(token, NOW)


def test_a_token_has_one_text() -> None:
    """The unused low bits of a base64 part's last character are not ignored: every
    other character that decodes to the same bytes is refused (found by the property
    test below, which flips one character at random)."""
    signer = TokenSigner("secret")
    token = signer.issue(NODE_A, 60, NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for end in (token.index(".") - 1, len(token) - 1):
        for replacement in alphabet.replace(token[end], ""):
            changed = token[:end] + replacement + token[end + 1 :]
            with pytest.raises(TokenError):
                signer.verify(changed, NOW)


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_every_flipped_byte_is_refused(position: int, value: int) -> None:
    """Changing any character of a valid token makes it invalid."""
    signer = TokenSigner("secret")
    token = signer.issue(NODE_A, 60, NOW)
    position %= len(token)
    replacement = chr(value % 128)
    if token[position] == replacement:
        return
    changed = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(TokenError):
        signer.verify(changed, NOW)


def test_rotation_accepts_the_previous_secret_for_one_max_ttl() -> None:
    """After rotating, old tokens work until previous_until, and new ones are signed anew."""
    old = TokenSigner("old")
    old_token = old.issue(NODE_A, MAX_TTL, NOW)
    rotated = TokenSigner("new", previous="old", previous_until=NOW + MAX_TTL)
    assert rotated.verify(old_token, NOW + 10)[0] == NODE_A
    assert rotated.verify(old_token, NOW + MAX_TTL - 1)[0] == NODE_A
    # A new token is signed with the new secret: the old signer refuses it.
    new_token = rotated.issue(NODE_A, 60, NOW)
    with pytest.raises(TokenError):
        old.verify(new_token, NOW)
    # Past the window the previous secret counts no more.
    late = old.issue(NODE_A, 60, NOW + MAX_TTL)
    with pytest.raises(TokenError, match="signature"):
        rotated.verify(late, NOW + MAX_TTL + 1)
    # Without a previous secret old tokens are refused at once.
    with pytest.raises(TokenError, match="signature"):
        TokenSigner("new").verify(old_token, NOW + 10)


def test_previous_secret_cannot_mint_tokens_outliving_the_window() -> None:
    """A token signed with the previous secret but expiring after the window is refused."""
    rotated = TokenSigner("new", previous="old", previous_until=NOW + 100)
    token = TokenSigner("old").issue(NODE_A, 1000, NOW)
    with pytest.raises(TokenError, match="out of range"):
        rotated.verify(token, NOW + 10)


def test_issue_checks_the_ttl() -> None:
    """issue() refuses a TTL outside 1..21600."""
    for ttl in (0, MAX_TTL + 1):
        with pytest.raises(ValueError):
            TokenSigner("s").issue(NODE_A, ttl, NOW)


def test_an_empty_secret_is_refused() -> None:
    """An empty secret would sign nothing worth checking."""
    with pytest.raises(ValueError):
        TokenSigner("")


@pytest.mark.parametrize(("values", "ttl"), [(["1"], 1), (["21600"], 21600), ([" 300 "], 300)])
def test_ttl_header_values(values: list[str], ttl: int) -> None:
    """1..21600, surrounding blanks ignored."""
    assert parse_ttl(values) == ttl


@pytest.mark.parametrize(
    "values",
    [
        None,
        [],
        ["0"],
        ["21601"],
        ["-1"],
        ["1.5"],
        ["abc"],
        [""],
        ["1", "2"],
        ["\uff11\uff12"],
        ["9" * 50],
    ],
)
def test_bad_ttl_header_values(values: list[str] | None) -> None:
    """Missing, repeated, non-numeric or out-of-range TTLs are refused."""
    with pytest.raises(TTLError):
        parse_ttl(values)


def test_remembered_tokens_still_expire() -> None:
    """A token verified once (and remembered) is refused all the same once expired, and
    a previous-secret token stops at the end of the rotation window."""
    signer = TokenSigner("secret")
    token = signer.issue(NODE_A, 10, NOW)
    assert signer.verify(token, NOW)[0] == NODE_A
    assert signer.verify(token, NOW + 9)[0] == NODE_A
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, NOW + 10)
    rotated = TokenSigner("new", previous="old", previous_until=NOW + 100)
    old_token = TokenSigner("old").issue(NODE_A, 90, NOW)
    assert rotated.verify(old_token, NOW + 50)[0] == NODE_A
    with pytest.raises(TokenError):
        rotated.verify(old_token, NOW + 100)


def test_the_memory_of_verified_tokens_is_bounded() -> None:
    """However many tokens are shown, at most 10,000 are remembered."""
    signer = TokenSigner("secret")
    for i in range(10_050):
        signer.verify(signer.issue(NODE_A, 1 + i % 21600, NOW), NOW)
    assert len(signer._verified) <= 10_000
