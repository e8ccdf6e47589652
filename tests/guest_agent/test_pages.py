"""Page events from the browser's signals: one per page the worker reached, with its real title."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from guest_agent.pages import PageEvent, PageEvents, real_title

A, B = "http://site.test/a", "http://site.test/b"


class PageEventsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pages = PageEvents(settle=0.5, load_patience=5.0)
        self.said: list[PageEvent] = []
        self.now = 0.0

    def at(self, now: float) -> list[tuple[str, str, str, int]]:
        self.now = now
        self.said += self.pages.due(now)
        return [(e.action, e.url, e.title, e.tab) for e in self.said]

    def load(self, tab: str, url: str, title: str, now: float) -> None:
        self.pages.navigated(tab, url, now)
        self.pages.title_seen(tab, url, title, now + 0.01)
        self.pages.loaded(tab, now + 0.02)

    def test_a_page_is_said_once_after_its_load_with_its_title(self) -> None:
        self.load("T1", A, "Page A", 1.0)
        self.assertEqual(self.at(1.3), [])
        self.assertEqual(self.at(1.6), [("page-load", A, "Page A", 1)])
        self.assertEqual(self.at(10.0), [("page-load", A, "Page A", 1)])

    def test_a_title_set_just_after_load_is_merged_into_the_pages_event(self) -> None:
        self.load("T1", A, "", 1.0)
        self.pages.title_seen("T1", A, "Late title", 1.3)
        self.assertEqual(self.at(2.0), [("page-load", A, "Late title", 1)])

    def test_a_title_changed_long_after_is_one_more_event_never_a_duplicate(self) -> None:
        self.load("T1", A, "One", 1.0)
        self.at(2.0)
        self.pages.title_seen("T1", A, "Two", 5.0)
        self.pages.title_seen("T1", A, "Two", 5.1)
        self.assertEqual(self.at(6.0), [("page-load", A, "One", 1), ("page-load", A, "Two", 1)])

    def test_a_history_route_and_a_hash_are_events_a_replace_to_the_same_url_is_not(self) -> None:
        self.load("T1", A, "A", 1.0)
        self.at(2.0)
        self.pages.navigated("T1", A + "#x", 3.0, same_document=True)
        self.pages.navigated("T1", A + "#x", 3.1, same_document=True)
        self.pages.navigated("T1", B, 4.0, same_document=True)
        self.pages.title_seen("T1", B, "B route", 4.1)
        self.assertEqual(
            self.at(9.0),
            [("page-load", A, "A", 1), ("page-load", A + "#x", "", 1), ("page-load", B, "B route", 1)],
        )

    def test_moving_on_before_the_title_settled_says_the_page_first(self) -> None:
        self.load("T1", A, "A", 1.0)
        self.load("T1", B, "B", 1.1)
        self.assertEqual(self.at(1.11), [("page-load", A, "A", 1)])
        self.assertEqual(self.at(2.0), [("page-load", A, "A", 1), ("page-load", B, "B", 1)])

    def test_a_popup_is_a_tab_of_its_own(self) -> None:
        self.load("T1", A, "A", 1.0)
        self.pages.tab("T2")
        self.load("T2", B, "B", 1.2)
        self.assertEqual(self.at(3.0), [("page-load", A, "A", 1), ("page-load", B, "B", 2)])

    def test_browser_pages_are_never_events(self) -> None:
        for url in ("about:blank", "chrome://settings/", "chrome-error://chromewebdata/", ""):
            self.load("T1", url, url, 1.0)
        self.assertEqual(self.at(10.0), [])

    def test_an_unreachable_page_is_one_page_error_at_once(self) -> None:
        self.pages.failed("T1", A, "net::ERR_CONNECTION_REFUSED", 1.0)
        self.pages.failed("T1", A, "the page could not be loaded", 1.0)
        self.assertEqual(self.at(1.0), [("page-error", A, "", 1)])
        self.assertEqual(self.said[0].as_json()["error"], "net::ERR_CONNECTION_REFUSED")

    def test_a_page_that_never_loads_is_said_after_the_patience(self) -> None:
        self.pages.navigated("T1", A, 1.0)
        self.assertEqual(self.pages.next_deadline(), 6.0)
        self.assertEqual(self.at(5.9), [])
        self.assertEqual(self.at(6.0), [("page-load", A, "", 1)])
        self.assertIsNone(self.pages.next_deadline())

    def test_a_closed_tab_says_what_it_held(self) -> None:
        self.load("T1", A, "A", 1.0)
        self.pages.closed("T1")
        self.assertEqual(self.at(1.05), [("page-load", A, "A", 1)])

    def test_a_made_up_title_is_no_title(self) -> None:
        self.assertEqual(real_title("http://h/x.html", "h/x.html"), "")
        self.assertEqual(real_title("http://h/", "h"), "")
        self.assertEqual(real_title("http://h/", "Home"), "Home")
