# -*- test-case-name: tests.app.test_tap -*-
"""``twistd metadatad``: command-line options and the composition of the services."""

from __future__ import annotations

import gc
import os
import secrets
import threading
from functools import partial
from typing import Any

import attrs
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from metadatad.admin.site import AdminSite
from metadatad.admin.wiring import with_console
from metadatad.clients.keystone import make_keystone_client
from metadatad.cluster.membership import MembershipService
from metadatad.config import (
    SHAREABLE_LISTEN_KINDS,
    Config,
    ConfigError,
    load_config,
    read_admin_token,
)
from metadatad.core.backlog import ADMIN_BACKLOG, METADATA_BACKLOG, with_default_backlog
from metadatad.core.conductors import ConductorInfo
from metadatad.core.identity import Identifier
from metadatad.db.activity import ActivityRecorder, ActivityRepository, fan_out
from metadatad.db.bootevents import BootEventRepository, BootEventStore
from metadatad.db.cache import BatchedLookups, NodeCache
from metadatad.db.cluster import ClusterRepository, bound_waits
from metadatad.db.migrate import check_schema
from metadatad.db.store import NodeRepository, Store, forbid_thread, make_engine
from metadatad.db.vendordata import VendordataErrorRepository, VendordataErrorStore
from metadatad.dhcp.service import make_dhcp_service
from metadatad.errors import SetupError
from metadatad.hardening import DRAIN_SECONDS, HardenedSite, Limits
from metadatad.logs import RootService
from metadatad.metadata.guard import make_guard
from metadatad.metadata.observe import RecordingVendordataErrors, request_observer
from metadatad.metadata.site import MetadataSite
from metadatad.metadata.vendordata import make_vendordata
from metadatad.metadata.wiring import make_peer_services, make_seen_recorder
from metadatad.reload import ReloadService
from metadatad.telemetry import REQUESTS, MetricsService, Sources
from metadatad.tftp.http import BootFilesResource, BootRouter
from metadatad.tftp.service import make_tftp_service
from metadatad.workerpool import WorkerPool


