# -*- test-case-name: tests.daemon.test_tftp_daemon -*-
"""Build the ``tftp`` service from the configuration (called by ``metadatad.tap``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from metadatad.config import Config
from metadatad.core.records import NodeRecord
from metadatad.db.bootevents import BootEvent
from metadatad.db.cache import NodeCache
from metadatad.errors import SetupError
from metadatad.interfaces import VendordataErrors
from metadatad.tftp.bootconfig import BootFiles, CachedLookup, Templates
from metadatad.tftp.hub import ReaderHub
from metadatad.tftp.listening import TFTPService
from metadatad.tftp.protocol import SessionConfig
from metadatad.tftp.server import TFTPServer

log = Logger()


class TFTPSetupError(SetupError):
    """The TFTP configuration cannot be used; ``str()`` is one line for the operator."""


def make_tftp_service(
    config: Config,
    store: Any,
    cache: NodeCache,
    reactor: Any,
    *,
    owns: Callable[[str], bool],
    record: Callable[[BootEvent], None] | None,
    vendordata_errors: VendordataErrors | None = None,
) -> TFTPService:
    """The ``tftp`` service for ``config.tftp``: listeners, server, file resolution.

    ``cache`` is the metadata site's node cache (lookups by address and uuid); a second
    cache with the same lifetime serves lookups by MAC.  Broken templates are a
    :class:`TFTPSetupError`; a missing root or templates directory only a warning
    (the operator may create them later: nothing is cached about their absence).
    """
    tftp = config.tftp
    templates = Templates(tftp.templates)
    problems = templates.check()
    if problems:
        raise TFTPSetupError(f"{config.path}: [tftp] templates: {problems[0]}")
    for key, path in (("root", tftp.root), ("templates", tftp.templates)):
        if not os.path.isdir(path):
            log.warn(
                "[tftp] {key}: {path} is not a directory (yet): its files are not found",
                key=key,
                path=path,
            )
    mac_cache = NodeCache.over(store, store.node_by_mac, reactor, config.metadata.cache_ttl)
    files = BootFiles(
        tftp.root,
        templates,
        CachedLookup(mac_cache, cache),
        owns,
        serve_unowned=tftp.serve_unowned,
        conductor=config.conductor.hostname,
        held=_held(config, vendordata_errors),
        hold_retry=config.vendordata.hold_retry,
        http_address=config.conductor.http_address,
    )
    server = TFTPServer(
        files,
        reactor,
        config=SessionConfig(
            max_blksize=tftp.max_blksize,
            max_windowsize=tftp.max_windowsize,
            timeout=tftp.timeout,
            max_timeout=tftp.max_timeout,
            retries=tftp.retries,
        ),
        max_transfers=tftp.max_transfers,
        max_transfers_per_source=tftp.max_transfers_per_source,
        record=record,
        conductor=config.conductor.hostname,
        readers=ReaderHub(reactor),
    )
    # The MAC cache rides along for /metrics and SIGHUP (which clears it with the
    # site's cache).
    return TFTPService(server, tftp.listen, reactor, mac_cache=mac_cache)


def _held(
    config: Config, errors: VendordataErrors | None
) -> Callable[[NodeRecord], Deferred[list[str]]] | None:
    """With ``[vendordata] hold_boot``: the targets that failed for a node at its
    current revision, from ``errors`` (a VendordataErrorStore).  Marks of an older
    revision do not hold: re-registering the node is how an operator says "try
    again" (the next vendor_data2.json read marks it anew if the target still fails)."""
    if not config.vendordata.hold_boot or errors is None:
        return None
    if not config.vendordata.failure_fatal:
        log.warn(
            "[vendordata] hold_boot is set without failure_fatal: no node is ever "
            "marked, so no boot is held"
        )

    for_node = errors.for_node

    def held(record: NodeRecord) -> Deferred[list[str]]:
        return for_node(record.node.uuid).addCallback(
            lambda marks: [m.target for m in marks if m.node_revision >= record.revision]
        )

    return held
