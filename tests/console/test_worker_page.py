"""The worker's page in a real browser: headless Chromium (Debian's) runs static/worker.html from
another origin, which attaches a handle through the controller: noVNC shows the real Xvnc's screen
(pixel check), the pointer moves the VM's pointer, the sound (a sine from the guest's real audio
server) reaches the page's AudioWorklet, and a release through the REST API ends the page's session.

Driven over the DevTools protocol with the guest agent's own thin CDP client (no Playwright, so no
browser download): the browser is the system's.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site
from twisted.web.static import File

from guest_agent.audio import AudioServer
from tests.console.headless import CHROMIUM, WorkerBrowser
from tests.console.support import XDOTOOL, XVNC, Xvnc, wait_until
from tests.console.test_audio_live import FFMPEG, SINE
from tests.integration.conftest import free_port
from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.api.app import make_api
from vmcloud.api.site import ApiSite
from vmcloud.console.proxies import build_proxies
from vmcloud.pool.interfaces import BatchOptions

STATIC = FilePath(__file__).parent().parent().parent().child("static")
pytestmark = pytest.mark.skipif(
    None in (CHROMIUM, XVNC, FFMPEG, XDOTOOL), reason="needs chromium, Xvnc, ffmpeg and xdotool"
)


class WorkerPageTests(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        assert FFMPEG is not None and CHROMIUM is not None
        self.xvnc = Xvnc(reactor, self.mktemp(), free_port())
        await self.xvnc.start(geometry="640x400")
        self.addCleanup(lambda: ensureDeferred(self.xvnc.stop()))
        self.guest = AudioServer(reactor, FFMPEG, password=lambda: self.xvnc.password, source=SINE)
        guest_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.guest))
        self.addCleanup(guest_port.stopListening)
        self.addCleanup(self.guest.close_all)
        # the controller: a pool with one VM locked for an audio batch, the API with the proxies
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=True))
        w.settle()
        self.handle = w.pool.lock(batch)
        vm = w.pool.state.vms[w.pool.state.handles[self.handle].vmid]
        w.pool.state.put(
            attrs.evolve(
                vm, ip="127.0.0.1", vnc_password=self.xvnc.password, capabilities=("cdp", "vnc", "audio")
            )
        )
        self.app_port = free_port()
        app_origin = f"http://127.0.0.1:{self.app_port}"
        proxies = build_proxies(
            reactor,
            w.pool,
            token="t",
            cors_origins=[app_origin],
            vnc_port=self.xvnc.port,
            audio_port=guest_port.getHost().port,
        )
        self.registry = proxies.registry
        api = make_api(w.pool, token="t", cors_origins=[app_origin], static_dir=STATIC, mounts=proxies.mounts)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(ApiSite(api.resource()))
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        # the application's own site, another origin, serving a copy of the worker page
        app = await TCP4ServerEndpoint(reactor, self.app_port, interface="127.0.0.1").listen(
            Site(File(STATIC.path))
        )
        self.addCleanup(app.stopListening)
        self.page_url = f"{app_origin}/worker.html?handle={self.handle}&base={self.base}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        await self._start_browser()
        self.addCleanup(lambda: ensureDeferred(self._wind_down()))

    async def _start_browser(self) -> None:
        self.browser = WorkerBrowser(reactor, self.mktemp())
        await self.browser.start()
        self.tab = await self.browser.open()

    async def _wind_down(self) -> None:
        await self.browser.stop()
        for member in list(self.registry._members):
            self.registry.end(member, "test over")
        self.guest.close_all()
        await wait_until(reactor, lambda: not self.guest.streams, 5, "the guest's encoders ended")

    async def js(self, expression: str) -> Any:
        return await self.tab.js(expression)

    async def until(self, expression: str, what: str, timeout: float = 15) -> Any:
        explain = "window.worker && {state: worker.state, level: worker.level}"
        return await self.tab.until(expression, what, timeout, explain)

    def test_screen_pointer_sound_and_release(self) -> Deferred[None]:
        async def run() -> None:
            await self.tab.navigate(self.page_url)
            await self.until("window.worker && window.worker.state === 'connected'", "the screen connects")
            # pixel check: noVNC's canvas shows the VM's white root window
            centre = (
                "(() => { const c = document.querySelector('#screen canvas');"
                " const p = c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data;"
                " return [c.width, c.height, p[0], p[1], p[2]]; })()"
            )
            white = f"(() => {{ const v = {centre}; return v[2] + v[3] + v[4] === 765 && v; }})()"
            size = await self.until(white, "the canvas shows the VM's white screen")
            assert size[:2] == [640, 400]
            # the pointer through noVNC moves the VM's pointer
            box = await self.js(
                "(() => { const r = document.querySelector('#screen canvas').getBoundingClientRect();"
                " return [r.left, r.top, r.width, r.height]; })()"
            )
            x, y = box[0] + box[2] * 0.25, box[1] + box[3] * 0.5
            await self.tab.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
            await wait_until(
                reactor, lambda: abs(self.xvnc.pointer()[0] - 160) <= 3, 10, "the VM's pointer moved"
            )
            # the sound: the guest's sine reaches the page's worklet
            assert await self.js("worker.attachment.startSound()") == "running"
            await self.until("worker.level > 0.03", "the page hears the VM's sound")
            # release through the REST API: the page is told the session ended
            released = await treq.post(f"{self.base}/release/{self.handle}", pool=self.pool)
            assert released.code == 204
            await self.until("worker.state === 'ended'", "the page says the session ended", timeout=10)

        return ensureDeferred(run())
