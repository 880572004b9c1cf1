"""``twistd metadatad``: options, the composition of the named services, and the plugin."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site

import metadatad.tap
from metadatad.config import Config
from metadatad.core.backlog import METADATA_BACKLOG
from metadatad.db.store import ReactorThreadError, Store
from metadatad.hardening import HardenedSite
from metadatad.tap import Options, makeService
from tests.support.databases import ScratchDatabase, empty_database

TOKEN = "admin-token-for-tests-0123456789"


# The daemon's services in start order (stopped in reverse), without TFTP and DHCP.
SERVICES = [
    "store",
    "membership",
    "boot-events",
    "node-activity",
    "vendordata-errors",
    "peer-watch",
    "seen",
    "metadata-http",
    "admin-http",
    "metrics",
    "reload",
]


def write_conf(  # noqa: PLR0917 (a test helper; keywords at every call)
    directory: Path,
    url: str,
    admin_listen: str | None = "tcp:18776:interface=127.0.0.1",
    token: bytes | None = TOKEN.encode() + b"\n",
    metadata: str = "",
    admin: str = "",
) -> Path:
    """A configuration file for ``url`` with metadata on 18775 and admin as given.

    ``admin_listen=None`` leaves the admin listen address at its default; ``token=None``
    writes no token file; ``metadata`` and ``admin`` are added to their sections.
    """
    token_file = directory / "admin-token"
    if token is not None:
        token_file.write_bytes(token)
    if "workers" not in metadata:
        metadata += "workers = 1\n"  # auto, the default, would depend on this machine's CPUs
    admin += f"token_file = {token_file}\n"
    if admin_listen is not None:
        admin += f"listen = {admin_listen}\n"
    conf = directory / "metadatad.conf"
    conf.write_text(
        f"[database]\nurl = {url}\npool_size = 3\n"
        f"[metadata]\nlisten = tcp:18775:interface=127.0.0.1\n{metadata}"
        f"[admin]\n{admin}",
        encoding="utf-8",
    )
    return conf


def options_for(conf: Path) -> Options:
    """Options as twistd parses them from ``--config conf``."""
    options = Options()
    options.parseOptions(["--config", str(conf)])
    return options


@pytest.fixture
def migrated_url(tmp_path: Path, scratch_databases: dict[str, ScratchDatabase | Exception]) -> str:
    """A migrated, empty SQLite database."""
    return empty_database("sqlite", tmp_path, scratch_databases)


@pytest.fixture
def services() -> Iterator[list[MultiService]]:
    """Services built by a test; their engines are disposed afterwards."""
    built: list[MultiService] = []
    yield built
    for root in built:
        # dispose() checks out no connection, so the reactor-thread guard allows it.
        root.getServiceNamed("store").repository.engine.dispose()


def build(conf: Path, services: list[MultiService], reactor: Any = None) -> MultiService:
    """makeService for ``conf`` on a memory reactor (no port is bound)."""
    root = makeService(options_for(conf), reactor or MemoryReactorClock())
    services.append(root)
    return root


# --- Options ----------------------------------------------------------------------------


def test_options_load_the_config(tmp_path: Path, migrated_url: str) -> None:
    """`--config PATH` loads and checks that file into options["configuration"]."""
    conf = write_conf(tmp_path, migrated_url)
    options = options_for(conf)
    config = options["configuration"]
    assert isinstance(config, Config)
    assert config.path == str(conf)
    assert config.database.url == migrated_url
    assert config.database.pool_size == 3
    assert config.metadata.listen == "tcp:18775:interface=127.0.0.1"


def test_short_option(tmp_path: Path, migrated_url: str) -> None:
    """`-c PATH` is the same as `--config PATH`."""
    conf = write_conf(tmp_path, migrated_url)
    options = Options()
    options.parseOptions(["-c", str(conf)])
    assert options["configuration"].path == str(conf)


def test_default_config_path() -> None:
    """Without --config the packaged path /etc/metadatad/metadatad.conf is used."""
    assert Options()["config"] == "/etc/metadatad/metadatad.conf"


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        (None, "No such file"),
        ("[database]\npool_size = lots\n", "[database] pool_size:"),
        ("[metadata]\nlisten = tcp:nope\n", "[metadata] listen:"),
        ("[databse]\n", "unknown section [databse]"),
        ("no section\n", "before any [section]"),
    ],
    ids=["missing", "bad-number", "bad-endpoint", "unknown-section", "syntax"],
)
def test_bad_config_exits_with_one_line(tmp_path: Path, text: str | None, detail: str) -> None:
    """A bad configuration file is a SystemExit whose message is one line naming the
    file (not a UsageError: twistd would print its usage text first)."""
    conf = tmp_path / "metadatad.conf"
    if text is not None:
        conf.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        options_for(conf)
    message = str(excinfo.value.code)
    assert message.startswith("metadatad: ")
    assert len(message.splitlines()) == 1
    assert str(conf) in message
    assert detail in message


def test_extra_arguments_are_a_usage_error(tmp_path: Path, migrated_url: str) -> None:
    """Positional arguments are refused."""
    conf = write_conf(tmp_path, migrated_url)
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--config", str(conf), "surplus"])


# --- makeService ------------------------------------------------------------------------


def test_named_services_in_order(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """The daemon is a MultiService of store, membership, boot-events,
    vendordata-errors, peer-watch, seen, metadata-http, admin-http, metrics and reload."""
    root = build(write_conf(tmp_path, migrated_url), services)
    assert isinstance(root, MultiService)
    assert [service.name for service in root] == SERVICES
    assert isinstance(root.getServiceNamed("store"), Store)
    for name in ("metadata-http", "admin-http"):
        service = root.getServiceNamed(name)
        assert isinstance(service, StreamServerEndpointService)
        assert IService(service).parent is root
    assert not root.running


def test_each_backend_composes(
    tmp_path: Path, database_url: str, services: list[MultiService]
) -> None:
    """makeService checks the schema and composes on every database backend."""
    root = build(write_conf(tmp_path, database_url), services)
    assert [service.name for service in root] == SERVICES
    assert root.getServiceNamed("store").repository.engine.pool.size() == 3


def test_without_admin_listen_there_is_no_admin_site(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """An empty [admin] listen leaves out admin-http, and needs no token file."""
    root = build(write_conf(tmp_path, migrated_url, admin_listen="", token=None), services)
    assert [service.name for service in root] == [
        "store",
        "membership",
        "boot-events",
        "node-activity",
        "vendordata-errors",
        "peer-watch",
        "seen",
        "metadata-http",
        "metrics",
        "reload",
    ]
    with pytest.raises(KeyError):
        root.getServiceNamed("admin-http")


def test_start_listens_on_configured_addresses_and_stops(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """Starting listens on both configured endpoints; stopping ends with the store."""
    reactor = MemoryReactorClock()
    root = build(write_conf(tmp_path, migrated_url), services, reactor)
    stopped = record_stops(root)
    root.startService()
    assert root.running
    listening = sorted((port, interface) for port, _f, _b, interface in reactor.tcpServers)
    assert listening == [(18775, "127.0.0.1"), (18776, "127.0.0.1")]
    for _port, factory, _backlog, _interface in reactor.tcpServers:
        assert isinstance(factory, Site)
        assert factory.displayTracebacks is False
    results: list[Any] = []
    root.stopService().addBoth(results.append)
    assert len(results) == 1
    assert not isinstance(results[0], Failure), results[0]
    assert stopped == [
        "metadata-http",  # first: it drains (nothing in progress here) before the rest
        "reload",
        "metrics",
        "admin-http",
        "seen",
        "peer-watch",
        "vendordata-errors",
        "node-activity",
        "boot-events",
        "membership",
        "store",
    ]
    assert not root.running


def record_stops(root: MultiService) -> list[str]:
    """The names of ``root``'s services, in the order they are told to stop."""
    stopped: list[str] = []
    for service in root:
        original = service.stopService

        def record(original: Any = original, name: str = service.name) -> Any:
            stopped.append(name)
            return original()

        service.stopService = record  # type: ignore[method-assign]
    return stopped


