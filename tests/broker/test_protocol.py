"""The broker's wire protocol on StringTransports: negotiation, auth, ACL, errors, delivery."""

from __future__ import annotations

import stomper
import stomper.stomp_10 as stomp_10
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.broker.support import CONTROLLER, Client, make_broker
from vmcloud.broker import BrokerLimits
from vmcloud.broker.auth import Guest, IStompAvatar, StompLogin
from vmcloud.broker.protocol import StompServerFactory
from vmcloud.broker.realm import IBrokerClient
from vmcloud.stomp.codec import Limits
from vmcloud.stomp.frame import Frame
from vmcloud.stomp.session import IStompSession
from vmcloud.words.destinations import BROADCAST, guest_destination
from vmcloud.words.destinations import CONTROLLER as CONTROLLER_QUEUE


class NegotiationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker()

    def test_highest_common_version(self) -> None:
        for offered, expected in [("1.0,1.1,1.2", "1.2"), ("1.1", "1.1"), ("1.0", "1.0"), ("1.1,2.0", "1.1")]:
            connected = Client(self.broker).connect(version=offered)
            self.assertEqual(connected.command, "CONNECTED")
            self.assertEqual(connected.headers["version"], expected)

    def test_no_accept_version_means_1_0_without_heartbeat(self) -> None:
        connected = Client(self.broker).connect(version=None)
        self.assertEqual(connected.headers["version"], "1.0")
        self.assertNotIn("heart-beat", connected.headers)

    def test_connected_headers(self) -> None:
        connected = Client(self.broker).connect()
        self.assertTrue(connected.headers["session"])
        self.assertTrue(connected.headers["server"].startswith("vmcloud/"))
        self.assertEqual(connected.headers["heart-beat"], "0,0")  # the client asked for none

    def test_stomp_command_is_accepted(self) -> None:
        self.assertEqual(Client(self.broker).connect(command="STOMP").command, "CONNECTED")

    def test_no_common_version(self) -> None:
        client = Client(self.broker)
        client.connect(version="2.0,3.0")
        self.assertEqual(client.received[-1].command, "ERROR")
        self.assertEqual(client.received[-1].headers["version"], "1.0,1.1,1.2")
        self.assertTrue(client.closing)

    def test_bad_heart_beat_header(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="fast")
        self.assertIn("heart-beat", client.received[-1].headers["message"])
        self.assertTrue(client.closing)

    def test_frame_before_connect(self) -> None:
        client = Client(self.broker)
        client.send_frame("SEND", {"destination": "/queue/a"}, b"x")
        error = client.error()
        self.assertIn("CONNECT", error.headers["message"])
        self.assertEqual(error.headers["content-type"], "text/plain")

    def test_second_connect(self) -> None:
        client = Client(self.broker)
        client.connect()
        client.send_frame("CONNECT", {"accept-version": "1.2"})
        self.assertIn("already connected", client.error().headers["message"])

    def test_connect_timeout(self) -> None:
        clock = Clock()
        client = Client(make_broker(clock))
        clock.advance(9)
        self.assertFalse(client.closing)
        clock.advance(1.5)
        self.assertIn("no CONNECT", client.error().headers["message"])

    def test_pipelined_frames_behind_connect_use_the_negotiated_version(self) -> None:
        """A 1.0 client (stomp_10 puts a space after the colon) pipelining SUBSCRIBE."""
        client = Client(self.broker)
        client.write(
            stomp_10.connect(*CONTROLLER).encode()
            + stomp_10.subscribe("/queue/a").encode()
            + stomp_10.send("/queue/a", "hello").encode()
        )
        frames = client.frames()
        self.assertEqual([f.command for f in frames], ["CONNECTED", "MESSAGE"])
        self.assertEqual(frames[1].headers["destination"], "/queue/a")
        self.assertEqual(frames[1].body, b"hello")


