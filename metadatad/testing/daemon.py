"""Run the real daemon for tests: ``twistd -n metadatad`` as a subprocess on loopback.

A :class:`Daemon` owns a directory holding its configuration, an SQLite database (unless
another database URL is given), the admin token, the node files it imported and the
daemon's captured output (``daemon.log``).  It picks free loopback ports, migrates the
database and imports nodes with ``metadatad-manage``, starts ``twistd``, waits until the
metadata site answers, and on :meth:`Daemon.stop` sends SIGTERM, then SIGKILL if the
daemon has not exited within the deadline.  No process outlives the test (or the
benchmark): the ``daemon_factory`` fixture stops every daemon it made, a benchmark
stops its own, and on Linux the daemon also gets SIGKILL should its starter die first.

Tests use it through the ``daemon_factory`` fixture (``tests/support/daemon.py``)::

    def test_something(daemon_factory):
        daemon = daemon_factory(nodes=[node_document(0, ports=[...127.0.0.1...])])
        status, headers, body = daemon.get("/latest/meta-data/instance-id")

or, for a daemon shared by a module, ``Daemon.create(directory, ...)`` with
``daemon.start()`` / ``daemon.stop()`` (or ``with Daemon.create(...) as daemon:``).
"""

from __future__ import annotations

import atexit
import ctypes
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
MANAGE = BIN / "metadatad-manage"

START_DEADLINE = 20.0
STOP_DEADLINE = 10.0
MANAGE_DEADLINE = 60.0
HTTP_TIMEOUT = 10.0


class DaemonError(AssertionError):
    """The daemon or a metadatad-manage command did not do what the test needed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_request(
    url: str,
    method: str = "GET",
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT,
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain-HTTP request: ``(status, headers, body)``; error statuses are returned.

    No proxy (whatever the environment says) and no redirect is followed.  ``source``
    binds the client to that address first: ``127.0.0.2`` is a caller on loopback that
    no node is registered for.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    connection = http.client.HTTPConnection(
        parts.hostname,
        parts.port or 80,
        timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _find_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, so the child calls it between fork and exec without loading anything.
_PRCTL = _find_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The daemon gets SIGKILL if the thread that started it (the test) dies first."""
    assert _PRCTL is not None
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


# Daemons started and not yet stopped: stopped at interpreter exit as a last resort.
_LIVE: set[Daemon] = set()


@atexit.register
def _stop_leftovers() -> None:
    for daemon in list(_LIVE):
        daemon.stop()


