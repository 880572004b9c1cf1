"""Builds the peer-discovery parts of the daemon (called from :mod:`metadatad.tap`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from twisted.application.service import MultiService

from metadatad.config import Config
from metadatad.db.peers import CHANNEL, PeerRepository, PeerStore
from metadatad.db.seen import SeenRepository
from metadatad.db.store import Store
from metadatad.metadata.peersite import PeerLimits, PeerRoutes
from metadatad.metadata.seen import SeenRecorder
from metadatad.metadata.watch import PostgresListener, WatchHub, WatchService


def make_peer_services(
    root: MultiService, config: Config, engine: Engine, store: Store, reactor: Any
) -> tuple[PeerStore, PeerRoutes]:
    """The peer store (on the store's threadpool), the site's peer routes, and the
    ``peer-watch`` service (a child of ``root``) that wakes watchers."""
    peer_store = PeerStore(PeerRepository(engine), store.run)
    hub = WatchHub(reactor)
    listener = None
    if engine.url.get_backend_name() == "postgresql":
        conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        listener = PostgresListener(
            conninfo,
            CHANNEL,
            reactor,
            store.run,
            hub.notify,
            on_state=lambda up: watch.listener_state(up),  # noqa: PLW0108 (watch: below)
        )
    watch = WatchService(hub, peer_store.indexes, reactor, listener=listener)
    watch.setServiceParent(root)
    metadata = config.metadata
    routes = PeerRoutes(
        peer_store,
        hub,
        PeerLimits(metadata.peer_max_keys, metadata.peer_max_bytes, metadata.watch_max_wait),
    )
    return peer_store, routes


def make_seen_recorder(
    root: MultiService, engine: Engine, store: Store, reactor: Any
) -> SeenRecorder:
    """The ``seen`` service (a child of ``root``, so stopped before the store's pool):
    nodes' last metadata requests, written in batches on the store's threadpool."""
    repository = SeenRepository(engine)
    recorder = SeenRecorder(lambda seen: store.run(repository.record, seen), reactor)
    recorder.setServiceParent(root)
    return recorder
