"""The real browser of a VM: Chromium on Xvnc with PulseAudio, driven over CDP (issue #9).

:class:`ChromiumBrowser` is the :class:`~guest_agent.browser.IBrowser` of a guest that has the
stack (see :mod:`guest_agent.stack` for the processes and their flags).  It is a service: it
starts the stack with the agent, so a FREE VM has a browser waiting on a blank page, and ends it
with the agent.

- **One browser-level CDP connection** with flattened sessions (:mod:`guest_agent.cdp`): it sees
  every tab and popup the worker opens, auto-attached and paused until their page events are on.
- **PREPARE** opens a fresh browser context (``Target.createBrowserContext``: no cookies,
  history, storage or windows of anyone before), sets the batch's cookies into it before the first
  navigation, opens a window of the asked size in it and loads the home page; the answer comes
  when the load event fired.  The blank window of the default context stays open under it, so
  Chromium never sees its last window close (it would exit) while contexts come and go.
- **Page events** come from the browser's signals through :class:`~guest_agent.pages.PageEvents`.
- **CLEANUP** revokes the VNC password and closes every viewer first, then disposes the context
  and proves the browser clean (one page, blank, zero cookies); when it cannot, Chromium is
  restarted from a wiped profile and proven again.
- **Health**: a dead Chromium is noticed by its process ending, a hung one by a CDP ping every
  ``health_interval`` seconds, a crashed renderer by ``Target.targetCrashed``.  Each is repaired by
  a restart (a prepared session is opened again on its home page, and the handle hears a
  ``browser-restarted`` event).  More than ``max_restarts`` in ``restart_window`` seconds, or a
  stack that cannot start, is beyond repair: ``on_broken`` tells the agent, which tells the
  controller, which replaces the VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from guest_agent.browser import IBrowser, PreparedBrowser, check_prepare_request
from guest_agent.cdp import CdpConnection, CdpError, connect, read_devtools_port
from guest_agent.pages import PageEvents, is_internal
from guest_agent.stack import (
    ChildProcess,
    StackError,
    StackPrograms,
    chromium_argv,
    guarded,
    pulseaudio_argv,
    read_text,
    spawn,
    tail,
    vnc_password_file,
    wait_until,
    write_private,
    xvnc_argv,
)

log = Logger()

BROWSER = "chromium"

#: The name of the binding through which a tab's page tells its title (CDP ``Runtime.addBinding``).
TITLE_BINDING = "__vmcloudTitle"

#: Runs in every new document of a watched tab, before the page's own scripts: tells the title at
#: once and whenever it changes.  The browser's own ``Target.targetInfoChanged`` says a new title
#: only seconds later (measured: 2 s), too late to merge it into its page's event.
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
class _Session:
    """The worker's session: the request, its browser context and its first tab."""

    request: PreparedBrowser
    context: str
    target: str | None = None
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
    """Chromium, Xvnc and PulseAudio of one VM, kept alive and prepared for each worker.

    ``user`` is the (uid, gid) Chromium runs as when the agent is root (its sandbox refuses root);
    None runs it as the agent's own user.  ``vnc_host``/``vnc_port``: where Xvnc listens, which
    PREPARE's answer tells the controller (the VM's address and 5900 in a VM or a namespace).
    """

    name = "browser"

    def __init__(
        self,
        reactor: Any,
        programs: StackPrograms,
        *,
        vnc_host: str,
        vnc_port: int = 5900,
        screen: tuple[int, int] = (1280, 800),
        user: tuple[int, int] | None = None,
        run_dir: str | None = None,
        environ: Mapping[str, str] | None = None,
        health_interval: float = 2.0,
        health_timeout: float = 3.0,
        start_timeout: float = 20.0,
        load_timeout: float = 15.0,
        max_restarts: int = 3,
        restart_window: float = 120.0,
        settle: float = 0.8,
    ) -> None:
        self._reactor = reactor
        self._programs = programs
        self.capabilities: tuple[str, ...] = programs.capabilities
        self.on_page_load: EventCallback | None = None
        self.on_broken: Callable[[str], None] | None = None
        self.vnc_host = vnc_host
        self.vnc_port = vnc_port
        self.screen = screen
        self._user = user
        self._run_dir_wanted = run_dir
        self.run_dir = ""
        self._environ = dict(environ if environ is not None else _base_environment())
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._start_timeout = start_timeout
        self._load_timeout = load_timeout
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._settle = settle
        self._lock = DeferredLock()
        self.xvnc: ChildProcess | None = None
        self.pulse: ChildProcess | None = None
        self.chromium: ChildProcess | None = None
        self.display: int | None = None
        self._profiles = 0
        self._profile: str | None = None
        self.cdp: CdpConnection | None = None
        self._session: _Session | None = None
        self._events = PageEvents(settle=settle)
        self._flush_call: IDelayedCall | None = None
        self._tabs: dict[str, str] = {}  # CDP session id -> target id, for tabs of the session
        self._attached: dict[str, Deferred[str]] = {}  # target id -> its session id, once its events are on
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
        Deferred.fromCoroutine(self._first_start()).addErrback(
            self._log_failure, "starting the browser stack"
        )

    async def _first_start(self) -> None:
        async with self._lock:
            try:
                await self._start_all()
            except Exception as e:
                log.error(
                    "The browser stack did not start: {error}", error=str(e), event="browser-start-failed"
                )
                await self._recover(f"the browser stack did not start: {e}")
        if not self.started.called:
            self.started.callback(None)
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
        for process in (self.chromium, self.pulse, self.xvnc):
            await _end(self._reactor, process, grace=2.0)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("Browser stack stopped", event="browser-stopped")

    # ------------------------------------------------------------------ IBrowser

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
                await self._close_session()
            self._set_vnc_password(request.vnc_password)
            error = await self._open_session(request)
            log.info(
                "Prepared Chromium: home page {homepage}, {cookies} cookies,"
                " window {width}x{height}, in {ms} ms",
                homepage=request.homepage,
                cookies=len(request.cookies),
                width=request.window_width,
                height=request.window_height,
                ms=round((time.monotonic() - started) * 1000),
                event="browser-prepared",
            )
            return {
                "browser": BROWSER,
                "capabilities": list(self.capabilities),
                "homepage": request.homepage,
                "cookies": len(request.cookies),
                "window": {"width": request.window_width, "height": request.window_height},
                "audio": bool(request.audio and self.pulse is not None),
                "vnc": {"host": self.vnc_host, "port": self.vnc_port},
                "homepageError": error,
                "replaced": replaced,
            }

    async def cleanup(self) -> dict[str, Any]:
        async with self._lock:
            was_prepared = self._session is not None
            self._set_vnc_password(None)
            await self._disconnect_viewers()
            restarted = False
            try:
                if self.broken is not None:
                    raise StackError(self.broken)
                await self._ensure_running()
                await self._close_session()
                proof = await self._prove_clean()
            except Exception as e:
                log.warn(
                    "Cleanup could not prove the browser clean ({error}): restarting it",
                    error=str(e),
                    event="browser-cleanup-restart",
                )
                restarted = True
                await self._restart_chromium(f"cleanup: {e}")
                proof = await self._prove_clean()
            log.info(
                "Cleaned up Chromium (restarted: {restarted})", restarted=restarted, event="browser-cleaned"
            )
            return {"browser": BROWSER, "wasPrepared": was_prepared, "restarted": restarted, "clean": proof}

    # ------------------------------------------------------------------ the session

    async def _open_session(self, request: PreparedBrowser) -> str | None:
        """A fresh context with the cookies, a window, the home page loaded; the load error if any."""
        cdp = self._cdp()
        context = (await cdp.call("Target.createBrowserContext", {"disposeOnDetach": False}))[
            "browserContextId"
        ]
        self._session = session = _Session(request, context)
        self._events = PageEvents(settle=self._settle)
        if request.cookies:
            await cdp.call(
                "Storage.setCookies",
                {
                    "cookies": [cookie_param(c, request.homepage) for c in request.cookies],
                    "browserContextId": context,
                },
            )
        width = min(request.window_width, self.screen[0])
        height = min(request.window_height, self.screen[1])
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
        target = session.target = created["targetId"]
        self._events.tab(target)
        attached = self._attached.setdefault(target, Deferred())
        attached.addTimeout(self._start_timeout, self._reactor)
        tab = await attached
        await self._size_window(target, width, height)
        load: Deferred[None] = Deferred()
        self._loads[tab] = load
        navigated = await cdp.call(
            "Page.navigate", {"url": request.homepage}, tab, timeout=self._load_timeout
        )
        error = navigated.get("errorText") or None
        load.addTimeout(self._load_timeout, self._reactor)
        try:
            await load
        except Exception:
            log.warn(
                "The home page {url} did not finish loading in {s} s; READY anyway",
                url=request.homepage,
                s=self._load_timeout,
                event="browser-home-slow",
            )
        finally:
            self._loads.pop(tab, None)
        if error is not None:
            self._events.failed(target, request.homepage, str(error), self._reactor.seconds())
            self._flush()
        return error

    async def _size_window(self, target: str, width: int, height: int) -> None:
        cdp = self._cdp()
        try:
            window = await cdp.call("Browser.getWindowForTarget", {"targetId": target})
            await cdp.call(
                "Browser.setWindowBounds",
                {
                    "windowId": window["windowId"],
                    "bounds": {"left": 0, "top": 0, "width": width, "height": height},
                },
            )
        except CdpError as e:
            log.warn("Could not size the window: {error}", error=str(e))

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        self._cancel_flush()
        self._events = PageEvents(settle=self._settle)
        self._tabs.clear()
        self._attached.clear()
        if session is not None and self.cdp is not None:
            await self.cdp.call("Target.disposeBrowserContext", {"browserContextId": session.context})

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

    # ------------------------------------------------------------------ VNC

    def _password_file(self) -> str:
        return os.path.join(self.run_dir, "vnc-passwd")

    def _set_vnc_password(self, password: str | None) -> None:
        """Rotate (or, with None, revoke) the VNC password: Xvnc reads the file at each login."""
        if self.run_dir:
            write_private(self._password_file(), vnc_password_file(password))

    async def _disconnect_viewers(self) -> None:
        """Close every VNC connection (``vncconfig -disconnect``), so no viewer outlives its worker."""
        if self._programs.vncconfig is None or self.display is None or not _running(self.xvnc):
            return
        d = getProcessOutputAndValue(
            self._programs.vncconfig,
            ["-display", f":{self.display}", "-disconnect"],
            env=self._environ,
            reactor=self._reactor,
        )
        d.addTimeout(5, self._reactor)
        try:
            _out, err, code = await d
        except Exception as e:
            log.warn("vncconfig -disconnect failed: {error}", error=str(e), event="vnc-disconnect-failed")
            return
        if code != 0:
            log.warn(
                "vncconfig -disconnect failed: {err}",
                err=err.decode("utf-8", "replace")[-200:],
                event="vnc-disconnect-failed",
            )

    # ------------------------------------------------------------------ processes

    async def _start_all(self) -> None:
        if not self.run_dir:
            self.run_dir = self._run_dir_wanted or tempfile.mkdtemp(prefix="vmcloud-browser-")
            os.makedirs(self.run_dir, exist_ok=True)
            os.chmod(self.run_dir, 0o711)
            self._set_vnc_password(None)
        if not _running(self.xvnc):
            await self._start_xvnc()
        if self._programs.pulseaudio is not None and not _running(self.pulse):
            await self._start_pulse()
        if not _running(self.chromium) or self.cdp is None:
            await self._start_chromium()

    async def _ensure_running(self) -> None:
        if (
            _running(self.xvnc)
            and _running(self.chromium)
            and self.cdp is not None
            and self.cdp.closed is None
        ):
            return
        await self._restart_chromium("the browser was not running")

    async def _start_xvnc(self) -> None:
        shown: Deferred[int] = Deferred()
        buffer = bytearray()

        def fd3(data: bytes) -> None:
            buffer.extend(data)
            if b"\n" in buffer and not shown.called:
                shown.callback(int(buffer.split(b"\n")[0]))

        self.display = None
        process = ChildProcess("Xvnc", on_fd3=fd3)
        process.on_end = self._process_ended
        log_path = os.path.join(self.run_dir, "xvnc.log")
        argv = xvnc_argv(
            self._programs,
            width=self.screen[0],
            height=self.screen[1],
            host=self.vnc_host,
            port=self.vnc_port,
            password_file=self._password_file(),
        )
        self.xvnc = spawn(
            self._reactor,
            process,
            guarded(self._programs, argv),
            env=self._environ,
            log_path=log_path,
            fd3=True,
        )

        def ended(how: str) -> str:
            if not shown.called:
                shown.errback(StackError(f"Xvnc {how}: {tail(log_path)}"))
            return how

        process.ended.addCallback(ended)
        shown.addTimeout(self._start_timeout, self._reactor)
        self.display = await shown
        log.info(
            "Xvnc on display :{display}, VNC on {host}:{port}",
            display=self.display,
            host=self.vnc_host,
            port=self.vnc_port,
            event="xvnc-started",
        )

    async def _start_pulse(self) -> None:
        runtime = os.path.join(self.run_dir, "pulse")
        os.makedirs(runtime, exist_ok=True)
        os.chmod(runtime, 0o711)
        socket_path = os.path.join(runtime, "native")
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        env = dict(self._environ, HOME=runtime, XDG_RUNTIME_DIR=runtime, PULSE_RUNTIME_PATH=runtime)
        process = ChildProcess("pulseaudio")
        process.on_end = self._process_ended
        self.pulse = spawn(
            self._reactor,
            process,
            guarded(self._programs, pulseaudio_argv(self._programs, runtime)),
            env=env,
            log_path=os.path.join(self.run_dir, "pulseaudio.log"),
        )
        try:
            await wait_until(
                self._reactor,
                lambda: os.path.exists(socket_path) or not process.running,
                self._start_timeout,
                "PulseAudio",
            )
        except StackError:
            process.kill()
            raise
        if not process.running:
            self.pulse = None
            log.warn(
                "PulseAudio did not start ({how}); the browser runs without sound",
                how=process.how,
                event="pulseaudio-failed",
            )
            return
        os.chmod(socket_path, 0o777)  # the browser runs as another user

    async def _start_chromium(self) -> None:
        if self.display is None:
            raise StackError("no display")
        self._profiles += 1
        home = os.path.join(self.run_dir, f"chromium-{self._profiles}")
        profile = os.path.join(home, "profile")
        os.makedirs(profile, mode=0o700)
        os.chmod(home, 0o700)
        if self._user is not None:
            for path in (home, profile):
                os.chown(path, *self._user)
        self._profile = home
        env = dict(
            self._environ,
            DISPLAY=f":{self.display}",
            HOME=home,
            XDG_CONFIG_HOME=os.path.join(home, ".config"),
            XDG_CACHE_HOME=os.path.join(home, ".cache"),
        )
        if self.pulse is not None:
            env["PULSE_SERVER"] = "unix:" + os.path.join(self.run_dir, "pulse", "native")
        argv = chromium_argv(self._programs, profile=profile, width=self.screen[0], height=self.screen[1])
        process = ChildProcess("chromium")
        process.on_end = self._process_ended
        self.chromium = spawn(
            self._reactor,
            process,
            guarded(self._programs, argv, self._user),
            env=env,
            log_path=os.path.join(self.run_dir, "chromium.log"),
        )
        port_file = os.path.join(profile, "DevToolsActivePort")

        def port_known() -> bool:
            if not process.running:
                raise StackError(
                    f"Chromium {process.how}: {tail(os.path.join(self.run_dir, 'chromium.log'))}"
                )
            content = read_text(port_file)
            return content is not None and content.count("\n") >= 1 and "/devtools/browser/" in content

        await wait_until(self._reactor, port_known, self._start_timeout, "Chromium's DevTools port", 0.02)
        content = read_text(port_file) or ""
        cdp = await connect(self._reactor, read_devtools_port(content), timeout=10.0)
        cdp.on_event = self._cdp_event
        cdp.when_closed.addCallback(self._cdp_closed, cdp)
        self.cdp = cdp
        await cdp.call("Target.setDiscoverTargets", {"discover": True})
        await cdp.call(
            "Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}
        )
        await self._warm_up()
        log.info(
            "Chromium up (pid {pid}) on display :{display}",
            pid=process.pid,
            display=self.display,
            event="chromium-started",
        )

    async def _warm_up(self) -> None:
        """Open and throw away one context with a window, so the first PREPARE is not the cold one.

        A new Chromium's first context and window cost about a second more than the later ones
        (measured: 1.2 s against 0.3-0.4 s); a FREE VM pays it before anyone waits.
        """
        cdp = self._cdp()
        try:
            context = (await cdp.call("Target.createBrowserContext", {"disposeOnDetach": False}))[
                "browserContextId"
            ]
            await cdp.call(
                "Target.createTarget", {"url": "about:blank", "browserContextId": context, "newWindow": True}
            )
            await cdp.call("Target.disposeBrowserContext", {"browserContextId": context})
        except CdpError as e:
            log.warn("Warming Chromium up failed: {error}", error=str(e))

    async def _restart_chromium(self, reason: str) -> None:
        """Chromium (and Xvnc, PulseAudio if they died) from scratch, with a wiped profile."""
        log.warn(
            "Restarting Chromium from a wiped profile: {reason}", reason=reason, event="chromium-restart"
        )
        self._session = None
        self._cancel_flush()
        self._tabs.clear()
        self._attached.clear()
        if self.cdp is not None:
            cdp, self.cdp = self.cdp, None
            cdp.close()
        old = self.chromium
        await _end(self._reactor, old, grace=0.0)
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None
        await self._start_all()

    # ------------------------------------------------------------------ health and repair

    def _process_ended(self, process: ChildProcess, how: str) -> None:
        if self._stopping or process not in (self.xvnc, self.chromium, self.pulse):
            return
        log.warn("{name} {how}", name=process.name, how=how, event="stack-process-ended")
        if process is self.pulse:
            self.pulse = None
        self._repair_soon(f"{process.name} {how}")

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
                _running(self.xvnc)
                and _running(self.chromium)
                and (self._programs.pulseaudio is None or _running(self.pulse))
                and self.cdp is not None
                and self.cdp.closed is None
                and not (self._session is not None and self._session.crashed)
                and reason != "hung"
            ):
                return  # repaired already by whoever held the lock
            await self._recover(reason)

    async def _recover(self, reason: str) -> None:
        """Restart what is needed; a prepared session is opened again.  Beyond repair: broken."""
        now = self._reactor.seconds()
        self._restarts = [t for t in self._restarts if now - t < self._restart_window] + [now]
        session = self._session
        try:
            if len(self._restarts) > self._max_restarts:
                raise StackError(f"{len(self._restarts)} restarts within {self._restart_window:g} s")
            if not _running(self.xvnc):
                await _end(self._reactor, self.chromium, grace=0.0)
            await self._restart_chromium(reason)
            if session is not None:
                await self._open_session(session.request)
                self._say({"action": "browser-restarted", "reason": reason[:200]})
        except Exception as e:
            self.broken = f"{reason}; repair failed: {e}"
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

    def _ours(self, info: Mapping[str, Any]) -> bool:
        session = self._session
        return (
            session is not None
            and info.get("type") == "page"
            and info.get("browserContextId") == session.context
        )

    def _cdp_event(self, method: str, params: Mapping[str, Any], session_id: str | None) -> None:
        now = self._reactor.seconds()
        if method == "Target.attachedToTarget":
            info = params.get("targetInfo", {})
            tab = str(params.get("sessionId"))
            if self._ours(info):
                target = str(info.get("targetId"))
                self._tabs[tab] = target
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
            if self._ours(info):
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
        elif session_id is not None and session_id in self._tabs:
            target = self._tabs[session_id]
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
                self._ask_title(session_id, target)
                load = self._loads.get(session_id)
                if load is not None and not load.called:
                    load.callback(None)
        self._flush()

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
            if isinstance(url, str) and isinstance(title, str) and self._tabs.get(tab) == target:
                self._events.title_seen(target, url, title[:1024], self._reactor.seconds())
                self._flush()

        d.addCallbacks(told, lambda _: None)

    async def _watch_tab(self, tab: str, target: str) -> None:
        """A new tab of the session: its page events on, then let it run."""
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
        attached = self._attached.get(target)
        if attached is None:
            self._attached[target] = attached = Deferred()
        if not attached.called:
            attached.callback(tab)

    # ------------------------------------------------------------------ saying events

    def _flush(self) -> None:
        self._cancel_flush()
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


def _running(process: ChildProcess | None) -> bool:
    return process is not None and process.running


async def _end(reactor: Any, process: ChildProcess | None, grace: float) -> None:
    """End a process: SIGTERM and ``grace`` seconds, then SIGKILL; returns once it is reaped."""
    if process is None or not process.running:
        return
    if grace > 0:
        process.kill(signal.SIGTERM)
        deadline = reactor.seconds() + grace
        while process.running and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05)
    process.kill(signal.SIGKILL)
    deadline = reactor.seconds() + 5.0
    while process.running and reactor.seconds() < deadline:
        await deferLater(reactor, 0.02)
    if process.running:
        log.warn("{name} (pid {pid}) did not end after SIGKILL", name=process.name, pid=process.pid)


def _base_environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env