class Daemon:
    """One ``twistd metadatad`` and its files.  Build with :meth:`create`."""

    def __init__(
        self,
        directory: Path,
        database_url: str,
        config: Mapping[str, Mapping[str, str]],
    ) -> None:
        self.directory = directory
        self.database_url = database_url
        self.config_path = directory / "metadatad.conf"
        self.token_path = directory / "admin-token"
        self.log_path = directory / "daemon.log"
        self.admin_token = secrets.token_urlsafe(32)
        self.metadata_port = 0
        self.admin_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._extra_config = {s: dict(keys) for s, keys in config.items()}
        self._imports = 0

    # --- construction ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path | str,
        *,
        nodes: Iterable[Mapping[str, Any]] = (),
        database_url: str | None = None,
        config: Mapping[str, Mapping[str, str]] | None = None,
        vendordata: Mapping[str, Any] | None = None,
    ) -> Daemon:
        """Write the configuration, migrate the database and import ``nodes``.

        ``config`` adds or overrides keys, section by section (``{"metadata":
        {"cache_ttl": "0"}}``); the listen addresses, token file and database are
        filled in here.  ``vendordata`` becomes ``[vendordata] static_file``.  The
        daemon is not started: call :meth:`start`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if database_url is None:
            database_url = f"sqlite:///{directory / 'metadatad.sqlite'}"
        extra = {s: dict(keys) for s, keys in (config or {}).items()}
        if vendordata is not None:
            vendordata_path = directory / "vendordata.json"
            vendordata_path.write_text(json.dumps(vendordata), encoding="utf-8")
            extra.setdefault("vendordata", {}).setdefault("static_file", str(vendordata_path))
        daemon = cls(directory, database_url, extra)
        daemon.token_path.write_text(daemon.admin_token + "\n", encoding="utf-8")
        daemon.token_path.chmod(0o600)
        daemon._write_config()
        daemon.manage("db", "upgrade")
        nodes = list(nodes)
        if nodes:
            daemon.import_nodes(nodes)
        return daemon

    def _write_config(self) -> None:
        self.metadata_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.metadata_port:
            self.admin_port = free_port()
        sections: dict[str, dict[str, str]] = {
            "database": {"url": self.database_url},
            "metadata": {
                "listen": f"tcp:{self.metadata_port}:interface=127.0.0.1",
                # One process unless a test asks for workers: the default, auto, would
                # start one per CPU (tests/daemon/test_workers.py covers it).
                "workers": "1",
            },
            "admin": {
                "listen": f"tcp:{self.admin_port}:interface=127.0.0.1",
                "token_file": str(self.token_path),
            },
            "conductor": {"hostname": "test-conductor"},
        }
        for section, keys in self._extra_config.items():
            sections.setdefault(section, {}).update(keys)
        lines = []
        for section, keys in sections.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {value}" for key, value in keys.items())
            lines.append("")
        self.config_path.write_text("\n".join(lines), encoding="utf-8")

    # --- metadatad-manage --------------------------------------------------------

    def manage(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``metadatad-manage --config CONF ARGS...``; fails the test if it fails
        (unless ``check`` is false)."""
        command = [str(MANAGE), "--config", str(self.config_path), *args]
        try:
            result = subprocess.run(
                command,
                input=input.decode("utf-8") if input is not None else None,
                capture_output=True,
                text=True,
                cwd=self.directory,
                timeout=MANAGE_DEADLINE,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise DaemonError(f"{' '.join(command)} did not finish in {e.timeout} s") from None
        if check and result.returncode != 0:
            raise DaemonError(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def import_nodes(self, nodes: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> str:
        """``metadatad-manage node import`` of a JSON file holding ``nodes``; returns
        the command's output."""
        self._imports += 1
        path = self.directory / f"nodes-{self._imports}.json"
        document = dict(nodes) if isinstance(nodes, Mapping) else [dict(n) for n in nodes]
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        return self.manage("node", "import", str(path)).stdout

    # --- the process -------------------------------------------------------------

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """What the daemon wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def errors(self) -> list[str]:
        """Tracebacks and unhandled errors in the daemon's output (a 500 leaves one)."""
        found: list[str] = []
        lines = self.output().splitlines()
        for index, line in enumerate(lines):
            if "Traceback (most recent call last)" in line or "Unhandled Error" in line:
                found.append("\n".join(lines[max(0, index - 1) : index + 30]))
        return found

    def start(self, deadline: float = START_DEADLINE) -> Daemon:
        """Start ``twistd -n metadatad`` and wait until ``GET /openstack`` answers 200.

        A port taken by someone else between choosing it and binding it is retried
        with new ports (twice).  Any other failure stops the daemon and fails with its
        output.
        """
        if self.running:
            raise DaemonError("the daemon is already running")
        for attempt in range(3):
            try:
                self._start_once(deadline)
                return self
            except DaemonError:
                if attempt < 2 and "Address already in use" in self.output():
                    self._write_config()
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, deadline: float) -> None:
        command = [
            str(TWISTD),
            "--nodaemon",
            "--pidfile=",
            "metadatad",
            "--config",
            str(self.config_path),
        ]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"--- {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=env,
                # PDEATHSIG follows the forking thread: only ask for it from the main
                # one.  The child only calls the pre-resolved prctl (no imports, no
                # locks), which is what makes preexec_fn safe enough here.
                preexec_fn=_die_with_parent  # noqa: PLW1509
                if _PRCTL is not None and threading.current_thread() is threading.main_thread()
                else None,
            )
        _LIVE.add(self)
        self.returncode = None
        self._wait_ready(deadline)

    def _wait_ready(self, deadline: float) -> None:
        """Poll ``GET /openstack`` (and the admin ``/healthz``) until they answer, the
        process exits, or the deadline passes."""
        assert self.process is not None
        give_up = time.monotonic() + deadline
        urls = [self.metadata_url + "/openstack", self.admin_url + "/healthz"]
        last_error = "no attempt"
        while urls:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._reap()
                raise DaemonError(
                    f"the daemon exited with status {code} before it was ready; "
                    f"its output ({self.log_path}):\n{self.output()}"
                )
            if time.monotonic() > give_up:
                self.stop()
                raise DaemonError(
                    f"the daemon was not ready after {deadline} s ({last_error}); "
                    f"its output ({self.log_path}):\n{self.output()}"
                )
            try:
                status, _, _ = http_request(
                    urls[0],
                    headers={"Authorization": f"Bearer {self.admin_token}"},
                    timeout=1.0,
                )
            except (OSError, http.client.HTTPException) as e:
                last_error = f"{urls[0]}: {e!r}"
            else:
                if status == 200:
                    urls.pop(0)
                    continue
                last_error = f"{urls[0]}: HTTP {status}"
            time.sleep(0.05)  # poll-with-deadline on a real subprocess

    def stop(self, deadline: float = STOP_DEADLINE) -> int | None:
        """SIGTERM, wait up to ``deadline``, then SIGKILL.  Returns the exit status
        (``None`` if never started): after a clean shutdown on SIGTERM, twistd re-raises
        the signal, so that is ``-signal.SIGTERM``; ``-signal.SIGKILL`` means it hung."""
        process = self.process
        if process is None:
            return self.returncode
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=deadline)
        self._reap()
        return self.returncode

    def _reap(self) -> None:
        assert self.process is not None
        self.returncode = self.process.wait()
        self.process = None
        _LIVE.discard(self)

    def __enter__(self) -> Daemon:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- HTTP ------------------------------------------------------------------------

    def get(
        self, path: str, headers: Mapping[str, str] | None = None, source: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """``GET`` a metadata path (``/latest/meta-data/``), from 127.0.0.1 unless
        ``source`` names another local address."""
        return http_request(self.metadata_url + path, headers=headers, source=source)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        source: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Any request to the metadata site."""
        return http_request(
            self.metadata_url + path, method, body=body, headers=headers, source=source
        )

    def admin(
        self,
        method: str,
        path: str,
        document: Any = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """An admin API request with the bearer token; ``(status, parsed JSON or text)``."""
        headers = {"Authorization": f"Bearer {self.admin_token if token is None else token}"}
        body = None
        if document is not None:
            body = json.dumps(document).encode("utf-8")
            headers["Content-Type"] = "application/json"
        status, _, raw = http_request(self.admin_url + path, method, body=body, headers=headers)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", errors="replace")
