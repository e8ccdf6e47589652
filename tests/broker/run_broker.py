"""Run the embedded broker alone on 127.0.0.1 for the integration tests (a real reactor, a real socket).

Prints one JSON line ``{"port": ..., "credentials": {vmid: [login, passcode]}}`` once listening,
and stops when its stdin closes, so a test that dies never leaves it behind.  Each ``stats`` line
on stdin is answered with a JSON line on stdout: the broker's :class:`BrokerStats`, and what the
process holds once the garbage is collected and free heap pages are returned (``blocks``: Python's
allocated memory blocks; ``rss``: bytes resident).  ``--log-file`` writes the broker's log there as
JSON lines (else it is dropped).

    python -m tests.broker.run_broker --heartbeat-floor-ms 100 --max-body 2097152 --mint a --mint b
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.stdio import StandardIO
from twisted.logger import globalLogBeginner, jsonFileLogObserver
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from vmcloud.broker import Broker, BrokerLimits
from vmcloud.stomp.codec import Limits

CONTROLLER = ("controller", "controller-secret")
OPERATORS = {"alice": "alice-secret"}


class _Control(LineOnlyReceiver):
    """stdin: ``stats`` lines are answered on stdout; the broker stops when stdin closes."""

    delimiter = b"\n"

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"stats":
            sys.stdout.write(json.dumps(held(self.broker)) + "\n")
            sys.stdout.flush()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def _trim() -> None:
    """Free pages inside glibc's heaps go back to the system (nothing elsewhere), so that RSS
    counts what is held rather than what the allocator happens to keep."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))


def held(broker: Broker) -> dict[str, int]:
    """The broker's counts, and the memory the process holds after a full collection and a trim."""
    gc.collect()
    _trim()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {**attrs.asdict(broker.stats()), "blocks": sys.getallocatedblocks(), "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heartbeat-floor-ms", type=int, default=BrokerLimits().heartbeat_floor_ms)
    parser.add_argument("--max-body", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--mint", action="append", default=[])
    parser.add_argument("--anonymous", action="store_true")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--max-connections", type=int, default=BrokerLimits().max_connections)
    parser.add_argument("--log-file")
    args = parser.parse_args()
    if args.log_file:
        log_file = open(args.log_file, "a")  # noqa: SIM115 - open as long as the process runs
        globalLogBeginner.beginLoggingTo([jsonFileLogObserver(log_file)], redirectStandardIO=False)
    limits = BrokerLimits(
        frame=Limits(max_body=args.max_body),
        heartbeat_floor_ms=args.heartbeat_floor_ms,
        connect_timeout=args.connect_timeout,
        max_connections=args.max_connections,
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
    StandardIO(_Control(broker))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
