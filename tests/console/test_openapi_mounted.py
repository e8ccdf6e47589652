"""The OpenAPI document says true of ``/console`` and ``/audio``: every status it lists for them is
one the mounted proxies really give, and they give no other (the drift test of tests/api/test_openapi.py
covers the Klein routes; these paths are served by resources mounted under ``/console/`` and ``/audio/``).

The proxies run as the daemon mounts them (``build_proxies`` over a real pool service, in the API's
Site, on a real socket), with handles in every state a worker's page can meet: assigned with and without
sound, waiting for a VM, whose VM died, whose VM has no screen, whose VM has no address yet.  Each
request is raw HTTP/1.1 and only its status line is read (a 101 or a live stream then simply ends).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.console.support import wait_until
from tests.console.test_screen import FakeVnc, conversation
from tests.integration.conftest import free_port
from tests.pool.fakes import World
from tests.pool.test_service import HOME
from vmcloud.api.app import make_api
from vmcloud.api.openapi import MOUNTED_PATHS, openapi_document
from vmcloud.api.site import ApiSite
from vmcloud.console.audio import AudioFactory, AudioResource
from vmcloud.console.gate import Gate
from vmcloud.console.proxies import build_proxies
from vmcloud.console.targets import PoolTargets
from vmcloud.console.vnc import ConsoleFactory, ConsoleResource
from vmcloud.pool.interfaces import BatchOptions

TOKEN = "admin-token"
APP = "https://app.example"
WS = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: binary\r\n"
)
BAD_KEY = WS.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")
EVIL_ORIGIN = "Origin: https://evil.example\r\n"
EVIL = WS + EVIL_ORIGIN


class StatusLine(Protocol):
    """Sends one request, keeps the status of the answer, then drops the connection."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.status: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n" in self.head and not self.status.called:
            self.status.callback(int(self.head.split(b" ", 2)[1]))
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.status.called:
            self.status.errback(ConnectionError(f"closed before a status line: {self.head!r}"))


