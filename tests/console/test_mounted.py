"""The proxies as the daemon serves them: mounted in the REST API's Site, over a real pool service,
a real Xvnc and the guest's real audio server; the handle released through the REST API."""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from guest_agent.audio import AudioServer
from tests.console.support import (
    XVNC,
    Xvnc,
    open_ws,
    operator_handshake,
    read_frame,
    rfb_handshake,
    wait_until,
)
from tests.console.test_audio_live import FFMPEG, SINE, Body
from tests.integration.conftest import free_port
from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.api.app import make_api
from vmcloud.api.site import ApiSite
from vmcloud.console.proxies import build_proxies
from vmcloud.console.vnc import CLOSE_ACCESS_ENDED
from vmcloud.pool.interfaces import BatchOptions

TOKEN = "admin-token"
pytestmark = pytest.mark.skipif(XVNC is None or FFMPEG is None, reason="needs Xvnc and ffmpeg")


class MountedProxiesTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        assert FFMPEG is not None
        self.xvnc = Xvnc(reactor, self.mktemp(), free_port())
        await self.xvnc.start()
        self.addCleanup(lambda: ensureDeferred(self.xvnc.stop()))
        self.guest = AudioServer(reactor, FFMPEG, password=lambda: self.xvnc.password, source=SINE)
        guest_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.guest))
        self.addCleanup(guest_port.stopListening)
        self.addCleanup(self.guest.close_all)
        # a pool (on its own Clock) with one VM locked for a batch that asked for audio
        self.world = w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=True))
        w.settle()
        self.handle = w.pool.lock(batch)
        self.vmid = w.pool.state.handles[self.handle].vmid
        vm = w.pool.state.vms[self.vmid]
        w.pool.state.put(
            attrs.evolve(
                vm, ip="127.0.0.1", vnc_password=self.xvnc.password, capabilities=("cdp", "vnc", "audio")
            )
        )
        proxies = build_proxies(
            reactor,
            w.pool,
            token=TOKEN,
            cors_origins=["https://app.example"],
            vnc_port=self.xvnc.port,
            audio_port=guest_port.getHost().port,
        )
        self.registry = proxies.registry
        app = make_api(
            w.pool,
            token=TOKEN,
            cors_origins=["https://app.example"],
            static_dir=self.static(),
            mounts=proxies.mounts,
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(ApiSite(app.resource()))
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(lambda: ensureDeferred(self._wind_down()))

    def static(self) -> Any:
        from twisted.python.filepath import FilePath

        path = FilePath(self.mktemp())
        path.makedirs()
        return path

    async def _wind_down(self) -> None:
        self.registry.handle_ended(self.handle, "test over")
        self.registry.vm_ended(self.vmid, "test over")
        self.guest.close_all()
        await wait_until(reactor, lambda: not self.guest.streams, 5, "the guest's encoders ended")

    def test_release_through_the_api_closes_console_and_sound(self) -> Deferred[None]:
        async def run() -> None:
            worker = await open_ws(
                reactor, self.port, f"/console/{self.handle}", origin="https://app.example"
            )
            watcher = await open_ws(reactor, self.port, f"/console/{self.handle}?view_only=1")
            operator = await open_ws(reactor, self.port, f"/console/vm/{self.vmid}?view_only=1&token={TOKEN}")
            for pipe in (worker, watcher, operator):
                if pipe is operator:  # the relay logged in itself: no password in the operator's page
                    size = await operator_handshake(pipe)
                else:
                    size = await rfb_handshake(pipe, self.xvnc.password)
                screen = await read_frame(pipe, *size)
                assert screen[:3] == b"\xff\xff\xff"
            agent = Agent(reactor, pool=self.pool)
            response = await agent.request(
                b"GET", f"http://127.0.0.1:{self.port}/audio/{self.handle}.ogg".encode()
            )
            assert response.code == 200
            body = Body()
            response.deliverBody(body)
            await wait_until(reactor, lambda: len(body.data) > 2000, 10, "the Ogg stream flows")

            started = time.monotonic()
            released = await treq.post(f"http://127.0.0.1:{self.port}/release/{self.handle}", pool=self.pool)
            assert released.code == 204
            for pipe in (worker, watcher):
                code, _ = await pipe.closed
                assert code == CLOSE_ACCESS_ENDED
            await body.done
            assert time.monotonic() - started < 1.0
            assert operator.transport.connected  # the VM lives on: the operator still watches it

            ws = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip
            for path, headers in ((f"/console/{self.handle}", ws), (f"/audio/{self.handle}.ogg", {})):
                gone = await treq.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, pool=self.pool)
                assert gone.code == 404
                assert (await gone.json())["error"] == "unknown-handle"
            operator.transport.abortConnection()

        return ensureDeferred(run())
