# -*- test-case-name: tests.tftp.test_tftp_server -*-
"""The TFTP server: requests in, transfers out (:mod:`metadatad.tftp.transfers`), the
thin glue around :mod:`metadatad.tftp.protocol`; the ports it listens on are in
:mod:`metadatad.tftp.listening`.

* Caps on concurrent transfers, global and per client address.  A request over a cap
  is dropped, not refused: the client retries it after its timeout, which is the
  back-pressure wanted in a boot storm, and an error would make firmware give up.
* A retransmitted request (same client address, port and bytes) while its transfer is
  being set up or running is ignored: the session retransmits on its own timer.

Counters for ``/metrics`` are in :attr:`TFTPServer.counters`; every request that was
served, or that concerned a known node, becomes a :class:`BootEvent`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from metadatad.db.bootevents import BootEvent, utc_moment
from metadatad.tftp.bootconfig import BootFiles, NotOwned, Opened
from metadatad.tftp.protocol import (
    DEFAULT_CONFIG,
    ErrorCode,
    MalformedPacket,
    Outcome,
    SessionConfig,
    TFTPError,
    error_reply,
    parse_request,
)
from metadatad.tftp.transfers import Address, Readers, Transfer, open_transfer_socket

_BUSY_WARNING_INTERVAL = 10.0

_OUTCOME_COUNTERS = {
    Outcome.COMPLETE: "transfers_complete",
    Outcome.TIMEOUT: "transfers_timeout",
    Outcome.CLIENT_ERROR: "transfers_client_error",
    Outcome.ABORTED: "transfers_aborted",
}


class Replier(Protocol):
    """Sends a reply to a request from the address the request was sent to."""

    def reply(self, datagram: bytes, addr: Address, local: str) -> None: ...


def _is_broadcast(dest: str, local: str) -> bool:
    """True for a request not sent to one of our unicast addresses.

    Linux reports a unicast datagram's destination as its local address (ipi_addr ==
    ipi_spec_dst); for a broadcast or multicast the local address is the interface's."""
    return dest != local


