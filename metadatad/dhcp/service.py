# -*- test-case-name: tests.dhcp.test_dhcp_service -*-
"""Build the ``dhcp`` service from the configuration (called by ``metadatad.tap``)."""

from __future__ import annotations

import threading
from typing import Any

from metadatad.clients.http import make_http_client
from metadatad.config import Config, ConfigError, read_token_file
from metadatad.core.bootmapping import BootDefaults
from metadatad.core.conductors import ConductorInfo
from metadatad.db.dhcp import DhcpPushRepository
from metadatad.db.store import forbid_thread, make_engine
from metadatad.dhcp.provider import Provider
from metadatad.dhcp.pusher import DhcpPusher
from metadatad.errors import SetupError
from metadatad.interfaces import TokenSource

__all__ = ["DhcpSetupError", "make_dhcp_service", "make_provider"]


class DhcpSetupError(SetupError):
    """The DHCP configuration cannot be used; ``str()`` is one line for the operator."""


def make_provider(config: Config, reactor: Any, keystone: TokenSource | None = None) -> Provider:
    """The provider ``[dhcp] provider`` names (not ``none``).  ``keystone``: the
    daemon's Keystone client, built by tap.py."""
    dhcp = config.dhcp
    owner = config.conductor.hostname
    if dhcp.provider == "dnsmasq":
        from metadatad.dhcp.dnsmasq import DnsmasqProvider

        # fsync waits on the disk, not the CPU: more threads than cores pay off.
        return DnsmasqProvider(
            dhcp.dnsmasq_hostsdir,
            dhcp.dnsmasq_optsdir,
            owner,
            reactor,
            threads=max(1, min(dhcp.concurrency, 16)),
        )
    if dhcp.provider == "script":
        from metadatad.dhcp.script import ScriptProvider

        return ScriptProvider(dhcp.script_command, owner, reactor, dhcp.script_timeout)
    if dhcp.provider == "neutron":
        from metadatad.clients.keystone import StaticToken
        from metadatad.dhcp.neutron import NeutronProvider

        http, _ = make_http_client(reactor, max_persistent_per_host=dhcp.concurrency)
        tokens: TokenSource | None
        try:
            if dhcp.neutron_token_file:
                tokens = StaticToken(
                    read_token_file(config, "dhcp", "neutron_token_file", dhcp.neutron_token_file)
                )
            else:
                tokens = keystone
        except ConfigError as e:
            raise DhcpSetupError(str(e)) from None
        if tokens is None:  # load_config refuses this; a Config built in code may not
            raise DhcpSetupError(
                f"{config.path}: [dhcp] provider: neutron needs [dhcp] neutron_token_file "
                "or [keystone] auth_url"
            )
        return NeutronProvider(
            http,
            reactor,
            tokens,
            dhcp.neutron_url,
            timeout=dhcp.neutron_timeout,
            retries=dhcp.neutron_retries,
        )
    raise DhcpSetupError(f"{config.path}: [dhcp] provider: unknown {dhcp.provider!r}")


def make_dhcp_service(
    config: Config, reactor: Any, keystone: TokenSource | None = None
) -> DhcpPusher | None:
    """The ``dhcp`` service, on an engine of its own (None for provider ``none``);
    ``keystone`` as for :func:`make_provider`."""
    dhcp = config.dhcp
    if dhcp.provider == "none":
        return None
    provider = make_provider(config, reactor, keystone)
    engine = make_engine(config.database.url, 2)
    forbid_thread(engine, threading.get_ident())
    conductor = config.conductor
    return DhcpPusher(
        DhcpPushRepository(engine),
        provider,
        ConductorInfo(
            conductor.hostname, conductor.group, conductor.tftp_address, conductor.http_address
        ),
        BootDefaults(dhcp.bios_boot_file, dhcp.uefi_boot_file, dhcp.ipxe_script_url),
        reactor,
        concurrency=dhcp.concurrency,
        retry_min=dhcp.retry_min,
        retry_max=dhcp.retry_max,
        permanent_retries=dhcp.permanent_retries,
        reconcile_interval=dhcp.reconcile_interval,
    )
