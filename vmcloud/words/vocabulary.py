"""Which words each side hears, and which requests the controller may say and await.

The controller hears what guests say (presence, answers, events); the agent hears requests.  Both
hear AINT_A_WORD.  :data:`REQUESTS` and :data:`ANSWERS` let the guest channel's generic
``call(identity, word, params, timeout)`` build any request and know which answer to await.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from vmcloud.words.browser import Cleanup, CleanupResults, PageLoad, Prepare, PrepareResults
from vmcloud.words.commands import CmdResults, CmdRun
from vmcloud.words.contexts import IAgentContext, IControllerContext
from vmcloud.words.files import FileGet, FilePut, FileResults
from vmcloud.words.grammar import Said, Word
from vmcloud.words.interpreter import AintAWord
from vmcloud.words.presence import Bye, Hello, StillAlive


class RequestWord(Protocol):
    """A word the controller says to a guest and awaits an answer to."""

    name: ClassVar[str]

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """Build the request; raise ValueError (or KeyError/TypeError) on bad parameters."""
        ...


def controller_words() -> tuple[Word[IControllerContext], ...]:
    """What the controller hears."""
    return (
        Hello(),
        Bye(),
        StillAlive(),
        CmdResults(),
        FileResults(),
        PrepareResults(),
        CleanupResults(),
        PageLoad(),
        AintAWord(),
    )


def agent_words() -> tuple[Word[IAgentContext], ...]:
    """What a guest agent hears."""
    return (CmdRun(), FilePut(), FileGet(), Prepare(), Cleanup(), AintAWord())


#: Requests by word, for :meth:`IGuestChannel.call`.
REQUESTS: Mapping[str, type[RequestWord]] = {
    CmdRun.name: CmdRun,
    FilePut.name: FilePut,
    FileGet.name: FileGet,
    Prepare.name: Prepare,
    Cleanup.name: Cleanup,
}

#: The answer word each request expects (AINT_A_WORD may always come instead).
ANSWERS: Mapping[str, str] = {
    CmdRun.name: CmdResults.name,
    FilePut.name: FileResults.name,
    FileGet.name: FileResults.name,
    Prepare.name: PrepareResults.name,
    Cleanup.name: CleanupResults.name,
}
