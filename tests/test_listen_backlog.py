"""Issue #8, point 6: every listener the daemon opens queues a whole pool's reconnects.

With Twisted's default backlog of 50, a restarted broker whose thousands of guests reconnect in the
same second left most of their SYNs to be retried one, three, seven seconds later.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.broker.protocol import StompServerFactory
from vmcloud.compose import build_controller, check_deployment
from vmcloud.config import MIN_LISTEN_BACKLOG, listen_backlog, parse_config, with_backlog
from vmcloud.tap import _warn_if_backlog_capped


class WithBacklogTests(SynchronousTestCase):
    def test_descriptions_get_the_backlog(self) -> None:
        for description in (
            "tcp:8080",
            "tcp:8080:interface=127.0.0.1",
            "tcp:port=8080:interface=0.0.0.0",
            "tcp6:8080:interface=\\:\\:1",
            "ssl:8443:privateKey=/etc/k.pem",
            "unix:/run/vmcloud.sock:mode=600",
        ):
            self.assertEqual(with_backlog(description, 2048), description + ":backlog=2048")

    def test_the_operators_backlog_stands(self) -> None:
        for description in ("tcp:8080:backlog=10", "tcp:backlog=4000:port=8080:interface=127.0.0.1"):
            self.assertEqual(with_backlog(description, 2048), description)

    def test_kinds_without_a_backlog_are_left_alone(self) -> None:
        for description in ("systemd:domain=INET:index=0", "onion:443", "tcp6\\:x:8080"):
            self.assertEqual(with_backlog(description, 2048), description)

    def test_an_escaped_backlog_is_not_a_backlog(self) -> None:
        description = "unix:/tmp/odd\\:backlog=5"  # a socket file named "odd:backlog=5"
        self.assertEqual(with_backlog(description, 2048), description + ":backlog=2048")

    def test_twisted_listens_with_it(self) -> None:
        reactor = MemoryReactorClock()
        description = with_backlog("tcp:0:interface=127.0.0.1", 2048)
        serverFromString(reactor, description).listen(Factory.forProtocol(Protocol))
        [(_port, _factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((backlog, interface), (2048, "127.0.0.1"))

    def test_fits_the_pool(self) -> None:
        self.assertEqual(listen_backlog(30), MIN_LISTEN_BACKLOG)
        self.assertGreaterEqual(MIN_LISTEN_BACKLOG, 1024)
        self.assertGreater(listen_backlog(5000), 5000)


class DaemonListenersTests(SynchronousTestCase):
    def listeners(self, **flags: str) -> list[tuple[object, int, str]]:
        """(factory, backlog, interface) of every listener of the daemon's service tree, started
        on a memory reactor."""
        reactor = MemoryReactorClock()
        config = parse_config(
            None,
            {"state-dir": self.mktemp(), "api": "tcp:0:interface=127.0.0.1", "stomp": "tcp:0", **flags},
        )
        root = build_controller(reactor, check_deployment(config, {}))
        assert isinstance(root, MultiService)
        for service in root:
            if isinstance(service, StreamServerEndpointService):
                service.startService()
        return [(factory, backlog, interface) for _port, factory, backlog, interface in reactor.tcpServers]

    def test_broker_and_api_listen_with_a_pool_sized_backlog(self) -> None:
        """Both used Twisted's 50 before."""
        listeners = self.listeners()
        self.assertEqual(len(listeners), 2)
        self.assertEqual(sum(isinstance(f, StompServerFactory) for f, _, _ in listeners), 1)
        self.assertEqual({backlog for _, backlog, _ in listeners}, {MIN_LISTEN_BACKLOG})

    def test_an_operators_backlog_stands(self) -> None:
        listeners = self.listeners(api="tcp:0:interface=127.0.0.1:backlog=77")
        self.assertEqual(sorted(backlog for _, backlog, _ in listeners), [77, MIN_LISTEN_BACKLOG])


class SomaxconnTests(SynchronousTestCase):
    def cap_file(self, value: str) -> str:
        path: str = self.mktemp()
        with open(path, "w") as f:
            f.write(value)
        return path

    def test_a_kernel_cap_below_the_backlog_is_logged(self) -> None:
        with capturedLogs() as events:
            _warn_if_backlog_capped(5064, self.cap_file("4096\n"))
        [event] = events
        fields = (event["event"], event["cap"], event["backlog"])
        self.assertEqual(fields, ("listen-backlog-capped", 4096, 5064))

    def test_nothing_said_when_it_fits_or_cannot_be_read(self) -> None:
        with capturedLogs() as events:
            _warn_if_backlog_capped(1024, self.cap_file("4096\n"))
            _warn_if_backlog_capped(1024, self.cap_file("junk"))
            _warn_if_backlog_capped(1024, self.mktemp())
        self.assertEqual(events, [])
