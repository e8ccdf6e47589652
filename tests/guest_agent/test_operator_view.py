"""The guest's side of the operator's view: HELLO tells the VNC port and the view-only password."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.agent import GuestAgent
from guest_agent.browser import NoBrowser
from guest_agent.files import FileStore
from tests.words.support import RecordingSession
from vmcloud.words.grammar import split_body
from vmcloud.words.presence import VNC_PORT, VNC_VIEW_PASSWORD


class _ConnectedSession(RecordingSession):
    is_connected = True


class _NoCommands:
    def kill_all(self) -> None:
        pass


class _ScreenBrowser(NoBrowser):
    """A browser with a screen, as :class:`~guest_agent.chromium.ChromiumBrowser` says it."""

    capabilities = ("cdp", "vnc")
    vnc_view = (5907, "opview-1")


class HelloTests(SynchronousTestCase):
    def agent(self, browser: NoBrowser) -> tuple[GuestAgent, RecordingSession]:
        self.clock = clock = Clock()
        session = _ConnectedSession()
        files = FileStore(FilePath(self.mktemp()), max_size=1024)
        agent = GuestAgent(
            clock,
            session,
            identity="vm-1",
            ip="10.0.0.5",
            mac=None,
            agent_version="1.0",
            runner=_NoCommands(),  # type: ignore[arg-type]
            files=files,
            browser=browser,
            workdir=files.root,
            beacon_interval=5,
        )
        agent.startService()
        self.addCleanup(agent.stopService)
        return agent, session

    def test_hello_says_it_and_beacons_do_not(self) -> None:
        agent, session = self.agent(_ScreenBrowser(Clock()))
        agent.connected()
        self.clock.advance(5)  # a beacon
        said = {split_body(body)[0]: headers for _, body, headers in session.sent}
        assert (said["HELLO"][VNC_PORT], said["HELLO"][VNC_VIEW_PASSWORD]) == ("5907", "opview-1")
        assert VNC_PORT not in said["STILL_ALIVE"] and VNC_VIEW_PASSWORD not in said["STILL_ALIVE"]

    def test_an_agent_without_a_screen_says_nothing_of_it(self) -> None:
        agent, session = self.agent(NoBrowser(Clock()))
        agent.connected()
        ((_, body, headers),) = session.sent
        assert split_body(body)[0] == "HELLO"
        assert VNC_PORT not in headers and VNC_VIEW_PASSWORD not in headers
