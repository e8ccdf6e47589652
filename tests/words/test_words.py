"""Every word: say it, put it through the real codec, hear it with the interpreter, see the act."""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.words.support import RecordingAgent, RecordingSession, said_on_the_wire
from vmcloud.words.browser import Cleanup, CleanupResults, PageLoad, Prepare, PrepareResults
from vmcloud.words.commands import CmdResults, CmdRun
from vmcloud.words.contexts import CommandOutcome, IAgentContext
from vmcloud.words.destinations import BROADCAST, CONTROLLER, guest_destination
from vmcloud.words.files import MAX_FILE_BYTES, FileGet, FilePut, FileResults
from vmcloud.words.grammar import Said, split_body
from vmcloud.words.interpreter import AintAWord, Interpreter
from vmcloud.words.presence import Bye, Hello, StillAlive
from vmcloud.words.vocabulary import agent_words


def answers(session: RecordingSession) -> list[tuple[str, str, dict[str, str], bytes]]:
    """(word, destination, headers, payload) of everything said."""
    out = []
    for destination, body, headers in session.sent:
        word, payload = split_body(body)
        out.append((word, destination, headers, payload))
    return out


class GrammarTests(SynchronousTestCase):
    def test_word_is_up_to_first_space_or_newline(self) -> None:
        self.assertEqual(split_body(b"CMD_RESULTS {}"), ("CMD_RESULTS", b"{}"))
        self.assertEqual(split_body(b"FILE_PUT\n\x00\x01 x"), ("FILE_PUT", b"\x00\x01 x"))
        self.assertEqual(split_body(b"HELLO"), ("HELLO", b""))

    def test_no_word(self) -> None:
        for body in (b"", b"hello", b"\xff\xfe", b" HELLO", b"A" * 40, b"H\x00LLO"):
            self.assertIsNone(split_body(body)[0], body)


