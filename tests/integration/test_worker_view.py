"""The worker's view end to end (issue #10): a real daemon, a real browser VM, a worker's real browser.

A real ``twistd vmcloud`` on the local driver (root: each VM in its network namespace, with
Xvnc, PulseAudio and Chromium run by its guest agent).  The worker's browser is Debian's Chromium,
headless, driven over CDP (:mod:`tests.console.headless`).  The application is another origin: a
loopback HTTP server of this test serving a page that uses ``vmcloud.js`` to lock a VM (through
the application's own backend, which holds the admin token, as a real application does) and to
attach it.  The VMs' pages come from a server on the bridge, the VMs' only way out.

1. The canvas shows the VM browser's home page (a page of one colour); keys typed into the canvas
   (ctrl-l, a URL, Enter) navigate the VM's browser, and the page-load event reaches the page
   through ``followEvents``; a second viewer (the controller's own ``worker.html``) sees the same
   screen, and its input, sent with ``?view_only=1``, is dropped by the controller; a release
   closes both consoles within a second, and the handle's console and sound answer 404.
2. A VM page plays beeps at known times in a batch that asked for audio: the page's AudioWorklet
   hears them, and the phone stream (``/audio/{handle}.ogg``) decodes with ffmpeg to a 1 kHz tone.

Needs root (namespaces), the browser stack and ffmpeg; skips without them, except under ``CI``
where a missing part fails.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from guest_agent.audio import find_encoder
from guest_agent.stack import find_stack
from tests.console.headless import CHROMIUM, Tab, WorkerBrowser
from tests.console.test_audio_live import Body
from tests.console.test_audio_live import decode as decode_pcm
from tests.integration.conftest import free_port
from tests.integration.test_daemon_harness import NEEDS_NETNS, Daemon, netns_available, running_daemon
from tests.integration.vmcloud_daemon import http_call


def _missing() -> str | None:
    programs, missing = find_stack()
    if programs is None:
        return "the browser stack is not installed: " + ", ".join(missing)
    if programs.pulseaudio is None:
        return "pulseaudio is not installed"
    ffmpeg, why = find_encoder()
    if ffmpeg is None:
        return why
    if CHROMIUM is None:
        return "Debian's chromium is not installed (the worker's browser)"
    if not netns_available():
        return NEEDS_NETNS
    return None


_why = _missing()
if _why is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the worker's view tests: {_why}")
    pytestmark = pytest.mark.skip(reason=_why)

GREEN, BLUE = [0, 255, 0], [0, 0, 255]
BEEP_HZ = 1000

#: The VM's pages: one colour each (a pixel says which one the screen shows), and a beeper.
PAGES = {
    "/home.html": '<html><head><title>Green home</title></head><body style="margin:0;background:#00ff00">',
    "/blue.html": '<html><head><title>Blue page</title></head><body style="margin:0;background:#0000ff">',
    "/red.html": '<html><head><title>Red page</title></head><body style="margin:0;background:#ff0000">',
    # Beeps of 300 ms every second, from 1 s after the sound starts; their start on the wall clock (the
    # one every process of this host shares) from the context's own output timestamp, taken once the
    # output runs (before that, the timestamp is stale and the estimate off by a fraction of a second).
    "/beeps.html": f"""<html><head><title>Beeps</title></head><body style="margin:0;background:#333">
