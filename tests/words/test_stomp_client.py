"""The STOMP client protocol on StringTransport, and the reconnecting session on a memory reactor."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.stomp.client import (
    NotConnectedError,
    ReconnectingSession,
    StompClientProtocol,
    StompError,
)
from vmcloud.stomp.codec import Decoder, encode
from vmcloud.stomp.frame import Frame


def frames_written(transport: StringTransport) -> list[Frame]:
    decoder = Decoder()
    decoder.version = "1.2"
    return decoder.feed(transport.value())


def wire(frame: Frame) -> bytes:
    return encode(frame, "1.2")


CONNECTED = Frame("CONNECTED", {"version": "1.2", "server": "test/1", "heart-beat": "0,0"})


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = StompClientProtocol(
            self.clock, login="vm-1", passcode="s3cret", host="/", heartbeat=(10_000, 10_000)
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def connect(self, connected: Frame = CONNECTED) -> None:
        self.protocol.dataReceived(wire(connected))
        self.successResultOf(self.protocol.ready)
        self.transport.clear()

    def test_connect_frame(self) -> None:
        (connect,) = frames_written(self.transport)
        self.assertEqual(connect.command, "CONNECT")
        self.assertEqual(connect.headers["accept-version"], "1.1,1.2")
        self.assertEqual(
            (connect.headers["login"], connect.headers["passcode"], connect.headers["host"]),
            ("vm-1", "s3cret", "/"),
        )
        self.assertEqual(connect.headers["heart-beat"], "10000,10000")

    def test_nothing_goes_out_before_connected(self) -> None:
        self.assertNoResult(self.protocol.ready)
        self.assertRaises(NotConnectedError, self.protocol.send, "/queue/a", b"x")

    def test_send_subscribe_and_receive_binary(self) -> None:
        self.connect()
        got: list[Frame] = []
        sid = self.protocol.subscribe("/queue/vmcloud.guest.vm-1", got.append)
        body = b"FILE_PUT\n\x00\x01\x02\x00"
        self.protocol.send("/queue/vmcloud.controller", body, {"cmd-id": "c:1", "path": "a\nb"})
        subscribe, send = frames_written(self.transport)
        self.assertEqual(
            (subscribe.command, subscribe.headers["id"], subscribe.headers["ack"]), ("SUBSCRIBE", sid, "auto")
        )
        self.assertEqual(send.headers["destination"], "/queue/vmcloud.controller")
        self.assertEqual((send.headers["cmd-id"], send.headers["path"], send.body), ("c:1", "a\nb", body))
        message = wire(
            Frame("MESSAGE", {"subscription": sid, "destination": "/queue/x", "message-id": "1"}, body)
        )
        for i in range(len(message)):  # one byte at a time
            self.protocol.dataReceived(message[i : i + 1])
        self.assertEqual([f.body for f in got], [body])
        self.protocol.unsubscribe(sid)
        (unsubscribe,) = frames_written(self.transport)[2:]
        self.assertEqual((unsubscribe.command, unsubscribe.headers["id"]), ("UNSUBSCRIBE", sid))

    def test_message_handler_failure_is_logged_and_survived(self) -> None:
        self.connect()

        def broken(frame: Frame) -> None:
            raise RuntimeError("bug")

        got: list[Frame] = []
        bad = self.protocol.subscribe("/queue/a", broken)
        good = self.protocol.subscribe("/queue/b", got.append)
        self.protocol.dataReceived(
            wire(Frame("MESSAGE", {"subscription": bad, "message-id": "1"}, b"x"))
            + wire(Frame("MESSAGE", {"subscription": good, "message-id": "2"}, b"y"))
        )
        self.assertEqual([f.body for f in got], [b"y"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_error_before_connected_fails_ready_and_closes(self) -> None:
        self.protocol.dataReceived(wire(Frame("ERROR", {"message": "bad login"}, b"")))
        failure = self.failureResultOf(self.protocol.ready, StompError)
        self.assertIn("bad login", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_error_fails_the_receipt_and_closes(self) -> None:
        self.connect()
        d = self.protocol.send_with_receipt("/queue/forbidden", b"x")
        (send,) = frames_written(self.transport)
        self.protocol.dataReceived(
            wire(Frame("ERROR", {"message": "access refused", "receipt-id": send.headers["receipt"]}))
        )
        self.assertIn("access refused", str(self.failureResultOf(d, StompError).value))
        self.assertTrue(self.transport.disconnecting)

    def test_receipt(self) -> None:
        self.connect()
        d = self.protocol.send_with_receipt("/queue/a", b"x")
        self.assertNoResult(d)
        (send,) = frames_written(self.transport)
        self.protocol.dataReceived(wire(Frame("RECEIPT", {"receipt-id": send.headers["receipt"]})))
        self.successResultOf(d)

    def test_clean_disconnect_waits_for_the_receipt(self) -> None:
        self.connect()
        lost = self.protocol.disconnect()
        (disconnect,) = frames_written(self.transport)
        self.assertEqual(disconnect.command, "DISCONNECT")
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(wire(Frame("RECEIPT", {"receipt-id": disconnect.headers["receipt"]})))
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(lost)

    def test_disconnect_without_receipt_times_out(self) -> None:
        self.connect()
        self.protocol.disconnect(timeout=2)
        self.clock.advance(2.1)
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)

    def test_heartbeats_both_ways(self) -> None:
        self.connect(Frame("CONNECTED", {"version": "1.2", "heart-beat": "5000,4000"}))
        # we send every max(10000, 4000) ms; we expect the broker every max(10000, 5000) ms
        self.clock.advance(10)
        self.assertEqual(self.transport.value(), b"\n")
        self.clock.advance(5)
        self.protocol.dataReceived(b"\n")  # the broker's beat at t=15
        self.clock.advance(15)  # t=30: silent 15 s < 20 s
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(10)  # t=40: silent 25 s
        self.assertTrue(self.transport.disconnecting)

    def test_no_heartbeats_when_the_broker_offers_none(self) -> None:
        self.connect()
        self.clock.advance(1000)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(self.transport.disconnecting)

    def test_no_connected_in_time(self) -> None:
        self.clock.advance(16)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(self.protocol.ready, StompError)

    def test_garbage_from_the_broker_closes(self) -> None:
        self.connect()
        self.protocol.dataReceived(b"MESSAGE\nbad\\tescape:x\n\n\x00")
        self.assertTrue(self.transport.disconnecting)

    def test_version_11_escaping(self) -> None:
        self.connect(Frame("CONNECTED", {"version": "1.1"}))
        self.protocol.send("/queue/a", b"x", {"h": "a\rb"})
        self.assertIn(b"h:a\rb\n", self.transport.value())


class SessionTests(SynchronousTestCase):
    """ReconnectingSession: reconnects with back-off, re-subscribes, says hello, flushes the outbox."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.hellos = 0
        self.session = ReconnectingSession(
            self.reactor,
            "tcp:127.0.0.1:61613",
            login="vm-1",
            passcode="pw",
            on_connected=self.say_hello,
            retry_policy=float,
        )
        self.received: list[Frame] = []
        self.connections = 0

    def say_hello(self) -> None:
        self.hellos += 1
        self.session.send("/queue/vmcloud.controller", b"HELLO")

    def accept(self) -> tuple[StompClientProtocol, StringTransport]:
        """Complete the latest connection attempt; ``lose`` ends it as the reactor would."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 61613))
        self.connections += 1
        outer = factory.buildProtocol(None)
        transport = StringTransport()
        outer.makeConnection(transport)
        self.outer = outer
        stomp = outer._wrappedProtocol._protocol  # endpoint wrapper, then ClientService's proxy
        self.assertIsInstance(stomp, StompClientProtocol)
        return stomp, transport

    def lose(self, reason: Exception) -> None:
        self.outer.connectionLost(Failure(reason))

    def test_subscribes_says_hello_and_flushes_after_every_connect(self) -> None:
        self.session.subscribe("/queue/vmcloud.guest.vm-1", self.received.append)
        self.session.send("/queue/vmcloud.controller", b"EARLY")
        self.session.startService()
        protocol, transport = self.accept()
        self.assertEqual([f.command for f in frames_written(transport)], ["CONNECT"])
        transport.clear()
        protocol.dataReceived(wire(CONNECTED))
        written = frames_written(transport)
        self.assertEqual([f.command for f in written], ["SUBSCRIBE", "SEND", "SEND"])
        self.assertEqual([f.body for f in written[1:]], [b"HELLO", b"EARLY"])
        self.assertTrue(self.session.is_connected)
        sid = written[0].headers["id"]

        # the broker goes away: sends wait in the outbox, the session reconnects after the back-off
        self.lose(ConnectionLost())
        self.assertFalse(self.session.is_connected)
        self.session.send("/queue/vmcloud.controller", b"WHILE_AWAY")
        self.reactor.advance(1.0)
        protocol2, transport2 = self.accept()
        protocol2.dataReceived(wire(CONNECTED))
        written = frames_written(transport2)[1:]
        self.assertEqual([f.command for f in written], ["SUBSCRIBE", "SEND", "SEND"])
        self.assertEqual(written[0].headers["id"], sid)
        self.assertEqual([f.body for f in written[1:]], [b"HELLO", b"WHILE_AWAY"])
        self.assertEqual(self.hellos, 2)
        protocol2.dataReceived(wire(Frame("MESSAGE", {"subscription": sid, "message-id": "1"}, b"CMD_RUN")))
        self.assertEqual([f.body for f in self.received], [b"CMD_RUN"])

    def test_refused_login_retries_with_backoff(self) -> None:
        self.session.startService()
        protocol, transport = self.accept()
        protocol.dataReceived(wire(Frame("ERROR", {"message": "bad credentials"})))
        self.assertTrue(transport.disconnecting)
        self.lose(ConnectionDone())
        self.assertFalse(self.session.is_connected)
        self.assertEqual(self.hellos, 0)
        # the retry policy gets 1 (first retry) + 1 (refused sessions so far)
        self.reactor.advance(1.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        protocol, transport = self.accept()
        protocol.dataReceived(wire(Frame("ERROR", {"message": "bad credentials"})))
        self.lose(ConnectionDone())
        self.reactor.advance(2.9)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_connection_lost_before_connected_retries(self) -> None:
        self.session.startService()
        self.accept()
        self.lose(ConnectionLost())
        self.reactor.advance(2.1)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        protocol, _ = self.accept()
        protocol.dataReceived(wire(CONNECTED))
        self.assertEqual(self.hellos, 1)

    def test_outbox_is_bounded(self) -> None:
        session = ReconnectingSession(self.reactor, "tcp:127.0.0.1:61613", max_outbox=3)
        for i in range(5):
            session.send("/queue/a", str(i).encode())
        self.assertEqual([body for _, body, _ in session._outbox], [b"2", b"3", b"4"])

    def test_stop_disconnects_cleanly(self) -> None:
        self.session.startService()
        protocol, transport = self.accept()
        protocol.dataReceived(wire(CONNECTED))
        transport.clear()
        stopped = self.session.stopService()
        (disconnect,) = frames_written(transport)
        self.assertEqual(disconnect.command, "DISCONNECT")
        self.assertNoResult(stopped)
        protocol.dataReceived(wire(Frame("RECEIPT", {"receipt-id": disconnect.headers["receipt"]})))
        self.assertTrue(transport.disconnecting)
        self.lose(ConnectionDone())
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(self.connections, 1)  # no reconnect after a stop
