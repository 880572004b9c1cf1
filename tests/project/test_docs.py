"""The operator docs say what the code does: every configuration key, admin route and
``metadatad-manage`` verb is documented, and the sample error lines are the ones the
code prints.  (``tests/core/test_config.py`` checks conf/metadatad.conf the same way.)"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

import pytest

from metadatad import cli
from metadatad.admin.console import Console
from metadatad.admin.site import AdminSite
from metadatad.config import _SCHEMA, Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CONFIGURATION = DOCS / "configuration.md"
API = DOCS / "api.md"
README = REPO / "README.md"
# Benchmark records belong to their authors; everything else is the operator guide.
GUIDE = [README, *(p for p in sorted(DOCS.glob("*.md")) if not p.name.startswith("benchmarks"))]


def table_keys(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, default cell), ...]}`` from the key tables under each
    ``## `[section]` `` heading of configuration.md."""
    found: dict[str, list[tuple[str, str]]] = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"^## `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
            found.setdefault(section, [])
            continue
        if line.startswith("## "):
            section = None
        row = re.match(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|", line)
        if row and section is not None:
            found[section].append((row.group(1), row.group(2).strip()))
    return found


def test_configuration_md_documents_every_key_once() -> None:
    """Each section of the schema has a table in configuration.md listing its keys,
    each once, and no key the schema does not know."""
    documented = table_keys(CONFIGURATION.read_text(encoding="utf-8"))
    for section, (_, parsers) in _SCHEMA.items():
        keys = [key for key, _ in documented.get(section, [])]
        assert sorted(keys) == sorted(parsers), f"[{section}] in docs/configuration.md"
    assert set(documented) == set(_SCHEMA)


def test_configuration_md_states_the_real_defaults() -> None:
    """The Default column, parsed as a value, is the built-in default."""
    defaults = Config()
    for section, rows in table_keys(CONFIGURATION.read_text(encoding="utf-8")).items():
        for key, cell in rows:
            actual = getattr(getattr(defaults, section), key)
            if (section, key) == ("conductor", "hostname"):
                assert cell == "the machine's host name"
                assert actual == socket.gethostname()
                continue
            raw = "" if cell == "empty" else cell.strip("`")
            parsed = parse_config("<doc>", {section: {key: raw}})
            assert getattr(getattr(parsed, section), key) == actual, f"[{section}] {key}: {cell}"


BAD_FILES = [
    "[metadata]\ncache_ttl = soon\n",
    "[metadata]\nlisten = tcp:99999\n",
    "[metadata]\nfoo = 1\n",
    "[metadatas]\n",
    "[metadata]\nlisten = tcp:1\nlisten = tcp:2\n",
    "[metadata]\n[metadata]\n",
    "[metadata]\nbogus line\n",
    "x = 1\n",
    "[database]\nurl = oracle://x/y\n",
    "[vendordata]\nstatic_file = nope.json\n",
    "[conductor]\nheartbeat_interval = 40\n",
    "[dhcp]\nprovider = dnsmasq\n",
    "[tftp]\nlisten = ::\n",
]


@pytest.mark.parametrize("text", BAD_FILES)
def test_sample_errors_are_what_the_code_prints(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sample line under "Errors" in configuration.md is printed for its file."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "metadatad.conf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    line = str(raised.value).replace(str(path), "/etc/metadatad/metadatad.conf")
    samples = CONFIGURATION.read_text(encoding="utf-8").split("## Errors", 1)[1]
    assert f"\n{line}\n" in samples.split("```")[1]


def test_api_md_documents_every_admin_route() -> None:
    """Each route and method of the admin site and the console has a
    ``### `METHOD /path` `` heading."""
    headings = set(re.findall(r"^### `(\w+ \S+)`", API.read_text(encoding="utf-8"), re.M))
    rules = [*AdminSite.app.url_map.iter_rules(), *Console.app.url_map.iter_rules()]
    for rule in rules:
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            assert f"{method} {path}" in headings


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    verbs = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                verbs += _verbs(sub, f"{prefix} {name}".strip()) or [f"{prefix} {name}".strip()]
    return verbs


@pytest.mark.parametrize("doc", [README, DOCS / "nodes.md"], ids=lambda p: p.name)
def test_every_cli_verb_is_documented(doc: Path) -> None:
    """The README and nodes.md name every ``metadatad-manage`` command."""
    verbs = _verbs(cli._parser())
    assert "ring show" in verbs and "node import" in verbs
    text = doc.read_text(encoding="utf-8")
    for verb in verbs:
        assert re.search(rf"\b{verb}\b", text), f"{verb!r} not in {doc.name}"


def test_readme_links_every_doc() -> None:
    """The README links every page under docs/."""
    text = README.read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in text, page.name


@pytest.mark.parametrize("doc", GUIDE, ids=lambda p: p.name)
def test_ini_examples_name_known_keys(doc: Path) -> None:
    """Every ``ini`` example of metadatad.conf uses only sections and keys the schema
    knows, and no comment after a value (it would be part of the value)."""
    for block in re.findall(r"```ini\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
        if re.search(r"^\[[A-Z]", block, re.M):
            continue  # a systemd unit
        section = None
        for line in block.splitlines():
            header = re.match(r"^\[(\w+)\]", line)
            if header:
                section = header.group(1)
                assert section in _SCHEMA, line
                continue
            key = re.match(r"^(\w+)\s*=(.*)$", line)
            if key:
                assert section is not None and key.group(1) in _SCHEMA[section][1], line
                assert not re.search(r"\s[#;]", key.group(2)), line


@pytest.mark.parametrize("doc", [*GUIDE, REPO / "conf" / "metadatad.conf"], ids=lambda p: p.name)
def test_no_stale_notes(doc: Path) -> None:
    """Nothing says a feature that exists is still to come."""
    text = " ".join(doc.read_text(encoding="utf-8").split()).lower()
    for stale in ("not built yet", "being built", "not used yet", "still to come"):
        assert (stale in text) is False, f"{doc.name}: {stale!r}"
