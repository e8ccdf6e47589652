"""Words carry JSON from guests: nesting that would blow the parser's stack is a malformed word.

Before issue #8 a payload or header of thousands of nested brackets raised ``RecursionError`` out
of the parser, which the interpreter could only report as an internal error with a traceback.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.words.support import RecordingAgent, RecordingSession, said_on_the_wire
from vmcloud.words.destinations import CONTROLLER, guest_destination
from vmcloud.words.grammar import MalformedWord, Said, json_header, json_payload, split_body
from vmcloud.words.interpreter import Interpreter
from vmcloud.words.vocabulary import agent_words

DEEP = "[" * 3000 + "]" * 3000


class NestedJsonTests(SynchronousTestCase):
    def test_a_deep_payload_is_a_malformed_word(self) -> None:
        frame = said_on_the_wire(Said(CONTROLLER, {}, b"CMD_RESULTS " + DEEP.encode()))
        with self.assertRaises(MalformedWord) as caught:
            json_payload(frame)
        self.assertIn("nested deeper than 32", caught.exception.reason)

    def test_a_deep_header_is_a_malformed_word(self) -> None:
        frame = said_on_the_wire(Said(CONTROLLER, {"args": DEEP}, b"CMD_RUN"))
        with self.assertRaises(MalformedWord) as caught:
            json_header(frame, "args")
        self.assertIn("nested deeper than 32", caught.exception.reason)

    def test_the_agent_answers_aint_a_word_without_a_traceback(self) -> None:
        session = RecordingSession()
        interpreter = Interpreter(agent_words(), RecordingAgent(session))
        headers = {"to": "test-1", "cmd-id": "c1", "cmd": "ls", "args": DEEP}
        self.successResultOf(
            interpreter.hear(said_on_the_wire(Said(guest_destination("test-1"), headers, b"CMD_RUN")))
        )
        [(_, body, answer)] = session.sent
        self.assertEqual((split_body(body)[0], answer["cmd-id"]), ("AINT_A_WORD", "c1"))
        self.assertIn("nested deeper", answer["reason"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_honest_json_still_parses(self) -> None:
        frame = said_on_the_wire(
            Said(CONTROLLER, {"args": '["-l", "[x]"]'}, b'CMD_RESULTS {"out": "[[[", "a": [[1]]}')
        )
        self.assertEqual(json_payload(frame), {"out": "[[[", "a": [[1]]})
        self.assertEqual(json_header(frame, "args"), ["-l", "[x]"])
