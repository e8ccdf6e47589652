"""``/console/vm/{vmid}/screen.png`` against a real Xvnc, through the API as the daemon mounts it.

The pool is a real pool service (tests/pool/fakes.py's World) with one READY VM whose address and
session password are the Xvnc's; the request goes through ``build_proxies`` and the API's site on a
real socket, as the monitor's thumbnails do.
"""

from __future__ import annotations

import time

import attrs
import pytest
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.console.support import XVNC, Xvnc
from tests.console.test_screen import decode_png
from tests.integration.conftest import free_port
from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.api.app import make_api
from vmcloud.api.site import ApiSite
from vmcloud.console.proxies import build_proxies
from vmcloud.pool.interfaces import BatchOptions
from vmcloud.pool.model import VMState

pytestmark = pytest.mark.skipif(XVNC is None, reason="needs Xvnc")
STATIC = FilePath(__file__).parent().parent().parent().child("static")
TOKEN = "admin-token"


class ScreenLiveTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    async def _set_up(self) -> None:
        self.xvnc = Xvnc(reactor, self.mktemp(), free_port())
        await self.xvnc.start(geometry="640x400")
        self.addCleanup(lambda: ensureDeferred(self.xvnc.stop()))
        w = World()
        w.pool.set_pool_size(1, 1, 60_000)
        w.settle()
        w.pool.prepare_batch(1, HOME, BatchOptions())
        w.settle()
        vm = next(vm for vm in w.vms() if vm.state is VMState.READY)
        self.vmid = vm.vmid
        self.pool = w.pool
        self.put(ip="127.0.0.1", vnc_password=self.xvnc.password, capabilities=("cdp", "vnc"))
        proxies = build_proxies(reactor, w.pool, token=TOKEN, cors_origins=[], vnc_port=self.xvnc.port)
        api = make_api(w.pool, token=TOKEN, cors_origins=[], static_dir=STATIC, mounts=proxies.mounts)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(ApiSite(api.resource()))
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.http = HTTPConnectionPool(reactor, persistent=False)

    def put(self, **changes: object) -> None:
        self.pool.state.put(attrs.evolve(self.pool.state.vms[self.vmid], **changes))

    async def get(self, query: str = "") -> tuple[int, bytes, str]:
        response = await treq.get(
            f"{self.base}/console/vm/{self.vmid}/screen.png{query}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            pool=self.http,
        )
        body = await response.content()
        return response.code, body, (response.headers.getRawHeaders("content-type") or [""])[0]

    def test_the_screen_as_png(self) -> Deferred[None]:
        async def run() -> None:
            started = time.monotonic()
            status, body, kind = await self.get()
            took = time.monotonic() - started
            assert (status, kind) == (200, "image/png"), body[:300]
            width, height, rows = decode_png(body)
            assert (width, height) == (320, 200)  # 640x400 scaled to the default width
            assert all(row == b"\xff" * 960 for row in rows)  # Xvnc's white root window (-wr)
            assert took < 3, f"a capture took {took:.2f} s"
            status, body, _ = await self.get("?width=1920")
            assert status == 200 and decode_png(body)[:2] == (640, 400)  # never scaled up

        return ensureDeferred(run())

    def test_vnc_errors_are_json(self) -> Deferred[None]:
        async def run() -> None:
            self.put(vnc_password="wrongpw1")
            status, body, kind = await self.get()
            assert (status, kind) == (502, "application/json") and b'"vnc-error"' in body, body
            self.put(vnc_password=self.xvnc.password, vnc_port=free_port())  # nothing listens there
            status, body, kind = await self.get()
            assert (status, kind) == (502, "application/json") and b'"vnc-unreachable"' in body, body
            self.put(state=VMState.FREE, vnc_password=None, vnc_port=None)
            status, body, _ = await self.get()
            assert status == 409 and b'"no-session"' in body, body

        return ensureDeferred(run())