class TFTPServer:
    """Requests in, transfers out: caps, file resolution, events and counters."""

    log = Logger()

    def __init__(
        self,
        files: BootFiles,
        clock: IReactorTime,
        *,
        config: SessionConfig = DEFAULT_CONFIG,
        max_transfers: int = 1000,
        max_transfers_per_source: int = 16,
        record: Callable[[BootEvent], None] | None = None,
        conductor: str = "",
        open_socket: Callable[[str, Address], Any] = open_transfer_socket,
        readers: Readers | None = None,
    ) -> None:
        self.files = files
        self.clock = clock
        self.config = config
        self.max_transfers = max_transfers
        self.max_transfers_per_source = max_transfers_per_source
        self._record = record
        self._conductor = conductor
        self._open_socket = open_socket
        # Where transfer sockets are watched: a ReaderHub in the daemon, else the clock.
        self.readers: Readers = readers if readers is not None else cast(Readers, clock)
        self.transfers: dict[tuple[Address, bytes], Transfer] = {}
        self._per_source: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._last_busy_warning = float("-inf")
        self.stopping = False

    @property
    def active(self) -> int:
        """Transfers being set up or running."""
        return len(self.transfers)

    def request_received(
        self,
        datagram: bytes,
        client: Address,
        local: str,
        replier: Replier,
        dest: str | None = None,
    ) -> None:
        """A datagram at a listening port from ``client`` to ``dest`` (the address it was
        sent to; default ``local``), answered from ``local``."""
        counters = self.counters
        counters["requests"] += 1
        if self.stopping:
            return
        if dest is not None and _is_broadcast(dest, local):
            counters["dropped_broadcast"] += 1
            return
        try:
            request = parse_request(datagram)
        except TFTPError as e:
            counters["malformed" if isinstance(e, MalformedPacket) else "refused"] += 1
            reply = error_reply(datagram, e.code, e.message)
            if reply is not None:
                replier.reply(reply, client, local)
            return
        key = (client, datagram)
        if key in self.transfers:
            counters["duplicate_requests"] += 1
            return
        source = client[0]
        if (
            len(self.transfers) >= self.max_transfers
            or self._per_source[source] >= self.max_transfers_per_source
        ):
            counters["dropped_busy"] += 1
            now = self.clock.seconds()
            if now - self._last_busy_warning >= _BUSY_WARNING_INTERVAL:
                self._last_busy_warning = now
                self.log.warn(
                    "TFTP busy: dropping requests ({active} transfers, {source} has "
                    "{mine}; caps {total}/{per_source})",
                    active=len(self.transfers),
                    source=source,
                    mine=self._per_source[source],
                    total=self.max_transfers,
                    per_source=self.max_transfers_per_source,
                )
            return
        transfer = Transfer(self, request, client, local, key)
        self.transfers[key] = transfer
        self._per_source[source] += 1
        try:
            opened = self.files.open(request.filename, source, local)
        except Exception:
            self._open_failed(Failure(), transfer, replier)
            return
        if isinstance(opened, Deferred):
            opened.addCallbacks(
                self._opened,
                self._open_failed,
                callbackArgs=(transfer, replier),
                errbackArgs=(transfer, replier),
            )
        else:
            self._opened(opened, transfer, replier)

    def _opened(self, opened: Opened, transfer: Transfer, replier: Replier) -> None:
        if self.stopping or transfer.done:
            transfer.opened = opened
            transfer._finish()
            return
        try:
            sock = self._open_socket(transfer.local, transfer.client)
        except OSError as e:
            self.log.error(
                "cannot open a TFTP transfer socket on {local}: {error}",
                local=transfer.local,
                error=e,
            )
            close = getattr(opened.source, "close", None)
            if close is not None:
                close()
            self._refuse(transfer, replier, TFTPError(ErrorCode.NOT_DEFINED, "server error"))
            return
        try:
            transfer.start(opened, sock)
        except Exception:
            self.log.failure(
                "TFTP transfer of {filename} failed", filename=transfer.request.filename
            )
            if not transfer.done:
                transfer.opened = opened
                transfer._finish()

    def _open_failed(self, failure: Failure, transfer: Transfer, replier: Replier) -> None:
        if isinstance(failure.value, TFTPError):
            self._refuse(transfer, replier, failure.value)
            return
        self.log.failure(
            "cannot resolve TFTP file {filename}", failure, filename=transfer.request.filename
        )
        self._refuse(transfer, replier, TFTPError(ErrorCode.NOT_DEFINED, "server error"))

    def _refuse(self, transfer: Transfer, replier: Replier, error: TFTPError) -> None:
        """Answer the request with ``error`` from the listener and forget it."""
        if isinstance(error, NotOwned):
            outcome = "not-owned"
        elif error.code == ErrorCode.FILE_NOT_FOUND:
            outcome = "not-found"
        elif error.code == ErrorCode.ACCESS_VIOLATION:
            outcome = "refused"
        else:
            outcome = "error"
        self.counters[outcome.replace("-", "_")] += 1
        if not self.stopping:
            replier.reply(error.packet, transfer.client, transfer.local)
        transfer.done = True
        self._release(transfer)
        self._report(
            transfer,
            outcome,
            error.message,
            getattr(error, "node_uuid", None),
            getattr(error, "kind", None),
        )

    def finished(self, transfer: Transfer) -> None:
        """A transfer ended (called by the transfer)."""
        self._release(transfer)
        session = transfer.session
        if session is None or session.outcome is None:
            return
        counters = self.counters
        counters[_OUTCOME_COUNTERS[session.outcome]] += 1
        counters["bytes_sent"] += session.bytes_sent
        counters["retransmits"] += session.retransmits
        error = session.error.message if session.error is not None else None
        opened = transfer.opened
        self._report(
            transfer,
            str(session.outcome),
            error,
            opened.node_uuid if opened else None,
            opened.kind if opened else None,
        )

    def _release(self, transfer: Transfer) -> None:
        if self.transfers.pop(transfer.key, None) is None:
            return
        source = transfer.client[0]
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def _report(
        self,
        transfer: Transfer,
        outcome: str,
        error: str | None,
        node_uuid: str | None,
        kind: str | None,
    ) -> None:
        """Log the end of ``transfer`` and record its boot event."""
        ended = self.clock.seconds()
        session = transfer.session
        duration = max(0.0, ended - transfer.started)
        if session is not None:
            self.log.info(
                "tftp {client} {filename}: {outcome}, {bytes} bytes in {duration:.3f}s",
                client=transfer.client[0],
                filename=transfer.request.filename,
                outcome=outcome,
                bytes=session.bytes_sent,
                duration=duration,
            )
        else:
            self.log.debug(
                "tftp {client} {filename}: {outcome}",
                client=transfer.client[0],
                filename=transfer.request.filename,
                outcome=outcome,
            )
        if self._record is None:
            return

        def build(uuid: str | None) -> None:
            # Requests of unknown machines that sent nothing are counters only: a
            # PXELINUX walk or a spoofed flood must not fill the table.
            if uuid is None and session is None:
                return
            options = session.options if session is not None else None
            event = BootEvent(
                node_uuid=uuid,
                conductor=self._conductor,
                client=transfer.client[0],
                server=transfer.local,
                filename=transfer.request.filename,
                kind=kind or "static",
                outcome=outcome,
                started_at=utc_moment(transfer.started),
                duration=duration,
                bytes_sent=session.bytes_sent if session is not None else 0,
                size=session.size if session is not None else None,
                error=error,
                blksize=options.blksize if options is not None else None,
                windowsize=options.windowsize if options is not None else None,
                retransmits=session.retransmits if session is not None else 0,
            )
            assert self._record is not None
            self._record(event)

        if node_uuid is not None:
            build(node_uuid)
            return
        try:
            found = self.files.node_of_client(transfer.client[0])
        except Exception:
            self.log.failure("node lookup for a boot event failed")
            found = None
        if isinstance(found, Deferred):
            found.addErrback(lambda f: self.log.failure("node lookup failed", f)).addCallback(build)
        else:
            build(found)

    def stop(self) -> None:
        """Abort every transfer (shutdown): clients get ERROR 0 now, not a timeout."""
        self.stopping = True
        for transfer in list(self.transfers.values()):
            if transfer.session is not None:
                transfer.abort("server shutting down")
            else:
                transfer.done = True  # set-up still running: _opened closes it
