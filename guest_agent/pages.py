"""Which page events a worker's browsing makes: the browser's raw signals in, one event per page out.

The browser says far more than the application wants: a link click is a navigation, a commit, a
title set while parsing, a load; a single-page app's route is a same-document navigation with the
title changed a moment later; a popup is a new target whose title arrives after its URL.  The
application wants one ``{"action": "page-load", "url", "title", "tab"}`` per page the worker
reached, with the page's real title (SPEC, "Page events").  So a page's event is held until its
load fired and its title had ``settle`` seconds to arrive (a title set after load is merged into
its URL's event), or until the tab moves on.  A title that changes after the event was said gives
one more event for the same URL (the application sees the title the worker sees), never two with
the same URL and title.  ``about:``, ``chrome:`` and DevTools pages are never events; a page that
could not be loaded is a ``page-error`` event.

No I/O and no clock of its own: the browser adapter feeds signals with ``now`` and asks
:meth:`PageEvents.due` what to say and :meth:`PageEvents.next_deadline` when to ask again.
"""

from __future__ import annotations

from typing import Any

import attrs

PAGE_LOAD = "page-load"
PAGE_ERROR = "page-error"

#: URL schemes of the browser's own pages: never events.
INTERNAL_SCHEMES = (
    "about:",
    "chrome:",
    "chrome-error:",
    "chrome-untrusted:",
    "devtools:",
    "chrome-extension:",
)


def is_internal(url: str) -> bool:
    """Whether ``url`` is one of the browser's own pages (blank page, settings, error page)."""
    return not url or url.lower().startswith(INTERNAL_SCHEMES)


def real_title(url: str, title: str) -> str:
    """The page's title, or "" when the browser only made one up from the URL (no ``<title>``)."""
    if not title or title == url:
        return ""
    bare = url.split("://", 1)[-1]
    if title in (bare, bare.rstrip("/"), url.rstrip("/")):
        return ""
    return title


@attrs.frozen
class PageEvent:
    """One event for the handle."""

    action: str
    url: str
    title: str
    tab: int
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"action": self.action, "url": self.url, "title": self.title, "tab": self.tab}
        if self.error is not None:
            data["error"] = self.error
        return data


@attrs.define
class _Visit:
    url: str
    title: str
    loaded: bool
    deadline: float | None
    said_title: str | None = None  # None: not said yet


@attrs.define
class _Tab:
    number: int
    visit: _Visit | None = None
    info: tuple[str, str] | None = None  # the browser's latest (url, title) for the tab
    last_error: str | None = None


class PageEvents:
    """The page events of one worker's session; tabs are named by the browser's target ids."""

    def __init__(self, *, settle: float = 0.8, load_patience: float = 10.0) -> None:
        self.settle = settle
        self.load_patience = load_patience
        self._tabs: dict[str, _Tab] = {}
        self._numbers = 0
        self._ready: list[PageEvent] = []

    def tab(self, target_id: str) -> int:
        """The tab's number in this session (1, 2, ... in the order tabs appeared)."""
        found = self._tabs.get(target_id)
        if found is None:
            self._numbers += 1
            found = self._tabs[target_id] = _Tab(self._numbers)
        return found.number

    def knows(self, target_id: str) -> bool:
        return target_id in self._tabs

    def navigated(self, target_id: str, url: str, now: float, *, same_document: bool = False) -> None:
        """The tab's top frame now shows ``url`` (a new document, or a route of the same one)."""
        self.tab(target_id)
        tab = self._tabs[target_id]
        current = tab.visit
        if current is not None and current.url == url and same_document:
            return  # replaceState to the same URL: nothing new for the worker
        self._say_now(tab)
        if is_internal(url):
            tab.visit = None
            return
        tab.last_error = None
        title = ""
        if tab.info is not None and tab.info[0] == url:
            title = real_title(url, tab.info[1])
        tab.visit = _Visit(
            url,
            title,
            loaded=same_document,
            deadline=now + (self.settle if same_document else self.load_patience),
        )

    def loaded(self, target_id: str, now: float) -> None:
        """The tab's document fired its load event."""
        tab = self._tabs.get(target_id)
        if tab is None or tab.visit is None or tab.visit.loaded:
            return
        tab.visit.loaded = True
        tab.visit.deadline = now + self.settle

    def title_seen(self, target_id: str, url: str, title: str, now: float) -> None:
        """The browser's view of the tab changed (``Target.targetInfoChanged``)."""
        tab = self._tabs.get(target_id)
        if tab is None:
            return
        tab.info = (url, title)
        visit = tab.visit
        if visit is None or visit.url != url:
            return
        title = real_title(url, title)
        if title == visit.title:
            return
        visit.title = title
        if visit.said_title is not None and title != visit.said_title:
            visit.deadline = now + self.settle  # said already: say the new title once it settles

    def failed(self, target_id: str, url: str, error: str, now: float) -> None:
        """The tab could not load ``url``: one ``page-error`` event, at once."""
        self.tab(target_id)
        tab = self._tabs[target_id]
        self._say_now(tab)
        tab.visit = None
        if is_internal(url) or tab.last_error == url:
            return
        tab.last_error = url
        self._ready.append(PageEvent(PAGE_ERROR, url, "", tab.number, error))

    def closed(self, target_id: str) -> None:
        """The tab is gone; what it held back is said now."""
        tab = self._tabs.get(target_id)
        if tab is not None:
            self._say_now(tab)
            tab.visit = None

    def due(self, now: float) -> list[PageEvent]:
        """The events to say now, in order."""
        for tab in self._tabs.values():
            visit = tab.visit
            if visit is not None and visit.deadline is not None and visit.deadline <= now:
                self._say(tab, visit)
        ready, self._ready = self._ready, []
        return ready

    def next_deadline(self) -> float | None:
        """When :meth:`due` will have something new to say (None: only after a new signal)."""
        deadlines = [
            t.visit.deadline for t in self._tabs.values() if t.visit and t.visit.deadline is not None
        ]
        return min(deadlines) if deadlines else None

    def flush(self) -> list[PageEvent]:
        """Everything held back, said now (the session ends)."""
        for tab in self._tabs.values():
            self._say_now(tab)
        ready, self._ready = self._ready, []
        return ready

    def _say_now(self, tab: _Tab) -> None:
        if tab.visit is not None and tab.visit.said_title is None:
            self._say(tab, tab.visit)

    def _say(self, tab: _Tab, visit: _Visit) -> None:
        visit.deadline = None
        if visit.said_title == visit.title:
            return
        visit.said_title = visit.title
        self._ready.append(PageEvent(PAGE_LOAD, visit.url, visit.title, tab.number))
