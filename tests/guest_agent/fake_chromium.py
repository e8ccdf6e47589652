"""A browser's DevTools side in memory, and a stack of processes that starts it: fakes for the orchestration.

:class:`FakeChromium` answers the CDP commands :class:`~guest_agent.chromium.ChromiumBrowser` sends
and says the events Chromium 156 says for them, in Chromium's order (a new page target is created,
attached paused, then the command that made it is answered).  Every message crosses on the next
turn of the test's clock (``clock.advance(0)`` delivers all that is due), never inside the call
that sent it.  :class:`FakeStack` is an :class:`~guest_agent.stack.IBrowserStack` whose
``start`` gives a connection to a new :class:`FakeChromium` (a restarted browser is a new one).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.task import Clock
from zope.interface import implementer

from guest_agent.cdp import CdpConnection
from guest_agent.stack import IBrowserStack, StackError

DEFAULT_CONTEXT = "CTX-default"


@attrs.define
class FakePage:
    target: str
    context: str
    url: str = "about:blank"
    title: str = ""
    session: str | None = None
    watched: set[str] = attrs.Factory(set)


class FakeChromium:
    """One running browser: its contexts, pages and cookies, spoken to over one CDP connection."""

    def __init__(self, clock: Clock, number: int = 1) -> None:
        self.clock = clock
        self.number = number
        self._ids = itertools.count(1)
        self.contexts: set[str] = {DEFAULT_CONTEXT}
        self.pages: dict[str, FakePage] = {}
        self.cookies: dict[str, list[dict[str, Any]]] = {DEFAULT_CONTEXT: []}
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.hung = False
        self.refuse: set[str] = set()  # methods answered with an error
        self.closed = False
        self.auto_attach = False
        self.load_delay = 0.05
        #: url -> (title set at load, errorText of the navigation or None)
        self.sites: dict[str, tuple[str, str | None]] = {}
        blank = self._new_page(DEFAULT_CONTEXT)
        self.default_page = blank.target
        self.cdp = CdpConnection(clock, self._received, timeout=10.0, close=self._close)

    # ------------------------------------------------------------------ what tests look at

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]

    def page_in(self, context: str) -> FakePage:
        [page] = [p for p in self.pages.values() if p.context == context]
        return page

    # ------------------------------------------------------------------ the wire

    def _close(self) -> None:
        self.closed = True

    def _received(self, text: str) -> None:
        message = json.loads(text)
        method, params, session = message["method"], message.get("params", {}), message.get("sessionId")
        self.calls.append((method, params, session))
        if self.hung or self.closed:
            return
        try:
            if method in self.refuse:
                raise KeyError(method)
            result = self._handle(method, params, session)
        except KeyError as e:
            self._later({"id": message["id"], "error": {"code": -32000, "message": f"unknown {e}"}})
            return
        self._later({"id": message["id"], "result": result})

    def _later(self, message: Mapping[str, Any]) -> None:
        text = json.dumps(message)
        self.clock.callLater(0, self._deliver, text)

    def _deliver(self, text: str) -> None:
        if not self.closed and self.cdp.closed is None:
            self.cdp.message_received(text)

    def event(self, method: str, params: Mapping[str, Any], session: str | None = None) -> None:
        message: dict[str, Any] = {"method": method, "params": dict(params)}
        if session is not None:
            message["sessionId"] = session
        self._later(message)

    def die(self, reason: str = "killed") -> None:
        """The browser's end as the agent sees it: the WebSocket goes."""
        self.closed = True
        self.clock.callLater(0, self.cdp.connection_lost, reason)

    # ------------------------------------------------------------------ the browser

    def _info(self, page: FakePage) -> dict[str, Any]:
        return {
            "targetId": page.target,
            "type": "page",
            "url": page.url,
            "title": page.title or page.url,
            "browserContextId": page.context,
            "attached": page.session is not None,
        }

    def _new_page(self, context: str) -> FakePage:
        page = FakePage(f"T{self.number}-{next(self._ids)}", context)
        self.pages[page.target] = page
        return page

    def open_page(self, context: str, url: str = "about:blank") -> FakePage:
        """A new page (a popup, ``window.open``): created, attached paused, as Chromium says it."""
        page = self._new_page(context)
        self.event("Target.targetCreated", {"targetInfo": self._info(page)})
        if self.auto_attach:
            page.session = f"S-{page.target}"
            self.event(
                "Target.attachedToTarget",
                {"sessionId": page.session, "targetInfo": self._info(page), "waitingForDebugger": True},
            )
        if url != "about:blank":
            self.navigate(page, url)
        return page

    def navigate(self, page: FakePage, url: str) -> str | None:
        title, error = self.sites.get(url, ("", None))
        if error is not None:
            page.url = "chrome-error://chromewebdata/"
            frame = {"id": page.target, "url": page.url, "unreachableUrl": url}
            self.event("Page.frameNavigated", {"frame": frame}, page.session)
            return error
        page.url, page.title = url, title
        self.event("Page.frameNavigated", {"frame": {"id": page.target, "url": url}}, page.session)
        self.event("Target.targetInfoChanged", {"targetInfo": self._info(page)})
        if "title" in page.watched and title:
            payload = json.dumps([url, title])
            self.event("Runtime.bindingCalled", {"name": "__vmcloudTitle", "payload": payload}, page.session)
        self.clock.callLater(self.load_delay, self._loaded, page, url)
        return None

    def _loaded(self, page: FakePage, url: str) -> None:
        if page.url == url and page.target in self.pages and not self.closed:
            self.event("Page.loadEventFired", {"timestamp": self.clock.seconds()}, page.session)

    def crash(self, target: str) -> None:
        self.event("Target.targetCrashed", {"targetId": target, "status": "crashed", "errorCode": 139})

    def _page_of(self, session: str | None) -> FakePage:
        page = next((p for p in self.pages.values() if p.session == session), None)
        if page is None:
            raise KeyError(f"session {session}")
        return page

    def _handle(self, method: str, params: dict[str, Any], session: str | None) -> dict[str, Any]:
        if session is not None:
            page = self._page_of(session)
            if method == "Page.navigate":
                error = self.navigate(page, params["url"])
                return {"frameId": page.target, **({"errorText": error} if error else {})}
            if method == "Runtime.addBinding":
                page.watched.add("title")
            elif method == "Runtime.evaluate":
                value = json.dumps([page.url, page.title])
                return {"result": {"type": "string", "value": value}}
            return {}
        if method == "Target.setAutoAttach":
            self.auto_attach = bool(params.get("autoAttach"))
            return {}
        if method == "Target.createBrowserContext":
            context = f"CTX{self.number}-{next(self._ids)}"
            self.contexts.add(context)
            self.cookies[context] = []
            return {"browserContextId": context}
        if method == "Target.createTarget":
            context = params.get("browserContextId", DEFAULT_CONTEXT)
            if context not in self.contexts:
                raise KeyError(f"context {context}")
            return {"targetId": self.open_page(context, params.get("url", "about:blank")).target}
        if method == "Target.disposeBrowserContext":
            context = params["browserContextId"]
            self.contexts.remove(context)
            del self.cookies[context]
            for page in [p for p in self.pages.values() if p.context == context]:
                del self.pages[page.target]
                if page.session is not None:
                    self.event("Target.detachedFromTarget", {"sessionId": page.session})
                self.event("Target.targetDestroyed", {"targetId": page.target})
            return {}
        if method == "Target.getTargets":
            return {"targetInfos": [self._info(p) for p in self.pages.values()]}
        if method == "Storage.setCookies":
            context = params.get("browserContextId", DEFAULT_CONTEXT)
            self.cookies[context] += params["cookies"]
            return {}
        if method == "Storage.getCookies":
            return {"cookies": list(self.cookies[params.get("browserContextId", DEFAULT_CONTEXT)])}
        if method == "Browser.getWindowForTarget":
            return {"windowId": 7, "bounds": {}}
        if method == "Browser.getVersion":
            return {"product": "FakeChrome/156"}
        return {}


