"""ChromiumBrowser's decisions against a fake Chromium: the spare window, isolation, events, repair."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from guest_agent.browser import IBrowser
from guest_agent.chromium import TITLE_BINDING, ChromiumBrowser
from guest_agent.stack import IBrowserStack, StackError
from tests.guest_agent.fake_chromium import DEFAULT_CONTEXT, FakeChromium, FakeStack

HOME = "http://site.test/home"
COOKIES = [{"name": "task", "value": "t-7"}, {"name": "worker", "value": "w-42"}]


class Harness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stack = FakeStack(self.clock)
        self.browser = ChromiumBrowser(self.clock, self.stack, settle=0.5)
        self.events: list[dict[str, Any]] = []
        self.broken: list[str] = []
        self.browser.on_page_load = lambda event: self.events.append(dict(event))
        self.browser.on_broken = self.broken.append
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.browser.running:
            d = self.browser.stopService()
            self.pump()
            self.successResultOf(d)

    def pump(self, seconds: float = 0.0) -> None:
        """Let every message due cross, and ``seconds`` pass in small steps."""
        self.clock.advance(0)
        steps = int(seconds / 0.05 + 0.5)
        for _ in range(steps):
            self.clock.advance(0.05)
        self.clock.advance(0)

    def start(self) -> FakeChromium:
        self.browser.startService()
        self.pump()
        self.successResultOf(self.browser.started)
        return self.stack.browser

    def wait(self, coroutine: Any, seconds: float = 0.2) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        self.pump(seconds)
        return self.successResultOf(d)

    def prepare(self, homepage: str = HOME, window: Any = (1280, 800), **kw: Any) -> dict[str, Any]:
        return self.wait(self.browser.prepare(homepage, kw.pop("cookies", COOKIES), window, True, **kw))  # type: ignore[no-any-return]

    def cleanup(self) -> dict[str, Any]:
        return self.wait(self.browser.cleanup(), 0)  # type: ignore[no-any-return]

    def our_contexts(self, chromium: FakeChromium) -> set[str]:
        return chromium.contexts - {DEFAULT_CONTEXT}


class SpareWindowTests(Harness):
    def test_the_browser_and_its_stack_provide_their_interfaces(self) -> None:
        self.assertTrue(verifyObject(IBrowserStack, self.stack))
        self.assertTrue(verifyObject(IBrowser, self.browser))
        self.assertEqual(self.browser.capabilities, ("cdp", "vnc", "audio"))
        # what HELLO tells of the operator's view: the stack's VNC port and view-only password
        self.assertEqual(self.browser.vnc_view, (5900, "view-pw1"))

    def test_a_started_browser_waits_with_a_spare_window_watched(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        page = chromium.page_in(spare)
        self.assertEqual(page.url, "about:blank")
        watchers = [m for m, _, s in chromium.calls if s == page.session]
        self.assertEqual(
            watchers,
            [
                "Page.enable",
                "Runtime.addBinding",
                "Page.addScriptToEvaluateOnNewDocument",
                "Runtime.enable",
                "Runtime.runIfWaitingForDebugger",
            ],
        )
        self.assertEqual(self.events, [], "a blank page is never an event")

    def test_prepare_takes_the_spare_sets_cookies_then_navigates(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        before = len(chromium.calls)
        answer = self.prepare(vnc_password="pw-12345")
        # then only the title asked at load (Runtime.evaluate)
        self.assertEqual(chromium.methods()[before:][:2], ["Storage.setCookies", "Page.navigate"])
        self.assertNotIn("Target.createTarget", chromium.methods()[before:])
        self.assertEqual([c["name"] for c in chromium.cookies[spare]], ["task", "worker"])
        self.assertEqual(chromium.calls[before][1]["browserContextId"], spare)
        self.assertEqual(chromium.page_in(spare).url, HOME)
        self.assertEqual(self.stack.passwords[-1], "pw-12345")
        self.assertEqual(
            {k: answer[k] for k in ("browser", "homepage", "cookies", "audio", "vnc", "replaced")},
            {
                "browser": "chromium",
                "homepage": HOME,
                "cookies": 2,
                "audio": True,
                "vnc": {"host": "10.0.0.5", "port": 5900},
                "replaced": False,
            },
        )

    def test_prepare_answers_after_the_home_page_loaded(self) -> None:
        chromium = self.start()
        chromium.load_delay = 1.0
        d = Deferred.fromCoroutine(self.browser.prepare(HOME, [], (1280, 800), False))
        self.pump(0.9)
        self.assertNoResult(d)
        self.pump(0.2)
        self.successResultOf(d)

    def test_another_window_size_resizes_the_spare_and_the_next_spare_has_it(self) -> None:
        chromium = self.start()
        before = len(chromium.calls)
        self.prepare(window=(800, 600))
        methods = chromium.methods()[before:]
        self.assertIn("Browser.setWindowBounds", methods)
        self.assertNotIn("Target.createTarget", methods)
        bounds = [p for m, p, _ in chromium.calls if m == "Browser.setWindowBounds"][-1]["bounds"]
        self.assertEqual((bounds["width"], bounds["height"]), (800, 600))
        self.cleanup()
        self.pump()
        created = [p for m, p, _ in chromium.calls if m == "Target.createTarget"][-1]
        self.assertEqual((created["width"], created["height"]), (800, 600))
        before = len(chromium.calls)
        self.prepare(window=(800, 600))
        self.assertNotIn("Browser.setWindowBounds", chromium.methods()[before:])

    def test_a_window_larger_than_the_screen_is_the_screen(self) -> None:
        chromium = self.start()
        self.prepare(window=(4000, 3000))
        bounds = [p for m, p, _ in chromium.calls if m == "Browser.setWindowBounds"][-1]["bounds"]
        self.assertEqual((bounds["width"], bounds["height"]), (1280, 800))

    def test_without_a_spare_prepare_opens_its_own_window(self) -> None:
        chromium = self.start()
        self.prepare()
        before = len(chromium.calls)
        answer = self.prepare("http://site.test/other")  # a session is replaced: no spare for it
        self.assertTrue(answer["replaced"])
        methods = chromium.methods()[before:]
        self.assertEqual(methods[0], "Target.disposeBrowserContext")
        self.assertIn("Target.createBrowserContext", methods)
        self.assertLess(methods.index("Storage.setCookies"), methods.index("Page.navigate"))
        self.assertEqual(len(self.our_contexts(chromium)), 1)

    def test_a_spare_whose_page_went_is_not_used(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        page = chromium.page_in(spare)
        chromium.event("Target.detachedFromTarget", {"sessionId": page.session})
        self.pump()
        self.prepare()
        self.assertNotIn(spare, chromium.contexts)
        [context] = self.our_contexts(chromium)
        self.assertEqual(chromium.page_in(context).url, HOME)

    def test_a_spare_that_cannot_be_opened_leaves_prepare_to_open_its_window(self) -> None:
        chromium = self.start()
        self.prepare()
        chromium.refuse.add("Target.createTarget")
        self.cleanup()
        self.pump()
        self.assertEqual(self.our_contexts(chromium), set(), "the half-made spare's context is disposed")
        chromium.refuse.clear()
        self.prepare()
        [context] = self.our_contexts(chromium)
        self.assertEqual(chromium.page_in(context).url, HOME)


class CleanupTests(Harness):
    def test_cleanup_disposes_proves_clean_and_opens_the_next_spare_after_answering(self) -> None:
        chromium = self.start()
        self.prepare(vnc_password="pw-12345")
        [used] = self.our_contexts(chromium)
        d = Deferred.fromCoroutine(self.browser.cleanup())
        answered_at: list[int] = []

        def answered(answer: dict[str, Any]) -> dict[str, Any]:
            answered_at.append(len(chromium.calls))
            return answer

        d.addCallback(answered)
        self.pump()
        answer = self.successResultOf(d)
        self.assertEqual(
            answer,
            {
                "browser": "chromium",
                "wasPrepared": True,
                "restarted": False,
                "clean": {"pages": 1, "cookies": 0},
            },
        )
        self.assertEqual(self.stack.passwords[-1], None)
        self.assertEqual(self.stack.disconnects, 1)
        self.assertNotIn(used, chromium.contexts)
        [at] = answered_at
        self.assertNotIn("Target.createBrowserContext", chromium.methods()[:at][-4:])
        self.assertIn("Target.createBrowserContext", chromium.methods()[at:])
        [fresh] = self.our_contexts(chromium)
        self.assertNotEqual(fresh, used)
        self.assertEqual(chromium.cookies[fresh], [], "the next worker's context holds nothing")

    def test_cleanup_of_a_free_browser_disposes_its_spare_too(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        answer = self.cleanup()
        self.assertFalse(answer["wasPrepared"])
        self.assertFalse(answer["restarted"])
        self.assertNotIn(spare, chromium.contexts)

    def test_a_browser_that_cannot_be_proven_clean_is_restarted_from_scratch(self) -> None:
        chromium = self.start()
        self.prepare()
        chromium.cookies[DEFAULT_CONTEXT].append({"name": "leak", "value": "x"})
        answer = self.cleanup()
        self.assertTrue(answer["restarted"])
        self.assertEqual(len(self.stack.browsers), 2)
        self.assertEqual(answer["clean"], {"pages": 1, "cookies": 0})
        self.assertEqual(self.broken, [])


class PageEventTests(Harness):
    def test_the_home_page_is_one_event_with_its_title_and_tab(self) -> None:
        chromium = self.start()
        chromium.sites[HOME] = ("Home page", None)
        self.prepare()
        self.pump(1.0)
        self.assertEqual(self.events, [{"action": "page-load", "url": HOME, "title": "Home page", "tab": 1}])

    def test_a_popup_is_tab_two(self) -> None:
        chromium = self.start()
        chromium.sites["http://site.test/popup"] = ("Popup", None)
        self.prepare()
        [context] = self.our_contexts(chromium)
        chromium.open_page(context, "http://site.test/popup")
        self.pump(1.0)
        self.assertEqual(
            [(e["url"], e["tab"]) for e in self.events], [(HOME, 1), ("http://site.test/popup", 2)]
        )

    def test_an_unreachable_home_page_is_ready_with_a_page_error(self) -> None:
        chromium = self.start()
        chromium.sites[HOME] = ("", "net::ERR_CONNECTION_REFUSED")
        answer = self.prepare()
        self.assertEqual(answer["homepageError"], "net::ERR_CONNECTION_REFUSED")
        self.pump(1.0)
        self.assertEqual([(e["action"], e["url"], e["tab"]) for e in self.events], [("page-error", HOME, 1)])

    def test_the_spares_page_says_nothing_even_if_it_moves(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        chromium.sites["http://site.test/x"] = ("X", None)
        chromium.navigate(chromium.page_in(spare), "http://site.test/x")
        self.pump(1.0)
        self.assertEqual(self.events, [])

    def test_a_title_binding_of_a_page_of_an_ended_session_is_not_said(self) -> None:
        chromium = self.start()
        self.prepare()
        self.pump(1.0)
        [context] = self.our_contexts(chromium)
        session = chromium.page_in(context).session
        self.cleanup()
        self.events.clear()
        chromium.event("Runtime.bindingCalled", {"name": TITLE_BINDING, "payload": '["x", "y"]'}, session)
        self.pump(1.0)
        self.assertEqual(self.events, [])


class RepairTests(Harness):
    def test_a_crashed_renderer_of_the_session_restarts_and_reopens_the_home_page(self) -> None:
        chromium = self.start()
        chromium.sites[HOME] = ("Home page", None)
        self.prepare()
        self.pump(1.0)
        [context] = self.our_contexts(chromium)
        chromium.crash(chromium.page_in(context).target)
        self.pump(1.0)
        self.assertEqual(len(self.stack.browsers), 2)
        again = self.stack.browser
        [context] = self.our_contexts(again)
        self.assertEqual(again.page_in(context).url, HOME)
        self.assertEqual([c["name"] for c in again.cookies[context]], ["task", "worker"])
        self.assertEqual([e["action"] for e in self.events], ["page-load", "browser-restarted", "page-load"])
        self.assertEqual(self.events[1]["reason"], "a renderer crashed")
        self.assertEqual(self.events[2]["url"], HOME)
        self.assertEqual(self.broken, [])

    def test_a_crashed_spare_is_replaced_by_a_window_at_prepare_without_a_restart(self) -> None:
        chromium = self.start()
        [spare] = self.our_contexts(chromium)
        chromium.crash(chromium.page_in(spare).target)
        self.pump()
        self.prepare()
        self.assertEqual(len(self.stack.browsers), 1)
        self.assertNotIn(spare, chromium.contexts)

    def test_a_hung_browser_is_noticed_within_seconds_and_restarted(self) -> None:
        chromium = self.start()
        self.prepare()
        chromium.hung = True
        self.pump(2.9)  # no ping can have timed out yet (3 s to answer)
        self.assertEqual(len(self.stack.browsers), 1)
        self.pump(2.2)  # a ping every 2 s, 3 s to answer: noticed within 5 s
        self.assertEqual(len(self.stack.browsers), 2)
        self.assertTrue(chromium.closed, "the hung browser's connection is dropped")
        self.assertEqual(self.events[-1]["action"], "browser-restarted")
        self.assertEqual(self.events[-1]["reason"], "hung")

    def test_a_dead_chromium_is_restarted_at_once(self) -> None:
        self.start()
        self.stack.process_died("chromium killed by signal 9")
        self.pump()
        self.assertEqual(len(self.stack.browsers), 2)
        self.assertEqual(len(self.our_contexts(self.stack.browser)), 1, "with a spare window")
        self.assertEqual(self.events, [], "nobody to tell while FREE")

    def test_a_stack_that_cannot_start_is_broken_within_seconds(self) -> None:
        self.stack.fail_starts = -1
        self.browser.startService()
        self.pump(2.9)
        self.assertEqual(self.broken, [])
        self.pump(0.2)  # the start, and three more a second apart: the restart budget
        self.successResultOf(self.browser.started)
        self.assertEqual(len(self.broken), 1)
        self.assertIn("4 restarts within 120 s", self.broken[0])
        self.assertIn("chromium exited with status 127", self.broken[0])
        failure = self.failureResultOf(
            Deferred.fromCoroutine(self.browser.prepare(HOME, [], (800, 600), False)), StackError
        )
        self.assertIn("broken", str(failure.value))

    def test_a_failed_restart_is_tried_again_and_the_session_reopened(self) -> None:
        self.start()
        self.prepare()
        self.stack.fail_starts = 2
        self.stack.process_died()
        self.pump(2.5)
        self.assertEqual(self.broken, [])
        self.assertEqual(len(self.stack.browsers), 2)
        again = self.stack.browser
        [context] = self.our_contexts(again)
        self.assertEqual(again.page_in(context).url, HOME)
        self.assertEqual(self.events[-1]["action"], "browser-restarted")

    def test_a_stack_that_starts_at_the_second_try_is_fine(self) -> None:
        self.stack.fail_starts = 1
        self.start()
        self.assertEqual(self.broken, [])
        self.prepare()

    def test_too_many_restarts_is_beyond_repair_and_said_once(self) -> None:
        self.start()
        self.prepare()
        for _ in range(4):
            self.stack.process_died()
            self.pump(1.0)
        self.assertEqual(len(self.stack.browsers), 4)
        self.assertEqual(len(self.broken), 1)
        self.assertIn("4 restarts within 120 s", self.broken[0])
        self.stack.process_died()
        self.pump(5.0)
        self.assertEqual(len(self.broken), 1)
        self.assertEqual(len(self.stack.browsers), 4)

    def test_restarts_spread_out_in_time_are_fine(self) -> None:
        self.start()
        for _ in range(5):
            self.stack.process_died()
            self.pump(1.0)
            self.clock.advance(60)
        self.assertEqual(self.broken, [])

    def test_stopping_ends_the_stack_and_repairs_nothing(self) -> None:
        self.start()
        d = self.browser.stopService()
        self.pump()
        self.successResultOf(d)
        self.assertTrue(self.stack.stopped)
        self.stack.on_ended = self.browser._stack_process_ended  # a late end is ignored
        self.stack.process_died()
        self.pump(5.0)
        self.assertEqual(len(self.stack.browsers), 1)
