"""The shipped pages and client library, served over a real socket and driven by a real JS engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from tests.api.client import TOKEN
from tests.api.fake_pool import RecordingPool, page_of, sample_handle, sample_vm
from vmcloud.api.app import make_api
from vmcloud.api.openapi import openapi_document
from vmcloud.pool.interfaces import BatchOptions, Cookie, UnknownHandle
from vmcloud.pool.views import HandleStatus

HERE = FilePath(__file__).parent()
STATIC = HERE.parent().parent().child("static")
NODE = shutil.which("node")


class WorkerPool(RecordingPool):
    """A pool whose handle gets its VM on the second look and is unknown once released."""

    def handle_status(self, handle: str) -> HandleStatus:
        looks = sum(1 for name, _ in self.calls if name == "handle_status")
        super().handle_status(handle)
        if looks == 0:
            return HandleStatus(sample_handle(handle, vmid=None), None, audio=False)
        return HandleStatus(sample_handle(handle, vmid="vm3"), sample_vm("vm3"), audio=False)

    def release(self, handle: str) -> None:
        super().release(handle)
        self.raises["handle_status"] = UnknownHandle(f"no handle {handle}")


class ServedFilesTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.pool = WorkerPool()
        self.pool.events = page_of((8, 3.0, {"action": "page-load", "url": "http://a/", "title": "A"}))
        app = make_api(self.pool, token=TOKEN, cors_origins=["*"], static_dir=STATIC)
        self.port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.http = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http.closeCachedConnections)

    async def get(self, path: str) -> tuple[int, str, bytes]:
        response = await treq.get(self.base + path, pool=self.http)
        body = await response.content()
        return response.code, response.headers.getRawHeaders("content-type", [""])[0], body

    def test_monitor_page(self) -> Deferred[None]:
        async def check() -> None:
            status, content_type, body = await self.get("/static/monitor.html")
            self.assertEqual((status, content_type), (200, "text/html"))
            self.assertIn(b'<script src="monitor.js" defer></script>', body)
            self.assertIn(b'<link rel="stylesheet" href="monitor.css">', body)
            for name in ("monitor.js", "monitor.css"):
                status, _, served = await self.get("/static/" + name)
                self.assertEqual((status, served), (200, STATIC.child(name).getContent()))

        return Deferred.fromCoroutine(check())

    def test_client_library(self) -> Deferred[None]:
        async def check() -> None:
            status, content_type, body = await self.get("/static/vmcloud.js")
            self.assertEqual(status, 200)
            self.assertIn("javascript", content_type)
            self.assertEqual(body, STATIC.child("vmcloud.js").getContent())

        return Deferred.fromCoroutine(check())

    def test_js_client_against_the_api(self) -> Deferred[None]:
        """vmcloud.js, run by node, does a worker's whole round against the live API."""
        if NODE is None:
            self.skipTest("node is not installed")

        async def check() -> None:
            out, err, code = await getProcessOutputAndValue(
                NODE,
                [HERE.child("vmcloud_js_check.js").path, self.base, TOKEN, STATIC.child("vmcloud.js").path],
            )
            self.assertEqual(code, 0, err.decode())
            seen = json.loads(out)
            self.assertEqual(seen["batch"], "b1")
            self.assertEqual(seen["handle"], self.pool.handle)
            self.assertEqual(seen["wrongToken"], {"isApiError": True, "status": 401, "code": "unauthorized"})
            self.assertTrue(seen["status"]["assigned"])
            self.assertEqual(
                seen["events"],
                [{"id": 8, "time": 3000, "data": {"action": "page-load", "url": "http://a/", "title": "A"}}],
            )
            self.assertEqual(seen["followEnd"], "stopped")
            self.assertEqual(seen["afterRelease"], "unknown-handle")
            prepared = [args for name, args in self.pool.calls if name == "prepare_batch"]
            options = BatchOptions(cookies=(Cookie("sid", "v"),), audio=True)
            self.assertEqual(prepared, [(2, "https://example.com/a%20b?x=1&y=%2F#top", options)])
            calls = [name for name, _ in self.pool.calls]
            self.assertIn(("renew_expire", (self.pool.handle, 1500)), self.pool.calls)
            self.assertEqual(calls[-2:], ["release", "handle_status"])
            self.check_scripted_outcomes(seen["scripted"])

        return Deferred.fromCoroutine(check())

    def check_scripted_outcomes(self, found: dict[str, Any]) -> None:
        """waitAssigned and followEvents against a scripted fetch: every way a wait can end."""
        hung = [name for name, seen in found.items() if seen.get("hung")]
        self.assertEqual(hung, [], "waits that never ended")
        lost = {"vmid": "vm3", "reason": "the server vanished", "time": 1796410000123}
        self.assertEqual(
            (found["lost"]["error"]["isLostError"], found["lost"]["error"]["lost"], found["lost"]["asked"]),
            (True, lost, 2),
            "a lost VM ends the wait at once",
        )
        for name, timeout in (("timeout", 60), ("hungTimeout", 30)):
            error = found[name]["error"]
            self.assertEqual((error["isTimeoutError"], error["timeout"]), (True, timeout), name)
            self.assertGreaterEqual(found[name]["ms"], timeout - 5, name)
        self.assertGreater(found["timeout"]["asked"], 1, "it polled until the time ran out")
        self.assertEqual(found["hungTimeout"]["asked"], 1, "a request that never answers still times out")
        self.assertEqual(
            (found["retried"]["value"], found["retried"]["errors"], found["retried"]["asked"]),
            ({"assigned": True, "vmid": "vm7"}, ["TypeError", "TypeError", "ApiError"], 5),
            "network errors and a 5xx are retried, then the wait goes on",
        )
        self.assertEqual(
            (found["unknown"]["error"], found["unknown"]["asked"]),
            (
                {"name": "ApiError", "status": 404, "code": "unknown-handle", "isApiError": True}
                | {"isLostError": False, "isTimeoutError": False},
                1,
            ),
            "an unknown handle ends the wait, without retries",
        )
        self.assertEqual(found["aborted"]["error"]["name"], "AbortError")
        self.assertEqual(
            (found["follow"]["value"], found["follow"]["errors"], found["follow"]["asked"]),
            ({"events": [2], "end": "unknown-handle"}, ["TypeError", "ApiError"], 5),
            "followEvents keeps the same retry rule",
        )


class PageSourceTests(SynchronousTestCase):
    def test_library_calls_only_documented_routes(self) -> None:
        source = STATIC.child("vmcloud.js").getContent().decode()
        used = set(re.findall(r'"/([a-z-]+)[/"]', source))
        documented = {path.split("/")[1] for path in openapi_document()["paths"]}
        self.assertTrue(used)
        self.assertLessEqual(used, documented)

    def test_monitor_calls_only_documented_routes(self) -> None:
        source = STATIC.child("monitor.js").getContent().decode()
        used = set(re.findall(r'"/([a-z-]+)[/?"]', source)) - {"static"}
        documented = {path.split("/")[1] for path in openapi_document()["paths"]}
        self.assertTrue({"all-status", "terminate-vm", "console", "release"} <= used, used)
        self.assertLessEqual(used, documented)

    def test_monitor_script_parses(self) -> None:
        if NODE is None:
            self.skipTest("node is not installed")
        page = STATIC.child("monitor.html").getContent().decode()
        self.assertEqual(re.findall(r"<script>(.*?)</script>", page, re.S), [])  # no inline script
        result = subprocess.run(
            [NODE, "--check", STATIC.child("monitor.js").path], capture_output=True, timeout=20
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
