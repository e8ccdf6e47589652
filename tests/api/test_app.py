"""The REST API as an application sees it: every route's answer and every refusal, in memory."""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from zope.interface.verify import verifyObject

from tests.api.client import HANDLE, TOKEN, ApiTestCase
from tests.api.fake_pool import WAITING, RecordingPool, page_of, sample_handle, sample_status, sample_vm
from tests.pool.fakes import World
from vmcloud.api.app import make_api
from vmcloud.pool.interfaces import (
    BatchCancelled,
    BatchOptions,
    Cookie,
    InvalidRequest,
    IPoolControl,
    ShuttingDown,
    UnknownBatch,
    UnknownHandle,
)
from vmcloud.pool.model import LostVM, VMState
from vmcloud.pool.views import HandleStatus

ENCODED_HOME = "http%3A%2F%2Fexample.com%2Fa%3Fb%3Dc"


class FakePoolTests(ApiTestCase):
    def test_fake_is_a_pool_control(self) -> None:
        """The tests' fake keeps to the interface the real pool implements."""
        self.assertTrue(verifyObject(IPoolControl, RecordingPool()))


class SuccessAnswerTests(ApiTestCase):
    """Each route's success answer: status, content type, body, and the pool call it made."""

    def test_set_pool_size(self) -> None:
        answer = self.call("POST", "/set-pool-size/2/4/60000")
        self.assertEqual((answer.status, answer.body, answer.header("content-type")), (204, b"", None))
        self.assertEqual(self.pool.calls, [("set_pool_size", (2, 4, 60000))])

    def test_prepare_batch_bare(self) -> None:
        answer = self.call("POST", f"/prepare-batch/3/{ENCODED_HOME}")
        self.assertEqual((answer.status, answer.body), (200, b"b1"))
        self.assertEqual(answer.header("content-type"), "text/plain; charset=utf-8")
        self.assertEqual(
            self.pool.calls, [("prepare_batch", (3, "http://example.com/a?b=c", BatchOptions()))]
        )

    def test_prepare_batch_json(self) -> None:
        answer = self.call("POST", f"/prepare-batch/1/{ENCODED_HOME}", headers={"Accept": "application/json"})
        self.assertEqual((answer.status, answer.header("content-type")), (200, "application/json"))
        self.assertEqual(answer.json(), {"batch": "b1"})

    def test_homepage_is_decoded_exactly_once(self) -> None:
        """A homepage's own escapes (%3D inside the URL) survive: %253D arrives as %3D, not '='."""
        self.call("POST", "/prepare-batch/1/https%3A%2F%2Fx.org%2Fq%3Fk%3Da%253Db%2520c")
        self.assertEqual(self.pool.calls[0][1][1], "https://x.org/q?k=a%3Db%20c")

    def test_homepage_unicode(self) -> None:
        self.call("POST", "/prepare-batch/1/https%3A%2F%2Fexample.com%2F%C3%A9t%C3%A9")
        self.assertEqual(self.pool.calls[0][1][1], "https://example.com/\u00e9t\u00e9")

    def test_prepare_batch_with_options(self) -> None:
        body = {
            "cookies": [
                {"name": "sid", "value": "42", "domain": "example.com", "secure": True, "httpOnly": True},
                {"name": "lang", "value": "", "path": "/app", "expires": 1893456000},
            ],
            "window": {"width": 1024, "height": 768},
            "audio": True,
        }
        answer = self.call(
            "POST",
            f"/prepare-batch/2/{ENCODED_HOME}",
            headers={"Content-Type": "application/json"},
            body=json.dumps(body).encode(),
        )
        self.assertEqual(answer.status, 200)
        self.assertEqual(
            self.pool.calls[0][1][2],
            BatchOptions(
                cookies=(
                    Cookie("sid", "42", domain="example.com", secure=True, http_only=True),
                    Cookie("lang", "", path="/app", expires=1893456000.0),
                ),
                window_width=1024,
                window_height=768,
                audio=True,
            ),
        )

    def test_lock_bare_and_json(self) -> None:
        bare = self.call("POST", "/lock/b1")
        self.assertEqual(
            (bare.status, bare.body, bare.header("content-type")),
            (200, HANDLE.encode(), "text/plain; charset=utf-8"),
        )
        as_json = self.call("POST", "/lock/b1", headers={"Accept": "text/html, application/json;q=0.9"})
        self.assertEqual(as_json.json(), {"handle": HANDLE, "assigned": True, "vmid": "e1-1"})
        self.pool.status = HandleStatus(sample_handle(vmid=None), None, audio=False)
        waiting = self.call("POST", "/lock/b1", headers={"Accept": "application/json"})
        self.assertEqual(waiting.json(), {"handle": HANDLE, "assigned": False})
        self.assertEqual([c for c in self.pool.calls if c[0] == "lock"], [("lock", ("b1",))] * 3)

    def test_release(self) -> None:
        answer = self.call("POST", f"/release/{HANDLE}")
        self.assertEqual((answer.status, answer.body), (204, b""))
        self.assertEqual(self.pool.calls, [("release", (HANDLE,))])

    def test_handle_status(self) -> None:
        answer = self.call("GET", f"/handle-status/{HANDLE}")
        self.assertEqual((answer.status, answer.header("content-type")), (200, "application/json"))
        self.assertEqual(
            answer.json(),
            {
                "assigned": True,
                "batch": "b1",
                "expires": True,
                "expireTime": 1700000600250,
                "vmid": "e1-1",
                "vm": {
                    "vmid": "e1-1",
                    "state": "OCCUPIED",
                    "since": 1699999970250,
                    "recovering": False,
                    "console": f"/console/{HANDLE}",
                    "audio": f"/audio/{HANDLE}",
                    "vncPassword": "pw123456",
                },
            },
        )
        self.assertEqual(answer.header("cache-control"), "no-store")

    def test_handle_status_of_a_handle_that_lost_its_vm(self) -> None:
        lost = LostVM("e1-1", "guest gone: BYE", 1_700_000_001.5)
        self.pool.status = HandleStatus(sample_handle(vmid=None, lost=lost), None, audio=False)
        answer = self.call("GET", f"/handle-status/{HANDLE}")
        self.assertEqual(
            answer.json(),
            {
                "assigned": False,
                "batch": "b1",
                "expires": True,
                "expireTime": 1700000600250,
                "lost": {"vmid": "e1-1", "reason": "guest gone: BYE", "time": 1700000001500},
            },
        )

    def test_renew_expire(self) -> None:
        answer = self.call("POST", f"/renew-expire/{HANDLE}/1000")
        self.assertEqual((answer.status, answer.body), (204, b""))
        self.assertEqual(self.pool.calls, [("renew_expire", (HANDLE, 1000))])

    def test_last_event_id_bare_and_json(self) -> None:
        bare = self.call("GET", f"/last-event-id/{HANDLE}")
        self.assertEqual((bare.status, bare.body), (200, b"7"))
        as_json = self.call("GET", f"/last-event-id/{HANDLE}", headers={"Accept": "application/json"})
        self.assertEqual(as_json.json(), {"lastId": 7})

    def test_fetch_events(self) -> None:
        self.pool.events = page_of(
            (8, 1.5, {"action": "page-load", "url": "http://a/", "title": "A"}),
            (9, 2.5, {"action": "page-load", "url": "http://b/", "title": "B"}),
        )
        answer = self.call("GET", f"/fetch-events/{HANDLE}/7")
        self.assertEqual((answer.status, answer.header("content-type")), (200, "application/json"))
        self.assertEqual(
            answer.json(),
            {
                "lastId": 9,
                "newEvents": [
                    {
                        "id": 8,
                        "time": 1500,
                        "data": {"action": "page-load", "url": "http://a/", "title": "A"},
                    },
                    {
                        "id": 9,
                        "time": 2500,
                        "data": {"action": "page-load", "url": "http://b/", "title": "B"},
                    },
                ],
                "dropped": 0,
            },
        )
        self.assertEqual(self.pool.calls, [("fetch_events", (HANDLE, 7, 5.0))])

    def test_cancel_batch(self) -> None:
        answer = self.call("POST", "/cancel-batch/b1")
        self.assertEqual((answer.status, answer.body), (204, b""))
        self.assertEqual(self.pool.calls, [("cancel_batch", ("b1",))])

    def test_shutdown(self) -> None:
        answer = self.call("POST", "/shutdown")
        self.assertEqual((answer.status, answer.body), (202, b""))
        self.assertEqual(self.pool.calls, [("shutdown", ())])

    def test_all_status(self) -> None:
        """The whole document, keys in their order: what the monitor and scripts read."""
        answer = self.call("GET", "/all-status")
        self.assertEqual((answer.status, answer.header("content-type")), (200, "application/json"))
        self.assertEqual(answer.header("cache-control"), "no-store")
        vm = {
            "vmid": "e1-1",
            "state": "OCCUPIED",
            "version": 5,
            "since": 1699999970250,
            "serverId": "srv-e1-1",
            "identity": "guest-e1-1",
            "ip": "10.0.0.7",
            "mac": "52:54:00:12:34:56",
            "batch": "b1",
            "handle": HANDLE,
            "lastUsed": 1699999970250,
            "recovering": False,
            "reason": None,
            "capabilities": ["cdp", "vnc", "audio"],
            "image": None,
            "outdated": False,
        }
        expected = {
            "poolSize": {
                "min": 1,
                "max": 4,
                "linger": 60000,
                "effectiveMin": 1,
                "effectiveMax": 4,
                "maxPoolSize": 30,
            },
            "vms": [
                vm,
                {
                    **vm,
                    "vmid": "e1-2",
                    "state": "WAIT",
                    "serverId": "srv-e1-2",
                    "identity": "guest-e1-2",
                    "handle": None,
                },
            ],
            "batches": [
                {
                    "id": "b1",
                    "size": 2,
                    "homepage": "https://example.com/",
                    "cancelled": False,
                    "createdAt": 1699999940250,
                    "ready": 0,
                    "preparing": 1,
                    "occupied": 1,
                    "pendingLocks": 1,
                }
            ],
            "preps": [
                {"batch": "b1", "vmid": "e1-2", "state": "preparing", "since": 1699999999250},
                {"batch": "b1", "vmid": None, "state": "queued"},
            ],
            "handles": [
                {
                    "handle": HANDLE,
                    "batch": "b1",
                    "vmid": "e1-1",
                    "createdAt": 1699999969250,
                    "expireTime": 1700000600250,
                    "lost": None,
                    "lastEventId": 1,
                    "events": 1,
                    "droppedEvents": 0,
                },
                {
                    "handle": WAITING,
                    "batch": "b1",
                    "vmid": None,
                    "createdAt": 1699999969250,
                    "expireTime": 1700000600250,
                    "lost": None,
                    "lastEventId": 0,
                    "events": 0,
                    "droppedEvents": 0,
                },
            ],
            "pendingLocks": [{"handle": WAITING, "batch": "b1", "since": 1699999995250}],
            "cloud": {
                "driver": "fake",
                "backingOff": True,
                "backoffUntil": 1700000005250,
                "quotaExceeded": False,
                "quotaRetryAt": None,
                "failures": 1,
                "quotaRefusals": 0,
                "bootFailures": 0,
                "bootBackoffUntil": None,
                "lastError": "boom",
                "lastErrorAt": 1699999999250,
                "lastListingAt": 1699999998250,
                "strays": 0,
                "image": None,
                "outdatedVMs": 0,
            },
            "shuttingDown": False,
            "reconciler": {"passes": 12, "lastPassMs": 1.5, "slowestPassMs": 20.0},
            "time": 1700000000250,
            "version": 42,
        }
        self.assertEqual(answer.body, json.dumps(expected, separators=(",", ":")).encode())
        self.assertEqual(self.pool.calls, [("all_status", ())])

    def test_terminate_vm(self) -> None:
        answer = self.call("POST", "/terminate-vm/e1-1")
        self.assertEqual((answer.status, answer.body, answer.header("content-type")), (204, b"", None))
        self.assertEqual(self.pool.calls, [("terminate_vm", ("e1-1",))])

    def test_metrics(self) -> None:
        answer = self.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.header("content-type").startswith("text/plain; version=0.0.4"))
        lines = answer.body.decode().splitlines()
        for expected in (
            'vmcloud_vms{state="FREE"} 0.0',
            'vmcloud_vms{state="WAIT"} 1.0',
            'vmcloud_vms{state="OCCUPIED"} 1.0',
            "vmcloud_pool_size_max 4.0",
            "vmcloud_batches 1.0",
            "vmcloud_handles 2.0",
            "vmcloud_pending_locks 1.0",
        ):
            self.assertIn(expected, lines)

    def test_index_redirects_to_monitor(self) -> None:
        answer = self.call("GET", "/")
        self.assertEqual((answer.status, answer.header("location")), (302, "/static/monitor.html"))

    def test_openapi_served(self) -> None:
        answer = self.call("GET", "/openapi.json")
        self.assertEqual((answer.status, answer.header("content-type")), (200, "application/json"))
        self.assertEqual(answer.json()["openapi"], "3.1.0")


