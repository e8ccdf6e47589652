"""The grammar every word of seed 001 shares: where the word sits in a message, and what a word is.

A message's body starts with its word (ASCII, up to the first space or newline); what follows one
separator byte is the word's payload (JSON text, or raw bytes for FILE_PUT / FILE_RESULTS).  Headers
carry the rest.  Everything here is pure: frames in, records out, no Twisted reactor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Coroutine, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

import attrs

from vmcloud import boundedjson
from vmcloud.stomp.frame import Frame
from vmcloud.words.destinations import BROADCAST, IDENTITY_RE, LOGIN_HEADER, guest_destination

#: A word: an upper-case ASCII token, short enough to log safely.
WORD_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
#: Request/answer correlation ids: printable, short, no separators that need escaping.
CMD_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Where a word may start its payload.
SEPARATORS = (b" ", b"\n")
#: The largest JSON a word may carry (payload or header), nested at most
#: :data:`~vmcloud.boundedjson.MAX_DEPTH` deep: the embedded broker's body limit (``Limits.max_body``),
#: so that a word relayed by an external broker allowing larger frames is held to the same size.
MAX_JSON_BYTES = 16 * 1024 * 1024

#: Header naming who a request is for: an identity, or ``*`` for every guest (on BROADCAST).
TO = "to"
#: The correlation id: every request carries one, every answer carries the same one.
CMD_ID = "cmd-id"
#: Every message a guest sends names the identity it goes by.
IDENTITY = "identity"
#: Answers say ``ok`` or ``error``; an error answer explains itself in ``message``.
STATUS = "status"
MESSAGE = "message"
OK = "ok"
ERROR = "error"
EVERYONE = "*"


class MalformedWord(ValueError):
    """A message that does not say what its word requires; ``reason`` is fit for a log and a peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _header_dict(headers: Mapping[str, str]) -> dict[str, str]:
    return dict(headers)


@attrs.frozen
class Said:
    """What a word says: the message to send, before any wire encoding."""

    destination: str
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_header_dict)
    body: bytes = b""

    @property
    def word(self) -> str:
        return split_body(self.body)[0] or ""


C_contra = TypeVar("C_contra", contravariant=True)


class Word(Protocol[C_contra]):
    """One word of the vocabulary: a name, and what hearing it means on the side that hears it.

    Each word class also has a ``how_to_say`` classmethod building the :class:`Said` message; its
    arguments differ from word to word, so it is not part of this protocol.
    """

    name: ClassVar[str]

    def listen_and_act(self, frame: Frame, context: C_contra) -> Coroutine[Any, Any, None]:
        """Act on a frame carrying this word; raise :class:`MalformedWord` when it is not well said."""
        ...


def split_body(body: bytes) -> tuple[str | None, bytes]:
    """The word a body starts with (None when it starts with no valid word) and its payload."""
    cut = len(body)
    for separator in SEPARATORS:
        at = body.find(separator, 0, 40)
        if at != -1:
            cut = min(cut, at)
    if cut > 32:
        return None, body
    try:
        word = body[:cut].decode("ascii")
    except UnicodeDecodeError:
        return None, body
    if not WORD_RE.match(word):
        return None, body
    return word, body[cut + 1 :]


