"""NoBrowser: what the controller sees from a guest before the real browser stack exists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from guest_agent.browser import (
    NO_BROWSER,
    BrowserRequestError,
    IBrowser,
    NoBrowser,
    check_prepare_request,
)
from vmcloud.words.cookies import Cookie

HOME = "https://crowd.example/task?id=7"
COOKIE = {
    "name": "worker",
    "value": "w-42",
    "domain": ".crowd.example",
    "path": "/",
    "secure": True,
    "httpOnly": True,
    "expires": 1900000000,
}


class NoBrowserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.loads: list[tuple[str, str]] = []
        self.browser = NoBrowser(
            self.clock, on_page_load=lambda event: self.loads.append((event["url"], event["title"]))
        )

    def prepare(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return self.successResultOf(ensureDeferred(self.browser.prepare(*args, **kw)))

    def cleanup(self) -> dict[str, Any]:
        return self.successResultOf(ensureDeferred(self.browser.cleanup()))

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IBrowser, self.browser))
        self.assertEqual(self.browser.capabilities, ("no-browser",))

    def test_prepare_records_and_reports_the_home_page_after_answering(self) -> None:
        answer = self.prepare(HOME, [COOKIE], (1024, 768), False)
        self.assertEqual(answer["browser"], NO_BROWSER)
        self.assertEqual(answer["capabilities"], ["no-browser"])
        self.assertEqual(answer["homepage"], HOME)
        self.assertEqual(answer["window"], {"width": 1024, "height": 768})
        self.assertEqual(answer["cookies"], 1)
        self.assertEqual(self.loads, [], "the page-load event must follow the answer, not precede it")
        self.clock.advance(0)
        self.assertEqual(self.loads, [(HOME, "")])
        prepared = self.browser.prepared
        assert prepared is not None
        self.assertEqual(
            prepared.cookies,
            (Cookie("worker", "w-42", ".crowd.example", "/", True, True, 1900000000.0),),
        )

    def test_audio_is_not_pretended(self) -> None:
        self.assertIs(self.prepare(HOME, [], {"width": 800, "height": 600}, True)["audio"], False)
        prepared = self.browser.prepared
        assert prepared is not None
        self.assertTrue(prepared.audio)

    def test_cleanup_forgets_and_drops_an_unreported_event(self) -> None:
        self.prepare(HOME, [], (800, 600), False)
        self.assertEqual(self.cleanup(), {"browser": NO_BROWSER, "wasPrepared": True})
        self.clock.advance(1)
        self.assertEqual(self.loads, [])
        self.assertIsNone(self.browser.prepared)
        self.assertEqual(self.cleanup()["wasPrepared"], False)

    def test_prepare_again_replaces(self) -> None:
        self.prepare(HOME, [], (800, 600), False)
        answer = self.prepare("http://other.example/", [], (800, 600), False)
        self.assertTrue(answer["replaced"])
        self.clock.advance(0)
        self.assertEqual(self.loads, [("http://other.example/", "")])

    def test_refused_request_changes_nothing(self) -> None:
        self.prepare(HOME, [], (800, 600), False)
        failure = self.failureResultOf(
            ensureDeferred(self.browser.prepare("javascript:alert(1)", [], (800, 600), False)),
            BrowserRequestError,
        )
        self.assertIn("http or https", str(failure.value))
        prepared = self.browser.prepared
        assert prepared is not None
        self.assertEqual(prepared.homepage, HOME)

    def test_listener_set_later_and_failing_listener_is_logged(self) -> None:
        browser = NoBrowser(self.clock)
        self.successResultOf(ensureDeferred(browser.prepare(HOME, [], (800, 600), False)))
        self.clock.advance(0)  # no listener yet: nothing to do, nothing breaks

        def broken(event: Mapping[str, Any]) -> None:
            raise RuntimeError("controller gone")

        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        browser.on_page_load = broken
        self.successResultOf(ensureDeferred(browser.prepare(HOME, [], (800, 600), False)))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("page-load-listener-failed", [e.get("event") for e in events])

    def test_vnc_password_is_kept_but_not_shown(self) -> None:
        self.prepare(HOME, [], (800, 600), False, vnc_password="hunter22")
        prepared = self.browser.prepared
        assert prepared is not None
        self.assertEqual(prepared.vnc_password, "hunter22")
        self.assertNotIn("hunter22", repr(prepared))


class ValidationTests(SynchronousTestCase):
    def refused(self, **kw: Any) -> str:
        request = {"homepage": HOME, "cookies": [], "window": (800, 600), "audio": False, **kw}
        with self.assertRaises(BrowserRequestError) as caught:
            check_prepare_request(
                request["homepage"],
                request["cookies"],
                request["window"],
                request["audio"],
                vnc_password=request.get("vnc_password"),
            )
        return str(caught.exception)

    def test_homepage(self) -> None:
        for bad in ["", "ftp://x/", "javascript:alert(1)", "http://", "http://a b/", "x" * 9000, 42, None]:
            self.assertIn("homepage", self.refused(homepage=bad), bad)

    def test_window(self) -> None:
        for bad in [(10, 600), (800, 20000), (800.5, 600), ("800", "600"), (True, 600), 800, {"w": 1}]:
            self.assertIn("window", self.refused(window=bad), bad)
        self.assertEqual(check_prepare_request(HOME, [], {}, False).window_width, 1280)
        self.assertEqual(check_prepare_request(HOME, [], [640, 480], False).window_height, 480)

    def test_cookies(self) -> None:
        cases = [
            ("not a list", "cookies must be a list"),
            ([{"value": "x"}], "cookie 1: name"),
            ([COOKIE, {"name": "a b", "value": "x"}], "cookie 2: name"),
            ([{"name": "a", "value": "x;y"}], "cookie 'a': value"),
            ([{"name": "a", "value": 7}], "cookie 'a': value"),
            ([{"name": "a", "value": "x", "domain": "bad domain"}], "cookie 'a': domain"),
            ([{"name": "a", "value": "x", "path": "relative"}], "cookie 'a': path"),
            ([{"name": "a", "value": "x", "secure": "yes"}], "cookie 'a': secure"),
            ([{"name": "a", "value": "x", "expires": "tomorrow"}], "cookie 'a': expires"),
            ([{"name": "a", "value": "x", "expires": float("nan")}], "cookie 'a': expires"),
            ([{"name": "a", "value": "x", "sameSite": "Lax"}], "cookie 1: unknown field 'sameSite'"),
            (["a=b"], "cookie 1: must be an object"),
            ([{"name": f"c{i}", "value": "v"} for i in range(201)], "at most 200 cookies"),
        ]
        for cookies, message in cases:
            self.assertIn(message, self.refused(cookies=cookies))

    def test_minimal_cookie_defaults(self) -> None:
        prepared = check_prepare_request(HOME, [{"name": "sid", "value": ""}], (800, 600), False)
        self.assertEqual(prepared.cookies, (Cookie(name="sid", value=""),))

    def test_audio_and_vnc_password(self) -> None:
        self.assertIn("audio", self.refused(audio="yes"))
        self.assertIn("vncPassword", self.refused(vnc_password=""))
        self.assertIn("vncPassword", self.refused(vnc_password=5))
