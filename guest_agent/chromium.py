"""The real browser of a VM: Chromium on Xvnc with PulseAudio, driven over CDP (issue #9).

:class:`ChromiumBrowser` is the :class:`~guest_agent.browser.IBrowser` of a guest that has the
stack.  It decides; :class:`~guest_agent.stack.IBrowserStack` runs the processes (see
:mod:`guest_agent.stack` for them and their flags).  It is a service: it starts the stack with the
agent, so a FREE VM has a browser waiting, and ends it with the agent.

- **One browser-level CDP connection** with flattened sessions (:mod:`guest_agent.cdp`): it sees
  every tab and popup the worker opens, auto-attached and paused until their page events are on.
- **A spare window.**  Most of a PREPARE used to be a new browser context's window and its new
  renderer's first answer (0.3-0.5 s of 0.6 s, measured).  So whenever the browser is idle (after
  its start, after CLEANUP answered) the next worker's window is opened in advance: a fresh browser
  context (``Target.createBrowserContext``: no cookies, history, storage or windows of anyone
  before) with one blank window whose page events are on.  Nobody ever browses in it before its
  worker, so isolation is that of a fresh context.  The blank window of the default context stays
  open under it, so Chromium never sees its last window close (it would exit) while contexts come
  and go.
- **PREPARE** takes the spare (or opens one then and there when there is none), sets the batch's
  cookies into its context before the first navigation, sizes the window if another size is asked,
  and loads the home page; the answer comes when the load event fired.
- **Page events** come from the browser's signals through :class:`~guest_agent.pages.PageEvents`.
- **CLEANUP** revokes the session's VNC password (the operator's view-only one stays, see
  :mod:`guest_agent.stack`) and closes every viewer, disposes the session's (and a
  spare's) context and proves the browser clean (one page, blank, zero cookies); when it cannot,
  Chromium is restarted from a wiped profile and proven again.  The next spare is opened after the
  answer, never inside it.
- **Health**: a dead process is noticed by its end (the stack says so), a hung browser by a CDP
  ping every ``health_interval`` seconds, a crashed renderer by ``Target.targetCrashed``.  Each is
  repaired by a restart from a wiped profile (a prepared session is opened again on its home page,
  and the handle hears a ``browser-restarted`` event).  More than ``max_restarts`` in
  ``restart_window`` seconds, or a stack that cannot start, is beyond repair: ``on_broken`` tells
  the agent, which tells the controller, which replaces the VM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.browser import IBrowser, PreparedBrowser, check_prepare_request
from guest_agent.cdp import CdpConnection, CdpError
from guest_agent.pages import PageEvents, is_internal
from guest_agent.stack import IBrowserStack, StackError

log = Logger()

BROWSER = "chromium"

#: The name of the binding through which a tab's page tells its title (CDP ``Runtime.addBinding``).
TITLE_BINDING = "__vmcloudTitle"

#: Runs in every new document of a watched tab, before the page's own scripts: tells the title at
#: once and whenever it changes.  The browser's own ``Target.targetInfoChanged`` says a new title
#: only seconds later, too late to merge it into its page's event.
TITLE_SCRIPT = (
    "(() => { if (window !== window.top) return; let last = null;"
    " const check = () => { const t = document.title;"
    " if (t !== last) { last = t;"
    f" try {{ {TITLE_BINDING}(JSON.stringify([location.href, t])); }} catch (e) {{}} }} }};"
    " new MutationObserver(check).observe(document, {subtree: true, childList: true, characterData: true});"
    " document.addEventListener('DOMContentLoaded', check); })();"
)

#: Called with an event for the handle: ``{"action": "page-load", "url", "title", "tab"}`` and kin.
EventCallback = Callable[[Mapping[str, Any]], None]


@attrs.define
class _Tab:
    """A page target we attached to: its target id, its browser context, whether it is watched."""

    target: str
    context: str
    watched: bool = False


@attrs.define
class _Window:
    """A fresh browser context with one blank window whose page events are on."""

    context: str
    target: str
    tab: str  # the CDP session of its page
    size: tuple[int, int]


@attrs.define
class _Session:
    """The worker's session: the request and its window."""

    request: PreparedBrowser
    window: _Window
    crashed: bool = False


