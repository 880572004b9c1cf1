"""JSON input within bounds: depth, lone surrogates, bytes that are not UTF-8."""

from __future__ import annotations

import pytest

from metadatad.core.jsoninput import MAX_DEPTH, JSONInputError, check_document, parse_json


def test_ordinary_documents_pass() -> None:
    """What operators and nodes send is returned as parsed."""
    assert parse_json(b'{"a": [1, {"b": "caf\\u00e9 \\ud83d\\ude00"}]}') == {
        "a": [1, {"b": "café 😀"}]
    }
    assert parse_json("[]") == []


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"[" * 5000, "nested deeper"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested deeper"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
        (b'"\\ud800"', "lone surrogate"),
        (b'{"\\udc00": 1}', "lone surrogate"),
        (b'[["ok", {"k": ["x\\udfffy"]}]]', "lone surrogate"),
        (b'"\\ud83d"', "lone surrogate"),
        (b'"\xff"', "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_refused(data: bytes, detail: str) -> None:
    """Each refusal is a JSONInputError (a ValueError) with a one-line message."""
    with pytest.raises(JSONInputError) as raised:
        parse_json(data)
    assert detail in str(raised.value)
    assert "\n" not in str(raised.value)


def test_depth_limit_is_inclusive() -> None:
    """``max_depth`` levels of arrays and objects are fine; one more is not."""
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert parse_json(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(JSONInputError):
        parse_json(b"[[1]]", max_depth=1)


def test_check_document_walks_without_recursion() -> None:
    """A document built in Python, deeper than the interpreter's stack, is refused
    without a RecursionError."""
    deep: list[object] = []
    for _ in range(50_000):
        deep = [deep]
    with pytest.raises(JSONInputError):
        check_document(deep)
