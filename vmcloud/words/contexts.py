"""What a word may do when it is heard: the controller's and the agent's side of the conversation.

The same word classes serve both sides (seed 001's "words" package); what differs is the context a
word acts in.  The controller's context keeps the registry of guests and the pending calls; the
agent's context runs commands, moves files and drives the browser.  Words talk to these interfaces
only, so each side can be tested with a recording fake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger
from zope.interface import Interface

from vmcloud.stomp.frame import Frame
from vmcloud.words.grammar import Said, printable

_log = Logger()

# --------------------------------------------------------------------------- records


@attrs.frozen
class Announcement:
    """What a guest says about itself in HELLO, BYE and STILL_ALIVE."""

    identity: str | None  # as the guest names itself (``identity`` header)
    login: str | None  # the STOMP login the broker vouches for (embedded broker only)
    ip: str | None
    mac: str | None
    agent_version: str
    capabilities: tuple[str, ...]
    # HELLO's optional operator view: the VNC server's port and the view-only password (a secret)
    vnc_port: int | None = None
    view_password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Answer:
    """A guest's answer to a request: the request's cmd-id, and a value or an error."""

    cmd_id: str
    word: str
    sender: str | None
    value: Mapping[str, Any] = attrs.field(factory=dict)
    error: str | None = None


@attrs.frozen
class CommandRequest:
    """CMD_RUN as the agent hears it."""

    cmd_id: str
    cmd: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None  # None: the agent's own environment
    path: str | None = None  # working directory; None: the agent's work dir
    timeout: float | None = None  # seconds; None: the agent's default


@attrs.frozen
class CommandOutcome:
    """How a command ended, in seed 001's terms (CMD_RESULTS)."""

    out: str
    err: str
    finished: bool  # False: killed by a signal (e.g. after its timeout)
    exit_code_or_signal: int
    resources: Mapping[str, float] = attrs.field(factory=dict)
    timed_out: bool = False
    truncated: bool = False  # some output was dropped (over the agent's output limit)
    duration: float | None = None  # seconds
    error: str | None = None  # why it could not start (then finished, with the shell's 126/127)


@attrs.frozen
class StoredFile:
    """A file the agent wrote or read, confined to its work directory."""

    path: str  # relative to the work directory
    size: int
    sha256: str


@attrs.frozen
class PrepareRequest:
    """PREPARE as the agent hears it: what the browser should look like for the next worker."""

    cmd_id: str
    homepage: str
    cookies: tuple[Mapping[str, Any], ...] = ()
    window_width: int = 1280
    window_height: int = 800
    audio: bool = False
    vnc_password: str | None = None


# --------------------------------------------------------------------------- contexts
# (zope.interface methods are declared without ``self``, hence the N805 exemptions.)


class IWordContext(Interface):
    """What every side offers its words."""

    def say(said: Said) -> None:  # noqa: N805
        """Send a message."""

    def speaker() -> str | None:
        """The identity this side speaks as (a guest's identity; None for the controller)."""

    def answer_destination(frame: Frame) -> str | None:  # noqa: N805
        """Where an answer to ``frame`` goes (None: nobody to answer)."""

    def heard_not_understood(cmd_id: str | None, word: str, reason: str, sender: str | None) -> None:  # noqa: N805
        """The peer answered AINT_A_WORD to something we said."""


class IControllerContext(IWordContext):
    """The controller's side: the registry of guests and the calls waiting for answers."""

    def heard_hello(announcement: Announcement) -> None:  # noqa: N805
        """A guest said HELLO."""

    def heard_bye(announcement: Announcement) -> None:  # noqa: N805
        """A guest said BYE."""

    def heard_beacon(announcement: Announcement) -> None:  # noqa: N805
        """A guest said STILL_ALIVE."""

    def heard_answer(answer: Answer) -> None:  # noqa: N805
        """A guest answered a request."""

    def heard_event(sender: str | None, event: Mapping[str, Any]) -> None:  # noqa: N805
        """A guest reported an event (e.g. a page load)."""


class IAgentContext(IWordContext):
    """The agent's side: who it is and what it can do."""

    def addressed_to_me(to: str | None) -> bool:  # noqa: N805
        """Whether a request's ``to`` header names this agent (or everyone)."""

    def identity() -> str:
        """The identity this agent goes by (the tail of its command destination)."""

    async def run_command(request: CommandRequest) -> CommandOutcome:  # noqa: N805
        """Run a command to its end or its timeout."""

    async def put_file(path: str, content: bytes, mode: int | None) -> StoredFile:  # noqa: N805
        """Write a file under the work directory; raise ValueError/OSError with a reason on refusal."""

    async def get_file(path: str) -> tuple[StoredFile, bytes]:  # noqa: N805
        """Read a file under the work directory; raise ValueError/OSError with a reason on refusal."""

    async def prepare(request: PrepareRequest) -> Mapping[str, Any]:  # noqa: N805
        """Give the browser a fresh profile, home page, cookies and window; return what to report."""

    async def cleanup(cmd_id: str) -> Mapping[str, Any]:  # noqa: N805
        """Kill the browser and wipe its profile; return what to report."""


# --------------------------------------------------------------------------- helpers for words


#: Failures an action reports as a plain reason; anything else is a bug and is logged with its traceback.
EXPECTED_ERRORS = (ValueError, OSError, LookupError)


def failure_reason(error: BaseException, what: str) -> str:
    """What to tell the controller about a failed action: the reason, never a traceback.

    Call it inside the ``except`` block: unexpected errors are logged there with their traceback.
    """
    if isinstance(error, EXPECTED_ERRORS):
        return printable(str(error) or type(error).__name__, 300)
    _log.failure("{what} failed", what=what)
    return f"internal error ({type(error).__name__}); see the agent's log"


def say_answer(frame: Frame, context: IAgentContext, said: Said) -> None:
    """Send an answer where the request says answers go (the controller's destination)."""
    destination = context.answer_destination(frame)
    if destination is not None:
        context.say(attrs.evolve(said, destination=destination))


async def act_and_answer(
    frame: Frame,
    context: IAgentContext,
    what: str,
    cmd_id: str,
    action: Callable[[], Awaitable[Any]],
    answer: Callable[..., Said],
    result: str,
) -> None:
    """Carry out a request and say its answer word: ``result=<the value>``, or the reason it failed."""
    try:
        value = await action()
    except Exception as e:
        said = answer(cmd_id=cmd_id, identity=context.identity(), error=failure_reason(e, f"{what} {cmd_id}"))
    else:
        said = answer(cmd_id=cmd_id, identity=context.identity(), **{result: value})
    say_answer(frame, context, said)
