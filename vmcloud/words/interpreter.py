"""The interpreter (seed 001's ``MsgInterpreter``): routes a heard frame to its word, by its first word.

Anything it cannot route, and anything a word finds malformed, is answered with AINT_A_WORD
("ain't ain't a word") carrying the reason and the request's ``cmd-id``, so that whoever asked
hears at once instead of waiting for a timeout.  Nothing a peer sends makes the interpreter raise:
every failure ends as a log line with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from vmcloud.stomp.frame import Frame
from vmcloud.words.contexts import IWordContext
from vmcloud.words.grammar import (
    CMD_ID,
    IDENTITY,
    MalformedWord,
    Said,
    Word,
    body_of,
    optional_cmd_id,
    printable,
    sender_of,
    split_body,
)

log = Logger()

WORD = "word"
REASON = "reason"


def _lenient_sender(frame: Frame) -> str | None:
    try:
        return sender_of(frame)
    except MalformedWord:
        return None


class AintAWord:
    """The answer to anything not understood: an unknown word, or a word not well said."""

    name: ClassVar[str] = "AINT_A_WORD"

    @classmethod
    def how_to_say(
        cls,
        *,
        destination: str,
        word: str,
        reason: str,
        cmd_id: str | None = None,
        speaker: str | None = None,
    ) -> Said:
        headers = {WORD: word, REASON: reason}
        if cmd_id is not None:
            headers[CMD_ID] = cmd_id
        if speaker is not None:
            headers[IDENTITY] = speaker
        return Said(destination, headers, body_of(cls.name))

    async def listen_and_act(self, frame: Frame, context: IWordContext) -> None:
        # Never answered, never malformed: two peers must not trade AINT_A_WORDs forever.
        context.heard_not_understood(
            optional_cmd_id(frame),
            printable(frame.get(WORD) or "?"),
            printable(frame.get(REASON) or "no reason given", 300),
            _lenient_sender(frame),
        )


C = TypeVar("C", bound=IWordContext)


class Interpreter(Generic[C]):
    """Routes frames to the words of one side's vocabulary, acting in that side's context."""

    def __init__(self, words: Iterable[Word[C]], context: C) -> None:
        self._words = {word.name: word for word in words}
        self._context = context

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(self._words)

    def hear(self, frame: Frame) -> Deferred[None]:
        """Act on one frame; the Deferred fires when the word is done acting (it never fails)."""
        return Deferred.fromCoroutine(self._hear(frame))

    async def _hear(self, frame: Frame) -> None:
        name, _ = split_body(frame.body)
        word = self._words.get(name) if name is not None else None
        if word is None:
            shown = name if name is not None else printable(frame.body[:32])
            self._not_understood(frame, shown, "unknown word" if name else "the body starts with no word")
            return
        try:
            await word.listen_and_act(frame, self._context)
        except MalformedWord as e:
            self._not_understood(frame, word.name, e.reason)
        except Exception:
            log.failure(
                "Acting on {word} from {sender} failed", word=word.name, sender=_lenient_sender(frame)
            )

    def _not_understood(self, frame: Frame, word: str, reason: str) -> None:
        sender = _lenient_sender(frame)
        cmd_id = optional_cmd_id(frame)
        log.warn(
            "Did not understand {word} from {sender} (cmd-id {cmd_id}): {reason}",
            word=word,
            sender=sender or "an unknown peer",
            cmd_id=cmd_id,
            reason=reason,
            event="word-not-understood",
        )
        if word == AintAWord.name:
            return
        try:
            destination = self._context.answer_destination(frame)
            if destination is None:
                return
            said = AintAWord.how_to_say(
                destination=destination,
                word=word,
                reason=reason,
                cmd_id=cmd_id,
                speaker=self._context.speaker(),
            )
            self._context.say(said)
        except Exception:
            log.failure("Could not answer AINT_A_WORD to {sender}", sender=sender)
