# -*- test-case-name: tests.web.test_services_view -*-
"""The service view (``/service/latest/...``) as HTTP: renderers over the rules of
:mod:`metadatad.core.services`.

A leaf per fact, each with its own status code (a missing fact is a 404 of its own),
the whole structure as JSON on ``Accept: application/json``; ``services`` answers
``0=db`` lines, and a service is found by that index or by its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metadatad.core.nodes import Node
from metadatad.core.services import SERVICE_LEAVES, ProjectView, member_of, service_document
from metadatad.metadata.reply import Reply, error, json_reply, text

__all__ = ["render_service"]


def render_service(node: Node, view: ProjectView, parts: Sequence[str], as_json: bool) -> Reply:
    """``/service/latest/<parts>``: a listing, a leaf, a host or a service."""
    me = member_of(node, view)
    if me.node.service is None:
        return error(404, "Not Found: this node is not a member of a service")
    document = service_document(me.node, view)
    if not parts:
        return json_reply(document) if as_json else text("\n".join(SERVICE_LEAVES))
    return _walk(document, parts, as_json, top=True)


_NOT_FOUND = "Not Found"


def _walk(value: Any, parts: Sequence[str], as_json: bool, top: bool = False) -> Reply:
    """Follow ``parts`` down ``value``: objects by key, host lists by cardinal value,
    the service list by index or name."""
    for depth, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                return error(404, _NOT_FOUND)
            value = value[part]
        elif isinstance(value, list):
            chosen = _pick(value, part)
            if chosen is None:
                return error(404, f"{_NOT_FOUND}: no {_list_kind(value)} {part[:64]!r}")
            value = chosen
        else:
            return error(404, _NOT_FOUND)
        if value is None and depth < len(parts) - 1:
            return error(404, _NOT_FOUND)
    return _render(value, as_json)


def _is_hosts(items: list[Any]) -> bool:
    return bool(items) and "cardinal_value" in items[0]


def _list_kind(items: list[Any]) -> str:
    return "host with cardinal value" if _is_hosts(items) else "service"


def _pick(items: list[Any], part: str) -> Any:
    if _is_hosts(items):
        return next((h for h in items if str(h["cardinal_value"]) == part), None)
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    return next((s for s in items if s.get("service_name") == part), None)


def _render(value: Any, as_json: bool) -> Reply:
    if value is None:
        return error(404, "Not Found: no value")
    if as_json:
        return json_reply(value)
    if isinstance(value, dict):
        return text("\n".join(value))
    if isinstance(value, list):
        if _is_hosts(value):
            return text("\n".join(f"{h['cardinal_value']}={h['hostname']}" for h in value))
        return text("\n".join(f"{i}={s['service_name']}" for i, s in enumerate(value)))
    return text(str(value))