@implementer(IBrowserStack)
class FakeStack:
    """Processes that start a new :class:`FakeChromium` each time, or fail when told."""

    capabilities = ("cdp", "vnc", "audio")
    screen = (1280, 800)
    vnc_address = ("10.0.0.5", 5900)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.on_ended: Any = None
        self.audio = True
        self.browsers: list[FakeChromium] = []
        self.fail_starts = 0  # this many next starts fail; -1: every one
        self.running = False
        self.stopped = False
        self.passwords: list[str | None] = []
        self.disconnects = 0
        self.view_password = "view-pw1"

    @property
    def browser(self) -> FakeChromium:
        return self.browsers[-1]

    async def start(self) -> CdpConnection:
        self.running = False
        if self.fail_starts:
            self.fail_starts -= 1 if self.fail_starts > 0 else 0
            raise StackError("chromium exited with status 127: chromium: not found")
        browser = FakeChromium(self.clock, len(self.browsers) + 1)
        self.browsers.append(browser)
        self.running = True
        return browser.cdp

    def healthy(self) -> bool:
        return self.running

    async def stop(self) -> None:
        self.running = False
        self.stopped = True

    def set_vnc_password(self, password: str | None) -> None:
        self.passwords.append(password)

    async def disconnect_viewers(self) -> None:
        self.disconnects += 1

    def process_died(self, how: str = "chromium killed by signal 9") -> None:
        """Chromium's process ended: the stack says so, and its WebSocket goes too."""
        self.running = False
        self.browser.die(how)
        if self.on_ended is not None:
            self.on_ended(how)
