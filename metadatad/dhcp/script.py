# -*- test-case-name: tests.dhcp.test_dhcp_service -*-
"""The ``script`` provider: run an operator's command per push.

The command (``[dhcp] script_command``, split like a shell would, no shell involved)
gets the mapping as one JSON object on stdin — the mapping's document plus
``"owner"`` and ``"generation"`` — and must exit 0 once the network service has it.
A non-zero exit, a signal or a timeout is a failed push (retried with backoff), whose
error is the end of the command's stderr.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from metadatad.core.bootmapping import BootMapping
from metadatad.dhcp.provider import PushError

__all__ = ["ScriptProvider"]

# Kept of a failed command's stderr (the end of it, where the reason usually is).
_STDERR_KEPT = 2000


class _Run(ProcessProtocol):
    def __init__(self, stdin: bytes, done: Deferred[None], command: str) -> None:
        self._stdin = stdin
        self._done = done
        self._command = command
        self._stderr = bytearray()
        self.timed_out = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self._stdin)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        pass  # stdout is not used

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        if len(self._stderr) > 4 * _STDERR_KEPT:
            del self._stderr[:-_STDERR_KEPT]

    def processEnded(self, reason: Failure) -> None:
        if self._done.called:
            return
        if isinstance(reason.value, internet_error.ProcessDone):
            self._done.callback(None)
            return
        stderr = bytes(self._stderr[-_STDERR_KEPT:]).decode("utf-8", "replace").strip()
        value: Any = reason.value
        if self.timed_out:
            how = "timed out"
        elif getattr(value, "signal", None):
            how = f"was killed by signal {value.signal}"
        else:
            how = f"exited {getattr(value, 'exitCode', '?')}"
        message = f"{self._command} {how}" + (f": {stderr}" if stderr else "")
        self._done.errback(PushError(message))


class ScriptProvider:
    """Runs ``command`` with the mapping on stdin, at most ``timeout`` seconds."""

    name = "script"

    def __init__(self, command: str, owner: str, reactor: Any, timeout: float = 30.0) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("empty command")
        self.owner = owner
        self.timeout = timeout
        self._reactor = reactor

    def start(self) -> None:
        pass

    def flush(self) -> None:
        pass  # every push is complete when its Deferred fires

    def stop(self) -> None:
        pass

    def push(
        self, mapping: BootMapping, previous: BootMapping | None, generation: int
    ) -> Deferred[None]:
        document = {**mapping.to_document(), "owner": self.owner, "generation": generation}
        done: Deferred[None] = Deferred()
        protocol = _Run(json.dumps(document).encode("utf-8") + b"\n", done, self.argv[0])
        try:
            transport = self._reactor.spawnProcess(
                protocol, self.argv[0], self.argv, env=dict(os.environ)
            )
        except OSError as e:
            raise PushError(f"cannot run {self.argv[0]}: {e.strerror}") from None
        timer = self._reactor.callLater(self.timeout, self._kill, protocol, transport)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)

    @staticmethod
    def _kill(protocol: _Run, transport: Any) -> None:
        protocol.timed_out = True
        try:
            transport.signalProcess("KILL")
        except internet_error.ProcessExitedAlready:
            pass
