# -*- test-case-name: tests.test_tap -*-
"""``twistd metadatad``: command-line options and the composition of the services."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.web.server import Site

from metadatad.admin.site import AdminSite
from metadatad.config import Config, ConfigError, load_config, read_admin_token
from metadatad.db.migrate import SchemaError, check_schema
from metadatad.db.store import NodeRepository, Store, make_engine
from metadatad.identity import Identifier
from metadatad.metadata.cache import NodeCache
from metadatad.metadata.site import MetadataSite


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
            raise usage.UsageError(str(e)) from None


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
    """Compose the daemon: the store first (its threadpool stops last), then the sites."""
    if reactor is None:
        from twisted.internet import reactor
    config: Config = options["configuration"]
    try:
        admin_token = read_admin_token(config) if config.admin.listen else ""
        engine = make_engine(config.database.url, config.database.pool_size)
        check_schema(engine)
    except (SchemaError, ConfigError) as e:
        raise SystemExit(f"metadatad: {e}") from None
    except SQLAlchemyError as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())
        raise SystemExit(
            f"metadatad: {config.path}: [database] url: cannot use the database: {reason}"
        ) from None

    root = MultiService()
    store = Store(NodeRepository(engine), reactor)
    store.setServiceParent(root)

    cache = NodeCache(store.node_by_ip, store.get_node, reactor, config.metadata.cache_ttl)
    store.add_change_listener(cache.invalidate)
    metadata_site = MetadataSite(
        cache,
        store,
        Identifier(config.metadata.trusted_proxies, config.metadata.proxy_shared_secret),
        static_vendordata=config.vendordata.static,
        region=config.metadata.region,
    )
    _listen(
        root,
        "metadata-http",
        reactor,
        config.metadata.listen,
        make_site(metadata_site.resource(), config.metadata.access_log),
    )
    if config.admin.listen:
        admin_site = AdminSite(store, admin_token)
        _listen(
            root,
            "admin-http",
            reactor,
            config.admin.listen,
            make_site(admin_site.resource(), config.metadata.access_log),
        )
    return root


def _listen(root: MultiService, name: str, reactor: Any, description: str, site: Site) -> None:
    service = StreamServerEndpointService(serverFromString(reactor, description), site)
    # A port that cannot be bound stops the daemon instead of leaving it half up.
    service._raiseSynchronously = True
    service.setName(name)
    service.setServiceParent(root)