def cookie_param(cookie: Any, homepage: str) -> dict[str, Any]:
    """A validated cookie as CDP's ``CookieParam``; without a domain it belongs to the home page's host."""
    param: dict[str, Any] = {
        "name": cookie.name,
        "value": cookie.value,
        "path": cookie.path,
        "secure": cookie.secure,
        "httpOnly": cookie.http_only,
    }
    if cookie.domain:
        param["domain"] = cookie.domain
    else:
        param["url"] = homepage
    if cookie.expires is not None:
        param["expires"] = cookie.expires
    return param


@implementer(IBrowser)
class ChromiumBrowser(Service):
    """The browser of one VM, kept alive and prepared for each worker; ``stack`` runs its processes."""

    name = "browser"

    def __init__(
        self,
        reactor: Any,
        stack: IBrowserStack,
        *,
        health_interval: float = 2.0,
        health_timeout: float = 3.0,
        start_timeout: float = 20.0,
        load_timeout: float = 15.0,
        max_restarts: int = 3,
        restart_window: float = 120.0,
        retry_delay: float = 1.0,
        settle: float = 0.8,
    ) -> None:
        self._reactor = reactor
        self.stack = stack
        self.capabilities: tuple[str, ...] = tuple(stack.capabilities)
        self.on_page_load: EventCallback | None = None
        self.on_broken: Callable[[str], None] | None = None
        self.screen: tuple[int, int] = (int(stack.screen[0]), int(stack.screen[1]))
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._start_timeout = start_timeout
        self._load_timeout = load_timeout
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._retry_delay = retry_delay
        self._settle = settle
        self._lock = DeferredLock()
        self.cdp: CdpConnection | None = None
        self._session: _Session | None = None
        self._spare: _Window | None = None
        self._spare_size = self.screen  # the size the next spare is opened at: the last one asked
        self._contexts: set[str] = set()  # our browser contexts, whose pages we watch
        self._events = PageEvents(settle=settle)
        self._flush_call: IDelayedCall | None = None
        self._tabs: dict[str, _Tab] = {}  # CDP session id -> the page it is attached to
        self._watchers: dict[str, Deferred[str]] = {}  # target id -> its session id, once watched
        self._loads: dict[str, Deferred[None]] = {}  # session id -> the next load event
        self._restarts: list[float] = []
        self._health: LoopingCall | None = None
        self._stopping = False
        self.broken: str | None = None
        self.started: Deferred[None] = Deferred()

    # ------------------------------------------------------------------ service

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._stopping = False
        self.stack.on_ended = self._stack_process_ended
        Deferred.fromCoroutine(self._first_start()).addErrback(
            self._log_failure, "starting the browser stack"
        )

    async def _first_start(self) -> None:
        async with self._lock:
            try:
                await self._start()
            except Exception as e:
                log.error(
                    "The browser stack did not start: {error}", error=str(e), event="browser-start-failed"
                )
                await self._recover(f"the browser stack did not start: {e}")
        if not self.started.called:
            self.started.callback(None)
        if self._stopping:
            return  # stopped while starting: no health checks on what is gone
        self._health = LoopingCall(self._check_health)
        self._health.clock = self._reactor
        self._health.start(self._health_interval, now=False).addErrback(self._log_failure, "the health check")

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        super().stopService()
        self._stopping = True
        if self._health is not None and self._health.running:
            self._health.stop()
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        self._cancel_flush()
        if self.cdp is not None:
            self.cdp.close()
            self.cdp = None
        await self.stack.stop()
        self.stack.on_ended = None
        log.info("Browser stack stopped", event="browser-stopped")

    # ------------------------------------------------------------------ IBrowser

    @property
    def vnc_view(self) -> tuple[int, str]:
        """The VNC server's port and the operator's view-only password, for HELLO."""
        return int(self.stack.vnc_address[1]), str(self.stack.view_password)

    async def prepare(
        self,
        homepage: str,
        cookies: Sequence[Mapping[str, Any]],
        window: tuple[int, int] | Mapping[str, Any],
        audio: bool,
        *,
        vnc_password: str | None = None,
    ) -> dict[str, Any]:
        request = check_prepare_request(
            homepage, cookies, window, audio, vnc_password=vnc_password, now=self._reactor.seconds()
        )
        async with self._lock:
            if self.broken is not None:
                raise StackError(f"the browser is broken: {self.broken}")
            started = time.monotonic()
            await self._ensure_running()
            replaced = self._session is not None
            if replaced:
                await self._dispose(self._close_session())
            self.stack.set_vnc_password(request.vnc_password)
            spare = self._spare is not None
            error = await self._open_session(request)
            log.info(
                "Prepared Chromium: home page {homepage}, {cookies} cookies,"
                " window {width}x{height}, in {ms} ms (spare window: {spare})",
                homepage=request.homepage,
                cookies=len(request.cookies),
                width=request.window_width,
                height=request.window_height,
                ms=round((time.monotonic() - started) * 1000),
                spare=spare,
                event="browser-prepared",
            )
            host, port = self.stack.vnc_address
            return {
                "browser": BROWSER,
                "capabilities": list(self.capabilities),
                "homepage": request.homepage,
                "cookies": len(request.cookies),
                "window": {"width": request.window_width, "height": request.window_height},
                "audio": bool(request.audio and self.stack.audio),
                "vnc": {"host": host, "port": port},
                "homepageError": error,
                "replaced": replaced,
            }

    async def cleanup(self) -> dict[str, Any]:
        async with self._lock:
            was_prepared = self._session is not None
            self.stack.set_vnc_password(None)
            # Viewers are closed while the browser is cleaned: both must be done before the answer.
            viewers = Deferred.fromCoroutine(self.stack.disconnect_viewers())
            restarted = False
            try:
                if self.broken is not None:
                    raise StackError(self.broken)
                await self._ensure_running()
                await self._dispose(self._close_session(), self._take_spare())
                proof = await self._prove_clean()
            except Exception as e:
                log.warn(
                    "Cleanup could not prove the browser clean ({error}): restarting it",
                    error=str(e),
                    event="browser-cleanup-restart",
                )
                restarted = True
                await self._restart(f"cleanup: {e}", spare=False)
                proof = await self._prove_clean()
            finally:
                await viewers
            log.info(
                "Cleaned up Chromium (restarted: {restarted})", restarted=restarted, event="browser-cleaned"
            )
            # The next worker's window, once the answer is on its way (the lock is free by then).
            self._reactor.callLater(0, self._spare_soon)
            return {"browser": BROWSER, "wasPrepared": was_prepared, "restarted": restarted, "clean": proof}

    # ------------------------------------------------------------------ windows and sessions

    def _window_size(self, request: PreparedBrowser) -> tuple[int, int]:
        return min(request.window_width, self.screen[0]), min(request.window_height, self.screen[1])

    async def _open_window(self, size: tuple[int, int]) -> _Window:
        """A fresh browser context with one blank window of ``size``, its page events on."""
        cdp = self._cdp()
        context = (await cdp.call("Target.createBrowserContext", {"disposeOnDetach": False}))[
            "browserContextId"
        ]
        self._contexts.add(context)
        try:
            width, height = size
            created = await cdp.call(
                "Target.createTarget",
                {
                    "url": "about:blank",
                    "browserContextId": context,
                    "newWindow": True,
                    "left": 0,
                    "top": 0,
                    "width": width,
                    "height": height,
                },
            )
            target = str(created["targetId"])
            tab = self._watched_tab(target)
            if tab is None:
                watched = self._watchers.setdefault(target, Deferred())
                watched.addTimeout(self._start_timeout, self._reactor)
                try:
                    tab = await watched
                finally:
                    self._watchers.pop(target, None)
            # Chromium makes a window of the screen's size one pixel smaller: set the bounds exactly.
            await self._size_window(target, size)
        except BaseException:
            try:
                await self._dispose([context])
            except Exception as e:
                log.info("Could not dispose a half-made window's context: {error}", error=str(e))
            raise
        return _Window(context, target, tab, size)

    def _watched_tab(self, target: str) -> str | None:
        return next((s for s, t in self._tabs.items() if t.target == target and t.watched), None)

    async def _size_window(self, target: str, size: tuple[int, int]) -> None:
        cdp = self._cdp()
        try:
            window = await cdp.call("Browser.getWindowForTarget", {"targetId": target})
            await cdp.call(
                "Browser.setWindowBounds",
                {
                    "windowId": window["windowId"],
                    "bounds": {"left": 0, "top": 0, "width": size[0], "height": size[1]},
                },
            )
        except CdpError as e:
            log.warn("Could not size the window: {error}", error=str(e))

    def _take_spare(self) -> list[str]:
        """Forget the spare window; the contexts to dispose (its own, if there was one)."""
        spare, self._spare = self._spare, None
        return [spare.context] if spare is not None else []

    def _usable_spare(self) -> _Window | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if self._tabs.get(spare.tab) is None:  # its page went (crashed, closed)
            Deferred.fromCoroutine(self._dispose([spare.context])).addErrback(
                self._log_failure, "disposing a spare window"
            )
            return None
        return spare

    def _spare_soon(self) -> None:
        if not self._stopping and self.broken is None:
            Deferred.fromCoroutine(self._open_spare()).addErrback(self._log_failure, "opening a spare window")

    async def _open_spare(self) -> None:
        async with self._lock:
            await self._open_spare_locked()

    async def _open_spare_locked(self) -> None:
        if (
            self._stopping
            or self.broken is not None
            or self._session is not None
            or self._spare is not None
            or self.cdp is None
            or self.cdp.closed is not None
        ):
            return
        try:
            self._spare = await self._open_window(self._spare_size)
        except Exception as e:
            log.warn(
                "Could not open a spare window ({error}); the next PREPARE opens its own",
                error=str(e),
                event="browser-spare-failed",
            )

    async def _open_session(self, request: PreparedBrowser) -> str | None:
        """The spare window (or a new one), the cookies, the home page loaded; the load error if any."""
        cdp = self._cdp()
        size = self._window_size(request)
        self._spare_size = size
        window = self._usable_spare()
        if window is None:
            window = await self._open_window(size)
        self._session = _Session(request, window)
        self._events = PageEvents(settle=self._settle)
        self._events.tab(window.target)
        if request.cookies:
            await cdp.call(
                "Storage.setCookies",
                {
                    "cookies": [cookie_param(c, request.homepage) for c in request.cookies],
                    "browserContextId": window.context,
                },
            )
        if window.size != size:
            await self._size_window(window.target, size)
        load: Deferred[None] = Deferred()
        self._loads[window.tab] = load
        try:
            navigated = await cdp.call(
                "Page.navigate", {"url": request.homepage}, window.tab, timeout=self._load_timeout
            )
            error = navigated.get("errorText") or None
            load.addTimeout(self._load_timeout, self._reactor)
            try:
                if error is None:  # an error page is shown at once; its load is not the home page's
                    await load
            except Exception:
                log.warn(
                    "The home page {url} did not finish loading in {s} s; READY anyway",
                    url=request.homepage,
                    s=self._load_timeout,
                    event="browser-home-slow",
                )
        finally:
            self._loads.pop(window.tab, None)
        if error is not None:
            self._events.failed(window.target, request.homepage, str(error), self._reactor.seconds())
            self._flush()
        return error

    def _close_session(self) -> list[str]:
        """Forget the session (what it held back is dropped); the contexts to dispose."""
        session, self._session = self._session, None
        self._cancel_flush()
        self._events = PageEvents(settle=self._settle)
        return [session.window.context] if session is not None else []

    async def _dispose(self, *contexts: list[str]) -> None:
        """Dispose browser contexts (their windows close), all at once."""
        doomed = [c for group in contexts for c in group]
        for context in doomed:
            self._contexts.discard(context)
        for tab, info in list(self._tabs.items()):
            if info.context in doomed:
                del self._tabs[tab]
        if doomed and self.cdp is not None:
            cdp = self.cdp
            try:
                await gatherResults(
                    [cdp.send("Target.disposeBrowserContext", {"browserContextId": c}) for c in doomed],
                    consumeErrors=True,
                )
            except FirstError as e:
                e.subFailure.raiseException()

    async def _prove_clean(self) -> dict[str, int]:
        """One page, blank, in the default context, and no cookie anywhere; StackError otherwise."""
        cdp = self._cdp()
        targets, jar = await gatherResults([cdp.send("Target.getTargets"), cdp.send("Storage.getCookies")])
        infos = targets.get("targetInfos", [])
        if len({t.get("browserContextId") for t in infos}) > 1:  # the default context's alone
            raise StackError("a browser context is left")
        # the omnibox popup shows up as a page target of its own (chrome://omnibox-popup...)
        pages = [
            t for t in infos if t.get("type") == "page" and not str(t.get("url")).startswith("chrome://")
        ]
        if len(pages) != 1 or pages[0].get("url") != "about:blank":
            raise StackError(f"{len(pages)} pages left: {[p.get('url') for p in pages][:5]}")
        cookies = jar.get("cookies", [])
        if cookies:
            raise StackError(f"{len(cookies)} cookies left")
        return {"pages": 1, "cookies": 0}

    # ------------------------------------------------------------------ starting and restarting

    async def _start(self, *, spare: bool = True) -> None:
        """Chromium afresh (and whatever else of the stack is down), listened to, with a spare window.

        The spare is also the warm-up: a new Chromium's first context and window cost
        several times what the later ones do, and a FREE VM pays it before anyone waits.
        """
        self._forget_browser()
        cdp = await self.stack.start()
        cdp.on_event = self._cdp_event
        cdp.when_closed.addCallback(self._cdp_closed, cdp)
        self.cdp = cdp
        await cdp.call("Target.setDiscoverTargets", {"discover": True})
        await cdp.call(
            "Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}
        )
        if spare:
            await self._open_spare_locked()

    def _forget_browser(self) -> None:
        """Everything known of the running browser, forgotten (it is about to be replaced)."""
        self._session = None
        self._spare = None
        self._cancel_flush()
        self._events = PageEvents(settle=self._settle)
        self._tabs.clear()
        self._watchers.clear()
        self._contexts.clear()
        if self.cdp is not None:
            cdp, self.cdp = self.cdp, None
            cdp.close()

    async def _restart(self, reason: str, *, spare: bool = True) -> None:
        log.warn(
            "Restarting Chromium from a wiped profile: {reason}", reason=reason, event="chromium-restart"
        )
        await self._start(spare=spare)

    async def _ensure_running(self) -> None:
        if self.stack.healthy() and self.cdp is not None and self.cdp.closed is None:
            return
        await self._restart("the browser was not running")

    # ------------------------------------------------------------------ health and repair

    def _stack_process_ended(self, reason: str) -> None:
        if not self._stopping:
            self._repair_soon(reason)

    def _cdp_closed(self, reason: str, cdp: CdpConnection) -> None:
        if self.cdp is cdp and not self._stopping:
            self._repair_soon(f"the DevTools connection closed ({reason})")

    def _repair_soon(self, reason: str) -> None:
        Deferred.fromCoroutine(self._repair(reason)).addErrback(self._log_failure, "repairing the browser")

    async def _repair(self, reason: str) -> None:
        async with self._lock:
            if self._stopping or self.broken is not None:
                return
            if (
                self.stack.healthy()
                and self.cdp is not None
                and self.cdp.closed is None
                and not (self._session is not None and self._session.crashed)
                and reason != "hung"
            ):
                return  # repaired already by whoever held the lock
            await self._recover(reason)

    async def _recover(self, reason: str) -> None:
        """Restart what is needed, a prepared session opened again; a restart that fails is tried
        again a second later, within the same budget.  Beyond repair: broken, and said once."""
        session = self._session
        error: Exception | None = None
        while True:
            now = self._reactor.seconds()
            self._restarts = [t for t in self._restarts if now - t < self._restart_window] + [now]
            if len(self._restarts) > self._max_restarts or self._stopping:
                break
            try:
                await self._restart(reason)
                if session is not None:
                    await self._open_session(session.request)
                    self._say({"action": "browser-restarted", "reason": reason[:200]})
                return
            except Exception as e:
                error = e
                log.warn(
                    "Repair failed ({reason}): {error}",
                    reason=reason,
                    error=str(e),
                    event="browser-repair-failed",
                )
                await deferLater(self._reactor, self._retry_delay)
        if self._stopping:
            return
        count = f"{len(self._restarts)} restarts within {self._restart_window:g} s"
        self.broken = f"{reason}; {count}" + (f"; the last failed: {error}" if error else "")
        log.error("The browser is beyond repair: {reason}", reason=self.broken, event="browser-broken")
        if self.on_broken is not None:
            self.on_broken(self.broken)

    def _check_health(self) -> None:
        if self._lock.locked or self._stopping or self.broken is not None or self.cdp is None:
            return
        cdp = self.cdp
        d = cdp.send("Browser.getVersion", timeout=self._health_timeout)

        def failed(failure: Failure) -> None:
            if self.cdp is cdp and not self._stopping:
                log.warn(
                    "Chromium does not answer: {error}", error=failure.getErrorMessage(), event="browser-hung"
                )
                self._repair_soon("hung")

        d.addCallbacks(lambda _: None, failed)

    # ------------------------------------------------------------------ CDP events

    def _cdp(self) -> CdpConnection:
        if self.cdp is None or self.cdp.closed is not None:
            raise StackError("no DevTools connection")
        return self.cdp

    def _in_session(self, context: object) -> bool:
        return self._session is not None and context == self._session.window.context

    def _cdp_event(self, method: str, params: Mapping[str, Any], session_id: str | None) -> None:
        now = self._reactor.seconds()
        if method == "Target.attachedToTarget":
            info = params.get("targetInfo", {})
            tab = str(params.get("sessionId"))
            context = info.get("browserContextId")
            if info.get("type") == "page" and context in self._contexts:
                target = str(info.get("targetId"))
                self._tabs[tab] = _Tab(target, str(context))
                if self._in_session(context):
                    self._events.tab(target)
                Deferred.fromCoroutine(self._watch_tab(tab, target)).addErrback(
                    self._log_failure, "watching a tab"
                )
            elif params.get("waitingForDebugger") and self.cdp is not None:
                self.cdp.send("Runtime.runIfWaitingForDebugger", None, tab).addErrback(lambda _: None)
        elif method == "Target.detachedFromTarget":
            self._tabs.pop(str(params.get("sessionId")), None)
        elif method in ("Target.targetCreated", "Target.targetInfoChanged"):
            info = params.get("targetInfo", {})
            if info.get("type") == "page" and self._in_session(info.get("browserContextId")):
                target = str(info.get("targetId"))
                if method == "Target.targetCreated":
                    self._events.tab(target)
                self._events.title_seen(target, str(info.get("url", "")), str(info.get("title", "")), now)
        elif method == "Target.targetDestroyed":
            self._events.closed(str(params.get("targetId")))
        elif method == "Target.targetCrashed":
            target = str(params.get("targetId"))
            if self._session is not None and self._events.knows(target):
                log.warn(
                    "A renderer of the session crashed ({status})",
                    status=params.get("status"),
                    event="renderer-crashed",
                )
                self._session.crashed = True
                self._repair_soon("a renderer crashed")
            elif self._spare is not None and self._spare.target == target:
                log.warn("The spare window's renderer crashed", event="renderer-crashed")
                for tab, info in list(self._tabs.items()):
                    if info.target == target:
                        del self._tabs[tab]  # the spare is not used; the next PREPARE opens a window
        elif session_id is not None and session_id in self._tabs:
            self._tab_event(method, params, session_id, self._tabs[session_id], now)
        self._flush()

    def _tab_event(self, method: str, params: Mapping[str, Any], tab: str, info: _Tab, now: float) -> None:
        if method == "Page.loadEventFired":
            load = self._loads.get(tab)
            if load is not None and not load.called:
                load.callback(None)
        if not self._in_session(info.context):
            return  # the spare's blank page, or a page of a session that ended
        target = info.target
        if method == "Page.frameNavigated":
            frame = params.get("frame", {})
            if not frame.get("parentId"):
                unreachable = frame.get("unreachableUrl")
                if unreachable:
                    self._events.failed(target, str(unreachable), "the page could not be loaded", now)
                else:
                    url = str(frame.get("url", "")) + str(frame.get("urlFragment", ""))
                    self._events.navigated(target, url, now)
        elif method == "Page.navigatedWithinDocument":
            if params.get("frameId") == target:  # a tab's main frame has the target's id
                self._events.navigated(target, str(params.get("url", "")), now, same_document=True)
        elif method == "Runtime.bindingCalled" and params.get("name") == TITLE_BINDING:
            try:
                told = json.loads(str(params.get("payload")))
            except ValueError:
                told = None
            if isinstance(told, list) and len(told) == 2 and all(isinstance(x, str) for x in told):
                self._events.title_seen(target, told[0], told[1][:1024], now)
        elif method == "Page.loadEventFired":
            self._events.loaded(target, now)
            self._ask_title(tab, target)

    def _ask_title(self, tab: str, target: str) -> None:
        """At load, ask the page its title too: the injected watcher misses a popup's first document."""
        if self.cdp is None:
            return
        d = self.cdp.send(
            "Runtime.evaluate",
            {"expression": "JSON.stringify([location.href, document.title])", "returnByValue": True},
            tab,
        )

        def told(result: dict[str, Any]) -> None:
            try:
                url, title = json.loads(result["result"]["value"])
            except (KeyError, TypeError, ValueError):
                return
            info = self._tabs.get(tab)
            if (
                isinstance(url, str)
                and isinstance(title, str)
                and info is not None
                and info.target == target
                and self._in_session(info.context)
            ):
                self._events.title_seen(target, url, title[:1024], self._reactor.seconds())
                self._flush()

        d.addCallbacks(told, lambda _: None)

    async def _watch_tab(self, tab: str, target: str) -> None:
        """A new tab of ours: its page events on, then let it run."""
        cdp = self._cdp()
        try:
            # One trip, not five: a session runs its commands in order, so the tab is let go only
            # after its watchers are on (measured: about 0.3 s less per PREPARE).
            await gatherResults(
                [
                    cdp.send("Page.enable", None, tab),
                    cdp.send("Runtime.addBinding", {"name": TITLE_BINDING}, tab),
                    cdp.send("Page.addScriptToEvaluateOnNewDocument", {"source": TITLE_SCRIPT}, tab),
                    cdp.send("Runtime.enable", None, tab),
                    cdp.send("Runtime.runIfWaitingForDebugger", None, tab),
                ],
                consumeErrors=True,
            )
        except FirstError as e:
            log.info("A tab went before it was watched: {error}", error=str(e))
            return
        info = self._tabs.get(tab)
        if info is None or info.target != target:
            return
        info.watched = True
        watcher = self._watchers.get(target)
        if watcher is not None and not watcher.called:
            watcher.callback(tab)

    # ------------------------------------------------------------------ saying events

    def _flush(self) -> None:
        self._cancel_flush()
        if self._stopping:
            return
        for event in self._events.due(self._reactor.seconds()):
            if is_internal(event.url):
                continue
            self._say(event.as_json())
        deadline = self._events.next_deadline()
        if deadline is not None:
            self._flush_call = self._reactor.callLater(
                max(0.0, deadline - self._reactor.seconds()), self._flush
            )

    def _cancel_flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _say(self, event: Mapping[str, Any]) -> None:
        callback = self.on_page_load
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            log.failure("The page event listener failed", event="page-load-listener-failed")

    @staticmethod
    def _log_failure(failure: Failure, what: str) -> None:
        log.failure("Failure while {what}", failure, what=what)