class AuthenticationTests(SynchronousTestCase):
    def test_controller_and_operator(self) -> None:
        broker = make_broker()
        self.assertEqual(Client(broker).connect(*CONTROLLER).command, "CONNECTED")
        self.assertEqual(Client(broker).connect("alice", "alice-secret").command, "CONNECTED")

    def test_bad_passcode(self) -> None:
        broker = make_broker()
        for login, passcode in [("controller", "nope"), ("alice", ""), ("bob", "x"), ("", ""), (None, None)]:
            client = Client(broker)
            client.connect(login, passcode)
            self.assertEqual(client.received[-1].headers["message"], "authentication failed")
            self.assertTrue(client.closing)

    def test_refusals_are_logged_with_the_reason_but_never_the_passcode(self) -> None:
        broker = make_broker()
        with capturedLogs() as events:
            Client(broker).connect("controller", "guessed-secret")
        by_event = {e.get("event"): e for e in events}
        refused = by_event["broker-auth-failed"]
        self.assertEqual((refused["login"], refused["reason"]), ("controller", "wrong passcode"))
        self.assertEqual(by_event["broker-error-sent"]["reason"], "authentication failed")
        self.assertNotIn("guessed-secret", repr(events))

    def test_minted_credentials(self) -> None:
        broker = make_broker()
        login, passcode = broker.credentials.mint("42")
        self.assertEqual(login, "vm-42")
        self.assertGreaterEqual(len(passcode), 22)  # >= 128 bits in urlsafe base64
        self.assertEqual(Client(broker).connect(login, passcode).command, "CONNECTED")
        wrong = Client(broker)
        wrong.connect(login, passcode + "x")
        self.assertTrue(wrong.closing)

    def test_restored_credentials_work_after_a_restart(self) -> None:
        before = make_broker()
        login, passcode = before.credentials.mint("3")
        after = make_broker()  # a new controller process, credentials from its checkpoint
        after.credentials.restore("3", login, passcode)
        self.assertEqual(Client(after).connect(login, passcode).command, "CONNECTED")
        with self.assertRaises(ValueError):
            after.credentials.restore("4", login, passcode)

    def test_revoke_drops_the_guest_and_refuses_its_credentials(self) -> None:
        broker = make_broker()
        login, passcode = broker.credentials.mint("7")
        guest = Client(broker)
        guest.connect(login, passcode)
        bystander = Client(broker)
        bystander.connect()
        broker.credentials.revoke("7")
        self.assertEqual(guest.error().headers["message"], "credentials revoked")
        self.assertFalse(bystander.closing)
        again = Client(broker)
        again.connect(login, passcode)
        self.assertTrue(again.closing)

    def test_a_guest_avatar_holds_the_minted_login_itself(self) -> None:
        """One string per VM login, not one per holder: at 5,000 VMs copies add up."""
        broker = make_broker()
        login, passcode = broker.credentials.mint("9")
        from_the_wire = login.encode().decode()
        _, avatar, _ = self.successResultOf(
            broker.portal.login(StompLogin(from_the_wire, passcode), None, IStompAvatar)
        )
        self.assertIs(avatar.identity, login)
        self.assertFalse(avatar.may_subscribe(guest_destination("vm-8")))
        self.assertTrue(avatar.may_subscribe(guest_destination("vm-9")))

    def test_anonymous_guests_only_when_enabled(self) -> None:
        refused = Client(make_broker())
        refused.connect("test-1", None)
        self.assertTrue(refused.closing)
        broker = make_broker(anonymous_guests=True)
        self.assertEqual(Client(broker).connect("test-1", None).command, "CONNECTED")
        self.assertEqual(Client(broker).connect("test-2", "").command, "CONNECTED")
        for login, passcode in [("test-1", "something"), ("bad identity!", None), ("alice", None)]:
            client = Client(broker)
            client.connect(login, passcode)
            self.assertTrue(client.closing, login)

    def test_anonymous_guests_only_over_loopback_whatever_the_listener(self) -> None:
        """Issue #8: a broker that also listens on the local driver's bridge took anonymous guests
        from every VM there; the rule is per connection, not per configured listener."""
        broker = make_broker(anonymous_guests=True)
        from_vm = Client(broker, address="10.250.0.11")
        with capturedLogs() as logged:
            from_vm.connect("evilguest", None)
        self.assertTrue(from_vm.closing)
        (refusal,) = [e for e in logged if e.get("event") == "broker-auth-failed"]
        self.assertIn("loopback", refusal["reason"])
        self.assertEqual(Client(broker, address="::1").connect("test-1", None).command, "CONNECTED")
        login, passcode = broker.credentials.mint("9")  # minted credentials work from anywhere
        self.assertEqual(Client(broker, address="10.250.0.11").connect(login, passcode).command, "CONNECTED")

    def test_anonymous_cannot_take_a_minted_login(self) -> None:
        broker = make_broker(anonymous_guests=True)
        login, _passcode = broker.credentials.mint("9")
        client = Client(broker)
        client.connect(login, None)
        self.assertTrue(client.closing)

    def test_interfaces(self) -> None:
        broker = make_broker()
        verifyObject(IStompAvatar, Guest("vm-1"))
        [checker] = broker.portal.checkers.values()
        verifyObject(ICredentialsChecker, checker)
        local = broker.attach_local("controller")
        verifyObject(IStompSession, local)
        verifyObject(IBrokerClient, local)
        client = Client(broker)
        verifyObject(IBrokerClient, client.protocol)


class GuestAccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker()
        self.controller = self.broker.attach_local("controller")
        self.inbox: list[Frame] = []
        self.controller.subscribe(CONTROLLER_QUEUE, self.inbox.append)
        login, passcode = self.broker.credentials.mint("1")
        self.guest = Client(self.broker)
        self.guest.connect(login, passcode)
        self.identity = login

    def test_guest_may_use_its_own_destinations(self) -> None:
        self.guest.subscribe(guest_destination(self.identity), "cmd")
        self.guest.subscribe(BROADCAST, "all")
        self.controller.send(guest_destination(self.identity), b"CMD_RUN", {"cmd-id": "1"})
        self.controller.send(BROADCAST, b"PING")
        self.assertEqual([f.body for f in self.guest.frames()], [b"CMD_RUN", b"PING"])
        self.guest.send_frame("SEND", {"destination": CONTROLLER_QUEUE, "receipt": "r"}, b"HELLO")
        self.assertEqual([f.command for f in self.guest.frames()], ["RECEIPT"])
        self.assertEqual([f.body for f in self.inbox], [b"HELLO"])

    def test_guest_identity_is_stamped_on_what_it_sends(self) -> None:
        self.guest.send_frame("SEND", {"destination": CONTROLLER_QUEUE, "user-id": "vm-2"}, b"HELLO")
        self.assertEqual(self.inbox[0].headers["user-id"], self.identity)

    def test_guest_may_not_subscribe_to_another_guest(self) -> None:
        other = Client(self.broker)
        other_login, other_passcode = self.broker.credentials.mint("2")
        other.connect(other_login, other_passcode)
        other.subscribe(guest_destination(other_login))
        self.guest.send_frame("SUBSCRIBE", {"destination": guest_destination(other_login), "id": "x"})
        error = self.guest.error()
        self.assertIn("not allowed to subscribe", error.headers["message"])
        # Everybody else carries on.
        self.controller.send(guest_destination(other_login), b"still here")
        self.assertEqual([f.body for f in other.frames()], [b"still here"])

    def test_guest_may_not_send_elsewhere(self) -> None:
        self.guest.send_frame("SEND", {"destination": guest_destination("vm-2"), "receipt": "r"}, b"x")
        error = self.guest.error()
        self.assertIn("not allowed to send", error.headers["message"])
        self.assertEqual(error.headers["receipt-id"], "r")

    def test_guest_may_not_send_beneath_the_controller_queue(self) -> None:
        """Nobody reads ``/queue/vmcloud.controller.<x>``: a guest could fill the store there."""
        self.guest.send_frame("SEND", {"destination": CONTROLLER_QUEUE + ".events", "receipt": "r"}, b"x")
        self.assertIn("not allowed to send", self.guest.error().headers["message"])


class ErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker(limits=BrokerLimits(frame=Limits(max_body=100), max_subscriptions=2))
        self.other = Client(self.broker)
        self.other.connect()
        self.other.subscribe("/topic/t")
        self.client = Client(self.broker)
        self.client.connect()

    def assert_others_carry_on(self) -> None:
        publisher = Client(self.broker)
        publisher.connect()
        publisher.send_frame("SEND", {"destination": "/topic/t"}, b"fine")
        self.assertEqual([f.body for f in self.other.frames()], [b"fine"])

    def test_unknown_command(self) -> None:
        self.client.send_frame("FROB", {"receipt": "1"})
        error = self.client.error()
        self.assertEqual(error.headers["message"], "unknown command FROB")
        self.assertEqual(error.headers["receipt-id"], "1")
        self.assertEqual(error.body, b"unknown command FROB")
        self.assert_others_carry_on()

    def test_malformed_frame(self) -> None:
        self.client.write(b"SEND\ndestination\n\n\x00")
        self.assertIn("colon", self.client.error().headers["message"])
        self.assert_others_carry_on()

    def test_bad_escape(self) -> None:
        self.client.write(b"SEND\ndestination:/topic/t\\t\n\n\x00")
        self.assertIn("escape", self.client.error().headers["message"])

    def test_overlong_line_is_refused_as_soon_as_it_is_one(self) -> None:
        """A line one byte over the limit, not ending in the CR of a CRLF, can never come right:
        refused at once, not when a further byte comes (the attack suite found the wait)."""
        limit = Limits().max_header_line
        for head in (b"", b"SEND\n"):
            client = Client(self.broker)
            client.connect()
            client.write(head + b"S" * (limit + 1))
            self.assertIn("header line longer", client.error().headers["message"])
        client = Client(self.broker)
        client.connect()
        client.write(b"SEND\ndestination:/topic/t\nx:" + b"v" * (limit - 2) + b"\r")  # may yet be a CRLF
        self.assertFalse(client.closing)
        client.write(b"\n\n\x00")  # it was: a header of exactly the limit
        self.assertFalse(client.closing)

    def test_oversize_frame(self) -> None:
        self.client.send_frame("SEND", {"destination": "/topic/t"}, b"x" * 101)
        self.assertIn("larger than 100", self.client.error().headers["message"])
        self.assert_others_carry_on()

    def test_missing_headers(self) -> None:
        for command, headers in [
            ("SEND", {}),
            ("SUBSCRIBE", {"destination": "/q"}),
            ("SUBSCRIBE", {"destination": "/q", "id": "1", "ack": "sometimes"}),
            ("ACK", {}),
            ("BEGIN", {}),
            ("COMMIT", {"transaction": "nope"}),
            ("UNSUBSCRIBE", {}),
        ]:
            client = Client(self.broker)
            client.connect()
            client.send_frame(command, headers)
            self.assertEqual(client.error().command, "ERROR", command)
        self.assert_others_carry_on()

    def test_too_many_subscriptions(self) -> None:
        self.client.subscribe("/topic/a", "1")
        self.client.subscribe("/topic/b", "2")
        self.client.send_frame("SUBSCRIBE", {"destination": "/topic/c", "id": "3"})
        self.assertIn("more than 2 subscriptions", self.client.error().headers["message"])

    def test_duplicate_subscription_id(self) -> None:
        self.client.subscribe("/topic/a", "1")
        self.client.send_frame("SUBSCRIBE", {"destination": "/topic/b", "id": "1"})
        self.assertIn("already in use", self.client.error().headers["message"])

    def test_too_many_connections(self) -> None:
        broker = make_broker(limits=BrokerLimits(max_connections=1))
        first = Client(broker)
        second = Client(broker)
        self.assertIn("too many connections", second.error().headers["message"])
        self.assertEqual(first.connect().command, "CONNECTED")
        factory = broker.factory()
        assert isinstance(factory, StompServerFactory)
        self.assertEqual((factory.opened, factory.refused), (2, 1))  # what /metrics can count

    def test_error_closes_after_flush_and_aborts_a_peer_that_never_reads(self) -> None:
        clock = Clock()
        broker = make_broker(clock)
        client = Client(broker)
        client.send_frame("FROB")
        self.assertTrue(client.closing)
        clock.advance(5)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(broker.stats().connections, 1)
        client.lose()
        self.assertEqual(broker.stats().connections, 0)

    def test_nothing_is_processed_after_an_error(self) -> None:
        self.client.write(b"FROB\n\n\x00SEND\ndestination:/topic/t\n\nlost\x00")
        self.client.error()
        self.assertEqual(self.other.frames(), [])


class ReceiptAndDisconnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = make_broker()

    def test_receipts_follow_processing(self) -> None:
        client = Client(self.broker)
        client.connect()
        client.send_frame("SUBSCRIBE", {"destination": "/queue/a", "id": "1", "receipt": "r1"})
        client.send_frame("SEND", {"destination": "/queue/a", "receipt": "r2"}, b"x")
        self.assertEqual(
            [(f.command, f.headers.get("receipt-id")) for f in client.frames()],
            [("RECEIPT", "r1"), ("MESSAGE", None), ("RECEIPT", "r2")],
        )

    def test_disconnect_with_receipt(self) -> None:
        client = Client(self.broker)
        client.connect()
        client.send_frame("DISCONNECT", {"receipt": "bye"})
        self.assertEqual(client.frames(), [Frame("RECEIPT", {"receipt-id": "bye"})])
        self.assertTrue(client.closing)

    def test_stomper_disconnect_without_blank_line(self) -> None:
        client = Client(self.broker)
        client.connect(version="1.1")
        client.write(stomper.disconnect("r-9").encode())
        self.assertEqual(client.frames(), [Frame("RECEIPT", {"receipt-id": "r-9"})])
        self.assertTrue(client.closing)


class StomperReplayTests(SynchronousTestCase):
    """What a seed-001 agent built on stomper sends, replayed whole and one byte at a time."""

    def replay(self, bytewise: bool) -> None:
        broker = make_broker()
        controller = broker.attach_local("controller")
        inbox: list[Frame] = []
        controller.subscribe("/queue/replies", inbox.append)
        agent = Client(broker, bytewise=bytewise)
        agent.write(stomper.connect(*CONTROLLER, "vm-host", (0, 0)).encode())
        [connected] = agent.frames()
        self.assertEqual(connected.headers["version"], "1.1")
        agent.decoder.version = "1.1"
        agent.write(stomper.subscribe("/queue/work", "1", "client-individual").encode())
        controller.send("/queue/work", b"job one")
        [message] = agent.frames()
        self.assertEqual(message.body, b"job one")
        agent.write(stomper.ack(message.headers["message-id"], "1").encode())
        agent.write(stomper.send("/queue/replies", "line 1\nline 2").encode())
        agent.write(
            stomper.begin("t").encode() + stomper.send("/queue/replies", "in tx", transactionid="t").encode()
        )
        self.assertEqual([f.body for f in inbox], [b"line 1\nline 2"])
        agent.write(stomper.commit("t").encode())
        self.assertEqual([f.body for f in inbox], [b"line 1\nline 2", b"in tx"])
        agent.write(stomper.disconnect("bye").encode())
        self.assertEqual(agent.frames(), [Frame("RECEIPT", {"receipt-id": "bye"})])
        agent.lose()
        self.assertEqual(broker.stats().unacked_messages, 0)
        self.assertEqual(broker.stats().queued_messages, 0)

    def test_whole(self) -> None:
        self.replay(bytewise=False)

    def test_bytewise(self) -> None:
        self.replay(bytewise=True)

    def test_stomp_10_with_spaces(self) -> None:
        broker = make_broker()
        agent = Client(broker)
        agent.write(stomp_10.connect(*CONTROLLER).encode())
        self.assertEqual(agent.frames()[0].headers["version"], "1.0")
        agent.decoder.version = agent.version = "1.0"
        agent.write(stomp_10.subscribe("/topic/x").encode())
        publisher = Client(broker)
        publisher.connect()
        publisher.send_frame("SEND", {"destination": "/topic/x"}, b"to a 1.0 client")
        [message] = agent.frames()
        self.assertEqual(message.body, b"to a 1.0 client")
        agent.write(stomp_10.unsubscribe("/topic/x").encode())
        publisher.send_frame("SEND", {"destination": "/topic/x"}, b"nobody")
        self.assertEqual(agent.frames(), [])