class AgentSideTests(SynchronousTestCase):
    """The agent's interpreter acting on requests, answering to the controller."""

    def setUp(self) -> None:
        self.session = RecordingSession()
        self.agent = RecordingAgent(self.session)
        self.interpreter = Interpreter(agent_words(), self.agent)

    def hear(self, said: Said) -> None:
        self.successResultOf(self.interpreter.hear(said_on_the_wire(said)))

    def test_context_fake_is_an_agent_context(self) -> None:
        verifyObject(IAgentContext, self.agent)

    def test_cmd_run_runs_and_answers_cmd_results(self) -> None:
        said = CmdRun.how_to_say(
            to="test-1",
            cmd_id="c1",
            cmd="sh",
            args=["-c", "echo hi; exit 3"],
            env={"A": "b:c\nd"},
            path="/tmp",
            timeout=2.5,
        )
        self.assertEqual(said.destination, guest_destination("test-1"))
        self.assertEqual(said.body, b"CMD_RUN")
        self.hear(said)
        (request,) = self.agent.commands
        self.assertEqual(request.cmd, "sh")
        self.assertEqual(request.args, ("-c", "echo hi; exit 3"))
        self.assertEqual(request.env, {"A": "b:c\nd"})
        self.assertEqual((request.path, request.timeout), ("/tmp", 2.5))
        ((word, destination, headers, payload),) = answers(self.session)
        self.assertEqual((word, destination), ("CMD_RESULTS", CONTROLLER))
        self.assertEqual(headers["cmd-id"], "c1")
        self.assertEqual(headers["status"], "ok")
        self.assertEqual(headers["identity"], "test-1")
        results = json.loads(payload)
        self.assertEqual(results["cmd-id"], "c1")
        self.assertEqual(results["out"], "hi\n")
        self.assertEqual(results["exitCodeOrSignal"], 3)
        self.assertIs(results["finished"], True)
        self.assertEqual(results["resources"], {"ru_utime": 0.01})

    def test_cmd_run_waits_for_the_command(self) -> None:
        self.agent.command_result = Deferred()
        d = self.interpreter.hear(said_on_the_wire(CmdRun.how_to_say(to="test-1", cmd_id="c1", cmd="sleep")))
        self.assertNoResult(d)
        self.assertEqual(self.session.sent, [])
        self.agent.command_result.callback(
            CommandOutcome(out="", err="", finished=False, exit_code_or_signal=15, timed_out=True)
        )
        self.successResultOf(d)
        results = json.loads(answers(self.session)[0][3])
        self.assertEqual(
            (results["finished"], results["exitCodeOrSignal"], results["timedOut"]), (False, 15, True)
        )

    def test_cmd_run_for_someone_else_is_ignored(self) -> None:
        self.hear(CmdRun.how_to_say(to="test-2", cmd_id="c1", cmd="true"))
        self.assertEqual((self.agent.commands, self.session.sent), ([], []))

    def test_broadcast_cmd_run_is_run(self) -> None:
        said = CmdRun.how_to_say(to="*", cmd_id="c1", cmd="true")
        self.assertEqual(said.destination, BROADCAST)
        self.hear(said)
        self.assertEqual(len(self.agent.commands), 1)

    def test_cmd_run_failure_is_an_error_answer(self) -> None:
        self.agent.fail_with = OSError("no such directory")
        self.hear(CmdRun.how_to_say(to="test-1", cmd_id="c1", cmd="true"))
        ((word, _, headers, payload),) = answers(self.session)
        self.assertEqual((word, headers["status"], headers["cmd-id"]), ("CMD_RESULTS", "error", "c1"))
        self.assertIn("no such directory", headers["message"])
        self.assertIn("no such directory", json.loads(payload)["error"])

    def test_unexpected_failure_hides_the_traceback(self) -> None:
        self.agent.fail_with = ZeroDivisionError("boom")
        self.hear(CmdRun.how_to_say(to="test-1", cmd_id="c1", cmd="true"))
        headers = answers(self.session)[0][2]
        self.assertEqual(headers["status"], "error")
        self.assertIn("internal error (ZeroDivisionError)", headers["message"])
        self.assertNotIn("Traceback", headers["message"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_malformed_cmd_run_is_answered_aint_a_word(self) -> None:
        for headers in (
            {"to": "test-1", "cmd-id": "c1", "cmd": "ls", "args": "not json"},
            {"to": "test-1", "cmd-id": "c1", "cmd": "ls", "args": "[1, 2]"},
            {"to": "test-1", "cmd-id": "c1", "cmd": "ls", "env": '{"A": 1}'},
            {"to": "test-1", "cmd-id": "c1", "cmd": "ls", "timeout": "-1"},
            {"to": "test-1", "cmd-id": "c1"},
        ):
            self.session.sent.clear()
            self.hear(Said(guest_destination("test-1"), headers, b"CMD_RUN"))
            ((word, destination, answer, _),) = answers(self.session)
            self.assertEqual((word, destination), ("AINT_A_WORD", CONTROLLER), headers)
            self.assertEqual(
                (answer["cmd-id"], answer["word"], answer["identity"]), ("c1", "CMD_RUN", "test-1")
            )
            self.assertTrue(answer["reason"])
        self.assertEqual(self.agent.commands, [])

    def test_unknown_word_is_answered_aint_a_word(self) -> None:
        self.hear(Said(guest_destination("test-1"), {"cmd-id": "x9"}, b"DANCE please"))
        ((word, _, headers, _),) = answers(self.session)
        self.assertEqual(word, "AINT_A_WORD")
        self.assertEqual(
            (headers["word"], headers["reason"], headers["cmd-id"]), ("DANCE", "unknown word", "x9")
        )

    def test_garbage_body_is_answered_aint_a_word(self) -> None:
        self.hear(Said(guest_destination("test-1"), {}, b"\xff\x00garbage"))
        ((word, _, headers, _),) = answers(self.session)
        self.assertEqual(word, "AINT_A_WORD")
        self.assertNotIn("cmd-id", headers)

    def test_aint_a_word_is_never_answered(self) -> None:
        self.hear(
            AintAWord.how_to_say(destination=guest_destination("test-1"), word="X", reason="r", cmd_id="c")
        )
        self.assertEqual(self.session.sent, [])
        self.assertEqual(self.agent.not_understood, [("c", "X", "r", None)])

    def test_file_put_stores_binary_content(self) -> None:
        content = os.urandom(70_000) + b"\x00\x00\n\r\n"
        self.hear(
            FilePut.how_to_say(to="test-1", cmd_id="f1", path="dir/blob.bin", content=content, mode=0o600)
        )
        self.assertEqual(self.agent.files["dir/blob.bin"], content)
        ((word, _, headers, payload),) = answers(self.session)
        self.assertEqual((word, headers["status"], headers["op"]), ("FILE_RESULTS", "ok", "put"))
        self.assertEqual(headers["size"], str(len(content)))
        self.assertEqual(payload, b"")

    def test_file_put_corrupted_on_the_way_is_refused(self) -> None:
        said = FilePut.how_to_say(to="test-1", cmd_id="f1", path="a", content=b"hello")
        self.hear(Said(said.destination, said.headers, b"FILE_PUT\nhellO"))
        self.assertEqual(self.agent.files, {})
        headers = answers(self.session)[0][2]
        self.assertEqual(headers["status"], "error")
        self.assertIn("corrupted", headers["message"])

    def test_file_put_over_the_limit_is_not_said(self) -> None:
        with self.assertRaises(ValueError):
            FilePut.how_to_say(to="test-1", cmd_id="f1", path="a", content=b"x" * (MAX_FILE_BYTES + 1))

    def test_file_put_refused_by_the_store(self) -> None:
        self.agent.fail_with = ValueError("'..' is not allowed in paths")
        self.hear(FilePut.how_to_say(to="test-1", cmd_id="f1", path="../etc/passwd", content=b"x"))
        headers = answers(self.session)[0][2]
        self.assertEqual((headers["status"], headers["message"]), ("error", "'..' is not allowed in paths"))

    def test_file_get_sends_the_bytes(self) -> None:
        content = bytes(range(256)) * 10
        self.agent.files["out/x.bin"] = content
        self.hear(FileGet.how_to_say(to="test-1", cmd_id="g1", path="out/x.bin"))
        ((word, _, headers, payload),) = answers(self.session)
        self.assertEqual(
            (word, headers["status"], headers["op"], headers["cmd-id"]), ("FILE_RESULTS", "ok", "get", "g1")
        )
        self.assertEqual(payload, content)

    def test_file_get_of_a_missing_file_is_an_error_answer(self) -> None:
        self.hear(FileGet.how_to_say(to="test-1", cmd_id="g1", path="nope"))
        headers = answers(self.session)[0][2]
        self.assertEqual((headers["status"], headers["message"]), ("error", "no such file"))

    def test_prepare_gives_the_browser_what_the_batch_asks(self) -> None:
        self.hear(
            Prepare.how_to_say(
                to="test-1",
                cmd_id="p1",
                homepage="https://example.org/task?x=1",
                cookies=[{"name": "s", "value": "v", "domain": "example.org"}],
                window=(1024, 768),
                audio=True,
                vnc_password="secret12",
            )
        )
        (request,) = self.agent.prepared
        self.assertEqual(request.homepage, "https://example.org/task?x=1")
        self.assertEqual((request.window_width, request.window_height, request.audio), (1024, 768, True))
        self.assertEqual(request.cookies[0]["domain"], "example.org")
        self.assertEqual(request.vnc_password, "secret12")
        ((word, _, headers, payload),) = answers(self.session)
        self.assertEqual((word, headers["cmd-id"]), ("PREPARE_RESULTS", "p1"))
        self.assertEqual(json.loads(payload), {"browser": "none"})

    def test_prepare_with_a_bad_homepage_is_not_understood(self) -> None:
        self.hear(Prepare.how_to_say(to="test-1", cmd_id="p1", homepage="file:///etc/passwd"))
        self.assertEqual(self.agent.prepared, [])
        ((word, _, headers, _),) = answers(self.session)
        self.assertEqual((word, headers["cmd-id"]), ("AINT_A_WORD", "p1"))
        self.assertIn("http", headers["reason"])

    def test_cleanup(self) -> None:
        self.hear(Cleanup.how_to_say(to="test-1", cmd_id="k1"))
        self.assertEqual(self.agent.cleaned, ["k1"])
        self.assertEqual(answers(self.session)[0][0], "CLEANUP_RESULTS")


class SayingTests(SynchronousTestCase):
    """What the guest says, as the controller receives it."""

    def test_presence_words_carry_the_guest_description(self) -> None:
        for word in (Hello, Bye, StillAlive):
            said = word.how_to_say(
                identity="test-1",
                ip="10.0.0.5",
                mac="fa:16:3e:00:00:01",
                agent_version="0.1.0",
                capabilities=["cmd", "file", "browser"],
            )
            self.assertEqual(said.destination, CONTROLLER)
            self.assertEqual(said.body, word.name.encode())
            self.assertEqual(said.headers["capabilities"], "cmd,file,browser")
            self.assertEqual(said.headers["agent-version"], "0.1.0")

    def test_answers_go_to_the_controller(self) -> None:
        for said in (
            CmdResults.how_to_say(cmd_id="c", identity="g", error="x"),
            FileResults.how_to_say(cmd_id="c", identity="g", op="get", error="x"),
            PrepareResults.how_to_say(cmd_id="c", identity="g", value={}),
            CleanupResults.how_to_say(cmd_id="c", identity="g", value={}),
            PageLoad.how_to_say(identity="g", url="https://a.example/", title="A"),
        ):
            self.assertEqual(said.destination, CONTROLLER, said.word)

    def test_bad_cmd_id_is_refused_when_saying(self) -> None:
        with self.assertRaises(ValueError):
            CmdRun.how_to_say(to="test-1", cmd_id="has space", cmd="ls")