def test_stopping_waits_for_the_metadata_site_to_drain_at_most_5_s(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """workers = 1: stopping the daemon stops the metadata listener at once, and the
    other services (the store last) only once the site has no request in progress, or
    after 5 s.  A request waiting on the store used to be dropped as its threadpool
    stopped with everything else.  (The services are not started, their stops only
    noted: started, their timers and threads would need a real reactor.)"""
    reactor = MemoryReactorClock()
    root = build(write_conf(tmp_path, migrated_url), services, reactor)
    stopped: list[str] = []
    for service in root:
        service.stopService = partial(stopped.append, service.name)  # type: ignore[method-assign]
    site = root.getServiceNamed("metadata-http").factory
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /latest/meta-data/ HTTP/1.1\r\n")  # still being received
    done = root.stopService()
    assert stopped == ["metadata-http"]
    reactor.advance(4.99)
    assert stopped == ["metadata-http"]
    assert not done.called
    reactor.advance(0.05)
    assert stopped == ["metadata-http", *(n for n in reversed(SERVICES) if n != "metadata-http")]
    assert done.called


def test_workers_move_the_metadata_site_to_a_pool(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """[metadata] workers = 2: the metadata-http listener holds the socket and the
    metadata-workers pool serves it; admin writes are passed on to the pool."""
    root = build(write_conf(tmp_path, migrated_url, metadata="workers = 2\n"), services)
    names = [service.name for service in root]
    assert names.index("metadata-workers") == names.index("metadata-http") + 1
    pool = root.getServiceNamed("metadata-workers")
    assert pool.count == 2
    assert pool.invalidate in root.getServiceNamed("store")._change_listeners


@pytest.mark.parametrize(("cpus", "count"), [(1, None), (3, 3)])
def test_auto_is_a_worker_per_usable_cpu(
    tmp_path: Path,
    migrated_url: str,
    services: list[MultiService],
    monkeypatch: pytest.MonkeyPatch,
    *,
    cpus: int,
    count: int | None,
) -> None:
    """workers = auto counts the CPUs this process may run on: one means no pool."""
    monkeypatch.setattr("metadatad.tap.os.sched_getaffinity", lambda pid: set(range(cpus)))
    root = build(write_conf(tmp_path, migrated_url, metadata="workers = auto\n"), services)
    names = [service.name for service in root]
    if count is None:
        assert "metadata-workers" not in names
    else:
        assert root.getServiceNamed("metadata-workers").count == count


def on_unix_socket(conf: Path, directory: Path) -> None:
    """Move ``conf``'s metadata site from its TCP port to a unix socket in ``directory``."""
    conf.write_text(
        conf.read_text().replace(
            "listen = tcp:18775:interface=127.0.0.1", f"listen = unix:{directory}/m.sock"
        )
    )


def test_auto_serves_a_unix_listener_in_this_process(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """workers = auto with a listener workers cannot share: no pool, no error."""
    conf = write_conf(tmp_path, migrated_url, metadata="workers = auto\n")
    on_unix_socket(conf, tmp_path)
    assert "metadata-workers" not in [service.name for service in build(conf, services)]


def test_workers_need_a_tcp_or_systemd_listener(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """A unix: metadata listener cannot be shared with workers: one line at start-up."""
    conf = write_conf(tmp_path, migrated_url, metadata="workers = 2\n")
    on_unix_socket(conf, tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        build(conf, services)
    assert "[metadata] workers = 2 needs a tcp, tcp6 or systemd listen" in str(excinfo.value)


def test_heap_is_frozen_once_the_reactor_runs(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """gc.freeze() runs after start-up (the reactor's when-running hook), not before."""
    reactor = MemoryReactorClock()
    build(write_conf(tmp_path, migrated_url), services, reactor)
    hooks = [f for f, _args, _kw in reactor.whenRunningHooks]
    assert metadatad.tap.freeze_heap in hooks


@pytest.mark.parametrize(
    ("listen", "backlog"),
    [("tcp:18775:interface=127.0.0.1", METADATA_BACKLOG), ("tcp:18775:backlog=333", 333)],
)
def test_metadata_listen_backlog(
    tmp_path: Path, migrated_url: str, services: list[MultiService], listen: str, backlog: int
) -> None:
    """The metadata site listens with the endpoint string's backlog=, or a default well
    above Twisted's 50 when the string gives none."""
    reactor = MemoryReactorClock()
    conf = write_conf(tmp_path, migrated_url, metadata=f"listen = {listen}\n")
    conf.write_text(
        conf.read_text().replace("listen = tcp:18775:interface=127.0.0.1\n", "", 1)
    )
    root = build(conf, services, reactor)
    root.startService()
    try:
        backlogs = {port: b for port, _f, b, _i in reactor.tcpServers}
        assert backlogs[18775] == backlog
    finally:
        root.stopService()


@pytest.mark.parametrize("access_log", ["false", "true"])
def test_access_log_chooses_the_site(
    tmp_path: Path,
    migrated_url: str,
    services: list[MultiService],
    access_log: str,
) -> None:
    """[metadata] access_log turns the access log of both sites on or off; both are
    HardenedSites (the admin API has the metadata site's connection limits, from its
    own section)."""
    reactor = MemoryReactorClock()
    conf = write_conf(
        tmp_path,
        migrated_url,
        metadata=f"access_log = {access_log}\n",
        admin="max_connections_per_source = 3\nwrite_timeout = 9\n",
    )
    root = build(conf, services, reactor)
    root.startService()
    try:
        factories = [factory for _port, factory, _backlog, _interface in reactor.tcpServers]
        assert len(factories) == 2
        assert all(isinstance(f, HardenedSite) for f in factories)
        assert all(f.access_log is (access_log == "true") for f in factories)
        admin = next(f for f in factories if f.name == "admin")
        assert admin.limits.max_connections_per_source == 3
        assert admin.limits.write_timeout == 9.0
    finally:
        root.stopService()


def test_unbindable_port_fails_start(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """A port that cannot be bound stops start-up with one line naming the service."""

    class BusyAdminPort(MemoryReactorClock):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            if port == 18776:
                raise CannotListenError(interface, port, OSError("address in use"))
            return super().listenTCP(port, factory, backlog, interface)

    root = build(write_conf(tmp_path, migrated_url), services, BusyAdminPort())
    with pytest.raises(SystemExit) as excinfo:
        root.startService()
    root.getServiceNamed("store").stopService()
    message = str(excinfo.value.code)
    assert len(message.splitlines()) == 1
    assert "admin-http" in message and "tcp:18776:interface=127.0.0.1" in message


def test_store_guard_forbids_queries_on_the_building_thread(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """After makeService, a query on the thread that built it (the reactor's) is refused."""
    root = build(write_conf(tmp_path, migrated_url), services)
    store = root.getServiceNamed("store")
    with pytest.raises(ReactorThreadError):
        store.repository.list_nodes()


def test_unmigrated_database_exits_with_the_fix(
    tmp_path: Path, services: list[MultiService]
) -> None:
    """An empty database stops makeService with SystemExit saying to run `db upgrade`."""
    url = f"sqlite:///{tmp_path / 'never-migrated.sqlite'}"
    with pytest.raises(SystemExit) as excinfo:
        build(write_conf(tmp_path, url), services)
    message = str(excinfo.value.code)
    assert len(message.splitlines()) == 1
    assert message.startswith("metadatad: ")
    assert "metadatad-manage --config CONF db upgrade" in message


@pytest.mark.parametrize(
    ("token", "detail"),
    [(None, "No such file"), (b"", "one token"), (b"two words\n", "without spaces")],
    ids=["missing", "empty", "spaces"],
)
def test_bad_admin_token_file_exits_naming_it(
    tmp_path: Path,
    migrated_url: str,
    services: list[MultiService],
    token: bytes | None,
    detail: str,
) -> None:
    """With the admin site on, a missing/empty/spaced token file is a SystemExit naming it."""
    with pytest.raises(SystemExit) as excinfo:
        build(write_conf(tmp_path, migrated_url, token=token), services)
    message = str(excinfo.value.code)
    assert len(message.splitlines()) == 1
    assert "[admin] token_file" in message
    assert str(tmp_path / "admin-token") in message
    assert detail in message


def test_default_admin_listen_needs_the_token(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """The admin site is on by default, so a missing token file stops the daemon."""
    with pytest.raises(SystemExit) as excinfo:
        build(write_conf(tmp_path, migrated_url, admin_listen=None, token=None), services)
    assert "[admin] token_file" in str(excinfo.value.code)


def test_non_utf8_admin_token_exits_naming_it(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """A binary token file is a SystemExit naming [admin] token_file."""
    with pytest.raises(SystemExit, match=r"token_file"):
        build(write_conf(tmp_path, migrated_url, token=b"\xff\xfe\xfd\n"), services)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://metadatad:hunter2@127.0.0.1:1/metadatad",
        "sqlite:////nonexistent-directory/metadatad.sqlite",
    ],
    ids=["refused", "sqlite-unopenable"],
)
def test_unusable_database_exits_with_one_line(tmp_path: Path, url: str) -> None:
    """A database makeService cannot use is a one-line SystemExit, not a traceback."""
    with pytest.raises(SystemExit) as excinfo:
        makeService(options_for(write_conf(tmp_path, url)), MemoryReactorClock())
    message = str(excinfo.value.code)
    assert len(message.splitlines()) == 1
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "detail"),
    [("sqlite://", "in-memory"), ("mysql://root@127.0.0.1:1/metadatad", "driver is not installed")],
)
def test_unusable_database_url_exits_with_one_line(tmp_path: Path, url: str, detail: str) -> None:
    """URLs that can never work are refused with the configuration, before any service."""
    with pytest.raises(SystemExit) as excinfo:
        options_for(write_conf(tmp_path, url))
    assert detail in str(excinfo.value.code)


# --- the twistd plugin ------------------------------------------------------------------


def test_plugin_is_discoverable() -> None:
    """getPlugins(IServiceMaker) finds tapname "metadatad" built from metadatad.tap."""
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "metadatad"]
    assert len(makers) == 1
    (maker,) = makers
    assert maker.options is metadatad.tap.Options
    assert maker.makeService is metadatad.tap.makeService
    assert maker.description


def twistd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``twistd`` next to this interpreter, in ``tmp_path``."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_twistd_refuses_bad_config_with_one_line(tmp_path: Path) -> None:
    """The real `twistd metadatad` with a bad config exits 1 printing the one-line
    reason, naming file, section and key, and nothing else (no usage text)."""
    conf = tmp_path / "metadatad.conf"
    conf.write_text("[database]\npool_size = lots\n", encoding="utf-8")
    result = twistd(tmp_path, "metadatad", "--config", str(conf))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert output.splitlines() == [
        f"metadatad: {conf}: [database] pool_size: expected an integer, got 'lots'"
    ]


@pytest.mark.slow
def test_twistd_refuses_unmigrated_database(tmp_path: Path) -> None:
    """The real `twistd metadatad` on an empty database exits 1 saying to run db upgrade."""
    conf = write_conf(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite'}", admin_listen="")
    result = twistd(tmp_path, "metadatad", "--config", str(conf))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "metadatad-manage --config CONF db upgrade" in output
    assert "Traceback" not in output


def test_systemd_endpoint_without_activation_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A systemd: listen address outside socket activation is a SetupError (one line
    from makeService), not a traceback."""
    from twisted.web.resource import Resource

    from metadatad.errors import SetupError
    from metadatad.tap import _listen, make_site

    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    with pytest.raises(SetupError) as excinfo:
        _listen(
            MultiService(),
            "metadata-http",
            MemoryReactorClock(),
            "systemd:domain=INET:index=0",
            make_site(Resource(), False),
        )
    assert "metadata-http" in str(excinfo.value)
    assert len(str(excinfo.value).splitlines()) == 1


def test_tftp_service_is_named_and_last(
    tmp_path: Path, migrated_url: str, services: list[MultiService]
) -> None:
    """[tftp] listen adds the "tftp" service last (stopped first), one listener per
    address; a broken template stops start-up with one line."""
    conf = write_conf(tmp_path, migrated_url)
    templates = tmp_path / "templates"
    templates.mkdir()
    with open(conf, "a", encoding="utf-8") as f:
        f.write(f"[tftp]\nlisten = 127.0.0.1:0 127.0.0.2:0\ntemplates = {templates}\n")
    root = build(conf, services)
    names = [service.name for service in root]
    assert names == [
        "store",
        "membership",
        "boot-events",
        "node-activity",
        "vendordata-errors",
        "peer-watch",
        "seen",
        "metadata-http",
        "admin-http",
        "tftp",
        "metrics",
        "reload",
    ]
    tftp = root.getServiceNamed("tftp")
    assert [s.name for s in tftp] == ["tftp-127.0.0.1:0", "tftp-127.0.0.2:0"]
    (templates / "grub.tmpl").write_text("$nope\n")
    with pytest.raises(SystemExit) as excinfo:
        build(conf, services)
    message = str(excinfo.value.code)
    assert len(message.splitlines()) == 1 and "$nope" in message and "[tftp] templates" in message
