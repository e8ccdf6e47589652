"""A worker's browser for tests and benches: Debian's Chromium, headless, driven over CDP.

No Playwright (it would download its own browser): the guest agent's thin CDP client
(:mod:`guest_agent.cdp`) drives the system's Chromium, one flattened session per tab.  A tab
evaluates JavaScript, polls a condition, and types keys or clicks as a person would: CDP's input
events reach the page as trusted DOM events, so noVNC turns them into RFB key and pointer
messages exactly as it does for a worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from guest_agent.cdp import CdpConnection, connect, read_devtools_port
from tests.autobahn_timers import batched_timers_run_out
from tests.console.support import wait_until

CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None
)

#: DOM ``code`` and Windows virtual key code of the characters a test types (URLs).
_PUNCTUATION = {
    ".": ("Period", 190),
    "/": ("Slash", 191),
    ":": ("Semicolon", 186),
    "-": ("Minus", 189),
    "_": ("Minus", 189),
    "?": ("Slash", 191),
    "=": ("Equal", 187),
    "&": ("Digit7", 55),
    " ": ("Space", 32),
}
_NAMED = {"Enter": ("Enter", 13, "\r"), "Control": ("ControlLeft", 17, ""), "Tab": ("Tab", 9, "")}
CTRL = 2


def key_fields(key: str) -> dict[str, Any]:
    """The fields of ``Input.dispatchKeyEvent`` for a key: a character, or a name of :data:`_NAMED`."""
    if key in _NAMED:
        code, vk, text = _NAMED[key]
    elif len(key) == 1 and key.isascii() and key.isalnum():
        code = f"Key{key.upper()}" if key.isalpha() else f"Digit{key}"
        vk, text = ord(key.upper()), key
    elif key in _PUNCTUATION:
        code, vk = _PUNCTUATION[key]
        text = key
    else:
        raise ValueError(f"no key for {key!r}")
    fields: dict[str, Any] = {"key": key, "code": code, "windowsVirtualKeyCode": vk}
    if text:
        fields["text"] = text
    return fields


class _Process(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-4000:]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class Tab:
    """One page of the headless browser, on its own flattened CDP session."""

    def __init__(self, browser: WorkerBrowser, target: str, session: str) -> None:
        self.browser = browser
        self.reactor = browser.reactor
        self.cdp = browser.cdp
        self.target = target
        self.session = session
        #: What went wrong in the page (failed loads, uncaught exceptions, console errors), for a
        #: failed wait to show.
        self.troubles: list[str] = []

    def event(self, method: str, params: Any) -> None:
        if method == "Network.loadingFailed":
            self.troubles.append(
                f"load failed: {params.get('errorText')} {params.get('blockedReason') or ''}"
            )
        elif method == "Network.responseReceived" and params.get("response", {}).get("status", 200) >= 400:
            response = params["response"]
            self.troubles.append(f"{response.get('status')} {response.get('url')}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.troubles.append(
                f"exception: {details.get('exception', {}).get('description') or details.get('text')}"
            )
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            self.troubles.append(
                f"console.{params['type']}: "
                + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
            )

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.call(method, params or {}, self.session)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def js(self, expression: str) -> Any:
        """The value of ``expression`` (promises awaited); an exception in the page fails."""
        answer = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression[:200]}: {json.dumps(answer['exceptionDetails'])[:800]}")
        return answer["result"].get("value")

    async def until(self, expression: str, what: str, timeout: float = 20, explain: str = "null") -> Any:
        """Poll ``expression`` until it is truthy; its value.  ``explain`` says what a failure shows."""
        deadline = self.reactor.seconds() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if self.reactor.seconds() > deadline:
                state = await self.js(f"JSON.stringify({explain})")
                troubles = "\n  ".join(self.troubles[-20:])
                raise AssertionError(f"not within {timeout} s: {what} (page: {state})\n  {troubles}")
            await deferLater(self.reactor, 0.05)

    async def key(self, key: str, modifiers: int = 0) -> None:
        """Press and release one key."""
        fields = key_fields(key)
        down = dict(fields, type="keyDown" if "text" in fields and not modifiers else "rawKeyDown")
        if modifiers:
            down.pop("text", None)
        await self.send("Input.dispatchKeyEvent", dict(down, modifiers=modifiers))
        up = {k: v for k, v in fields.items() if k != "text"}
        await self.send("Input.dispatchKeyEvent", dict(up, type="keyUp", modifiers=modifiers))

    async def ctrl(self, key: str) -> None:
        """Ctrl + ``key`` (Control held while the key goes down and up)."""
        control = key_fields("Control")
        await self.send("Input.dispatchKeyEvent", dict(control, type="rawKeyDown", modifiers=CTRL))
        await self.key(key, CTRL)
        await self.send("Input.dispatchKeyEvent", dict(control, type="keyUp", modifiers=0))

    async def type(self, text: str) -> None:
        for character in text:
            await self.key(character)

    async def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            )


class WorkerBrowser:
    """Debian's Chromium, headless, with its DevTools on loopback; ``open`` gives tabs."""

    def __init__(self, reactor: Any, profile: str, *, window: tuple[int, int] = (1400, 1000)) -> None:
        self.reactor = reactor
        self.profile = profile
        self.window = window
        self._process = _Process()
        self._transport: Any = None
        self._tabs: dict[str, Tab] = {}
        self.cdp: CdpConnection

    async def start(self) -> None:
        assert CHROMIUM is not None, "Debian's chromium is not installed"
        os.makedirs(self.profile, exist_ok=True)
        argv = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--mute-audio",
            "--autoplay-policy=no-user-gesture-required", "--disable-renderer-backgrounding",
            "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows",
            f"--window-size={self.window[0]},{self.window[1]}", f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank",
        ]  # fmt: skip
        self._transport = self.reactor.spawnProcess(self._process, CHROMIUM, argv, env=dict(os.environ))
        active = os.path.join(self.profile, "DevToolsActivePort")

        def ready() -> bool:
            try:
                with open(active) as f:
                    read_devtools_port(f.read())
                return True
            except (OSError, ValueError):
                return False

        await wait_until(self.reactor, ready, 30, "Chromium's DevTools port")
        with open(active) as f:
            self.cdp = await connect(self.reactor, read_devtools_port(f.read()))
        self.cdp.on_event = self._event

    def _event(self, method: str, params: Any, session: str | None) -> None:
        tab = self._tabs.get(session or "")
        if tab is not None:
            tab.event(method, params)

    async def open(self, url: str = "about:blank") -> Tab:
        """A new tab on ``url`` (not waited for: poll what the page should show)."""
        created = await self.cdp.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.cdp.call(
            "Target.attachToTarget", {"targetId": created["targetId"], "flatten": True}
        )
        tab = Tab(self, created["targetId"], attached["sessionId"])
        self._tabs[tab.session] = tab
        await tab.send("Emulation.setFocusEmulationEnabled", {"enabled": True})  # keys reach any tab
        await tab.send("Runtime.enable")
        await tab.send("Network.enable")
        if url != "about:blank":
            await tab.navigate(url)
        return tab

    async def stop(self) -> None:
        if self._transport is not None and not self._process.ended.called:
            self._transport.signalProcess(signal.SIGKILL)
        await self._process.ended
        if hasattr(self, "cdp"):
            self.cdp.close()
        await batched_timers_run_out(self.reactor)
        shutil.rmtree(self.profile, ignore_errors=True)
