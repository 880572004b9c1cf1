"""Process handling shared by the benchmarks: children in their own sessions, stopped
on exit, on Ctrl-C and on SIGTERM, and the ``main`` wrapper that guarantees it."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a daemon's workers); [] once it is gone."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [pid, *(p for child in children for p in tree(int(child)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nginx_argv(prefix: Path, http: str, *, connections: int = 1024) -> list[str]:
    """Write ``prefix/nginx.conf`` (one worker process, no access log, every temporary
    file under ``prefix``, ``http`` inside its ``http`` block) and return the command
    that runs it in the foreground (Debian's nginx-light)."""
    conf = prefix / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\npid nginx.pid;\nerror_log error.log;\n"
        # Root's workers would otherwise inherit a soft limit below the connections.
        f"worker_rlimit_nofile {connections * 2};\n"
        f"events {{ worker_connections {connections}; }}\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
        f"  scgi_temp_path {prefix}/scgi;\n{http}}}\n"
    )
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]


class BenchError(Exception):
    """A run that cannot be trusted: a server died, a check failed."""


PERIOD_US = 10_000  # short, so a capped process is held back in small steps


class CpuQuota:
    """Each process given to :meth:`cap` in a cpu cgroup of its own, capped at
    ``cores`` of a core."""

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self._groups: list[Path] = []
        v1 = Path("/sys/fs/cgroup/cpu")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self._root, self._v2 = v1, False
        elif "cpu" in read_text(v2 / "cgroup.subtree_control").split():
            self._root, self._v2 = v2, True
        else:
            raise BenchError("no cgroup cpu controller to cap the servers with: --quota 0")

    def cap(self, pid: int) -> None:
        group = self._root / f"metadatad-bench-{os.getpid()}-{len(self._groups)}"
        try:
            group.mkdir()
            self._groups.append(group)
            quota = round(self.cores * PERIOD_US)
            if self._v2:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise BenchError(f"cannot cap process {pid} in {group} ({e}): --quota 0") from e

    def remove(self) -> None:
        """Remove the cgroups (once their processes are gone)."""
        deadline = time.monotonic() + 5
        for group in self._groups:
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        print(f"bench: could not remove {group}", file=sys.stderr)
                        break
                    time.sleep(0.05)
        self._groups.clear()


def read_text(path: Path) -> str:
    """The file's text, or "" when it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return ""


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds process ``pid`` (all its threads) spent on a CPU and waiting for one."""
    on = wait = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        fields = read_text(task).split()
        if len(fields) >= 2:
            on += int(fields[0])
            wait += int(fields[1])
    return on / 1e9, wait / 1e9


class Processes:
    """Every child started here, each in its own session, stopped on exit."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._children: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self, name: str, argv: list[str], cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        log = open(self._logdir / f"{name}.log", "wb")  # closed in stop_all
        with signals_held():  # no Ctrl-C between the fork and the bookkeeping
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=cwd, start_new_session=True,
            )
            self._children.append((name, proc, log))
        return proc

    def discard(self, name: str) -> None:
        """Stop and forget a child (its port was taken), to start it again."""
        for child in [c for c in self._children if c[0] == name]:
            _, proc, log = child
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            log.close()
            self._children.remove(child)

    def pid(self, name: str) -> int:
        return next(proc.pid for n, proc, _ in self._children if n == name)

    def log(self, name: str) -> str:
        path = self._logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc, _ in self._children:
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with status {proc.returncode}:\n{tail(self.log(name))}"
                )

    def stop_all(self) -> None:
        for _, proc, _ in self._children:
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, proc, log in self._children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"bench: {name} ignored SIGTERM, killing it", file=sys.stderr)
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            # Whatever the leader left behind in its session goes too.
            signal_group(proc, signal.SIGKILL)
            log.close()
        self._children.clear()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held = {"depth": 0, "pending": False}


def _stop_requested(signum: int, frame: object) -> None:
    if _held["depth"]:
        _held["pending"] = True
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block (not a signal mask: children
    would inherit it and ignore SIGTERM)."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["pending"]:
            _held["pending"] = False
            raise KeyboardInterrupt


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # Each child leads its own session (start_new_session), so its pid is its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_bench(
    bench: Callable[[argparse.Namespace, Path, Processes], int],
    args: argparse.Namespace,
    prefix: str,
) -> int:
    """Run ``bench`` in a temporary directory; whatever happens, stop every child it
    started and remove the directory.  Exit status: the bench's, 2 on BenchError,
    130 when interrupted."""
    # Also when started with SIGINT ignored (as a background job of a script).
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_requested)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Processes(tmp)
    try:
        return bench(args, tmp, procs)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        # Neither a second Ctrl-C nor SIGTERM may cut the clean-up short.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