class EscapingTests(SynchronousTestCase):
    def test_headers_cross_versions(self) -> None:
        broker = make_broker()
        receivers = {}
        for version in ("1.0", "1.1", "1.2"):
            receiver = Client(broker)
            receiver.connect(version=version)
            receiver.subscribe("/topic/esc", "s")
            receivers[version] = receiver
        sender = Client(broker)
        sender.connect()
        sender.send_frame("SEND", {"destination": "/topic/esc", "odd": "a:b\\c\nd", "plain": "p q"}, b"!")
        for version, receiver in receivers.items():
            [message] = receiver.frames()
            self.assertEqual(message.headers["plain"], "p q")
            if version == "1.0":
                self.assertNotIn("odd", message.headers)  # cannot travel unescaped
            else:
                self.assertEqual(message.headers["odd"], "a:b\\c\nd")

    def test_destination_with_escaped_colon_matches(self) -> None:
        broker = make_broker()
        receiver = Client(broker)
        receiver.connect()
        receiver.subscribe("/queue/a:b")
        sender = Client(broker)
        sender.connect(version="1.1")
        sender.write(b"SEND\ndestination:/queue/a\\cb\n\nx\x00")
        [message] = receiver.frames()
        self.assertEqual(message.headers["destination"], "/queue/a:b")


class HeartBeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = make_broker(self.clock)  # the default floor: 100 ms

    def beats_within(self, client: Client, seconds: float, step: float = 1 / 64) -> int:
        """Heart-beats (bare EOLs) the broker wrote to ``client`` while ``seconds`` passed, in
        steps whose sums are exact (the time of every wake-up is, too)."""
        client.transport.clear()
        self.clock.pump([step] * round(seconds / step))
        data = client.transport.value()
        self.assertEqual(data.strip(b"\n"), b"")
        return len(data)

    def test_the_client_gets_the_beats_it_asks_for(self) -> None:
        """A client asking for a beat every 500 ms gets one every 500 ms (it got one every 10 s)."""
        client = Client(self.broker)
        connected = client.connect(heart_beat="0,500")
        self.assertEqual(connected.headers["heart-beat"], "500,0")
        self.assertEqual(self.beats_within(client, 5), 10)

    def test_connected_answers_with_the_negotiated_pair(self) -> None:
        for asked, answer in [
            ("0,0", "0,0"),
            ("10000,10000", "10000,10000"),  # what the guest agent asks
            ("1000,250", "250,1000"),
            ("0,60000", "60000,0"),
            ("30,20", "100,100"),  # raised to the floor
            ("1,0", "0,100"),
        ]:
            connected = Client(self.broker).connect(heart_beat=asked)
            self.assertEqual(connected.headers["heart-beat"], answer, asked)

    def test_asks_below_the_floor_get_the_floor(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="0,10")
        self.assertIn(self.beats_within(client, 1, step=0.001), (9, 10))  # 0.1 s steps, in floats

    def test_floor_is_a_limit(self) -> None:
        broker = make_broker(self.clock, limits=BrokerLimits(heartbeat_floor_ms=1000))
        client = Client(broker)
        self.assertEqual(client.connect(heart_beat="0,500").headers["heart-beat"], "1000,0")
        self.assertEqual(self.beats_within(client, 3.5), 3)

    def test_absurd_intervals_are_refused(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="0,99999999999999999999")
        self.assertIn("at most", client.received[-1].headers["message"])
        self.assertTrue(client.closing)

    def test_broker_beats_when_idle(self) -> None:
        client = Client(self.broker)
        connected = client.connect(heart_beat="0,1000")
        self.assertEqual(connected.headers["heart-beat"], "1000,0")
        self.clock.advance(1)
        self.assertEqual(client.transport.value(), b"\n")
        client.transport.clear()
        self.clock.advance(0.5)
        client.send_frame("SUBSCRIBE", {"destination": "/topic/x", "id": "1", "receipt": "r"})
        client.frames()
        self.clock.advance(0.9)
        self.assertEqual(client.transport.value(), b"")  # a frame went out 0.9 s ago
        self.clock.advance(0.1)
        self.assertEqual(client.transport.value(), b"\n")

    def test_no_beats_unless_asked(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="0,0")
        self.clock.advance(60)
        self.assertEqual(client.transport.value(), b"")
        self.assertFalse(client.closing)

    def test_silent_client_is_dropped(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="2000,0")  # promises a beat every 2000 ms
        for _ in range(4):  # beating keeps it alive
            self.clock.advance(2)
            client.write(b"\n")
        self.assertFalse(client.closing)
        self.clock.pump([0.01] * 499)  # 4.99 s of silence: allowed
        self.assertFalse(client.closing)
        self.clock.pump([0.01] * 2)  # 5.01 s: 2.5 intervals
        self.assertEqual(client.error().headers["message"], "heart-beat timeout")

    def test_a_client_offering_fast_beats_is_held_to_them(self) -> None:
        client = Client(self.broker)
        self.assertEqual(client.connect(heart_beat="200,0").headers["heart-beat"], "0,200")
        for _ in range(20):
            self.clock.advance(0.2)
            client.write(b"\n")
        self.assertFalse(client.closing)
        self.clock.pump([0.01] * 51)  # 0.51 s: 2.5 intervals of 200 ms
        self.assertEqual(client.error().headers["message"], "heart-beat timeout")

    def test_a_late_look_waits_for_the_next_read(self) -> None:
        """The reactor held up past a silence deadline: what the peer sent meanwhile is read
        before it is judged silent, and if it still said nothing, it is dropped then."""
        talking, silent = Client(self.broker), Client(self.broker)
        talking.connect(heart_beat="1000,0")
        silent.connect(heart_beat="1000,0")
        self.clock.advance(2.4)
        self.clock.advance(0.6)  # the deadlines (2.5 s) passed 0.5 s ago: nobody dropped yet
        self.assertFalse(talking.closing or silent.closing)
        talking.write(b"\n")  # read in the same reactor turn
        self.clock.advance(0.001)
        self.assertFalse(talking.closing)
        self.assertEqual(silent.error().headers["message"], "heart-beat timeout")
        self.clock.advance(2.4)
        self.assertFalse(talking.closing)
        self.clock.advance(0.1)  # on time: no second look
        self.assertEqual(talking.error().headers["message"], "heart-beat timeout")

    def test_silence_is_counted_from_the_last_byte(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="1000,0")  # dropped after 2.5 s of silence
        self.clock.advance(2)
        client.write(b"\n")
        self.clock.advance(2.4)
        self.assertFalse(client.closing)
        self.clock.advance(0.1)
        self.assertEqual(client.error().headers["message"], "heart-beat timeout")

    def test_one_timed_call_beats_for_every_connection(self) -> None:
        clients = [Client(self.broker) for _ in range(20)]
        for client in clients:
            client.connect(heart_beat="0,1000")  # wants a beat every second
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.assertEqual({c.transport.value() for c in clients}, {b"\n"})
        clients[3].lose()
        self.clock.pump([0.5] * 4)
        self.assertEqual(clients[3].transport.value(), b"\n")
        self.assertEqual({c.transport.value() for c in clients if c is not clients[3]}, {b"\n\n\n"})
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_clients_asking_different_paces_share_one_timed_call(self) -> None:
        asks = [125, 250, 375, 1000, 2000, 125, 625]
        clients = [Client(self.broker) for _ in asks]
        for client, ms in zip(clients, asks, strict=True):
            client.connect(heart_beat=f"0,{ms}")
            client.transport.clear()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.pump([1 / 64] * 256)
        self.assertEqual([len(c.transport.value()) for c in clients], [4000 // ms for ms in asks])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_clients_without_heartbeats_are_never_dropped(self) -> None:
        client = Client(self.broker)
        client.connect(heart_beat="0,0")
        self.clock.advance(3600)
        self.assertFalse(client.closing)