def printable(value: bytes | str, limit: int = 64) -> str:
    """A short, safe rendering of untrusted text for log lines and AINT_A_WORD answers."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    shown = "".join(ch if ch.isprintable() else "?" for ch in value[:limit])
    return shown + ("..." if len(value) > limit else "")


def body_of(word: str, payload: bytes | None = None) -> bytes:
    """A body: the word, then (after a newline) the payload, if any."""
    head = word.encode("ascii")
    return head if payload is None else head + b"\n" + payload


def json_body(word: str, payload: Mapping[str, Any]) -> bytes:
    """``WORD <json>``, as seed 001 writes CMD_RESULTS."""
    return word.encode("ascii") + b" " + json.dumps(payload, separators=(",", ":")).encode("utf-8")


def json_payload(frame: Frame) -> dict[str, Any]:
    """The JSON object following the word; an empty payload is an empty object."""
    word, payload = split_body(frame.body)
    if not payload.strip():
        return {}
    try:
        value = boundedjson.loads(payload.decode("utf-8"), max_bytes=MAX_JSON_BYTES)
    except ValueError as e:  # JsonRefused, JSONDecodeError, UnicodeDecodeError
        raise MalformedWord(f"{word} payload is not JSON: {printable(str(e))}") from None
    if not isinstance(value, dict):
        raise MalformedWord(f"{word} payload is not a JSON object")
    return value


def required(frame: Frame, name: str) -> str:
    """A header that must be there and not empty."""
    value = frame.get(name)
    if not value:
        raise MalformedWord(f"missing header {name!r}")
    return value


def cmd_id_of(frame: Frame) -> str:
    """The request's correlation id, validated."""
    value = required(frame, CMD_ID)
    if not CMD_ID_RE.match(value):
        raise MalformedWord(f"bad {CMD_ID} {printable(value)!r}")
    return value


def optional_cmd_id(frame: Frame) -> str | None:
    """The correlation id when the frame has a well-formed one, else None (for error answers)."""
    value = frame.get(CMD_ID)
    return value if value and CMD_ID_RE.match(value) else None


def optional_identity(frame: Frame, name: str = IDENTITY) -> str | None:
    """An identity header, validated when present."""
    value = frame.get(name)
    if value is None or value == "":
        return None
    if not IDENTITY_RE.match(value):
        raise MalformedWord(f"bad {name} {printable(value)!r}")
    return value


def json_header(frame: Frame, name: str) -> Any:
    """A header holding JSON (CMD_RUN's ``args`` and ``env``); absent means None."""
    value = frame.get(name)
    if value is None or value == "":
        return None
    try:
        return boundedjson.loads(value, max_bytes=MAX_JSON_BYTES)
    except boundedjson.JsonRefused as e:
        raise MalformedWord(f"header {name!r}: {e}") from None
    except ValueError:
        raise MalformedWord(f"header {name!r} is not JSON") from None


def seconds_header(frame: Frame, name: str) -> float | None:
    """A positive, finite number of seconds; absent means None."""
    value = frame.get(name)
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise MalformedWord(f"header {name!r} is not a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise MalformedWord(f"header {name!r} must be a positive number of seconds")
    return seconds


def answer_headers(cmd_id: str, identity: str, error: str | None = None) -> dict[str, str]:
    """The headers every answer carries: the request's cmd-id, the sender, ok or error."""
    headers = {CMD_ID: cmd_id, IDENTITY: identity, STATUS: OK if error is None else ERROR}
    if error is not None:
        headers[MESSAGE] = error
    return headers


def answer_error(frame: Frame) -> str | None:
    """The error an answer reports, or None when it says ok."""
    status = frame.get(STATUS, OK)
    if status == OK:
        return None
    if status != ERROR:
        raise MalformedWord(f"bad {STATUS} {printable(status or '')!r}")
    return frame.get(MESSAGE) or "the guest reported an error without a message"


def sender_of(frame: Frame) -> str | None:
    """Who sent a guest message: the login the broker vouches for, else the identity it claims."""
    return optional_identity(frame, LOGIN_HEADER) or optional_identity(frame)


def request_destination(to: str) -> str:
    """Where a request for ``to`` goes: the guest's own destination, or BROADCAST for everyone."""
    return BROADCAST if to == EVERYONE else guest_destination(to)


def request_headers(to: str, cmd_id: str) -> dict[str, str]:
    """The headers every request carries."""
    if not CMD_ID_RE.match(cmd_id):
        raise ValueError(f"bad cmd-id {cmd_id!r}")
    return {TO: to, CMD_ID: cmd_id}