class BadInputTests(ApiTestCase):
    """Every bad input answers 4xx JSON, never reaches the pool, and logs no traceback.

    (trial fails a test that leaves a logged failure behind, so "no traceback" is checked for free.)
    """

    def refused(self, method: str, path: str, status: int, code: str, **kwargs) -> None:
        answer = self.call(method, path, **kwargs)
        self.assert_error(answer, status, code)
        self.assertNotIn("Traceback", answer.body.decode())

    def test_non_integers(self) -> None:
        for path in (
            "/set-pool-size/two/4/100",
            "/set-pool-size/2/4.5/100",
            "/set-pool-size/2/4/1e3",
            "/set-pool-size/+2/4/100",
            "/set-pool-size/%202/4/100",
            "/set-pool-size/2_0/4/100",
            f"/prepare-batch/x/{ENCODED_HOME}",
            f"/renew-expire/{HANDLE}/soon",
            f"/renew-expire/{HANDLE}/99999999999999999999",
        ):
            with self.subTest(path=path):
                self.refused("POST", path, 400, "bad-request")
        self.refused("GET", f"/fetch-events/{HANDLE}/last", 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_negative_numbers(self) -> None:
        self.refused("POST", "/set-pool-size/-1/4/100", 400, "bad-request")
        self.refused("POST", "/set-pool-size/1/4/-100", 400, "bad-request")
        self.refused("POST", f"/prepare-batch/-2/{ENCODED_HOME}", 400, "bad-request")
        self.refused("POST", f"/renew-expire/{HANDLE}/-5", 400, "bad-request")
        self.refused("GET", f"/fetch-events/{HANDLE}/-1", 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_message_names_the_parameter(self) -> None:
        answer = self.call("POST", "/set-pool-size/1/x/100")
        self.assertIn("max", self.assert_error(answer, 400, "bad-request")["message"])

    def test_min_above_max_refused_by_pool(self) -> None:
        self.pool.raises["set_pool_size"] = InvalidRequest("min 5 > max 2")
        answer = self.call("POST", "/set-pool-size/5/2/100")
        self.assertEqual(self.assert_error(answer, 400, "bad-request")["message"], "min 5 > max 2")

    def test_bad_homepages(self) -> None:
        for homepage in (
            "ftp%3A%2F%2Fexample.com%2F",
            "javascript%3Aalert(1)",
            "file%3A%2F%2F%2Fetc%2Fpasswd",
            "http%3A%2F%2F",
            "example.com",
            "http%3A%2F%2Fexa%20mple.com",
            "http%3A%2F%2Fexample.com%2F%FF",
            "http%3A%2F%2F" + "a" * 5000 + ".com",
        ):
            with self.subTest(homepage=homepage[:40]):
                self.refused("POST", f"/prepare-batch/1/{homepage}", 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_unencoded_homepage_explains_encoding(self) -> None:
        answer = self.call("POST", "/prepare-batch/1/http://example.com/a")
        self.assertIn("%2F", self.assert_error(answer, 400, "bad-request")["message"])
        self.assertEqual(self.pool.calls, [])

    def test_bad_bodies(self) -> None:
        for body in (
            b"{not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"cookie": []}',
            b'{"cookies": {}}',
            b'{"cookies": [{"name": "a"}]}',
            b'{"cookies": [{"name": "", "value": "v"}]}',
            b'{"cookies": [{"name": 3, "value": "v"}]}',
            b'{"cookies": [{"name": "a", "value": "v", "secure": "yes"}]}',
            b'{"cookies": [{"name": "a", "value": "v", "expires": "tomorrow"}]}',
            b'{"cookies": [{"name": "a", "value": "v", "sameSite": "Lax"}]}',
            b'{"cookies": [{"name": "a", "value": "line\\nbreak"}]}',
            b'{"window": {"width": 0, "height": 600}}',
            b'{"window": {"width": true}}',
            b'{"window": [800, 600]}',
            b'{"audio": "yes"}',
            b'{"cookies": [' + b",".join([b'{"name": "a", "value": "v"}'] * 101) + b"]}",
            b'{"cookies": [{"name": "a", "value": "' + b"v" * 70000 + b'"}]}',
        ):
            with self.subTest(body=body[:50]):
                self.refused("POST", f"/prepare-batch/1/{ENCODED_HOME}", 400, "bad-request", body=body)
        self.assertEqual(self.pool.calls, [])

    def test_unknown_route(self) -> None:
        self.refused("GET", "/no-such-thing", 404, "not-found")
        self.refused("POST", "/lock", 404, "not-found")
        self.refused("POST", "/set-pool-size/1/2", 404, "not-found")

    def test_wrong_method(self) -> None:
        answer = self.call("GET", "/lock/b1")
        self.assert_error(answer, 405, "method-not-allowed")
        self.assertEqual(answer.header("allow"), "POST")
        self.refused("POST", f"/handle-status/{HANDLE}", 405, "method-not-allowed")
        self.refused("DELETE", "/shutdown", 405, "method-not-allowed")
        self.assertEqual(self.pool.calls, [])

    def test_non_utf8_path(self) -> None:
        self.refused("POST", "/lock/%FF%FE", 400, "bad-request")

    def test_pool_errors_keep_status_and_code(self) -> None:
        cases = [
            ("lock", "POST", "/lock/nope", UnknownBatch("no batch 'nope'"), 404, "unknown-batch"),
            ("lock", "POST", "/lock/b1", BatchCancelled("batch b1 is cancelled"), 409, "batch-cancelled"),
            ("cancel_batch", "POST", "/cancel-batch/nope", UnknownBatch("no batch"), 404, "unknown-batch"),
            ("release", "POST", "/release/gone", UnknownHandle("no handle"), 404, "unknown-handle"),
            (
                "handle_status",
                "GET",
                "/handle-status/gone",
                UnknownHandle("no handle"),
                404,
                "unknown-handle",
            ),
            (
                "renew_expire",
                "POST",
                "/renew-expire/gone/5",
                UnknownHandle("no handle"),
                404,
                "unknown-handle",
            ),
            (
                "last_event_id",
                "GET",
                "/last-event-id/gone",
                UnknownHandle("no handle"),
                404,
                "unknown-handle",
            ),
            (
                "fetch_events",
                "GET",
                "/fetch-events/gone/0",
                UnknownHandle("no handle"),
                404,
                "unknown-handle",
            ),
            (
                "prepare_batch",
                "POST",
                f"/prepare-batch/9/{ENCODED_HOME}",
                ShuttingDown("shutting down"),
                409,
                "shutting-down",
            ),
            (
                "prepare_batch",
                "POST",
                f"/prepare-batch/99/{ENCODED_HOME}",
                InvalidRequest("size 99 > cap 30"),
                400,
                "bad-request",
            ),
        ]
        for method_name, method, path, error, status, code in cases:
            with self.subTest(path=path, code=code):
                self.pool.raises = {method_name: error}
                answer = self.call(method, path)
                self.assertEqual(self.assert_error(answer, status, code)["message"], error.message)

    def test_refusal_is_logged_with_reason_but_not_the_handle(self) -> None:
        self.pool.raises["release"] = UnknownHandle("no such handle")
        with capturedLogs() as events:
            self.call("POST", f"/release/{HANDLE}")
        refused = [e for e in events if e.get("event") == "api-refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual((refused[0]["status"], refused[0]["code"]), (404, "unknown-handle"))
        self.assertEqual(refused[0]["where"], "/release/<handle>")
        self.assertNotIn(HANDLE, repr(refused[0]))


class InternalErrorTests(ApiTestCase):
    def test_unexpected_exception_is_500_json_without_traceback(self) -> None:
        self.pool.raises["all_status"] = RuntimeError("database password is hunter2")
        with capturedLogs() as events:
            answer = self.call("GET", "/all-status")
        self.assert_error(answer, 500, "internal-error")
        body = answer.body.decode()
        for leak in ("hunter2", "Traceback", "RuntimeError", "app.py"):
            self.assertNotIn(leak, body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        logged = [e for e in events if e.get("event") == "api-internal-error"]
        self.assertEqual(len(logged), 1)
        # The client's message carries the reference that finds the log line.
        self.assertIn(logged[0]["reference"], answer.json()["message"])

    def test_unserializable_status_is_500(self) -> None:
        vm = attrs.evolve(sample_vm(), capabilities=(object(),))
        self.pool.everything = attrs.evolve(sample_status(), vms=(vm,))
        self.assert_error(self.call("GET", "/all-status"), 500, "internal-error")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_async_failure_in_long_poll_is_500(self) -> None:
        self.pool.hold_events = True
        d = self.start("GET", f"/fetch-events/{HANDLE}/0")
        self.pool.pending_fetch.errback(ValueError("boom"))
        self.assert_error(self.finish(d), 500, "internal-error")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class AuthTests(ApiTestCase):
    token = TOKEN

    ADMIN_ROUTES = (
        ("POST", "/set-pool-size/1/2/3"),
        ("POST", f"/prepare-batch/1/{ENCODED_HOME}"),
        ("POST", "/lock/b1"),
        ("POST", "/cancel-batch/b1"),
        ("POST", "/shutdown"),
        ("GET", "/all-status"),
        ("GET", "/metrics"),
    )
    HANDLE_ROUTES = (
        ("POST", f"/release/{HANDLE}"),
        ("GET", f"/handle-status/{HANDLE}"),
        ("POST", f"/renew-expire/{HANDLE}/100"),
        ("GET", f"/last-event-id/{HANDLE}"),
        ("GET", f"/fetch-events/{HANDLE}/0"),
    )

    def test_admin_routes_need_the_token(self) -> None:
        for method, path in self.ADMIN_ROUTES:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Bearer"},
            ):
                with self.subTest(path=path, headers=headers):
                    answer = self.call(method, path, headers=headers)
                    self.assert_error(answer, 401, "unauthorized")
                    self.assertEqual(answer.header("www-authenticate"), 'Bearer realm="vmcloud"')
        self.assertEqual(self.pool.calls, [], "nothing reached the pool without the token")

    def test_admin_routes_with_the_token(self) -> None:
        for method, path in self.ADMIN_ROUTES:
            with self.subTest(path=path):
                answer = self.call(method, path, headers=self.admin())
                self.assertIn(answer.status, (200, 202, 204))
        self.assertEqual(len(self.pool.calls), len(self.ADMIN_ROUTES))

    def test_bearer_scheme_is_case_insensitive(self) -> None:
        answer = self.call("GET", "/all-status", headers={"Authorization": f"bearer {TOKEN}"})
        self.assertEqual(answer.status, 200)

    def test_unauthorized_answer_comes_before_input_checks(self) -> None:
        """Without the token, bad input is not even looked at (nothing to learn by probing)."""
        self.assert_error(self.call("POST", "/set-pool-size/x/y/z"), 401, "unauthorized")

    def test_handle_routes_need_only_the_handle(self) -> None:
        for method, path in self.HANDLE_ROUTES:
            with self.subTest(path=path):
                self.assertIn(self.call(method, path).status, (200, 204))

    def test_public_pages(self) -> None:
        self.assertEqual(self.call("GET", "/").status, 302)
        self.assertEqual(self.call("GET", "/openapi.json").status, 200)
        self.assertEqual(self.call("HEAD", "/static/monitor.html").status, 200)

    def test_no_token_means_no_auth(self) -> None:
        self.token = None
        self.make()
        for method, path in self.ADMIN_ROUTES:
            with self.subTest(path=path):
                self.assertIn(self.call(method, path).status, (200, 202, 204))


class CorsTests(ApiTestCase):
    token = TOKEN
    origin = {"Origin": "https://worker.example"}

    def test_handle_routes_allow_any_origin(self) -> None:
        for method, path in AuthTests.HANDLE_ROUTES:
            with self.subTest(path=path):
                answer = self.call(method, path, headers=self.origin)
                self.assertEqual(answer.header("access-control-allow-origin"), "*")

    def test_errors_on_handle_routes_are_readable_cross_origin(self) -> None:
        self.pool.raises["handle_status"] = UnknownHandle("no handle")
        answer = self.call("GET", "/handle-status/gone", headers=self.origin)
        self.assert_error(answer, 404, "unknown-handle")
        self.assertEqual(answer.header("access-control-allow-origin"), "*")

    def test_admin_routes_get_no_cors(self) -> None:
        answer = self.call("GET", "/all-status", headers={**self.origin, **self.admin()})
        self.assertIsNone(answer.header("access-control-allow-origin"))

    def test_preflight(self) -> None:
        for method, path in AuthTests.HANDLE_ROUTES:
            with self.subTest(path=path):
                answer = self.call(
                    "OPTIONS",
                    path,
                    headers={**self.origin, "Access-Control-Request-Method": method},
                )
                self.assertEqual((answer.status, answer.body), (204, b""))
                self.assertEqual(answer.header("access-control-allow-origin"), "*")
                self.assertEqual(answer.header("access-control-allow-methods"), f"{method}, OPTIONS")
                self.assertIn("Content-Type", answer.header("access-control-allow-headers"))
        self.assertEqual(self.pool.calls, [], "a preflight does nothing to the pool")

    def test_no_preflight_on_admin_routes(self) -> None:
        self.assert_error(self.call("OPTIONS", "/lock/b1", headers=self.origin), 405, "method-not-allowed")


class CorsListTests(ApiTestCase):
    cors_origins = ("https://worker.example", "https://other.example/")

    def test_listed_origin_is_echoed(self) -> None:
        for origin in ("https://worker.example", "https://other.example"):
            answer = self.call("GET", f"/handle-status/{HANDLE}", headers={"Origin": origin})
            self.assertEqual(answer.header("access-control-allow-origin"), origin)
            self.assertEqual(answer.header("vary"), "Origin")

    def test_other_origin_is_not_allowed(self) -> None:
        answer = self.call("GET", f"/handle-status/{HANDLE}", headers={"Origin": "https://evil.example"})
        self.assertIsNone(answer.header("access-control-allow-origin"))
        preflight = self.call("OPTIONS", f"/release/{HANDLE}", headers={"Origin": "https://evil.example"})
        self.assertEqual(preflight.status, 204)
        self.assertIsNone(preflight.header("access-control-allow-methods"))


class LongPollTests(ApiTestCase):
    def test_wait_passes_through(self) -> None:
        self.call("GET", f"/fetch-events/{HANDLE}/3?wait=2.5")
        self.call("GET", f"/fetch-events/{HANDLE}/3?wait=0")
        self.assertEqual(
            [c[1][2] for c in self.pool.calls],
            [2.5, 0.0],
        )

    def test_wait_is_capped(self) -> None:
        self.call("GET", f"/fetch-events/{HANDLE}/3?wait=3600")
        self.assertEqual(self.pool.calls, [("fetch_events", (HANDLE, 3, 30.0))])

    def test_default_is_configurable(self) -> None:
        self.make(long_poll_default=1.5, max_long_poll=10.0)
        self.call("GET", f"/fetch-events/{HANDLE}/0")
        self.assertEqual(self.pool.calls, [("fetch_events", (HANDLE, 0, 1.5))])

    def test_bad_wait(self) -> None:
        for wait in ("abc", "-1", "1e3", "nan", "inf", ""):
            with self.subTest(wait=wait):
                self.assert_error(
                    self.call("GET", f"/fetch-events/{HANDLE}/0?wait={wait}"), 400, "bad-request"
                )
        self.assertEqual(self.pool.calls, [])

    def test_answer_arrives_when_the_pool_has_events(self) -> None:
        self.pool.hold_events = True
        d = self.start("GET", f"/fetch-events/{HANDLE}/4?wait=20")
        self.assertNoResult(d)
        data = {"action": "page-load", "url": "http://a/", "title": "A"}
        self.pool.pending_fetch.callback(page_of((5, 10.0, data)))
        answer = self.finish(d)
        expected = {"lastId": 5, "newEvents": [{"id": 5, "time": 10000, "data": data}], "dropped": 0}
        self.assertEqual((answer.status, answer.json()), (200, expected))

    def test_client_going_away_cancels_the_wait_quietly(self) -> None:
        """A worker page closed mid-poll: the pool's wait is cancelled and nothing is logged as an error."""
        self.pool.hold_events = True
        d = self.start("GET", f"/fetch-events/{HANDLE}/4?wait=20")
        d.cancel()
        self.treq.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.pool.cancelled_fetches, 1)


class StatusLongPollTests(ApiTestCase):
    """GET /all-status?since=<version>&wait=<seconds>: the monitor's long poll, through the fake."""

    def test_since_and_wait_pass_through(self) -> None:
        answer = self.call("GET", "/all-status?since=41&wait=2.5")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.json()["version"], 42)
        self.call("GET", "/all-status?since=0")
        self.call("GET", "/all-status?since=41&wait=3600")
        self.assertEqual(
            self.pool.calls,
            [("status_after", (41, 2.5)), ("status_after", (0, 5.0)), ("status_after", (41, 30.0))],
        )

    def test_the_cap_is_the_lower_of_30_s_and_the_long_poll_cap(self) -> None:
        self.make(max_long_poll=60.0)
        self.call("GET", "/all-status?since=1&wait=45")
        self.make(max_long_poll=2.0)
        self.call("GET", "/all-status?since=1&wait=45")
        self.assertEqual([c[1][1] for c in self.pool.calls], [30.0, 2.0])

    def test_without_since_it_answers_at_once(self) -> None:
        self.call("GET", "/all-status?wait=20")
        self.assertEqual(self.pool.calls, [("all_status", ())])

    def test_bad_since_or_wait(self) -> None:
        for query in (
            "since=x",
            "since=-1",
            "since=1.5",
            "since=",
            "since=1&wait=abc",
            "since=1&wait=-1",
            "wait=nan",
        ):
            with self.subTest(query=query):
                self.assert_error(self.call("GET", f"/all-status?{query}"), 400, "bad-request")
        self.assertEqual(self.pool.calls, [])

    def test_answer_arrives_when_the_pool_answers(self) -> None:
        self.pool.hold_status = True
        d = self.start("GET", "/all-status?since=42&wait=20")
        self.assertNoResult(d)
        assert self.pool.pending_status is not None
        self.pool.pending_status.callback(attrs.evolve(sample_status(), version=43))
        answer = self.finish(d)
        self.assertEqual((answer.status, answer.json()["version"]), (200, 43))

    def test_client_going_away_cancels_the_wait_quietly(self) -> None:
        self.pool.hold_status = True
        d = self.start("GET", "/all-status?since=42&wait=20")
        d.cancel()
        self.treq.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.pool.cancelled_status_waits, 1)


class RealPoolTests(SynchronousTestCase):
    """The new routes over a real pool on a Clock: the long poll woken by a change, terminate-vm."""

    def setUp(self) -> None:
        self.world = World()
        self.world.pool.set_pool_size(1, 2, 60_000)
        self.world.settle()
        static = FilePath(self.mktemp())
        static.makedirs()
        app = make_api(self.world.pool, token=None, cors_origins=["*"], static_dir=static)
        self.treq = StubTreq(app.resource())

    def start(self, method: str, path: str) -> Deferred[Any]:
        d = self.treq.request(method, "http://vmcloud.test" + path)
        self.treq.flush()
        return d

    def answer(self, d: Deferred[Any]) -> tuple[int, Any]:
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, json.loads(body) if body else None

    def test_long_poll_woken_by_a_change(self) -> None:
        _, status = self.answer(self.start("GET", "/all-status"))
        d = self.start("GET", f"/all-status?since={status['version']}&wait=20")
        self.world.clock.advance(5)
        self.assertNoResult(d)
        self.world.pool.prepare_batch(1, "https://example.org/", BatchOptions())
        self.world.turn()
        code, after = self.answer(d)
        self.assertEqual(code, 200)
        self.assertNotEqual(after["version"], status["version"])
        self.assertEqual(len(after["batches"]), 1)

    def test_a_client_going_away_leaves_no_timer(self) -> None:
        _, status = self.answer(self.start("GET", "/all-status"))
        timers = len(self.world.clock.getDelayedCalls())
        d = self.start("GET", f"/all-status?since={status['version']}&wait=20")
        self.assertEqual(len(self.world.clock.getDelayedCalls()), timers + 1)
        d.cancel()
        self.treq.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.world.clock.getDelayedCalls()), timers)

    def test_terminate_vm(self) -> None:
        (vm,) = self.world.vms()
        code, body = self.answer(self.start("POST", f"/terminate-vm/{vm.vmid}"))
        self.assertEqual((code, body), (204, None))
        self.assertEqual(self.world.state.vms[vm.vmid].state, VMState.ERROR)
        code, body = self.answer(self.start("POST", "/terminate-vm/no-such-vm"))
        self.assertEqual((code, body["error"]), (404, "unknown-vm"))
        self.world.pool.shutdown()
        code, body = self.answer(self.start("POST", f"/terminate-vm/{vm.vmid}"))
        self.assertEqual((code, body["error"]), (409, "shutting-down"))
