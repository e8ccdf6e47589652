"""Untrusted parts of a request turned into typed values, or a 400 saying exactly what is wrong.

Everything here is pure (no Twisted): path segments, query values and the JSON body of
prepare-batch come in as bytes or text, typed values or an :class:`~vmcloud.api.errors.ApiError`
come out.  ``int()`` is deliberately not used on raw input: it accepts ``" 7"``, ``"+7"`` and
``"7_000"``, which are not numbers a client should be allowed to send.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from vmcloud import boundedjson
from vmcloud.api.errors import bad_request
from vmcloud.pool.interfaces import BatchOptions, Cookie
from vmcloud.pool.service import check_homepage

# 15 digits: beyond every pool size and every millisecond delay anyone means (~31 000 years).
_COUNT = re.compile(r"[0-9]{1,15}")
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")

#: The largest request body the API reads (prepare-batch's options: 100 cookies of a few KB fit);
#: the HTTP layer refuses a larger one with 413 before it is read, and JSON bodies are parsed
#: with this size limit and :data:`~vmcloud.boundedjson.MAX_DEPTH` levels of nesting.
MAX_BODY_BYTES = 64 * 1024
MAX_COOKIES = 100
MAX_COOKIE_CHARS = 4096
WINDOW_RANGE = (100, 8192)

_BATCH_KEYS = frozenset({"cookies", "window", "audio"})
_WINDOW_KEYS = frozenset({"width", "height"})
_COOKIE_KEYS = frozenset({"name", "value", "domain", "path", "secure", "httpOnly", "expires"})


def _shown(raw: str) -> str:
    """A client's value quoted for an error message, cut short so a huge input stays a short answer."""
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def parse_count(name: str, raw: str) -> int:
    """A non-negative integer path parameter (sizes, milliseconds, event ids)."""
    if not _COUNT.fullmatch(raw):
        raise bad_request(f"{name} must be a non-negative integer, got {_shown(raw)}")
    return int(raw)


def parse_batch_size(raw: str) -> int:
    """prepare-batch's ``size``: at least 1.

    A batch is how many VMs are kept READY for it; a batch of 0 would keep none, yet each lock
    on it would still be given a VM prepared on demand, so a size of 0 is refused rather than
    meaning "no VMs" to the application and "any number" to the pool.
    """
    size = parse_count("size", raw)
    if size < 1:
        raise bad_request("size must be at least 1: it is how many VMs the batch keeps READY for its locks")
    return size


def parse_wait(raw: bytes | None, *, default: float, maximum: float) -> float:
    """The ``?wait=`` seconds of a long poll: absent means ``default``, above ``maximum`` is capped."""
    if raw is None:
        return min(default, maximum)
    text = raw.decode("ascii", "replace")
    if not _SECONDS.fullmatch(text):
        raise bad_request(f"wait must be a non-negative number of seconds, got {_shown(text)}")
    return min(float(text), maximum)


def homepage_segment(raw_path: bytes, position: int) -> str:
    """The homepage of prepare-batch, from the request's raw path, percent-decoded exactly once.

    The web server has already decoded every segment (so ``%2F`` became ``/``) before routing;
    only the raw path tells an encoded slash from a real one, and decoding twice would turn a
    homepage's own ``%253D`` into ``=``.  ``position`` is the index of the homepage among the raw
    path's segments (2 for ``/prepare-batch/{size}/{homepage}`` mounted at the root).
    """
    segments = raw_path.split(b"?", 1)[0].split(b"/")[1:]
    rest = segments[position:]
    if len(rest) != 1:
        raise bad_request(
            "homepage must be one URL-encoded path segment (encode '/' as %2F, '?' as %3F, '#' as %23)"
        )
    try:
        text = rest[0].decode("ascii")
        homepage = unquote(text, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise bad_request("homepage is not valid UTF-8 once decoded") from None
    return check_homepage(homepage)


def parse_batch_options(body: bytes) -> BatchOptions:
    """The optional JSON body of prepare-batch; an empty body means the defaults.

    Unknown keys are refused rather than ignored, so that a typo (``"cookie"``) is an error the
    application sees instead of a batch silently prepared without its cookies.
    """
    if len(body) > MAX_BODY_BYTES:
        raise bad_request(f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return BatchOptions()
    try:
        document = boundedjson.loads(body, max_bytes=MAX_BODY_BYTES)
    except boundedjson.JsonRefused as e:
        raise bad_request(f"request body refused: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise bad_request("request body must be a JSON object")
    _refuse_unknown("request body", document, _BATCH_KEYS)

    cookies = document.get("cookies", [])
    if not isinstance(cookies, list):
        raise bad_request("cookies must be a list")
    if len(cookies) > MAX_COOKIES:
        raise bad_request(f"at most {MAX_COOKIES} cookies")
    options: dict[str, Any] = {"cookies": tuple(_cookie(i, c) for i, c in enumerate(cookies))}

    window = document.get("window")
    if window is not None:
        if not isinstance(window, dict):
            raise bad_request("window must be an object with width and height")
        _refuse_unknown("window", window, _WINDOW_KEYS)
        for key in ("width", "height"):
            if key in window:
                options[f"window_{key}"] = _window_size(key, window[key])

    audio = document.get("audio", False)
    if not isinstance(audio, bool):
        raise bad_request("audio must be true or false")
    options["audio"] = audio
    return BatchOptions(**options)


def _refuse_unknown(what: str, document: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(document) - known)
    if unknown:
        raise bad_request(f"{what} has unknown keys {unknown}; known: {sorted(known)}")


def _window_size(key: str, value: Any) -> int:
    low, high = WINDOW_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"window {key} must be an integer from {low} to {high}")
    return value


def _cookie(index: int, raw: Any) -> Cookie:
    where = f"cookies[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object")
    _refuse_unknown(where, raw, _COOKIE_KEYS)

    def text(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise bad_request(f"{where}.{key} must be a string")
        if len(value) > MAX_COOKIE_CHARS or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise bad_request(f"{where}.{key} is too long or contains control characters")
        return value

    def flag(key: str) -> bool:
        value = raw.get(key, False)
        if not isinstance(value, bool):
            raise bad_request(f"{where}.{key} must be true or false")
        return value

    if "name" not in raw or "value" not in raw:
        raise bad_request(f"{where} needs a name and a value")
    name = text("name", raw["name"])
    if not name:
        raise bad_request(f"{where}.name must not be empty")
    domain = raw.get("domain")
    expires = raw.get("expires")
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, int | float) or not math.isfinite(expires)
    ):
        raise bad_request(f"{where}.expires must be seconds since the epoch, or null")
    return Cookie(
        name=name,
        value=text("value", raw["value"]),
        domain=None if domain is None else text("domain", domain),
        path=text("path", raw.get("path", "/")),
        secure=flag("secure"),
        http_only=flag("httpOnly"),
        expires=None if expires is None else float(expires),
    )


def wants_json(accept: bytes | None) -> bool:
    """Whether the client asked for ``application/json`` (else ids go back as bare text)."""
    if not accept:
        return False
    return any(part.split(b";", 1)[0].strip().lower() == b"application/json" for part in accept.split(b","))
