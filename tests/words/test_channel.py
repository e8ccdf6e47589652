"""The controller's guest channel: registry, beacons and silence, calls and their answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.words.support import MemoryBroker, RecordingAgent, RecordingSession
from vmcloud.pool.interfaces import GuestCallFailed, GuestInfo, IGuestChannel, IGuestListener
from vmcloud.words.browser import PageLoad
from vmcloud.words.channel import GuestChannel, SharedGuestLogin
from vmcloud.words.commands import CmdResults
from vmcloud.words.contexts import CommandOutcome
from vmcloud.words.destinations import CONTROLLER, LOGIN_HEADER, guest_destination
from vmcloud.words.grammar import Said, split_body
from vmcloud.words.interpreter import AintAWord, Interpreter
from vmcloud.words.presence import Bye, Hello, StillAlive
from vmcloud.words.vocabulary import agent_words


@implementer(IGuestListener)
class RecordingListener:
    def __init__(self) -> None:
        self.hellos: list[GuestInfo] = []
        self.gone: list[tuple[str, str]] = []
        self.events: list[tuple[str, Mapping[str, Any]]] = []

    def guest_hello(self, guest: GuestInfo) -> None:
        self.hellos.append(guest)

    def guest_gone(self, identity: str, reason: str) -> None:
        self.gone.append((identity, reason))

    def guest_event(self, identity: str, event: Mapping[str, Any]) -> None:
        self.events.append((identity, event))


class FakeCredentials:
    def __init__(self) -> None:
        self.revoked: list[str] = []

    def mint(self, vmid: str) -> tuple[str, str]:
        return f"vm-{vmid}", f"secret-{vmid}"

    def revoke(self, vmid: str) -> None:
        self.revoked.append(vmid)


def hello(identity: str = "test-1", word: type = Hello, **extra: str) -> Said:
    said: Said = word.how_to_say(
        identity=identity, ip="10.0.0.5", mac="FA:16:3E:00:00:01", agent_version="0.1.0", capabilities=["cmd"]
    )
    return Said(said.destination, {**said.headers, **extra}, said.body)


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.session = RecordingSession()
        self.credentials = FakeCredentials()
        self.channel = GuestChannel(
            self.clock,
            self.session,
            credentials=self.credentials,
            guest_broker="tcp:10.0.0.1:61613",
            beacon_timeout=20,
        )
        self.listener = RecordingListener()
        self.channel.add_listener(self.listener)
        self.channel.startService()

    def test_implements_the_seam(self) -> None:
        verifyObject(IGuestChannel, self.channel)

    def test_listens_on_the_controller_destination(self) -> None:
        self.assertEqual([d for d, _ in self.session.subscriptions.values()], [CONTROLLER])
        self.channel.stopService()
        self.assertEqual(self.session.subscriptions, {})

    def test_hello_registers_the_guest(self) -> None:
        self.session.deliver_said(hello())
        (guest,) = self.listener.hellos
        self.assertEqual(guest.identity, "test-1")
        self.assertEqual((guest.ip, guest.mac), ("10.0.0.5", "fa:16:3e:00:00:01"))
        self.assertEqual((guest.agent_version, guest.capabilities), ("0.1.0", ("cmd",)))
        self.assertEqual(guest.last_beacon, 1000)
        self.assertIsNone(guest.login)
        self.assertEqual(self.channel.guests(), {"test-1": guest})

    def test_beacons_keep_a_guest_and_silence_makes_it_gone(self) -> None:
        self.session.deliver_said(hello())
        for _ in range(5):
            self.clock.advance(15)
            self.session.deliver_said(hello(word=StillAlive))
        self.assertEqual(self.channel.guests()["test-1"].last_beacon, 1075)
        self.assertEqual(self.listener.gone, [])
        self.clock.advance(19.9)
        self.assertEqual(self.listener.gone, [])
        self.clock.advance(0.2)
        self.assertEqual(self.listener.gone, [("test-1", "silent for more than 20 s")])
        self.assertEqual(self.channel.guests(), {})

    def test_one_timed_call_watches_every_guest_for_silence(self) -> None:
        for i in range(30):
            self.session.deliver_said(hello(f"test-{i}"))
            self.clock.advance(0.25)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for _ in range(3):  # every guest but test-7 keeps beaconing
            self.clock.advance(4)
            for i in range(30):
                if i != 7:
                    self.session.deliver_said(hello(f"test-{i}", word=StillAlive))
        self.assertEqual(self.listener.gone, [])
        self.clock.advance(1021.75 - self.clock.seconds() - 0.1)  # test-7 said HELLO at 1001.75
        self.assertEqual(self.listener.gone, [])
        self.clock.advance(0.2)
        self.assertEqual(self.listener.gone, [("test-7", "silent for more than 20 s")])
        self.assertEqual(len(self.channel.guests()), 29)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.channel.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_guests_share_what_they_say_alike(self) -> None:
        """5,000 guests beacon every few seconds: their records hold one copy of each thing said."""
        self.session.deliver_said(hello("test-1"))
        self.session.deliver_said(hello("test-2"))
        first = self.channel.guests()["test-1"]
        self.clock.advance(5)
        self.session.deliver_said(hello("test-1", word=StillAlive))
        again, other = self.channel.guests()["test-1"], self.channel.guests()["test-2"]
        self.assertEqual(again.last_beacon, 1005)
        self.assertIs(again.mac, first.mac)
        self.assertIs(again.ip, first.ip)
        self.assertIs(again.identity, first.identity)
        self.assertIs(other.capabilities, first.capabilities)
        self.assertIs(other.agent_version, first.agent_version)

    def test_bye_makes_the_guest_gone_at_once(self) -> None:
        self.session.deliver_said(hello())
        self.session.deliver_said(hello(word=Bye))
        self.assertEqual(self.listener.gone, [("test-1", "said BYE")])
        self.clock.advance(100)
        self.assertEqual(len(self.listener.gone), 1)

    def test_beacon_from_an_unknown_guest_registers_it(self) -> None:
        self.session.deliver_said(hello(word=StillAlive))
        self.assertEqual([g.identity for g in self.listener.hellos], ["test-1"])

    def test_identity_from_mac_when_none_is_given(self) -> None:
        said = hello()
        headers = {k: v for k, v in said.headers.items() if k != "identity"}
        self.session.deliver(CONTROLLER, said.body, headers)
        self.assertEqual(list(self.channel.guests()), ["fa-16-3e-00-00-01"])

    def test_the_login_the_broker_vouches_for_wins(self) -> None:
        self.channel.mint_credentials("7")
        self.session.deliver_said(hello("vm-8", **{LOGIN_HEADER: "vm-7"}))
        (guest,) = self.listener.hellos
        self.assertEqual((guest.identity, guest.login), ("vm-7", "vm-7"))

    def test_a_minted_login_is_recognised(self) -> None:
        self.channel.mint_credentials("7")
        self.session.deliver_said(hello("vm-7"))
        self.assertEqual(self.listener.hellos[0].login, "vm-7")

    def test_mint_and_revoke_credentials(self) -> None:
        credentials = self.channel.mint_credentials("7")
        self.assertEqual(
            (credentials.broker, credentials.login, credentials.passcode),
            ("tcp:10.0.0.1:61613", "vm-7", "secret-7"),
        )
        self.session.deliver_said(hello("vm-7"))
        self.channel.revoke_credentials("7")
        self.assertEqual(self.credentials.revoked, ["7"])
        self.assertEqual(self.channel.guests(), {})

    def test_shared_login_never_forgets_other_guests(self) -> None:
        channel = GuestChannel(
            self.clock,
            self.session,
            credentials=SharedGuestLogin("guest", "guest"),
            guest_broker="tcp:rabbit:61614",
            beacon_timeout=20,
        )
        channel.startService()
        self.assertEqual(channel.mint_credentials("1").login, "guest")
        channel.mint_credentials("2")
        self.session.deliver_said(hello("test-1"))
        channel.revoke_credentials("1")
        self.assertIn("test-1", channel.guests())

    def test_page_load_is_an_event(self) -> None:
        self.session.deliver_said(PageLoad.how_to_say(identity="test-1", url="https://a.example/", title="A"))
        self.assertEqual(
            self.listener.events,
            [("test-1", {"action": "page-load", "url": "https://a.example/", "title": "A"})],
        )

    def test_malformed_hello_is_logged_answered_and_survived(self) -> None:
        self.session.deliver_said(hello(ip="not-an-ip"))
        self.assertEqual(self.listener.hellos, [])
        ((destination, body, headers),) = self.session.sent
        self.assertEqual((destination, split_body(body)[0]), (guest_destination("test-1"), "AINT_A_WORD"))
        self.assertIn("ip", headers["reason"])
        self.session.deliver_said(hello())
        self.assertEqual(len(self.listener.hellos), 1)

    def test_garbage_from_nobody_is_only_logged(self) -> None:
        self.session.deliver(CONTROLLER, b"\x00\xff", {})
        self.session.deliver(CONTROLLER, b"HELLO", {})
        self.session.deliver(CONTROLLER, b"HELLO", {"identity": "../../etc"})
        self.session.deliver(CONTROLLER, b"CMD_RESULTS {", {"cmd-id": "c", "identity": "test-1"})
        self.assertEqual(self.channel.guests(), {})
        self.assertEqual([split_body(b)[0] for _, b, _ in self.session.sent], ["AINT_A_WORD"])

    def test_a_failing_listener_does_not_stop_the_others(self) -> None:
        class Broken(RecordingListener):
            def guest_hello(self, guest: GuestInfo) -> None:
                raise RuntimeError("bug")

        other = RecordingListener()
        self.channel.add_listener(Broken())
        self.channel.add_listener(other)
        self.session.deliver_said(hello())
        self.assertEqual(len(other.hellos), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class CallTests(SynchronousTestCase):
    """``call`` says a request and awaits the answer with the same cmd-id."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = RecordingSession()
        self.channel = GuestChannel(
            self.clock, self.session, credentials=FakeCredentials(), guest_broker="tcp:x:1", beacon_timeout=20
        )
        self.channel.startService()
        self.session.deliver_said(hello())

    def call(
        self, word: str = "CMD_RUN", params: Mapping[str, Any] | None = None, timeout: float = 30
    ) -> Deferred:
        params = {"cmd": "true"} if params is None else params
        return Deferred.fromCoroutine(self.channel.call("test-1", word, params, timeout))

    def request(self) -> tuple[str, dict[str, str]]:
        destination, _, headers = self.session.sent[-1]
        return destination, headers

    def test_answer_completes_the_call(self) -> None:
        d = self.call(params={"cmd": "sh", "args": ["-c", "exit 3"], "timeout": 5})
        destination, headers = self.request()
        self.assertEqual(destination, guest_destination("test-1"))
        self.assertEqual(
            (headers["cmd"], headers["args"], headers["timeout"]), ("sh", '["-c", "exit 3"]', "5.0")
        )
        self.assertNoResult(d)
        outcome = CommandOutcome(
            out="", err="", finished=True, exit_code_or_signal=3, resources={"ru_maxrss": 1}
        )
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id=headers["cmd-id"], identity="test-1", outcome=outcome)
        )
        result = self.successResultOf(d)
        self.assertEqual((result["exitCodeOrSignal"], result["cmd-id"]), (3, headers["cmd-id"]))

    def test_every_call_has_its_own_cmd_id(self) -> None:
        self.call()
        self.call()
        ids = {h["cmd-id"] for _, _, h in self.session.sent}
        self.assertEqual(len(ids), 2)

    def test_no_answer_in_time(self) -> None:
        d = self.call(timeout=10)
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(2)
        failure = self.failureResultOf(d, GuestCallFailed)
        self.assertIn("no answer from test-1 to CMD_RUN within 10 s", str(failure.value))

    def test_late_and_unknown_answers_are_ignored(self) -> None:
        d = self.call(timeout=1)
        _, headers = self.request()
        self.clock.advance(2)
        self.failureResultOf(d, GuestCallFailed)
        outcome = CommandOutcome(out="", err="", finished=True, exit_code_or_signal=0)
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id=headers["cmd-id"], identity="test-1", outcome=outcome)
        )
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id="never-asked", identity="test-1", outcome=outcome)
        )
        d2 = self.call()
        self.assertNoResult(d2)

    def test_answers_from_another_guest_are_ignored(self) -> None:
        d = self.call()
        _, headers = self.request()
        outcome = CommandOutcome(out="", err="", finished=True, exit_code_or_signal=0)
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id=headers["cmd-id"], identity="test-2", outcome=outcome)
        )
        self.assertNoResult(d)
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id=headers["cmd-id"], identity="test-1", outcome=outcome)
        )
        self.successResultOf(d)

    def test_error_answer_fails_the_call(self) -> None:
        d = self.call()
        _, headers = self.request()
        self.session.deliver_said(
            CmdResults.how_to_say(cmd_id=headers["cmd-id"], identity="test-1", error="disk full")
        )
        self.assertIn("disk full", str(self.failureResultOf(d, GuestCallFailed).value))

    def test_aint_a_word_fails_the_call_at_once(self) -> None:
        d = self.call(word="CLEANUP", params={})
        _, headers = self.request()
        self.session.deliver_said(
            AintAWord.how_to_say(
                destination=CONTROLLER,
                word="CLEANUP",
                reason="unknown word",
                cmd_id=headers["cmd-id"],
                speaker="test-1",
            )
        )
        failure = self.failureResultOf(d, GuestCallFailed)
        self.assertIn("test-1 did not understand CLEANUP: unknown word", str(failure.value))

    def test_malformed_answer_fails_the_call(self) -> None:
        d = self.call()
        _, headers = self.request()
        self.session.deliver(
            CONTROLLER, b"CMD_RESULTS {nope", {"cmd-id": headers["cmd-id"], "identity": "test-1"}
        )
        self.assertIn("malformed CMD_RESULTS", str(self.failureResultOf(d, GuestCallFailed).value))

    def test_guest_gone_fails_its_calls(self) -> None:
        d = self.call(timeout=300)
        self.clock.advance(21)
        self.assertIn("gone", str(self.failureResultOf(d, GuestCallFailed).value))

    def test_bad_requests(self) -> None:
        self.failureResultOf(self.call(word="DANCE"), ValueError)
        self.failureResultOf(self.call(params={"cmd": "ls", "colour": "red"}), ValueError)
        self.failureResultOf(
            Deferred.fromCoroutine(self.channel.call("no/such", "CLEANUP", {}, 1)), GuestCallFailed
        )

    def test_stopping_fails_pending_calls(self) -> None:
        d = self.call()
        self.channel.stopService()
        self.assertIn("stopping", str(self.failureResultOf(d, GuestCallFailed).value))


