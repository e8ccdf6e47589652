"""Repair against a real Chromium (issue #9): a crashed renderer, a hung browser, a browser that cannot start.

Each test runs one real stack (Xvnc, PulseAudio, Chromium as ``nobody`` with its sandbox on when
root) in this test's reactor, driven by :class:`~guest_agent.chromium.ChromiumBrowser`, without a
daemon: the controller's side of a broken browser (BYE → ERROR, replaced, ``vm-died``) is tested
end to end in ``test_browser_vm.py``.  Needs the Debian packages; skips without them, except under
``CI`` where a missing stack fails.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import psutil
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from guest_agent.chromium import ChromiumBrowser
from guest_agent.stack import BrowserStack, StackError, StackPrograms, find_stack
from tests.autobahn_timers import batched_timers_run_out

HOME_PAGE = b"<html><head><title>Repair home</title></head><body>home</body></html>"


def programs_or_skip() -> StackPrograms:
    programs, missing = find_stack()
    if programs is None:
        why = "the browser stack is not installed: " + ", ".join(missing)
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the browser repair tests: {why}")
        raise SkipTest(why)
    return programs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class RealChromiumRepairTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.programs = programs_or_skip()
        # registered first: runs after every other cleanup
        self.addCleanup(batched_timers_run_out, reactor)
        root = Resource()
        root.putChild(b"", Data(HOME_PAGE, "text/html"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.home = f"http://127.0.0.1:{address.port}/"
        self.events: list[dict[str, Any]] = []
        self.broken: list[str] = []

    def make(self, programs: StackPrograms | None = None) -> tuple[ChromiumBrowser, BrowserStack]:
        user = (65534, 65534) if os.geteuid() == 0 else None
        stack = BrowserStack(
            reactor, programs or self.programs, vnc_host="127.0.0.1", vnc_port=free_port(), user=user
        )
        browser = ChromiumBrowser(reactor, stack, settle=0.3)
        browser.on_page_load = lambda event: self.events.append(dict(event))
        browser.on_broken = self.broken.append
        browser.startService()
        self.addCleanup(browser.stopService)
        return browser, stack

    async def until(self, check: Callable[[], bool], what: str, timeout: float) -> float:
        """Poll ``check`` (bounded); the seconds it took."""
        began = time.monotonic()
        while not check():
            if time.monotonic() - began > timeout:
                self.fail(f"{what}: not within {timeout:g} s")
            await deferLater(reactor, 0.1)
        return time.monotonic() - began

    def chromium_family(self, stack: BrowserStack) -> set[int]:
        assert stack.chromium is not None and stack.chromium.pid is not None
        pid = stack.chromium.pid
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}

    def actions(self) -> list[str]:
        return [str(e["action"]) for e in self.events]

    async def _crash(self) -> None:
        browser, stack = self.make()
        await browser.started
        await browser.prepare(self.home, [{"name": "a", "value": "1"}], (800, 600), False)
        await self.until(lambda: "page-load" in self.actions(), "the home page's event", 10)
        old = self.chromium_family(stack)
        cdp = browser.cdp
        assert cdp is not None
        [page] = [
            t
            for t in (await cdp.call("Target.getTargets"))["targetInfos"]
            if t["type"] == "page" and t["url"] == self.home
        ]
        session = (await cdp.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}))[
            "sessionId"
        ]
        cdp.send("Page.crash", None, session).addErrback(lambda _: None)  # never answered: it crashed
        await self.until(lambda: "browser-restarted" in self.actions(), "the repair", 20)
        await self.until(lambda: self.actions()[-1] == "page-load", "the home page again", 10)
        self.assertEqual(self.events[-1]["url"], self.home)
        self.assertEqual(self.broken, [])
        await self.until(lambda: not any(alive(p) for p in old), "the old Chromium's end", 10)
        answer = await browser.cleanup()
        self.assertFalse(answer["restarted"])

    def test_a_crashed_renderer_is_repaired_on_the_home_page(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._crash())

    async def _hung(self) -> None:
        browser, stack = self.make()
        await browser.started
        await browser.prepare(self.home, [], (800, 600), False)
        old = self.chromium_family(stack)
        assert stack.chromium is not None and stack.chromium.pid is not None
        os.kill(stack.chromium.pid, signal.SIGSTOP)
        took = await self.until(
            lambda: stack.chromium is not None and stack.chromium.pid not in old, "a new Chromium", 20
        )
        self.assertLess(took, 10, "a hung browser is noticed within seconds (ping 2 s, answer 3 s)")
        await self.until(lambda: "browser-restarted" in self.actions(), "the session opened again", 20)
        self.assertEqual([e["reason"] for e in self.events if e["action"] == "browser-restarted"], ["hung"])
        await self.until(lambda: not any(alive(p) for p in old), "the hung Chromium's end", 10)
        self.assertEqual(self.broken, [])
        await browser.cleanup()
        await browser.prepare(self.home, [], (800, 600), False)

    def test_a_hung_browser_is_restarted_from_a_wiped_profile(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hung())

    async def _cannot_start(self) -> None:
        unrunnable = self.mktemp()
        with open(unrunnable, "w") as f:
            f.write("not a program\n")
        os.chmod(unrunnable, 0o644)
        browser, stack = self.make(attrs.evolve(self.programs, chromium=os.path.abspath(unrunnable)))
        await browser.started
        self.assertEqual(len(self.broken), 1)
        self.assertIn("chromium", self.broken[0].lower())
        with self.assertRaises(StackError):
            await browser.prepare(self.home, [], (800, 600), False)
        xvnc = stack.xvnc
        await browser.stopService()
        self.assertTrue(xvnc is None or not xvnc.running, "nothing of the stack is left running")

    def test_a_browser_that_cannot_start_is_broken(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cannot_start())
