"""SIGHUP reloads: what changes (pure comparison), and the service's handling of a
good and a bad file; the signal itself is sent to the real daemon in
test_operability_daemon.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.logger import LogLevel, capturedLogs

from metadatad.config import load_config
from metadatad.reload import ReloadService, plan_reload


def write(tmp_path: Path, vendordata: Any, cache_ttl: str = "15") -> Path:
    (tmp_path / "vendordata.json").write_text(
        vendordata if isinstance(vendordata, str) else json.dumps(vendordata)
    )
    conf = tmp_path / "metadatad.conf"
    conf.write_text(
        f"[metadata]\ncache_ttl = {cache_ttl}\n"
        f"[vendordata]\nstatic_file = {tmp_path / 'vendordata.json'}\n"
    )
    return conf


def test_plan_reload(tmp_path: Path) -> None:
    """Same file: nothing to do.  New vendordata: taken.  Other sections: named."""
    conf = write(tmp_path, {"a": 1})
    old = load_config(conf)
    assert plan_reload(old, load_config(conf)) == plan_reload(old, old)
    assert plan_reload(old, old).vendordata is None
    assert plan_reload(old, old).restart_sections == ()
    write(tmp_path, {"a": 2}, cache_ttl="3")
    plan = plan_reload(old, load_config(conf))
    assert plan.vendordata == {"a": 2}
    assert plan.restart_sections == ("metadata",)


class Reactor:
    """Runs callFromThread at once (the handler runs on the main thread here)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


def test_service_reloads_on_sighup_and_refuses_bad_files(tmp_path: Path) -> None:
    """A real SIGHUP to this process: vendordata set, caches cleared; a broken file
    changes nothing; the previous handler comes back when the service stops."""
    conf = write(tmp_path, {"a": 1})
    served: list[Any] = []
    cleared: list[str] = []
    service = ReloadService(
        load_config(conf),
        Reactor(),
        set_vendordata=served.append,
        invalidate=[lambda: cleared.append("metadata"), lambda: cleared.append("tftp")],
    )
    before = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        write(tmp_path, {"a": 2})
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
        assert served == [{"a": 2}]
        assert cleared == ["metadata", "tftp"]
        assert any(e["log_level"] == LogLevel.info for e in events)

        write(tmp_path, "{broken")
        with capturedLogs() as events:
            assert service.reload() is False
        assert served == [{"a": 2}] and len(cleared) == 2
        (error,) = [e for e in events if e["log_level"] == LogLevel.error]
        assert "not valid JSON" in error["error"]

        write(tmp_path, {"a": 2}, cache_ttl="1")
        with capturedLogs() as events:
            assert service.reload() is True
        assert served == [{"a": 2}]  # unchanged vendordata is not set again
        (warning,) = [e for e in events if e["log_level"] == LogLevel.warn]
        assert warning["sections"] == "[metadata]"
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before
