"""Run the embedded broker alone on 127.0.0.1 for the integration tests (a real reactor, a real socket).

Prints one JSON line ``{"port": ..., "credentials": {vmid: [login, passcode]}}`` once listening,
and stops when its stdin closes, so a test that dies never leaves it behind.

    python -m tests.broker.run_broker --heartbeat-floor-ms 100 --max-body 2097152 --mint a --mint b
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

from vmcloud.broker import Broker, BrokerLimits
from vmcloud.stomp.codec import Limits

CONTROLLER = ("controller", "controller-secret")
OPERATORS = {"alice": "alice-secret"}


class _StopOnStdinClose(Protocol):
    def connectionLost(self, reason: Failure | None = None) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heartbeat-floor-ms", type=int, default=BrokerLimits().heartbeat_floor_ms)
    parser.add_argument("--max-body", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--mint", action="append", default=[])
    parser.add_argument("--anonymous", action="store_true")
    args = parser.parse_args()
    limits = BrokerLimits(
        frame=Limits(max_body=args.max_body),
        heartbeat_floor_ms=args.heartbeat_floor_ms,
        connect_timeout=5,
    )
    broker = Broker(
        reactor,
        controller_login=CONTROLLER[0],
        controller_passcode=CONTROLLER[1],
        operators=OPERATORS,
        anonymous_guests=args.anonymous,
        limits=limits,
    )
    credentials = {vmid: list(broker.credentials.mint(vmid)) for vmid in args.mint}

    def listening(port: object) -> None:
        address = port.getHost()  # type: ignore[attr-defined]
        sys.stdout.write(json.dumps({"port": address.port, "credentials": credentials}) + "\n")
        sys.stdout.flush()

    def failed(failure: Failure) -> None:
        sys.stderr.write(f"cannot listen: {failure.getErrorMessage()}\n")
        reactor.stop()  # type: ignore[attr-defined]

    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    endpoint.listen(broker.factory()).addCallbacks(listening, failed)
    StandardIO(_StopOnStdinClose())
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
