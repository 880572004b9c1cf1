"""The Neutron stub (:class:`metadatad.testing.NeutronStub`) in a process of its own,
so that a benchmark measures metadatad rather than a stub sharing its process.

    python bench/neutron_stub.py PORTS_FILE TOKEN RESULT_FILE

``PORTS_FILE`` holds one Neutron port id a line.  Listens on 127.0.0.1 (a free port),
prints ``listening <port>`` on stdout once ready; on SIGTERM writes ``{port id: time of
its last accepted PUT}`` as JSON to ``RESULT_FILE`` and exits.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/ itself must not be on the path: bench/http.py would shadow the stdlib's http.
sys.path[0] = str(ROOT)


def main() -> int:
    from twisted.internet import reactor
    from twisted.web.server import Site

    from metadatad.testing import NeutronStub

    ports_file, token, result_file = sys.argv[1:4]
    stub = NeutronStub(ports=Path(ports_file).read_text().split())
    stub.static_tokens.add(token)
    site = Site(stub.resource())
    site.log = lambda request: None  # type: ignore[method-assign]
    listening: Any = reactor
    port = listening.listenTCP(0, site, interface="127.0.0.1", backlog=1024)

    def finish(*_: object) -> None:
        Path(result_file).write_text(json.dumps(stub.accepted_at))
        listening.callFromThread(listening.stop)

    signal.signal(signal.SIGTERM, finish)
    print(f"listening {port.getHost().port}", flush=True)
    listening.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
