"""FILE_PUT, FILE_GET and FILE_RESULTS: copy a file to or from a guest over the guest channel.

Seed 001 moved files with Chirp beside STOMP; here the bytes travel in the message body itself
(``WORD\\n<bytes>``, binary safe because the codec always sends ``content-length``), so a guest
needs no other open port.  Paths are relative to the agent's work directory, which confines them;
sizes are limited (:data:`MAX_FILE_BYTES`, below the broker's body limit) and every transfer carries
the SHA-256 of its content, checked by the receiving side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.logger import Logger

from vmcloud.stomp.frame import Frame
from vmcloud.words.contexts import (
    Answer,
    IAgentContext,
    IControllerContext,
    StoredFile,
    failure_reason,
    say_answer,
)
from vmcloud.words.destinations import CONTROLLER
from vmcloud.words.grammar import (
    TO,
    MalformedWord,
    Said,
    answer_error,
    answer_headers,
    body_of,
    cmd_id_of,
    printable,
    request_destination,
    request_headers,
    sender_of,
    split_body,
)

log = Logger()

#: The largest file either side moves in one message.  The embedded broker drops a consumer that
#: falls 8 MiB behind and refuses bodies over 16 MiB, so one message stays well below both.
MAX_FILE_BYTES = 6 * 1024 * 1024

PATH = "path"
MODE = "mode"
SIZE = "size"
SHA256 = "sha256"
OP = "op"
_MAX_PATH = 1024


def _path_of(frame: Frame) -> str:
    path = frame.get(PATH) or ""
    if not path or len(path) > _MAX_PATH or "\x00" in path:
        raise MalformedWord(f"header {PATH!r} must be a path of 1 to {_MAX_PATH} characters")
    return path


def _sha256_of(frame: Frame) -> str | None:
    value = frame.get(SHA256)
    if value is None:
        return None
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise MalformedWord(f"bad {SHA256} {printable(value)!r}")
    return value


class FilePut:
    """Controller → guest: store these bytes at ``path`` (relative to the agent's work dir)."""

    name: ClassVar[str] = "FILE_PUT"

    @classmethod
    def how_to_say(cls, *, to: str, cmd_id: str, path: str, content: bytes, mode: int | None = None) -> Said:
        if len(content) > MAX_FILE_BYTES:
            raise ValueError(f"{len(content)} bytes is more than FILE_PUT carries ({MAX_FILE_BYTES})")
        headers = request_headers(to, cmd_id)
        headers[PATH] = path
        headers[SIZE] = str(len(content))
        headers[SHA256] = hashlib.sha256(content).hexdigest()
        if mode is not None:
            headers[MODE] = f"{mode:o}"
        return Said(request_destination(to), headers, body_of(cls.name, content))

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """The request from call parameters ``path``, ``content`` (bytes) and optional ``mode``."""
        unknown = set(params) - {PATH, "content", MODE}
        if unknown:
            raise ValueError(f"FILE_PUT has no parameter {sorted(unknown)}")
        content = params["content"]
        if not isinstance(content, bytes):
            raise ValueError("FILE_PUT content must be bytes")
        return cls.how_to_say(to=to, cmd_id=cmd_id, path=params[PATH], content=content, mode=params.get(MODE))

    async def listen_and_act(self, frame: Frame, context: IAgentContext) -> None:
        if not context.addressed_to_me(frame.get(TO)):
            return
        cmd_id = cmd_id_of(frame)
        path = _path_of(frame)
        _, content = split_body(frame.body)
        mode_text = frame.get(MODE)
        try:
            mode = int(mode_text, 8) if mode_text else None
        except ValueError:
            raise MalformedWord(f"bad {MODE} {printable(mode_text or '')!r}") from None
        if mode is not None and not 0 <= mode <= 0o7777:
            raise MalformedWord(f"bad {MODE} {mode_text!r}")
        expected = _sha256_of(frame)
        size = frame.get(SIZE)
        error: str | None = None
        stored: StoredFile | None = None
        if len(content) > MAX_FILE_BYTES:
            error = f"file of {len(content)} bytes is over the limit of {MAX_FILE_BYTES}"
        elif size is not None and size != str(len(content)):
            error = f"file arrived with {len(content)} bytes, {size} were sent"
        elif expected is not None and hashlib.sha256(content).hexdigest() != expected:
            error = "file arrived corrupted (sha256 differs)"
        else:
            try:
                stored = await context.put_file(path, content, mode)
            except Exception as e:
                error = failure_reason(e, f"FILE_PUT {cmd_id}")
        if error is not None:
            log.warn("FILE_PUT {cmd_id} of {path} refused: {reason}", cmd_id=cmd_id, path=path, reason=error)
        say_answer(
            frame,
            context,
            FileResults.how_to_say(
                cmd_id=cmd_id, identity=context.identity(), op="put", stored=stored, error=error
            ),
        )


class FileGet:
    """Controller → guest: send me the file at ``path`` (relative to the agent's work dir)."""

    name: ClassVar[str] = "FILE_GET"

    @classmethod
    def how_to_say(cls, *, to: str, cmd_id: str, path: str) -> Said:
        headers = request_headers(to, cmd_id)
        headers[PATH] = path
        return Said(request_destination(to), headers, body_of(cls.name))

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """The request from call parameter ``path``."""
        unknown = set(params) - {PATH}
        if unknown:
            raise ValueError(f"FILE_GET has no parameter {sorted(unknown)}")
        return cls.how_to_say(to=to, cmd_id=cmd_id, path=params[PATH])

    async def listen_and_act(self, frame: Frame, context: IAgentContext) -> None:
        if not context.addressed_to_me(frame.get(TO)):
            return
        cmd_id = cmd_id_of(frame)
        path = _path_of(frame)
        try:
            stored, content = await context.get_file(path)
        except Exception as e:
            reason = failure_reason(e, f"FILE_GET {cmd_id}")
            log.warn("FILE_GET {cmd_id} of {path} refused: {reason}", cmd_id=cmd_id, path=path, reason=reason)
            said = FileResults.how_to_say(cmd_id=cmd_id, identity=context.identity(), op="get", error=reason)
        else:
            if len(content) > MAX_FILE_BYTES:
                reason = f"file of {len(content)} bytes is over the limit of {MAX_FILE_BYTES}"
                said = FileResults.how_to_say(
                    cmd_id=cmd_id, identity=context.identity(), op="get", error=reason
                )
            else:
                said = FileResults.how_to_say(
                    cmd_id=cmd_id, identity=context.identity(), op="get", stored=stored, content=content
                )
        say_answer(frame, context, said)


class FileResults:
    """Guest → controller: the answer to FILE_PUT (what was stored) or FILE_GET (the bytes)."""

    name: ClassVar[str] = "FILE_RESULTS"

    @classmethod
    def how_to_say(
        cls,
        *,
        cmd_id: str,
        identity: str,
        op: str,
        stored: StoredFile | None = None,
        content: bytes | None = None,
        error: str | None = None,
    ) -> Said:
        headers = answer_headers(cmd_id, identity, error)
        headers[OP] = op
        if stored is not None:
            headers[PATH] = stored.path
            headers[SIZE] = str(stored.size)
            headers[SHA256] = stored.sha256
        return Said(CONTROLLER, headers, body_of(cls.name, content))

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        cmd_id = cmd_id_of(frame)
        sender = sender_of(frame)
        try:
            error = answer_error(frame)
            value = {} if error is not None else self._read(frame)
        except MalformedWord as e:
            context.heard_answer(
                Answer(cmd_id, self.name, sender, error=f"malformed {self.name}: {e.reason}")
            )
            raise
        context.heard_answer(Answer(cmd_id, self.name, sender, value, error))

    @staticmethod
    def _read(frame: Frame) -> dict[str, Any]:
        op = frame.get(OP)
        if op not in ("put", "get"):
            raise MalformedWord(f"bad {OP} {printable(op or '')!r}")
        size_text = frame.get(SIZE) or ""
        if not size_text.isdigit():
            raise MalformedWord(f"bad {SIZE} {printable(size_text)!r}")
        sha256 = _sha256_of(frame)
        value: dict[str, Any] = {"path": _path_of(frame), "size": int(size_text), "sha256": sha256}
        if op == "get":
            _, content = split_body(frame.body)
            if len(content) != value["size"] or hashlib.sha256(content).hexdigest() != sha256:
                raise MalformedWord("file arrived corrupted (size or sha256 differs)")
            value["content"] = content
        return value