class Options(usage.Options):
    """Options of ``twistd metadatad``."""

    synopsis = "[--config FILE]"
    longdesc = "Serve instance metadata to the nodes of this provisioning conductor."
    optParameters = [
        ["config", "c", "/etc/metadatad/metadatad.conf", "The configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["configuration"] = load_config(self["config"])
        except ConfigError as e:
            # Not a UsageError: twistd prints its whole usage text before one of those,
            # burying the line that names the file, section and key.
            raise SystemExit(f"metadatad: {e}") from None


class QuietSite(Site):
    """A Site that writes no access log line per request (metrics count requests)."""

    def log(self, request: Any) -> None:
        pass


def make_site(resource: Any, access_log: bool) -> Site:
    """A twisted.web Site for ``resource`` that never shows tracebacks to callers."""
    site = Site(resource) if access_log else QuietSite(resource)
    site.displayTracebacks = False
    return site


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Compose the daemon: the store first (its threadpool stops last), membership
    (stopped after the sites, it marks this conductor offline), then the sites.  On
    stopping, the metadata site drains before any of them stops.

    A :class:`~metadatad.errors.SetupError` from any part stops twistd with its one line.
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        return _compose(options["configuration"], reactor)
    except SetupError as e:
        raise SystemExit(f"metadatad: {e}") from None


def _database(config: Config) -> Engine:
    """The store's engine, its schema checked."""
    try:
        engine = make_engine(config.database.url, config.database.pool_size)
        check_schema(engine)
    except SQLAlchemyError as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())
        raise SetupError(
            f"{config.path}: [database] url: cannot use the database: {reason}"
        ) from None
    return engine


def _compose(config: Config, reactor: Any) -> MultiService:
    admin_token = read_admin_token(config) if config.admin.listen else ""
    engine = _database(config)

    root = RootService(config.logging.format)
    store = Store(NodeRepository(engine), reactor)
    store.setServiceParent(root)
    membership = _membership(config, reactor)
    membership.setServiceParent(root)
    # After membership: stopped before it, so in-flight pushes finish while it still
    # holds its nodes.
    # One Keystone client (one token) for every service calling OpenStack APIs.
    keystone = make_keystone_client(config, reactor)
    dhcp = make_dhcp_service(config, reactor, keystone)
    if dhcp is not None:
        dhcp.setServiceParent(root)
        membership.add_observer(dhcp.claimed)
        store.add_change_listener(dhcp.nodes_changed)
    # Added before the TFTP service: stopped after it, so its last events are written.
    boot_events = BootEventStore(
        BootEventRepository(engine), reactor, retention_days=config.tftp.event_retention
    )
    boot_events.setServiceParent(root)
    parts = build_metadata(root, config, engine, store, reactor, keystone=keystone)
    cache, vendordata, peer_store = parts.cache, parts.vendordata, parts.peer_store
    activity, vendordata_errors = parts.activity, parts.vendordata_errors
    caches: dict[str, Any] = {"metadata": cache}
    tftp = None
    if config.tftp.listen:
        # Made here, started last (below): the HTTP boot route shares its files.
        tftp = make_tftp_service(
            config,
            store,
            cache,
            reactor,
            owns=membership.owns,
            record=fan_out(boot_events.record, activity.tftp),
            vendordata_errors=vendordata_errors,
        )
    site_resource: Any = parts.resource
    if tftp is not None and config.conductor.http_address:
        # Boot files over HTTP at <http_address>/boot/ (docs/boot.md); in this process
        # only: metadata workers serve the metadata site alone.
        boot = BootFilesResource(
            tftp.server.files,
            reactor,
            record=fan_out(boot_events.record, activity.tftp),
            conductor=config.conductor.hostname,
        )
        site_resource = BootRouter(boot, site_resource)
    listen = with_default_backlog(config.metadata.listen, METADATA_BACKLOG)
    workers = None
    count = config.metadata.worker_count(len(os.sched_getaffinity(0)))
    if count == 1:
        site = parts.site
        if site_resource is not parts.resource:
            site = _hardened_site(site_resource, config, reactor)
        listener = _listen(root, "metadata-http", reactor, listen, site)
        # As a worker does when it stops (worker.stopping): the site stops accepting and
        # answers what it accepted before the services (the store last) stop under it.
        root.drain_first(listener, partial(site.drained, DRAIN_SECONDS))
    else:
        workers = _worker_pool(
            root, config, reactor, listen, count=count, store=store, caches=caches
        )
    if config.admin.listen:
        admin_site = AdminSite(
            store,
            admin_token,
            max_body_bytes=config.admin.max_body_bytes,
            boot_events=boot_events,
            cluster=membership,
            vendordata_errors=parts.vendordata_errors,
            peers=peer_store,
            dhcp=dhcp,
            workers=workers,
        )
        _listen(
            root,
            "admin-http",
            reactor,
            config.admin.listen,
            HardenedSite(
                with_console(
                    admin_site.resource(),
                    config,
                    reactor,
                    engine=engine,
                    token=admin_token,
                    store=store,
                    membership=membership,
                    boot_events=boot_events,
                    activity=activity,
                    vendordata_errors=vendordata_errors,
                    peers=peer_store,
                    dhcp=dhcp,
                ),
                _limits(config.admin),
                "admin",
                config.metadata.access_log,
                forms=True,  # the console's login and action forms
                measure=REQUESTS.tally("admin").observe,
                reactor=reactor,
            ),
            ADMIN_BACKLOG,
        )
    tftp_server = None
    if tftp is not None:
        tftp.setServiceParent(root)
        caches["tftp"] = tftp.mac_cache
        tftp_server = tftp.server
    MetricsService(
        Sources(caches, membership, tftp_server, reactor, workers=workers)
    ).setServiceParent(root)
    ReloadService(
        config,
        reactor,
        set_vendordata=parts.metadata_site.set_static_vendordata,
        invalidate=[
            *(cache.invalidate for cache in caches.values()),
            *([vendordata.forget] if vendordata is not None else []),
            *([workers.reload] if workers is not None else []),
        ],
    ).setServiceParent(root)
    # Once every service has started (twistd starts them before the reactor runs).
    reactor.callWhenRunning(freeze_heap)
    return root


def freeze_heap() -> None:
    """Move everything start-up allocated (modules, config, caches' structures) out of
    the collector's sight: full collections then scan only what requests allocate, and a
    forked worker does not touch (and so copy) the parent's pages by collecting them."""
    gc.collect()
    gc.freeze()


@attrs.frozen
class MetadataParts:
    """The metadata site and what it is built on (see :func:`build_metadata`)."""

    resource: Any  # the site's resource
    site: HardenedSite  # the Site of ``resource`` (what a metadata worker serves)
    metadata_site: MetadataSite
    cache: NodeCache
    vendordata: Any
    peer_store: Any
    vendordata_errors: VendordataErrorStore
    activity: ActivityRecorder


def build_metadata(
    root: MultiService,
    config: Config,
    engine: Engine,
    store: Store,
    reactor: Any,
    *,
    keystone: Any,
) -> MetadataParts:
    """The metadata site's resource and its collaborators; the services among them
    (the console's activity recorder, vendordata errors, dynamic vendordata, peer
    watches, last-seen times) become children of ``root``.  The daemon's single process
    and each metadata worker build it the same way."""
    # The console's boot timeline (HTTP activity, last boot outcome), kept as long as
    # boot events.
    activity = ActivityRecorder(
        ActivityRepository(engine),
        reactor,
        config.conductor.hostname,
        retention_days=config.tftp.event_retention,
    )
    activity.setServiceParent(root)
    vendordata_errors = VendordataErrorStore(VendordataErrorRepository(engine), reactor)
    vendordata_errors.setServiceParent(root)
    vendordata = make_vendordata(
        config, reactor, RecordingVendordataErrors(vendordata_errors, activity), keystone
    )
    if vendordata is not None:
        vendordata.setServiceParent(root)
    # A storm's new callers are looked up together (BatchedLookups), not one query each.
    lookups = BatchedLookups(store.nodes_by_ip)
    cache = NodeCache.over(store, lookups, reactor, config.metadata.cache_ttl)
    peer_store, peer_routes = make_peer_services(root, config, engine, store, reactor)
    seen = make_seen_recorder(root, engine, store, reactor)
    metadata_site = MetadataSite(
        cache,
        store,
        Identifier(config.metadata.trusted_proxies, config.metadata.proxy_shared_secret),
        static_vendordata=config.vendordata.static,
        region=config.metadata.region,
        vendordata=vendordata,
        peer_routes=peer_routes,
        guard=make_guard(config.metadata, reactor),
        observe=request_observer(activity),
        seen=seen.note,
    )
    resource = metadata_site.resource()
    return MetadataParts(
        resource,
        _hardened_site(resource, config, reactor),
        metadata_site,
        cache,
        vendordata,
        peer_store,
        vendordata_errors,
        activity,
    )


def _worker_pool(
    root: MultiService,
    config: Config,
    reactor: Any,
    listen: str,
    *,
    count: int,
    store: Store,
    caches: dict[str, Any],
) -> WorkerPool:
    """``[metadata] workers`` > 1: this process binds (or adopts) the metadata socket
    without accepting on it, and the ``metadata-workers`` service serves it."""
    kind = listen.split(":", 1)[0]
    if kind not in SHAREABLE_LISTEN_KINDS:
        raise SetupError(
            f"{config.path}: [metadata] workers = {count} needs a tcp, "
            f"tcp6 or systemd listen address, not {kind}:"
        )
    unused = Site(Resource())  # never accepts a connection
    held = _listen(root, "metadata-http", reactor, listen, unused, kind=_HeldSocketService)

    def changed_in_a_worker() -> None:
        for cache in caches.values():
            cache.invalidate()

    pool = WorkerPool(
        reactor,
        count,
        config.path,
        held.fileno,
        # One secret for every worker: a token from one is good on all of them.
        config.metadata.token_secret or secrets.token_urlsafe(32),
        on_changed=[changed_in_a_worker],
    )
    pool.setServiceParent(root)
    store.add_change_listener(pool.invalidate)
    return pool


def _hardened_site(resource: Any, config: Config, reactor: Any) -> HardenedSite:
    """The metadata site's Site: size limits, slow-client timeouts, connection caps."""
    m = config.metadata
    return HardenedSite(
        resource,
        _limits(m),
        "metadata",
        m.access_log,
        exempt=m.trusted_proxies,
        measure=REQUESTS.tally("metadata").observe,
        reactor=reactor,
    )


def _limits(section: Any) -> Limits:
    """The connection limits of a ``[metadata]`` or ``[admin]`` section."""
    return Limits(
        max_header_bytes=section.max_header_bytes,
        max_body_bytes=section.max_body_bytes,
        client_timeout=section.client_timeout,
        idle_timeout=section.idle_timeout,
        max_connections_per_source=section.max_connections_per_source,
        write_timeout=section.write_timeout,
    )


def _membership(config: Config, reactor: Any) -> MembershipService:
    """The ``membership`` service, on an engine of its own: heartbeats never wait
    behind the sites' queries for a connection."""
    conductor = config.conductor
    engine = make_engine(config.database.url, 2)
    forbid_thread(engine, threading.get_ident())
    # A conductor stopped inside a transaction must not hold the others up for long.
    interval = conductor.heartbeat_interval
    bound_waits(engine, lock_timeout=max(1.0, interval), idle_timeout=max(2.0, 2 * interval))
    return MembershipService(
        ClusterRepository(engine),
        ConductorInfo(
            conductor.hostname, conductor.group, conductor.tftp_address, conductor.http_address
        ),
        reactor,
        heartbeat_interval=conductor.heartbeat_interval,
        heartbeat_timeout=conductor.heartbeat_timeout,
        replicas=conductor.replicas,
        points=conductor.ring_points,
        max_load_factor=conductor.max_load_factor,
    )


class _ListeningService(StreamServerEndpointService):
    """Binds at privileged start; a port that cannot be bound stops the daemon with one
    line instead of leaving it half up or printing a traceback."""

    description = ""

    def privilegedStartService(self) -> None:
        self._raiseSynchronously = True
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(
                f"metadatad: {self.name}: cannot listen on {self.description}: {e.socketError}"
            ) from None


class _HeldSocketService(_ListeningService):
    """Binds (or adopts) the socket and never accepts on it: the workers do."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._hold)

    def _hold(self, port: Any) -> Any:
        port.stopReading()
        self.port = port
        return port

    def fileno(self) -> int:
        """The listening socket's descriptor, for the workers to adopt."""
        return int(self.port.fileno())


def _listen(  # noqa: PLR0917
    root: MultiService,
    name: str,
    reactor: Any,
    description: str,
    site: Site,
    backlog: int | None = None,
    *,
    kind: type[_ListeningService] = _ListeningService,
) -> Any:
    """Listen on ``description`` (with ``backlog`` unless the string gives one)."""
    if backlog is not None:
        description = with_default_backlog(description, backlog)
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:  # systemd: endpoints meet their descriptors only here
        raise SetupError(f"{name}: cannot use endpoint {description!r}: {e}") from None
    service = kind(endpoint, site)
    service.description = description
    service.setName(name)
    service.setServiceParent(root)
    return service