class MountedRoutesDriftTests(TestCase):
    timeout = 30

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._set_up())

    def _locked(self, w: World, audio: bool, **vm: Any) -> str:
        batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=audio))
        w.settle()
        token = w.pool.lock(batch)
        w.settle()
        vmid = w.pool.state.handles[token].vmid
        assert vmid is not None, "no VM assigned"
        record = w.pool.state.vms[vmid]
        fields = {
            "ip": "127.0.0.1",
            "ips": ("127.0.0.1",),
            "capabilities": ("cdp", "vnc", "audio"),
            "vnc_password": "pw",
        }
        w.pool.state.put(attrs.evolve(record, **{**fields, **vm}))
        return token

    async def _set_up(self) -> None:
        # a VNC server that gives one frame to whoever asks (screen.png's 200)
        screen = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: FakeVnc(conversation(32, 20)))
        )
        self.addCleanup(screen.stopListening)
        self.world = w = World()
        w.pool.set_pool_size(0, 10, 60_000)
        w.settle()
        self.shown = self._locked(w, audio=False, vnc_port=screen.getHost().port)
        self.sessionless = self._locked(w, audio=False, vnc_password=None)
        self.sound = self._locked(w, audio=True)
        self.silent = self._locked(w, audio=False)
        self.blind = self._locked(w, audio=True, capabilities=("no-browser",))
        self.nowhere = self._locked(w, audio=True, ip=None, ips=())
        lost = self._locked(w, audio=True)
        vm = w.pool.state.vms[w.pool.state.handles[lost].vmid or ""]
        w.pool.guest_gone(vm.identity or "", "BYE")
        self.lost = lost
        batch = w.pool.prepare_batch(1, HOME, BatchOptions(audio=True))
        w.settle()
        w.pool.lock(batch)  # takes the batch's READY VM
        self.waiting = w.pool.lock(batch)  # and this one waits (the pool is not let run again)
        self.vmid = {
            name: w.pool.state.handles[getattr(self, name)].vmid
            for name in ("sound", "blind", "nowhere", "shown", "sessionless")
        }
        closed = free_port()  # the VMs' servers: nobody listens (a 101 still opens, then closes 4001)
        self.proxies = build_proxies(
            reactor, w.pool, token=TOKEN, cors_origins=[APP], vnc_port=closed, audio_port=closed
        )
        self.port = await self._listen(self.proxies.mounts)
        # the same resources with no room left: the limits' refusals
        targets, gate = (
            PoolTargets(w.pool, vnc_port=closed, audio_port=closed),
            Gate(token=TOKEN, cors_origins=[APP]),
        )
        console_factory = ConsoleFactory(
            clock=reactor, dial=lambda *_: Deferred(), registry=self.proxies.registry
        )
        audio_factory = AudioFactory(clock=reactor, hub=self.proxies.hub)

        def console(**limits: int) -> ConsoleResource:
            return ConsoleResource(
                console_factory,
                gate,
                resolve_handle=targets.console,
                resolve_vm=targets.console_of_vm,
                **limits,
            )

        self.full = {
            "per-key": await self._listen(
                {
                    "console": console(max_per_key=0),
                    "audio": AudioResource(audio_factory, gate, resolve=targets.audio, max_per_handle=0),
                }
            ),
            "total": await self._listen(
                {
                    "console": console(max_total=0),
                    "audio": AudioResource(audio_factory, gate, resolve=targets.audio, max_total=0),
                }
            ),
        }
        self.addCleanup(lambda: ensureDeferred(self._wind_down()))

    async def _listen(self, mounts: dict[str, Any]) -> int:
        static = FilePath(self.mktemp())
        static.makedirs()
        app = make_api(self.world.pool, token=TOKEN, cors_origins=[APP], static_dir=static, mounts=mounts)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(ApiSite(app.resource()))
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port  # type: ignore[attr-defined]
        return number

    async def _wind_down(self) -> None:
        for token in (self.sound, self.silent, self.blind, self.nowhere):
            self.proxies.registry.handle_ended(token, "test over")
        for vmid in self.vmid.values():
            self.proxies.registry.vm_ended(vmid or "", "test over")
        await wait_until(reactor, lambda: self.proxies.registry.total == 0, 5, "every socket closed")
        await deferLater(reactor, 0.6)  # the close grace, and autobahn's batched timers

    async def status(self, port: int, method: str, path: str, headers: str = "") -> int:
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()
        client = StatusLine(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return await client.status

    def test_every_documented_status_and_no_other(self) -> Deferred[None]:
        async def run() -> None:
            p, key, total = self.port, self.full["per-key"], self.full["total"]
            sound, vm = self.sound, self.vmid["sound"]
            admin = f"Authorization: Bearer {TOKEN}\r\n"
            png = "/console/vm/{vmid}/screen.png"
            cases: list[tuple[str, int, str, str, str, int]] = [
                # /console/{handle}
                ("/console/{handle}", p, "GET", f"/console/{sound}", WS + f"Origin: {APP}\r\n", 101),
                ("/console/{handle}", p, "GET", f"/console/{sound}?view_only=1", WS, 101),
                ("/console/{handle}", p, "GET", f"/console/{sound}", BAD_KEY, 400),
                ("/console/{handle}", p, "GET", f"/console/{sound}", EVIL, 403),
                ("/console/{handle}", p, "GET", "/console/no-such-handle", WS, 404),
                ("/console/{handle}", p, "POST", f"/console/{sound}", WS, 405),
                ("/console/{handle}", p, "GET", f"/console/{self.waiting}", WS, 409),
                ("/console/{handle}", p, "GET", f"/console/{self.blind}", WS, 409),
                ("/console/{handle}", p, "GET", f"/console/{self.lost}", WS, 410),
                ("/console/{handle}", p, "GET", f"/console/{sound}", "", 426),
                ("/console/{handle}", key, "GET", f"/console/{sound}", WS, 429),
                ("/console/{handle}", total, "GET", f"/console/{sound}", WS, 503),
                ("/console/{handle}", p, "GET", f"/console/{self.nowhere}", WS, 503),
                # /console/vm/{vmid}
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{vm}?token={TOKEN}", WS, 101),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{vm}", admin + BAD_KEY, 400),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{vm}", WS, 401),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{vm}", admin + EVIL, 403),
                ("/console/vm/{vmid}", p, "GET", "/console/vm/no-such-vm", admin + WS, 404),
                ("/console/vm/{vmid}", p, "POST", f"/console/vm/{vm}", admin + WS, 405),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{self.vmid['blind']}", admin + WS, 409),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{vm}", admin, 426),
                ("/console/vm/{vmid}", key, "GET", f"/console/vm/{vm}", admin + WS, 429),
                ("/console/vm/{vmid}", p, "GET", f"/console/vm/{self.vmid['nowhere']}", admin + WS, 503),
                # /console/vm/{vmid}/screen.png
                (png, p, "GET", f"/console/vm/{self.vmid['shown']}/screen.png", admin, 200),
                (png, p, "GET", f"/console/vm/{vm}/screen.png?width=0", admin, 400),
                (png, p, "GET", f"/console/vm/{vm}/screen.png", "", 401),
                (png, p, "GET", f"/console/vm/{vm}/screen.png", admin + EVIL_ORIGIN, 403),
                (png, p, "GET", "/console/vm/no-such-vm/screen.png", admin, 404),
                (png, p, "GET", f"/console/vm/{self.vmid['blind']}/screen.png", admin, 404),
                (png, p, "POST", f"/console/vm/{vm}/screen.png", admin, 405),
                (png, p, "GET", f"/console/vm/{self.vmid['sessionless']}/screen.png", admin, 409),
                (png, p, "GET", f"/console/vm/{vm}/screen.png", admin, 502),
                (png, p, "GET", f"/console/vm/{self.vmid['nowhere']}/screen.png", admin, 503),
                # /audio/{handle}
                ("/audio/{handle}", p, "GET", f"/audio/{sound}", WS, 101),
                ("/audio/{handle}", p, "GET", f"/audio/{sound}?format=pcm", WS, 101),
                ("/audio/{handle}", p, "GET", f"/audio/{sound}?format=mp3", WS, 400),
                ("/audio/{handle}", p, "GET", f"/audio/{sound}", BAD_KEY, 400),
                ("/audio/{handle}", p, "GET", f"/audio/{sound}", EVIL, 403),
                ("/audio/{handle}", p, "GET", f"/audio/{self.silent}", WS, 404),
                ("/audio/{handle}", p, "POST", f"/audio/{sound}", WS, 405),
                ("/audio/{handle}", p, "GET", f"/audio/{self.waiting}", WS, 409),
                ("/audio/{handle}", p, "GET", f"/audio/{self.blind}", WS, 409),
                ("/audio/{handle}", p, "GET", f"/audio/{self.lost}", WS, 410),
                ("/audio/{handle}", p, "GET", f"/audio/{sound}", "", 426),
                ("/audio/{handle}", key, "GET", f"/audio/{sound}", WS, 429),
                ("/audio/{handle}", total, "GET", f"/audio/{sound}", WS, 503),
                ("/audio/{handle}", p, "GET", f"/audio/{self.nowhere}", WS, 503),
                # /audio/{handle}.ogg
                ("/audio/{handle}.ogg", p, "GET", f"/audio/{sound}.ogg", f"Origin: {APP}\r\n", 200),
                ("/audio/{handle}.ogg", p, "HEAD", f"/audio/{sound}.ogg", "", 200),
                ("/audio/{handle}.ogg", p, "GET", "/audio/no-such-handle.ogg", "", 404),
                ("/audio/{handle}.ogg", p, "GET", f"/audio/{self.silent}.ogg", "", 404),
                ("/audio/{handle}.ogg", p, "POST", f"/audio/{sound}.ogg", "", 405),
                ("/audio/{handle}.ogg", p, "GET", f"/audio/{self.waiting}.ogg", "", 409),
                ("/audio/{handle}.ogg", p, "GET", f"/audio/{self.lost}.ogg", "", 410),
                ("/audio/{handle}.ogg", key, "GET", f"/audio/{sound}.ogg", "", 429),
                ("/audio/{handle}.ogg", total, "GET", f"/audio/{sound}.ogg", "", 503),
                ("/audio/{handle}.ogg", p, "GET", f"/audio/{self.nowhere}.ogg", "", 503),
            ]
            observed: dict[tuple[str, str], set[int]] = defaultdict(set)
            for template, port, method, path, headers, expected_status in cases:
                status = await self.status(port, method, path, headers)
                assert status == expected_status, (method, path, headers, status)
                observed[(template, "GET")].add(status)
            document = openapi_document()["paths"]
            expected = {
                (path, method.upper()): {int(status) for status in operation["responses"]}
                for path, item in document.items()
                if path in MOUNTED_PATHS
                for method, operation in item.items()
            }
            assert dict(observed) == expected
            # and those paths are what the daemon mounts
            assert {path.split("/")[1] for path in MOUNTED_PATHS} == set(self.proxies.mounts)

        return ensureDeferred(run())
