"""``makeService`` with dynamic vendordata: the named service, its token source, and
start-up refusals for unusable token or CA files."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import MultiService

from metadatad.clients.keystone import KeystoneTokenClient
from metadatad.metadata.vendordata import DynamicVendordata, StaticToken
from tests.app.test_tap import build, migrated_url, services, write_conf

__all__ = ["migrated_url", "services"]  # fixtures, used here by name

TARGETS = "testing@http://127.0.0.1:9/vd ops@https://127.0.0.1:10/"


def with_sections(conf: Path, text: str) -> Path:
    conf.write_text(conf.read_text(encoding="utf-8") + text, encoding="utf-8")
    return conf


def test_dynamic_targets_add_the_vendordata_service(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """With targets, a named ``vendordata`` service joins the daemon (after the
    failure store, before the sites) and uses the service token file."""
    token = tmp_path / "vd-token"
    token.write_text("tok-123\n")
    conf = with_sections(
        write_conf(tmp_path, migrated_url),
        f"[vendordata]\ndynamic_targets = {TARGETS}\nservice_token_file = {token}\n",
    )
    root = build(conf, services)
    names = [service.name for service in root]
    assert names.index("vendordata-errors") < names.index("vendordata")
    assert names.index("vendordata") < names.index("metadata-http")
    service = root.getServiceNamed("vendordata")
    assert isinstance(service, DynamicVendordata)
    assert service.targets == (
        ("testing", "http://127.0.0.1:9/vd"),
        ("ops", "https://127.0.0.1:10/"),
    )
    assert service._token_source == StaticToken("tok-123")


def test_keystone_is_the_token_source_without_a_token_file(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    conf = with_sections(
        write_conf(tmp_path, migrated_url),
        f"[vendordata]\ndynamic_targets = {TARGETS}\n"
        "[keystone]\nauth_url = http://127.0.0.1:5000/v3\nusername = md\npassword = pw\n"
        "project_name = service\n",
    )
    service = build(conf, services).getServiceNamed("vendordata")
    assert isinstance(service._token_source, KeystoneTokenClient)


def test_without_targets_there_is_no_vendordata_service(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    root = build(write_conf(tmp_path, migrated_url), services)
    with pytest.raises(KeyError):
        root.getServiceNamed("vendordata")


@pytest.mark.parametrize(
    ("extra", "detail"),
    [
        ("service_token_file = {missing}\n", "[vendordata] service_token_file: cannot read"),
        ("service_token_file = {spaced}\n", "one token without spaces"),
        ("ca_file = {broken_ca}\n", "[vendordata] ca_file:"),
    ],
)
def test_unusable_files_stop_the_daemon_with_one_line(
    tmp_path: Path,
    migrated_url: str,
    services: list[MultiService],
    extra: str,
    detail: str,
) -> None:
    """A token file that cannot be read or holds junk, or a CA file whose certificate
    does not parse: SystemExit naming the key."""
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    broken_ca = tmp_path / "ca.pem"
    broken_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    files = {"missing": tmp_path / "nope", "spaced": spaced, "broken_ca": broken_ca}
    conf = with_sections(
        write_conf(tmp_path, migrated_url),
        f"[vendordata]\ndynamic_targets = {TARGETS}\n" + extra.format(**files),
    )
    with pytest.raises(SystemExit) as caught:
        build(conf, services)
    message = str(caught.value)
    assert message.startswith("metadatad: ") and "\n" not in message
    assert detail in message