class ConversationTests(SynchronousTestCase):
    """Controller and agent over an in-memory broker, every message through the real codec."""

    def setUp(self) -> None:
        self.clock = Clock()
        broker = MemoryBroker()
        self.channel = GuestChannel(
            self.clock,
            broker.session("controller"),
            credentials=FakeCredentials(),
            guest_broker="tcp:x:1",
            beacon_timeout=20,
        )
        self.channel.startService()
        agent_session = broker.session("agent", login="vm-1")
        self.agent = RecordingAgent(agent_session, name="vm-1")
        interpreter = Interpreter(agent_words(), self.agent)
        agent_session.subscribe(guest_destination("vm-1"), interpreter.hear)
        self.agent.say(hello("vm-1"))

    def call(self, word: str, params: Mapping[str, Any]) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(self.channel.call("vm-1", word, params, 5)))

    def test_cmd_run(self) -> None:
        result = self.call("CMD_RUN", {"cmd": "sh", "args": ["-c", "echo hi; exit 3"]})
        self.assertEqual((result["out"], result["exitCodeOrSignal"], result["finished"]), ("hi\n", 3, True))
        self.assertEqual(self.agent.commands[0].args, ("-c", "echo hi; exit 3"))

    def test_file_round_trip(self) -> None:
        content = bytes(range(256)) * 4096
        put = self.call("FILE_PUT", {"path": "a/b.bin", "content": content})
        self.assertEqual(put["size"], len(content))
        got = self.call("FILE_GET", {"path": "a/b.bin"})
        self.assertEqual(got["content"], content)

    def test_file_get_refused(self) -> None:
        d = Deferred.fromCoroutine(self.channel.call("vm-1", "FILE_GET", {"path": "missing"}, 5))
        self.assertIn("no such file", str(self.failureResultOf(d, GuestCallFailed).value))

    def test_prepare_and_cleanup(self) -> None:
        result = self.call(
            "PREPARE", {"homepage": "https://example.org/", "window": {"width": 800, "height": 600}}
        )
        self.assertEqual(result, {"browser": "none"})
        self.assertEqual(self.agent.prepared[0].window_width, 800)
        self.assertEqual(self.call("CLEANUP", {}), {})

    def test_the_controller_answers_nonsense_from_a_guest(self) -> None:
        self.agent.say(Said(CONTROLLER, {"identity": "vm-1"}, b"SING"))
        self.assertEqual(self.agent.not_understood, [(None, "SING", "unknown word", None)])


class CommandResultsShapeTests(SynchronousTestCase):
    def test_seed_001_keys(self) -> None:
        outcome = CommandOutcome(
            out="o", err="e", finished=False, exit_code_or_signal=9, resources={"ru_utime": 1.0}
        )
        said = CmdResults.how_to_say(cmd_id="c", identity="g", outcome=outcome)
        word, payload = split_body(said.body)
        self.assertEqual(word, "CMD_RESULTS")
        results = json.loads(payload)
        self.assertLessEqual(
            {"cmd-id", "out", "err", "finished", "exitCodeOrSignal", "resources"}, set(results)
        )
