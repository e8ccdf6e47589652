"""PREPARE, CLEANUP, their answers, and PAGE_LOAD: the browser words (issue #3), in seed 001's style.

PREPARE gives a guest's browser what a batch asks for (home page, cookies, window size, audio, the
VNC password of the session); CLEANUP wipes it for the next worker.  Both are requests with a
``cmd-id`` answered by ``PREPARE_RESULTS <json>`` / ``CLEANUP_RESULTS <json>``.  PAGE_LOAD is an
event a guest says on its own, for every top-level page load: ``PAGE_LOAD <json>`` with
``{"action": "page-load", "url", "title"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from vmcloud.stomp.frame import Frame
from vmcloud.words.contexts import (
    Answer,
    IAgentContext,
    IControllerContext,
    PrepareRequest,
    act_and_answer,
)
from vmcloud.words.destinations import CONTROLLER
from vmcloud.words.grammar import (
    IDENTITY,
    TO,
    MalformedWord,
    Said,
    answer_error,
    answer_headers,
    body_of,
    cmd_id_of,
    json_body,
    json_payload,
    request_destination,
    request_headers,
    sender_of,
)

_MAX_URL = 8192
_MAX_TITLE = 1024
_MAX_COOKIES = 200
_PREPARE_KEYS = {"homepage", "cookies", "window", "audio", "vncPassword"}


def _web_url(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_URL:
        raise MalformedWord(f"{what} must be a URL of at most {_MAX_URL} characters")
    if urlsplit(value).scheme not in ("http", "https"):
        raise MalformedWord(f"{what} must be an http or https URL")
    return value


class _JsonAnswer:
    """An answer word whose body is ``WORD <json>``."""

    name: ClassVar[str]

    @classmethod
    def how_to_say(
        cls, *, cmd_id: str, identity: str, value: Mapping[str, Any] | None = None, error: str | None = None
    ) -> Said:
        payload = dict(value or {})
        if error is not None:
            payload["error"] = error
        return Said(CONTROLLER, answer_headers(cmd_id, identity, error), json_body(cls.name, payload))

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        cmd_id = cmd_id_of(frame)
        sender = sender_of(frame)
        try:
            error = answer_error(frame)
            value = json_payload(frame)
        except MalformedWord as e:
            context.heard_answer(
                Answer(cmd_id, self.name, sender, error=f"malformed {self.name}: {e.reason}")
            )
            raise
        context.heard_answer(Answer(cmd_id, self.name, sender, value, error))


class PrepareResults(_JsonAnswer):
    """Guest → controller: the browser is prepared (with what the session needs), or why not."""

    name: ClassVar[str] = "PREPARE_RESULTS"


class CleanupResults(_JsonAnswer):
    """Guest → controller: the browser is gone and its profile wiped, or why not."""

    name: ClassVar[str] = "CLEANUP_RESULTS"


class Prepare:
    """Controller → guest: open ``homepage`` in a fresh profile, with cookies, window size, audio."""

    name: ClassVar[str] = "PREPARE"

    @classmethod
    def how_to_say(
        cls,
        *,
        to: str,
        cmd_id: str,
        homepage: str,
        cookies: Sequence[Mapping[str, Any]] = (),
        window: tuple[int, int] = (1280, 800),
        audio: bool = False,
        vnc_password: str | None = None,
    ) -> Said:
        payload: dict[str, Any] = {
            "homepage": homepage,
            "cookies": [dict(c) for c in cookies],
            "window": {"width": window[0], "height": window[1]},
            "audio": audio,
        }
        if vnc_password is not None:
            payload["vncPassword"] = vnc_password
        return Said(request_destination(to), request_headers(to, cmd_id), json_body(cls.name, payload))

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """The request from call parameters named as in the body (``homepage``, ``cookies``, ...)."""
        unknown = set(params) - _PREPARE_KEYS
        if unknown:
            raise ValueError(f"PREPARE has no parameter {sorted(unknown)}")
        window = params.get("window") or {}
        return cls.how_to_say(
            to=to,
            cmd_id=cmd_id,
            homepage=params["homepage"],
            cookies=params.get("cookies", ()),
            window=(int(window.get("width", 1280)), int(window.get("height", 800))),
            audio=bool(params.get("audio", False)),
            vnc_password=params.get("vncPassword"),
        )

    @staticmethod
    def read(frame: Frame) -> PrepareRequest:
        """The request, every field checked."""
        cmd_id = cmd_id_of(frame)
        payload = json_payload(frame)
        homepage = _web_url(payload.get("homepage"), "homepage")
        cookies = payload.get("cookies", [])
        if not isinstance(cookies, list) or len(cookies) > _MAX_COOKIES:
            raise MalformedWord(f"cookies must be a list of at most {_MAX_COOKIES} objects")
        for cookie in cookies:
            if not (
                isinstance(cookie, dict)
                and isinstance(cookie.get("name"), str)
                and isinstance(cookie.get("value"), str)
            ):
                raise MalformedWord("every cookie needs a string name and value")
        window = payload.get("window", {})
        if not isinstance(window, dict):
            raise MalformedWord("window must be an object with width and height")
        width, height = window.get("width", 1280), window.get("height", 800)
        for size in (width, height):
            if not isinstance(size, int) or isinstance(size, bool) or not 64 <= size <= 16384:
                raise MalformedWord("window width and height must be integers from 64 to 16384")
        audio = payload.get("audio", False)
        if not isinstance(audio, bool):
            raise MalformedWord("audio must be true or false")
        password = payload.get("vncPassword")
        if password is not None and not isinstance(password, str):
            raise MalformedWord("vncPassword must be a string")
        return PrepareRequest(
            cmd_id=cmd_id,
            homepage=homepage,
            cookies=tuple(cookies),
            window_width=width,
            window_height=height,
            audio=audio,
            vnc_password=password,
        )

    async def listen_and_act(self, frame: Frame, context: IAgentContext) -> None:
        if not context.addressed_to_me(frame.get(TO)):
            return
        request = self.read(frame)
        await act_and_answer(
            frame,
            context,
            "PREPARE",
            request.cmd_id,
            lambda: context.prepare(request),
            PrepareResults.how_to_say,
            "value",
        )


class Cleanup:
    """Controller → guest: kill the browser and wipe its profile, ready for the next worker."""

    name: ClassVar[str] = "CLEANUP"

    @classmethod
    def how_to_say(cls, *, to: str, cmd_id: str) -> Said:
        return Said(request_destination(to), request_headers(to, cmd_id), body_of(cls.name))

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """The request; CLEANUP takes no parameters."""
        if params:
            raise ValueError(f"CLEANUP has no parameter {sorted(params)}")
        return cls.how_to_say(to=to, cmd_id=cmd_id)

    async def listen_and_act(self, frame: Frame, context: IAgentContext) -> None:
        if not context.addressed_to_me(frame.get(TO)):
            return
        cmd_id = cmd_id_of(frame)
        await act_and_answer(
            frame,
            context,
            "CLEANUP",
            cmd_id,
            lambda: context.cleanup(cmd_id),
            CleanupResults.how_to_say,
            "value",
        )


class PageLoad:
    """Guest → controller event: the browser loaded a top-level page (or could not, or restarted).

    ``{"action": "page-load", "url", "title", "tab"}`` for a page the worker reached (``tab``
    numbers the session's tabs and popups from 1); ``"page-error"`` with ``error`` for a page that
    could not be loaded; ``"browser-restarted"`` with ``reason`` when the guest had to restart a
    crashed or hung browser on the session's home page.  ``tab``, ``error`` and ``reason`` are
    optional, so an agent that says only url and title is still understood.
    """

    name: ClassVar[str] = "PAGE_LOAD"
    action: ClassVar[str] = "page-load"
    actions: ClassVar[frozenset[str]] = frozenset({"page-load", "page-error", "browser-restarted"})

    @classmethod
    def how_to_say(
        cls,
        *,
        identity: str,
        url: str = "",
        title: str = "",
        tab: int | None = None,
        action: str = "page-load",
        error: str | None = None,
        reason: str | None = None,
    ) -> Said:
        if action not in cls.actions:
            raise ValueError(f"PAGE_LOAD has no action {action!r}")
        payload: dict[str, Any] = {"action": action, "url": url[:_MAX_URL], "title": title[:_MAX_TITLE]}
        if tab is not None:
            payload["tab"] = tab
        if error is not None:
            payload["error"] = error[:_MAX_TITLE]
        if reason is not None:
            payload["reason"] = reason[:_MAX_TITLE]
        return Said(CONTROLLER, {IDENTITY: identity}, json_body(cls.name, payload))

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        payload = json_payload(frame)
        action = payload.get("action", self.action)
        if action not in self.actions:
            raise MalformedWord(f"action must be one of {sorted(self.actions)}")
        url, title = payload.get("url", ""), payload.get("title", "")
        if not isinstance(url, str) or len(url) > _MAX_URL:
            raise MalformedWord(f"url must be a string of at most {_MAX_URL} characters")
        if not isinstance(title, str):
            raise MalformedWord("title must be a string")
        event: dict[str, Any] = {"action": action, "url": url, "title": title[:_MAX_TITLE]}
        tab = payload.get("tab")
        if tab is not None:
            if not isinstance(tab, int) or isinstance(tab, bool) or not 0 < tab < 1_000_000:
                raise MalformedWord("tab must be a positive integer")
            event["tab"] = tab
        for key in ("error", "reason"):
            text = payload.get(key)
            if text is not None:
                if not isinstance(text, str):
                    raise MalformedWord(f"{key} must be a string")
                event[key] = text[:_MAX_TITLE]
        context.heard_event(sender_of(frame), event)
