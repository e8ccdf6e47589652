"""The browser seam of the guest agent (issue #3): prepare a browser for a worker, clean it after.

The agent drives whatever :class:`IBrowser` it was given: the real stack (Chromium over CDP, Xvnc,
audio capture: :mod:`guest_agent.chromium`, :mod:`guest_agent.stack`) where it is installed, else, or
with ``browser = none``, :class:`NoBrowser`.  NoBrowser does everything the controller can observe
except show pages: it checks the request exactly as a real browser would, remembers it, announces
the capability ``no-browser`` so the controller (and an operator reading /all-status) knows, and
reports one page-load event for the home page, so the event path guest → controller → handle →
fetch-events is exercised end to end.

Requests are validated here, not only in the words, because a browser acts on them: a cookie
without a name or a ``javascript:`` home page must become a clear refusal
(:class:`BrowserRequestError`, whose message goes back to the controller), never a crash in the
middle of a half-prepared profile.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from vmcloud.words.cookies import Cookie

#: Called for every page event: ``{"action": "page-load", "url", "title", "tab"}`` (``tab`` only from
#: a real browser), ``{"action": "page-error", "url", "error", ...}``, ``{"action": "browser-restarted",
#: "reason"}``.
PageLoadCallback = Callable[[Mapping[str, Any]], None]
#: Called once when the browser is beyond repair, with the reason (the VM must be replaced).
BrokenCallback = Callable[[str], None]

#: Capability announced by :class:`NoBrowser` in HELLO.
NO_BROWSER = "no-browser"

MAX_URL = 8192
MAX_COOKIES = 200
MAX_COOKIE_NAME = 256
MAX_COOKIE_VALUE = 4096
MIN_WINDOW, MAX_WINDOW = 64, 16384  # the PREPARE word's bounds

_COOKIE_FIELDS = frozenset({"name", "value", "domain", "path", "secure", "httpOnly", "expires"})
# RFC 6265 token characters for names; values may not hold ';', ',', quotes, backslash or controls.
_COOKIE_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_COOKIE_VALUE_RE = re.compile(r'^[^\x00-\x1f\x7f;,"\\ ]*$')
_DOMAIN_RE = re.compile(r"^\.?[A-Za-z0-9]([A-Za-z0-9\-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,62}))*\.?$")

log = Logger()


class BrowserRequestError(ValueError):
    """A prepare request the browser will not act on; the message says why, for the controller."""


class IBrowser(Interface):
    """A browser the agent prepares for each worker and cleans afterwards.

    Every method is async; a refused request raises :class:`BrowserRequestError`, anything
    else that goes wrong raises an exception whose message is fit for the controller.
    """

    capabilities = Attribute(
        "tuple of str announced in HELLO: what this browser can do ('no-browser', 'cdp', 'vnc', 'audio')"
    )
    on_page_load = Attribute(
        "callable(event: Mapping) -> None or None; called for every page event (see PageLoadCallback). "
        "The agent sets it once it can forward events to the controller; a callback that raises is logged."
    )
    on_broken = Attribute(
        "callable(reason: str) -> None or None; called once if the browser cannot be repaired, so the "
        "agent tells the controller to replace the VM."
    )
    vnc_view = Attribute(
        "(port, password) or None: the VNC server's port and the operator's view-only password, said in "
        "HELLO so that the controller shows the monitor this VM's screen in every state (never a worker)"
    )

    async def prepare(
        homepage: str,  # noqa: N805 - zope interface methods have no self
        cookies: Sequence[Mapping[str, Any]],
        window: tuple[int, int] | Mapping[str, Any],
        audio: bool,
        *,
        vnc_password: str | None = None,
    ) -> dict[str, Any]:
        """Start a fresh profile showing ``homepage``; return what the controller should know.

        ``cookies`` use the REST API's JSON form (``name``, ``value``, ``domain``, ``path``,
        ``secure``, ``httpOnly``, ``expires``); ``window`` is ``(width, height)`` or
        ``{"width", "height"}``; ``vnc_password`` (PREPARE's ``vncPassword``) protects the
        session's VNC server where there is one.  A browser already prepared is replaced.
        """

    async def cleanup() -> dict[str, Any]:
        """Close the browser and forget the profile, ready for the next worker."""


@attrs.frozen
class PreparedBrowser:
    """One prepared session, as validated: what the browser was asked to show."""

    homepage: str
    cookies: tuple[Cookie, ...]
    window_width: int
    window_height: int
    audio: bool
    prepared_at: float  # seconds, on the agent's clock
    vnc_password: str | None = attrs.field(default=None, repr=False)  # a secret: never in logs


def check_prepare_request(
    homepage: object,
    cookies: object,
    window: object,
    audio: object,
    *,
    vnc_password: object = None,
    now: float = 0.0,
) -> PreparedBrowser:
    """The request as a record, every field checked; :class:`BrowserRequestError` otherwise."""
    if not isinstance(homepage, str) or not 0 < len(homepage) <= MAX_URL:
        raise BrowserRequestError(f"homepage must be a URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(homepage)
    except ValueError as e:
        raise BrowserRequestError(f"homepage is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BrowserRequestError("homepage must be an http or https URL with a host")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in homepage):
        raise BrowserRequestError("homepage must not contain spaces or control characters")
    if isinstance(cookies, str | bytes | Mapping) or not isinstance(cookies, Sequence):
        raise BrowserRequestError("cookies must be a list")
    if len(cookies) > MAX_COOKIES:
        raise BrowserRequestError(f"at most {MAX_COOKIES} cookies, got {len(cookies)}")
    checked = tuple(_cookie(i, c) for i, c in enumerate(cookies, 1))
    width, height = _window(window)
    if not isinstance(audio, bool):
        raise BrowserRequestError("audio must be true or false")
    if vnc_password is not None and (not isinstance(vnc_password, str) or not 0 < len(vnc_password) <= 256):
        raise BrowserRequestError("vncPassword must be text of 1 to 256 characters")
    return PreparedBrowser(homepage, checked, width, height, audio, now, vnc_password)


def _window(window: object) -> tuple[int, int]:
    if isinstance(window, Mapping):
        unknown = set(window) - {"width", "height"}
        if unknown:
            raise BrowserRequestError(f"window has no field {sorted(unknown)[0]!r}")
        size = (window.get("width", 1280), window.get("height", 800))
    elif isinstance(window, tuple | list) and len(window) == 2:
        size = (window[0], window[1])
    else:
        raise BrowserRequestError("window must be (width, height) or {width, height}")
    for value in size:
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_WINDOW <= value <= MAX_WINDOW:
            raise BrowserRequestError(
                f"window width and height must be whole numbers from {MIN_WINDOW} to {MAX_WINDOW}"
            )
    return size[0], size[1]


def _cookie(index: int, raw: object) -> Cookie:
    where = f"cookie {index}"
    if not isinstance(raw, Mapping):
        raise BrowserRequestError(f"{where}: must be an object")
    unknown = set(raw) - _COOKIE_FIELDS
    if unknown:
        raise BrowserRequestError(
            f"{where}: unknown field {sorted(map(str, unknown))[0]!r}"
            f" (known: {', '.join(sorted(_COOKIE_FIELDS))})"
        )
    name, value = raw.get("name"), raw.get("value")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_COOKIE_NAME or not _COOKIE_NAME_RE.match(name):
        raise BrowserRequestError(
            f"{where}: name must be a cookie token of at most {MAX_COOKIE_NAME} characters"
        )
    where = f"cookie {name!r}"
    if not isinstance(value, str) or len(value) > MAX_COOKIE_VALUE or not _COOKIE_VALUE_RE.match(value):
        raise BrowserRequestError(
            f"{where}: value must be text of at most {MAX_COOKIE_VALUE} characters without"
            " spaces, ';', ',', quotes, backslashes or control characters"
        )
    domain = raw.get("domain")
    if domain is not None and (
        not isinstance(domain, str) or len(domain) > 253 or not _DOMAIN_RE.match(domain)
    ):
        raise BrowserRequestError(f"{where}: domain must be a host name")
    path = raw.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024 or ";" in path:
        raise BrowserRequestError(f"{where}: path must start with '/'")
    flags = {}
    for field in ("secure", "httpOnly"):
        flag = raw.get(field, False)
        if not isinstance(flag, bool):
            raise BrowserRequestError(f"{where}: {field} must be true or false")
        flags[field] = flag
    expires = raw.get("expires")
    if expires is not None and (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not math.isfinite(expires)
        or expires < 0
    ):
        raise BrowserRequestError(f"{where}: expires must be seconds since the epoch")
    return Cookie(
        name=name,
        value=value,
        domain=domain,
        path=path,
        secure=flags["secure"],
        http_only=flags["httpOnly"],
        expires=float(expires) if expires is not None else None,
    )


@implementer(IBrowser)
class NoBrowser:
    """The stand-in browser: validates and records requests, shows nothing, reports the home page.

    The page-load event for the home page is reported on the next reactor turn after ``prepare``
    returns, so the controller hears PREPARE_RESULTS first, as it would from a real browser whose
    page finishes loading after the answer.  ``cleanup`` drops an event not yet reported.
    """

    capabilities: tuple[str, ...] = (NO_BROWSER,)
    vnc_view: tuple[int, str] | None = None  # no screen to show

    def __init__(self, clock: IReactorTime, on_page_load: PageLoadCallback | None = None) -> None:
        self._clock = clock
        self.on_page_load = on_page_load
        self.on_broken: BrokenCallback | None = None  # a stand-in never breaks
        self.prepared: PreparedBrowser | None = None
        self._pending: IDelayedCall | None = None

    async def prepare(
        self,
        homepage: str,
        cookies: Sequence[Mapping[str, Any]],
        window: tuple[int, int] | Mapping[str, Any],
        audio: bool,
        *,
        vnc_password: str | None = None,
    ) -> dict[str, Any]:
        session = check_prepare_request(
            homepage, cookies, window, audio, vnc_password=vnc_password, now=self._clock.seconds()
        )
        replaced = self.prepared is not None
        self._cancel_pending()
        self.prepared = session
        self._pending = self._clock.callLater(0, self._report_home_page, session)
        log.info(
            "Prepared (no browser): home page {homepage}, {cookies} cookies, window {width}x{height}",
            homepage=session.homepage,
            cookies=len(session.cookies),
            width=session.window_width,
            height=session.window_height,
            event="browser-prepared",
        )
        return {
            "browser": NO_BROWSER,
            "capabilities": list(self.capabilities),
            "homepage": session.homepage,
            "cookies": len(session.cookies),
            "window": {"width": session.window_width, "height": session.window_height},
            # No audio capture without a browser stack, whatever was asked: say so rather than pretend.
            "audio": False,
            "vnc": None,
            "replaced": replaced,
        }

    async def cleanup(self) -> dict[str, Any]:
        was_prepared = self.prepared is not None
        self._cancel_pending()
        self.prepared = None
        log.info("Cleaned up (no browser)", event="browser-cleaned")
        return {"browser": NO_BROWSER, "wasPrepared": was_prepared}

    def _cancel_pending(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def _report_home_page(self, session: PreparedBrowser) -> None:
        self._pending = None
        callback = self.on_page_load
        if callback is None or self.prepared is not session:
            return
        try:
            # No page was loaded, so there is no title to report.
            callback({"action": "page-load", "url": session.homepage, "title": ""})
        except Exception:
            log.failure(
                "The page-load listener failed for {url}",
                url=session.homepage,
                event="page-load-listener-failed",
            )