<script>
const ctx = new AudioContext();
const gain = ctx.createGain(); gain.gain.value = 0; gain.connect(ctx.destination);
const osc = ctx.createOscillator(); osc.frequency.value = {BEEP_HZ}; osc.connect(gain); osc.start();
function schedule() {{
  const stamp = ctx.getOutputTimestamp();
  if (ctx.state !== 'running' || !(stamp.performanceTime > 0) || !(stamp.contextTime > 0.2)) {{
    setTimeout(schedule, 50); return;
  }}
  const first = Math.ceil(stamp.contextTime) + 1;
  for (let i = 0; i < 150; i++) {{
    gain.gain.setValueAtTime(0.5, first + i); gain.gain.setValueAtTime(0, first + i + 0.3);
  }}
  const wall = performance.timeOrigin + stamp.performanceTime + (first - stamp.contextTime) * 1000;
  fetch('/beeps?first=' + wall + '&state=' + ctx.state);
}}
schedule();
</script></body></html>""",
}


class VmSite(BaseHTTPRequestHandler):
    """The VMs' web: the pages above, and the beeper's report."""

    beeps: list[dict[str, str]] = []
    pages: dict[str, str] = PAGES

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/beeps":
            self.beeps.append({k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()})
            body = b"ok"
        elif path in self.pages:
            body = self.pages[path].encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


#: The application's page: vmcloud.js from the controller locks a VM through the application's
#: backend (which holds the admin token), attaches it, follows its events.
APP_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>app</title>
<style>html, body {{ margin: 0; background: #000; }} #screen {{ width: 1280px; height: 800px; }}</style>
<script src="{controller}/static/vmcloud.js"></script></head>
<body><div id="screen" tabindex="0"></div><script>
"use strict";
const query = new URLSearchParams(location.search);
window.app = {{ state: "start", events: [], levels: [], handle: null, attachment: null, error: null }};
async function lock() {{
  // A lock that never reached the backend (a network error, no answer) is tried again: this host's
  // network changes under the browser whenever a namespace comes or goes (ERR_NETWORK_CHANGED).
  for (let attempt = 1; ; attempt++) {{
    try {{
      return await vmcloud.admin(location.origin + "/backend").lock(query.get("batch"));
    }} catch (error) {{
      if (error.name === "ApiError" || attempt === 3) throw error;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }}
  }}
}}
(async () => {{
  app.handle = await lock();
  const vm = vmcloud.handle("{controller}", app.handle);
  vm.followEvents((event) => app.events.push(event.data), {{ lastId: 0 }});
  app.attachment = await vm.attach(document.getElementById("screen"), {{
    audio: query.get("audio") === "1",
    levelMs: 10,
    onState: (state) => {{ app.state = state; }},
    onLevel: (report) => {{ app.levels.push([Date.now(), report.level]); }},
  }});
}})().catch((error) => {{ app.error = String(error); }});
</script></body></html>"""


def app_server(controller_port: int, port: int, page: str = APP_PAGE) -> ThreadingHTTPServer:
    """The application's site on ``port``: its page (``/app.html``, ``page`` with ``{controller}``
    filled in), and ``POST /backend/lock/{batch}`` relayed to the controller (the page never holds
    the admin token).  bench/worker.py serves its own page with it."""
    controller = f"http://127.0.0.1:{controller_port}"

    class App(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path != "/app.html":
                self.send_error(404)
                return
            self._answer(200, "text/html", page.format(controller=controller).encode())

        def do_POST(self) -> None:
            if not self.path.startswith("/backend/lock/"):
                self.send_error(404)
                return
            answer = http_call(
                controller_port,
                "POST",
                self.path.removeprefix("/backend"),
                headers={"Accept": self.headers.get("Accept", "*/*")},
            )
            self._answer(answer.status, answer.headers.get("content-type", "text/plain"), answer.body)

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), App)


def _serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture(scope="class")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One daemon with one browser VM, the VMs' site on its bridge, the application on loopback."""
    app_port = free_port()
    app_origin = f"http://127.0.0.1:{app_port}"
    base = tmp_path_factory.mktemp("worker-view")
    with running_daemon(base, "w", pool_timeout_operation=60, api_cors_origins=app_origin) as daemon:
        daemon.set_pool_size(1, 1)
        daemon.wait_vms(FREE=1, timeout=90)  # the bridge exists once a VM booted
        site = ThreadingHTTPServer((daemon.layout.bridge_ip, 0), VmSite)
        _serve(site)
        app = app_server(daemon.api_port, app_port)
        _serve(app)
        request.cls.daemon = daemon
        request.cls.site = f"http://{daemon.layout.bridge_ip}:{site.server_address[1]}"
        request.cls.app = app_origin
        request.cls.base = base
        try:
            yield
        finally:
            site.shutdown()
            app.shutdown()


#: The colour at a point of the screen's canvas (fractions of its size), or null before it exists.
def pixel(where: str, fx: float = 0.5, fy: float = 0.6) -> str:
    return (
        f"(() => {{ const c = document.querySelector('{where} canvas');"
        " if (!c || !c.width) return null;"
        f" const p = c.getContext('2d').getImageData(Math.floor(c.width * {fx}), Math.floor(c.height * {fy}),"
        " 1, 1).data; return [p[0], p[1], p[2]]; })()"
    )


def shows(where: str, colour: list[int]) -> str:
    return f"JSON.stringify({pixel(where)}) === '{json.dumps(colour, separators=(',', ':'))}'"


APP_STATE = "{state: app.state, error: app.error, events: app.events, pixel: " + pixel("#screen") + "}"
WORKER_STATE = "{state: worker.state, pixel: " + pixel("#screen") + "}"
WS_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def decode(ogg: bytes) -> list[int]:
    """Mono 48 kHz samples of an Ogg/Opus stream, as ffmpeg decodes it (fails on a broken stream)."""
    pcm = decode_pcm(ogg)
    return list(struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 2 * 2]))


