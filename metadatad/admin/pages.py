# -*- test-case-name: tests.web.test_console_site -*-
"""The console's HTML, rendered on the server.

Every value goes through :class:`markupsafe.Markup`'s formatting, which escapes
whatever is not already markup: a node named ``<script>`` is shown as text.  Pages
carry no inline script or style (the Content-Security-Policy forbids both); the ring
picture is SVG whose sizes are attributes.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup, escape

from metadatad.admin.timeline import Entry
from metadatad.db.console import PUSH_STATES, NodeFilter, NodeRow

__all__ = [
    "cluster_fragments",
    "cluster_page",
    "confirm_page",
    "login_page",
    "node_page",
    "nodes_page",
    "whatif_page",
]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
ACTIONS = {
    "repush": ("Re-push the DHCP mapping", "Its owner pushes the node's boot mapping again."),
    "clear-vendordata": (
        "Clear the vendordata error",
        "The node's recorded vendordata failures are forgotten; its next boot asks again.",
    ),
    "delete-shared-keys": (
        "Delete the shared keys",
        "The keys the node shared with its project are deleted; it may post new ones.",
    ),
    "reset-password": (
        "Reset the posted password",
        "The password the node posted is cleared (Nova's clear-password); it may post again.",
    ),
}


def _layout(title: str, body: Markup, csrf: str | None, active: str = "") -> bytes:
    nav = Markup("")
    if csrf is not None:
        links = Markup("").join(
            Markup('<a href="{}"{}>{}</a>').format(
                href, Markup(' class="active"') if key == active else "", label
            )
            for key, href, label in (
                ("cluster", "/", "Cluster"),
                ("nodes", "/console/nodes", "Nodes"),
                ("whatif", "/console/whatif", "What-if"),
            )
        )
        nav = Markup(
            '<nav>{}<form method="post" action="/console/logout" class="logout">'
            '<input type="hidden" name="csrf" value="{}">'
            '<button type="submit">Log out</button></form></nav>'
        ).format(links, csrf)
    page = Markup(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>{} · metadatad</title>"
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<script src="/console/static/console.js" defer></script>'
        "</head><body><header><h1>metadatad</h1>{}</header><main>{}</main></body></html>\n"
    ).format(title, nav, body)
    return str(page).encode("utf-8")


def login_page(message: str = "") -> bytes:
    """The login form: the admin token, posted (never in a URL)."""
    error = Markup('<p class="error" id="login-error">{}</p>').format(message) if message else ""
    body = Markup(
        "<h2>Log in</h2>{}"
        '<form method="post" action="/console/login" class="login">'
        '<label>Admin token <input type="password" name="token" id="token" '
        'autocomplete="current-password" required autofocus></label>'
        '<button type="submit" id="login">Log in</button></form>'
        "<p>The token is the one in <code>[admin] token_file</code>; the browser keeps a "
        "signed session cookie until it closes, never the token.</p>"
    ).format(error)
    return _layout("Log in", body, None)


def _age_class(conductor: Mapping[str, Any], timeout: float) -> str:
    age = conductor.get("heartbeat_age")
    if not conductor.get("live") or age is None or age > timeout:
        return "dead"
    return "live"


def _color(name: str) -> str:
    return PALETTE[zlib.crc32(name.encode("utf-8")) % len(PALETTE)]


def cluster_fragments(snapshot: Mapping[str, Any]) -> dict[str, str]:
    """The live parts of the cluster page (what the event stream sends)."""
    timeout = float(snapshot.get("heartbeat_timeout") or 0)
    rows = Markup("").join(
        Markup(
            '<tr data-conductor="{name}" data-live="{live}" class="{state}">'
            '<td>{name}</td><td>{group}</td><td class="age">{age}</td><td>{state}</td>'
            "<td>{assigned}</td><td>{claimed}</td></tr>"
        ).format(
            name=c["name"],
            live="yes" if _age_class(c, timeout) == "live" else "no",
            state=_age_class(c, timeout) if c.get("online", True) else "stopped",
            group=c.get("group") or "-",
            age="-" if c.get("heartbeat_age") is None else f"{c['heartbeat_age']:.1f} s",
            assigned=c.get("assigned", 0),
            claimed=c.get("claimed", 0),
        )
        for c in snapshot.get("conductors", [])
    )
    table = Markup(
        '<table class="conductors"><thead><tr><th>Conductor</th><th>Group</th>'
        "<th>Heartbeat age</th><th>State</th><th>Nodes assigned</th><th>Nodes claimed</th>"
        "</tr></thead><tbody>{}</tbody></table>"
    ).format(rows)
    summary = Markup(
        '<p id="ring-summary">Ring generation <strong id="generation">{}</strong>{} · '
        "{} nodes, {} unowned, {} not claimed by their ring owner yet · "
        "dead after {:g} s without a heartbeat</p>"
    ).format(
        snapshot.get("generation", "-"),
        Markup(" since {}").format(snapshot["changed_at"]) if snapshot.get("changed_at") else "",
        snapshot.get("nodes", 0),
        snapshot.get("unowned", 0),
        snapshot.get("pending", 0),
        timeout,
    )
    return {"conductors": str(table), "ring": str(summary + _ring_picture(snapshot))}


def _ring_picture(snapshot: Mapping[str, Any]) -> Markup:
    """One bar per ring member, as wide as its share of the nodes (equal shares when
    there are no nodes)."""
    members = [c for c in snapshot.get("conductors", []) if c.get("in_ring")]
    total = sum(c.get("assigned", 0) for c in members)
    shares = [
        (c["name"], (c.get("assigned", 0) / total) if total else 1 / len(members)) for c in members
    ]
    x = 0.0
    parts = []
    for name, share in shares:
        width = share * 1000
        label = Markup("")
        if width > 60:
            label = Markup('<text x="{:.1f}" y="38" text-anchor="middle">{}</text>').format(
                x + width / 2, name
            )
        parts.append(
            Markup(
                '<g class="member" data-conductor="{}" data-share="{:.4f}">'
                '<rect x="{:.1f}" y="10" width="{:.1f}" height="44" fill="{}">'
                "<title>{} · {:.1%}</title></rect>{}</g>"
            ).format(name, share, x, width, _color(name), name, share, label)
        )
        x += width
    if not parts:
        parts.append(Markup('<text x="500" y="38" text-anchor="middle">no live conductor</text>'))
    return Markup(
        '<svg id="ring" viewBox="0 0 1000 64" role="img" aria-label="the ring">{}</svg>'
    ).format(Markup("").join(parts))


def cluster_page(snapshot: Mapping[str, Any], csrf: str) -> bytes:
    """Conductors and the ring; ``console.js`` keeps both live."""
    fragments = cluster_fragments(snapshot)
    body = Markup(
        '<h2>Cluster</h2><p class="live-state" id="stream-state">live updates: connecting</p>'
        '<section id="conductors" data-stream="/console/events">{}</section>'
        '<section id="ring-section"><h3>Ring</h3><div id="ring-box">{}</div></section>'
    ).format(Markup(fragments["conductors"]), Markup(fragments["ring"]))
    return _layout("Cluster", body, csrf, "cluster")


def _options(values: Iterable[tuple[str, str]], chosen: str) -> Markup:
    return Markup("").join(
        Markup('<option value="{}"{}>{}</option>').format(
            value, Markup(" selected") if value == chosen else "", label
        )
        for value, label in values
    )


def _query(wanted: NodeFilter, page: int) -> str:
    fields = {"q": wanted.search, "owner": wanted.owner, "push": wanted.push}
    fields["outcome"] = wanted.outcome
    fields = {k: v for k, v in fields.items() if v}
    return "/console/nodes?" + urlencode({**fields, "page": page})


def nodes_page(
    wanted: NodeFilter,
    total: int,
    rows: Sequence[NodeRow],
    *,
    choices: Mapping[str, list[str]],
    csrf: str,
    elapsed: float,
) -> bytes:
    """The nodes table: search, filters, one page, and the pager."""
    form = Markup(
        '<form method="get" action="/console/nodes" class="filters">'
        '<input type="search" name="q" id="search" value="{}" '
        'placeholder="name, uuid, MAC or IP">'
        '<select name="owner" id="owner"><option value="">any owner</option>'
        '<option value="-"{}>no owner</option>{}</select>'
        '<select name="push" id="push"><option value="">any push state</option>{}</select>'
        '<select name="outcome" id="outcome"><option value="">any boot outcome</option>{}'
        "</select>"
        '<button type="submit" id="find">Find</button></form>'
    ).format(
        wanted.search,
        Markup(" selected") if wanted.owner == "-" else "",
        _options(((o, o) for o in choices.get("owners", [])), wanted.owner),
        _options(((p, p) for p in PUSH_STATES), wanted.push),
        _options(
            ((o, o) for o in [*choices.get("outcomes", []), "none"]),
            wanted.outcome,
        ),
    )
    lines = Markup("").join(
        Markup(
            '<tr><td><a class="node" href="/console/nodes/{uuid}">{name}</a></td>'
            "<td><code>{uuid}</code></td><td>{macs}</td><td>{ips}</td><td>{owner}</td>"
            '<td class="push-{push}">{push}</td><td>{outcome}</td><td>{vd}</td></tr>'
        ).format(
            uuid=row.uuid,
            name=row.name,
            macs=" ".join(row.macs),
            ips=" ".join(row.ips),
            owner=row.owner or "-",
            push=row.push,
            outcome=row.outcome or "-",
            vd="error" if row.vendordata_error else "",
        )
        for row in rows
    )
    pages = max(1, -(-total // wanted.per_page))
    page = min(max(1, wanted.page), pages)
    pager = Markup('<p class="pager">{} nodes · page {} of {}{}{}</p>').format(
        total,
        page,
        pages,
        Markup(' <a href="{}" id="previous">previous</a>').format(_query(wanted, page - 1))
        if page > 1
        else "",
        Markup(' <a href="{}" id="next">next</a>').format(_query(wanted, page + 1))
        if page < pages
        else "",
    )
    body = Markup(
        "<h2>Nodes</h2>{}{}"
        '<table class="nodes" id="nodes"><thead><tr><th>Name</th><th>UUID</th><th>MACs</th>'
        "<th>IPs</th><th>Owner</th><th>DHCP push</th><th>Last boot</th><th>Vendordata</th>"
        '</tr></thead><tbody>{}</tbody></table><p class="timing">queried in {:.1f} ms</p>'
    ).format(form, pager, lines, elapsed * 1000)
    return _layout("Nodes", body, csrf, "nodes")


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(sep=" ") + " UTC"


def _action_button(uuid: str, action: str, extra: str = "") -> Markup:
    label = ACTIONS[action][0]
    target = f"/console/nodes/{uuid}/{action}" + (
        "?" + urlencode({"target": extra}) if extra else ""
    )
    return Markup('<a class="button" id="{}" href="{}">{}</a>').format(
        action + ("-" + extra if extra else ""), target, label
    )


def node_page(
    document: Mapping[str, Any],
    *,
    ownership: Mapping[str, Any],
    push: Mapping[str, Any] | None,
    vendordata_errors: Sequence[Mapping[str, Any]],
    entries: Sequence[Entry],
    status: Any,
    csrf: str,
    notice: str = "",
) -> bytes:
    """A node: ownership, DHCP, boot timeline, actions and its document."""
    uuid = str(document["uuid"])
    standbys = ", ".join(ownership.get("standbys") or []) or "-"
    who = Markup(
        '<dl><dt>Owner</dt><dd id="owner">{}</dd><dt>Ring owner</dt><dd>{}</dd>'
        "<dt>Standbys</dt><dd>{}</dd><dt>Claimed</dt><dd>{} (generation {}, ring {})</dd>"
        '<dt>Last boot outcome</dt><dd id="outcome">{}</dd></dl>'
    ).format(
        ownership.get("owner") or "-",
        ownership.get("ring_owner") or "-",
        standbys,
        ownership.get("claimed_at") or "-",
        ownership.get("generation", "-"),
        ownership.get("ring_generation", "-"),
        "-" if status is None else f"{status.outcome} ({status.detail}, {_when(status.at)})",
    )
    mappings = Markup("")
    if push is None:
        dhcp = Markup("<p>No DHCP mapping recorded (no provider, or not claimed yet).</p>")
    else:
        dhcp = Markup(
            '<dl><dt>Push state</dt><dd id="push-state" class="push-{}">{}</dd>'
            "<dt>Attempts</dt><dd>{}</dd><dt>Last error</dt><dd>{}</dd></dl>"
        ).format(push["status"], push["status"], push["attempts"], push.get("last_error") or "-")
        mappings = Markup(
            "<details><summary>DHCP mapping: desired and pushed</summary>"
            "<h4>Desired</h4><pre>{}</pre><h4>Pushed</h4><pre>{}</pre></details>"
        ).format(
            json.dumps(push.get("mapping"), indent=1, sort_keys=True),
            json.dumps(push.get("pushed"), indent=1, sort_keys=True),
        )
    steps = Markup("").join(
        Markup(
            '<li class="{} kind-{}"><time>{}</time>{} <strong>{}</strong>'
            '<span class="detail">{}</span></li>'
        ).format(
            "problem" if e.problem else "ok",
            e.kind,
            _when(e.at),
            Markup(" → <time>{}</time>").format(_when(e.until)) if e.until else "",
            e.summary,
            e.detail,
        )
        for e in entries
    )
    errors = Markup("").join(
        Markup("<li>{}: {} ({}) {}</li>").format(
            e.get("target"),
            e.get("reason"),
            e.get("failed_at"),
            _action_button(uuid, "clear-vendordata", str(e.get("target"))),
        )
        for e in vendordata_errors
    )
    shared = document.get("shared_keys") or {}
    actions = Markup("{}{}{}").format(
        _action_button(uuid, "repush") if push is not None else "",
        _action_button(uuid, "delete-shared-keys") if shared else "",
        _action_button(uuid, "reset-password") if document.get("password_set") else "",
    )
    body = Markup(
        '<h2>Node <span id="node-name">{}</span></h2><p><code>{}</code></p>{}'
        '<div class="columns"><section><h3>Who holds it</h3>{}</section>'
        "<section><h3>DHCP</h3>{}</section>"
        '<section><h3>Actions</h3><p class="actions">{}</p>'
        '<h3>Vendordata errors</h3><ul id="vendordata-errors">{}</ul></section></div>'
        '<section><h3>Boot timeline</h3><ol class="timeline" id="timeline">{}</ol></section>'
        '<section>{}<details><summary>Node document</summary><pre id="document">{}</pre>'
        "</details></section>"
    ).format(
        document.get("name", ""),
        uuid,
        Markup('<p class="notice" id="notice">{}</p>').format(notice) if notice else "",
        who,
        dhcp,
        actions or "-",
        errors or Markup("<li>none</li>"),
        steps or Markup("<li>nothing recorded yet</li>"),
        mappings,
        json.dumps(document, indent=1, sort_keys=True),
    )
    return _layout(f"Node {document.get('name', '')}", body, csrf, "nodes")


def confirm_page(uuid: str, name: str, action: str, target: str, csrf: str) -> bytes:
    """The confirmation of an action: a POST form with the CSRF token."""
    label, explanation = ACTIONS[action]
    body = Markup(
        "<h2>{}?</h2><p>Node <strong>{}</strong> (<code>{}</code>){}.</p><p>{}</p>"
        '<form method="post" action="/console/nodes/{}/{}">'
        '<input type="hidden" name="csrf" value="{}">'
        '<input type="hidden" name="target" value="{}">'
        '<button type="submit" id="confirm">Yes: {}</button> '
        '<a href="/console/nodes/{}" id="cancel">Cancel</a></form>'
    ).format(
        label,
        name,
        uuid,
        Markup(", target <strong>{}</strong>").format(target) if target else "",
        explanation,
        uuid,
        action,
        csrf,
        target,
        label,
        uuid,
    )
    return _layout(label, body, csrf, "nodes")


def whatif_page(
    conductors: Sequence[str],
    chosen: str,
    *,
    total: int,
    moves: Sequence[Mapping[str, Any]] | None,
    csrf: str,
    shown: int = 500,
) -> bytes:
    """Pick a conductor; see the nodes that would move if it died."""
    form = Markup(
        '<form method="get" action="/console/whatif"><label>If this conductor died: '
        '<select name="conductor" id="conductor">{}</select></label> '
        '<button type="submit" id="show">Show the moves</button></form>'
    ).format(_options(((c, c) for c in conductors), chosen))
    result = Markup("")
    if moves is not None:
        lines = Markup("").join(
            Markup(
                '<tr><td><a href="/console/nodes/{}">{}</a></td><td><code>{}</code></td>'
                "<td>{}</td><td>{}</td><td>{}</td></tr>"
            ).format(
                m["uuid"],
                m["name"],
                m["uuid"],
                m["group"] or "-",
                m["from"] or "-",
                m["to"] or "(unowned)",
            )
            for m in moves[:shown]
        )
        result = Markup(
            '<p id="moves-summary">If {} died, {} of {} nodes would move{}.</p>'
            '<table id="moves"><thead><tr><th>Node</th><th>UUID</th><th>Group</th>'
            "<th>From</th><th>To</th></tr></thead><tbody>{}</tbody></table>"
        ).format(
            chosen,
            len(moves),
            total,
            f" (the first {shown} shown)" if len(moves) > shown else "",
            lines,
        )
    body = Markup("<h2>What if a conductor died?</h2>{}{}").format(form, result)
    return _layout("What-if", body, csrf, "whatif")


def escape_text(value: object) -> str:
    """``value`` as HTML text (for the few plain messages)."""
    return str(escape(value))
