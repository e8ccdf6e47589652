"""The agent and a real-stack browser (on a fake stack): a browser beyond repair makes the agent say BYE.

The controller's side (BYE → the VM is ERROR and replaced, an OCCUPIED one's handle hears
``vm-died``) is tested in tests/pool/test_service.py; here, that the agent says it, and only once,
and never registers the broken VM again.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.agent import GuestAgent
from guest_agent.chromium import ChromiumBrowser
from guest_agent.files import FileStore
from tests.guest_agent.fake_chromium import FakeStack
from tests.words.support import RecordingSession
from vmcloud.words.grammar import split_body


class NoCommands:
    def kill_all(self) -> None:
        pass


class ConnectedSession(RecordingSession):
    is_connected = True


class BrokenBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.session = ConnectedSession()
        self.stack = FakeStack(self.clock)
        self.browser = ChromiumBrowser(self.clock, self.stack)
        files = FileStore(FilePath(self.mktemp()), max_size=1024)
        self.agent = GuestAgent(
            self.clock,
            self.session,
            identity="vm-1",
            ip="10.0.0.5",
            mac=None,
            agent_version="1",
            runner=NoCommands(),  # type: ignore[arg-type]
            files=files,
            browser=self.browser,
            workdir=files.root,
            beacon_interval=5,
        )

    def words(self) -> list[tuple[str | None, dict[str, str]]]:
        out = [(split_body(body)[0], headers) for _, body, headers in self.session.sent]
        self.session.sent.clear()
        return out

    def test_hello_says_what_the_browser_can_do(self) -> None:
        self.browser.startService()
        self.agent.startService()
        self.clock.advance(0)
        self.agent.connected()
        [(word, headers)] = self.words()
        self.assertEqual(word, "HELLO")
        self.assertEqual(headers["capabilities"], "cmd,file,cdp,vnc,audio")

    def test_a_browser_that_cannot_start_makes_the_agent_say_bye_and_stay_silent(self) -> None:
        self.stack.fail_starts = -1
        self.agent.startService()  # the agent listens before the browser (its parent starts it first)
        self.browser.startService()
        for _ in range(80):  # the start and its three retries, a second apart
            self.clock.advance(0.05)
        [(word, headers)] = self.words()
        self.assertEqual(word, "BYE")
        self.assertEqual(headers["identity"], "vm-1")
        self.clock.advance(30)  # no beacon from a broken VM
        self.assertEqual(self.words(), [])
        self.agent.connected()  # a reconnect: BYE again, never HELLO
        self.assertEqual([w for w, _ in self.words()], ["BYE"])
        self.agent.stopService()  # said BYE already: nothing more
        self.assertEqual(self.words(), [])

    def test_a_browser_broken_by_too_many_restarts_says_bye_once(self) -> None:
        self.browser.startService()
        self.agent.startService()
        self.clock.advance(0)
        for _ in range(4):
            self.stack.process_died()
            for _ in range(20):
                self.clock.advance(0.05)
        self.assertEqual([w for w, _ in self.words()], ["BYE"])
        self.assertIsNotNone(self.agent.broken)