def goertzel(window: list[int], frequency: float, rate: int = 48000) -> float:
    """The power of one frequency in ``window`` (one bin of a Fourier transform)."""
    coefficient = 2 * math.cos(2 * math.pi * frequency / rate)
    before = earlier = 0.0
    for sample in window:
        before, earlier = sample + coefficient * before - earlier, before
    return before * before + earlier * earlier - coefficient * before * earlier


def tone_windows(samples: list[int], frequency: float, size: int = 480) -> int:
    """How many 10 ms windows hold a tone of ``frequency``: loud, and that frequency far above
    its neighbours (an octave below and above, and half an octave)."""
    found = 0
    for start in range(0, len(samples) - size, size):
        window = samples[start : start + size]
        if (sum(s * s for s in window) / size) ** 0.5 < 2000:
            continue
        power = goertzel(window, frequency)
        others = [goertzel(window, frequency * k) for k in (0.5, 0.7, 1.4, 2.0)]
        if power > 20 * max(others):
            found += 1
    return found


@pytest.mark.usefixtures("world")
class WorkerViewTests(TestCase):
    timeout = 180
    daemon: Daemon
    site: str
    app: str
    base: Path

    def setUp(self) -> Deferred[None]:
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.browser = WorkerBrowser(reactor, str(self.base / f"chromium-{self.id().rsplit('.', 1)[-1]}"))
        self.addCleanup(lambda: ensureDeferred(self.browser.stop()))
        return ensureDeferred(self.browser.start())

    @property
    def controller(self) -> str:
        return self.daemon.url

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await treq.request(
            method,
            self.controller + path,
            json=body,
            headers={"Accept": "application/json"},
            pool=self.http,
        )
        text = await response.text()
        return response.code, (json.loads(text) if text.startswith(("{", "[")) else text)

    async def batch(self, page: str, audio: bool) -> str:
        code, answer = await self.api(
            "POST", f"/prepare-batch/1/{quote(self.site + page, safe='')}", {"audio": audio}
        )
        assert code == 200, answer
        self.addCleanup(lambda: ensureDeferred(self.api("POST", f"/cancel-batch/{answer['batch']}")))
        return str(answer["batch"])

    async def open_app(self, batch: str, audio: bool) -> Tab:
        tab = await self.browser.open(f"{self.app}/app.html?batch={batch}&audio={int(audio)}")
        await tab.until("window.app && app.state === 'connected'", "the app attached the VM", 60, APP_STATE)
        return tab

    async def gone(self, handle: str) -> None:
        """The handle's console and sound answer 404, as an unknown handle's do."""
        for token in (handle, "h-never-issued-0123456789abcdef"):
            for path, headers in (
                (f"/console/{token}", WS_HEADERS),
                (f"/audio/{token}", WS_HEADERS),
                (f"/audio/{token}.ogg", {}),
            ):
                response = await treq.get(self.controller + path, headers=headers, pool=self.http)
                body = await response.json()
                assert (response.code, body["error"]) == (404, "unknown-handle"), (path, body)

    def test_a_page_on_another_origin_locks_attaches_and_drives_the_vm(self) -> Deferred[None]:
        async def run() -> None:
            home, blue, red = (f"{self.site}/{name}.html" for name in ("home", "blue", "red"))
            batch = await self.batch("/home.html", audio=False)
            app = await self.open_app(batch, audio=False)
            handle = await app.js("app.handle")
            # the canvas shows the VM browser's home page; its event reached the page
            await app.until(shows("#screen", GREEN), "the canvas shows the green home page", 20, APP_STATE)
            await app.until(
                f"app.events.some((e) => e.url === {json.dumps(home)} && e.title === 'Green home')",
                "the home page's event",
                20,
                APP_STATE,
            )
            # keys typed into the canvas drive the VM's browser: ctrl-l, a URL, Enter
            await app.js("app.attachment.rfb.focus()")
            await app.ctrl("l")
            await deferLater(reactor, 0.3)
            await app.type(blue)
            await app.key("Enter")
            await app.until(shows("#screen", BLUE), "the canvas shows the typed page", 20, APP_STATE)
            await app.until(
                f"app.events.some((e) => e.url === {json.dumps(blue)} && e.title === 'Blue page')",
                "the typed page's event reached the page",
                20,
                APP_STATE,
            )
            # a second viewer of the handle (the controller's own worker page) sees the same screen
            watcher = await self.browser.open(
                f"{self.controller}/static/worker.html?handle={handle}&view_only=1&audio=0"
            )
            await watcher.until(
                "window.worker && worker.state === 'connected'",
                "the second viewer connects",
                30,
                WORKER_STATE,
            )
            await watcher.until(
                shows("#screen", BLUE), "the second viewer sees the same screen", 20, WORKER_STATE
            )
            # its input, sent anyway (noVNC told to send it), is dropped by the controller
            await watcher.js("worker.attachment.rfb.viewOnly = false; worker.attachment.rfb.focus(); true")
            await watcher.ctrl("l")
            await deferLater(reactor, 0.3)
            await watcher.type(red)
            await watcher.key("Enter")
            await deferLater(reactor, 3.0)  # a typed URL loads in well under a second here
            assert await app.js(shows("#screen", BLUE)), await app.js(f"JSON.stringify({APP_STATE})")
            events = await app.js("app.events.filter((e) => e.action === 'page-load').map((e) => e.url)")
            assert events == [home, blue], events
            # the handle's sound: its batch did not ask for audio
            response = await treq.get(f"{self.controller}/audio/{handle}.ogg", pool=self.http)
            assert (response.code, (await response.json())["error"]) == (404, "no-audio")
            # release (by the application's page): both consoles close within a second
            for tab, name in ((app, "app"), (watcher, "worker")):
                await tab.js(
                    f"window.closedAt = null; {name}.attachment.rfb.addEventListener("
                    "'disconnect', () => { window.closedAt = Date.now(); }); true"
                )
            released = await app.js(
                f"(async () => {{ const t = Date.now(); await vmcloud.handle({json.dumps(self.controller)},"
                " app.handle).release(); return t; })()"
            )
            closed = [await tab.until("window.closedAt", "the console closed", 5) for tab in (app, watcher)]
            assert all(0 <= t - released < 1000 for t in closed), (released, closed)
            await app.until("app.state === 'ended'", "the app says the session ended", 10, APP_STATE)
            await watcher.until("worker.state === 'ended'", "the worker page says so too", 10, WORKER_STATE)
            await self.gone(handle)

        return ensureDeferred(run())

    def test_the_worker_hears_the_vm(self) -> Deferred[None]:
        async def run() -> None:
            VmSite.beeps.clear()
            batch = await self.batch("/beeps.html", audio=True)
            app = await self.open_app(batch, audio=True)
            handle = await app.js("app.handle")
            assert await app.js("app.attachment.startSound()") == "running"
            # the phone's stream, meanwhile
            response = await treq.get(
                f"{self.controller}/audio/{handle}.ogg", pool=self.http, unbuffered=True
            )
            assert response.code == 200
            assert response.headers.getRawHeaders("content-type") == ["audio/ogg"]
            ogg = Body()
            response.deliverBody(ogg)
            self.addCleanup(lambda: ogg.transport and ogg.transport.stopProducing())
            # the page's AudioWorklet heard the beeps: onsets a second apart (the VM page's own idea of
            # when it plays is too rough for more; bench/worker.py measures the delay at the VM's sink).
            # Looked at until three or four beeps came (how soon the first plays varies with the load).
            deadline = reactor.seconds() + 15
            while True:
                await deferLater(reactor, 0.5)
                levels = await app.js("app.levels")
                onsets = [t for (t, level), (_, before) in zip(levels[1:], levels, strict=False)
                          if level > 0.1 and before < 0.05]  # fmt: skip
                if len(onsets) >= 3 or reactor.seconds() > deadline:
                    break
            [report] = VmSite.beeps
            assert report["state"] == "running", report  # the VM's browser plays without a gesture
            assert len(onsets) >= 2, levels[-200:]
            assert all(900 < b - a < 1100 for a, b in itertools.pairwise(onsets)), onsets
            # the phone's stream decodes to the same beeps: a 1 kHz tone in about 30 % of the time
            samples = decode(ogg.data)
            assert tone_windows(samples, BEEP_HZ) >= 50, len(samples)  # 0.5 s of 1 kHz tone or more
            # release: the sound's socket and the stream end within a second, and both routes are gone
            await app.js(
                "window.soundClosed = null; app.attachment.sound.socket.addEventListener("
                "'close', () => { window.soundClosed = Date.now(); }); true"
            )
            released = await app.js(
                f"(async () => {{ const t = Date.now(); await vmcloud.handle({json.dumps(self.controller)},"
                " app.handle).release(); return t; })()"
            )
            closed = await app.until("window.soundClosed", "the sound socket closed", 5)
            assert 0 <= closed - released < 1000, (released, closed)
            await ogg.done
            await self.gone(handle)

        return ensureDeferred(run())
