"""The CDP client against a fake peer: requests numbered and matched, events routed, hangs noticed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.cdp import CdpClosed, CdpConnection, CdpError, CdpTimeout, read_devtools_port


class FakePeer:
    """The browser's side: records what the client wrote, answers or speaks when told."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sent: list[dict[str, Any]] = []
        self.events: list[tuple[str, Mapping[str, Any], str | None]] = []
        self.cdp = CdpConnection(
            self.clock,
            lambda text: self.sent.append(json.loads(text)),
            timeout=5.0,
            on_event=lambda m, p, s: self.events.append((m, p, s)),
        )

    def answer(self, index: int, **fields: Any) -> None:
        self.cdp.message_received(json.dumps({"id": self.sent[index]["id"], **fields}))


class CdpConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.peer = FakePeer()
        self.cdp = self.peer.cdp

    def test_a_command_is_answered_by_its_id_even_out_of_order(self) -> None:
        first = self.cdp.send("Target.getTargets")
        second = self.cdp.send("Page.navigate", {"url": "http://a/"}, "S1")
        self.assertEqual(
            self.peer.sent[1],
            {"id": 2, "method": "Page.navigate", "params": {"url": "http://a/"}, "sessionId": "S1"},
        )
        self.peer.answer(1, result={"frameId": "F"})
        self.peer.answer(0, result={"targetInfos": []})
        self.assertEqual(self.successResultOf(second), {"frameId": "F"})
        self.assertEqual(self.successResultOf(first), {"targetInfos": []})

    def test_an_error_answer_fails_the_command_with_the_browsers_message(self) -> None:
        d = self.cdp.send("Target.disposeBrowserContext", {"browserContextId": "X"})
        self.peer.answer(0, error={"code": -32602, "message": "Failed to find context"})
        failure = self.failureResultOf(d, CdpError)
        self.assertEqual(str(failure.value), "Target.disposeBrowserContext: Failed to find context")
        self.assertEqual(failure.value.code, -32602)

    def test_a_hung_browser_is_noticed_by_the_timeout_and_a_late_answer_is_dropped(self) -> None:
        d = self.cdp.send("Browser.getVersion", timeout=3.0)
        self.peer.clock.advance(2.9)
        self.assertNoResult(d)
        self.peer.clock.advance(0.2)
        self.failureResultOf(d, CdpTimeout)
        self.peer.answer(0, result={})  # too late: ignored, nothing raised

    def test_events_reach_the_listener_with_their_session(self) -> None:
        self.cdp.message_received(
            json.dumps({"method": "Page.loadEventFired", "params": {"timestamp": 1}, "sessionId": "S"})
        )
        self.cdp.message_received(
            json.dumps({"method": "Target.targetCreated", "params": {"targetInfo": {}}})
        )
        self.assertEqual(
            self.peer.events,
            [
                ("Page.loadEventFired", {"timestamp": 1}, "S"),
                ("Target.targetCreated", {"targetInfo": {}}, None),
            ],
        )

    def test_garbage_from_the_peer_is_dropped(self) -> None:
        for junk in ("not json", "[1,2]", '{"id": "x"}', '{"params": {}}'):
            self.cdp.message_received(junk)
        self.assertEqual(self.peer.events, [])

    def test_a_lost_connection_fails_what_is_pending_and_refuses_new_commands(self) -> None:
        d = self.cdp.send("Target.getTargets")
        self.cdp.connection_lost("browser died")
        self.failureResultOf(d, CdpClosed)
        self.assertEqual(self.successResultOf(self.cdp.when_closed), "browser died")
        self.assertRaises(CdpClosed, self.cdp.send, "Target.getTargets")
        self.assertEqual(self.peer.clock.getDelayedCalls(), [])

    def test_a_listener_that_raises_is_logged_not_fatal(self) -> None:
        def broken(method: str, params: Mapping[str, Any], session: str | None) -> None:
            raise RuntimeError("bug")

        self.cdp.on_event = broken
        self.cdp.message_received('{"method": "X.y", "params": {}}')
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        d = self.cdp.send("Browser.getVersion")
        self.peer.answer(0, result={"product": "Chrome"})
        self.assertEqual(self.successResultOf(d), {"product": "Chrome"})


class DevToolsActivePortTests(SynchronousTestCase):
    def test_the_port_file_gives_the_browser_websocket(self) -> None:
        self.assertEqual(
            read_devtools_port("41234\n/devtools/browser/ab-12\n"),
            "ws://127.0.0.1:41234/devtools/browser/ab-12",
        )

    def test_a_half_written_file_is_not_ready(self) -> None:
        for content in ("", "41234", "41234\n", "x\n/devtools/browser/a"):
            self.assertRaises(ValueError, read_devtools_port, content)


class ClosedConnectionTests(SynchronousTestCase):
    def test_messages_after_close_are_dropped(self) -> None:
        peer = FakePeer()
        peer.cdp.close()
        peer.cdp.message_received('{"method": "Page.loadEventFired", "params": {}}')
        self.assertEqual(peer.events, [])
