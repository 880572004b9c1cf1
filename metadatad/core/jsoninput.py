# -*- test-case-name: tests.core.test_jsoninput -*-
"""JSON from outside (admin API bodies, node files, peer posts), parsed within bounds.

:func:`parse_json` refuses, with a :class:`JSONInputError` naming the problem:

- text that is not JSON, or bytes that are not UTF-8;
- nesting deeper than ``max_depth`` arrays and objects (the parser's own recursion
  limit is never reached: ``[`` x 5000 is a clear error, not a ``RecursionError``);
- a lone surrogate (``"\\ud800"``) in any string, key or value: valid JSON, but not
  text any database driver, log or UTF-8 encoder accepts.

Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class JSONInputError(ValueError):
    """JSON input that is refused; ``str()`` is one line, safe to show and log."""


def parse_json(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """The document in ``data``, checked as the module docstring says."""
    try:
        document = json.loads(data)
    except RecursionError:
        raise JSONInputError(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise JSONInputError("not UTF-8 text") from None
    except ValueError as e:
        raise JSONInputError(f"not valid JSON: {e}") from None
    check_document(document, max_depth)
    return document


def check_document(document: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`JSONInputError` if ``document`` (already parsed) nests deeper than
    ``max_depth`` or holds a string that is not valid Unicode."""
    # An explicit stack: a deep document must not exhaust the interpreter's.
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth >= max_depth:
                raise JSONInputError(f"nested deeper than {max_depth} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def is_valid_text(value: str) -> bool:
    """True unless ``value`` holds a lone surrogate (which UTF-8 cannot encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: Any) -> None:
    if isinstance(value, str) and not is_valid_text(value):
        raise JSONInputError("a string holds a lone surrogate (\\ud800-\\udfff): not valid text")
