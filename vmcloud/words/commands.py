"""CMD_RUN and CMD_RESULTS: run a command on a guest and hear how it ended (seed 001).

CMD_RUN carries everything in headers (``to``, ``cmd-id``, ``cmd``, ``args`` as a JSON list,
``env`` as a JSON object, ``path``, ``timeout``) and the bare word as its body.  CMD_RESULTS answers
with ``CMD_RESULTS <json>``, keeping seed 001's key names (``cmd-id``, ``out``, ``err``,
``finished``, ``exitCodeOrSignal``, ``resources``) and adding a few of its own (``timedOut``,
``truncated``, ``duration``, ``error``).  A command that could not start is still a result (exit
127 or 126 and ``error``, as a shell says it); an answer with ``status: error`` means the agent
could not even try.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from twisted.logger import Logger

from vmcloud.stomp.frame import Frame
from vmcloud.words.contexts import (
    Answer,
    CommandOutcome,
    CommandRequest,
    IAgentContext,
    IControllerContext,
    act_and_answer,
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
    json_body,
    json_header,
    json_payload,
    request_destination,
    request_headers,
    seconds_header,
    sender_of,
)

log = Logger()

CMD = "cmd"
ARGS = "args"
ENV = "env"
PATH = "path"
TIMEOUT = "timeout"

_MAX_CMD = 4096


class CmdRun:
    """Controller → guest: run ``cmd args…`` in ``path`` with ``env``, for at most ``timeout`` s."""

    name: ClassVar[str] = "CMD_RUN"

    @classmethod
    def how_to_say(
        cls,
        *,
        to: str,
        cmd_id: str,
        cmd: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        timeout: float | None = None,
    ) -> Said:
        headers = request_headers(to, cmd_id)
        headers[CMD] = cmd
        headers[ARGS] = json.dumps(list(args))
        if env is not None:
            headers[ENV] = json.dumps(dict(env))
        if path is not None:
            headers[PATH] = path
        if timeout is not None:
            headers[TIMEOUT] = repr(float(timeout))
        return Said(request_destination(to), headers, body_of(cls.name))

    @classmethod
    def from_params(cls, to: str, cmd_id: str, params: Mapping[str, Any]) -> Said:
        """The request from :meth:`IGuestChannel.call` parameters (``cmd``, ``args``, ``env``, ...)."""
        unknown = set(params) - {CMD, ARGS, ENV, PATH, TIMEOUT}
        if unknown:
            raise ValueError(f"CMD_RUN has no parameter {sorted(unknown)}")
        return cls.how_to_say(
            to=to,
            cmd_id=cmd_id,
            cmd=params[CMD],
            args=params.get(ARGS, ()),
            env=params.get(ENV),
            path=params.get(PATH),
            timeout=params.get(TIMEOUT),
        )

    @staticmethod
    def read(frame: Frame) -> CommandRequest:
        """The request, every header checked."""
        cmd_id = cmd_id_of(frame)
        cmd = frame.get(CMD) or ""
        if not cmd or len(cmd) > _MAX_CMD or "\x00" in cmd:
            raise MalformedWord(f"header {CMD!r} must be a command of 1 to {_MAX_CMD} characters")
        args = json_header(frame, ARGS)
        if args is None:
            args = []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise MalformedWord(f"header {ARGS!r} must be a JSON list of strings")
        env = json_header(frame, ENV)
        if env is not None and not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
            raise MalformedWord(f"header {ENV!r} must be a JSON object of strings")
        return CommandRequest(
            cmd_id=cmd_id,
            cmd=cmd,
            args=tuple(args),
            env=env,
            path=frame.get(PATH) or None,
            timeout=seconds_header(frame, TIMEOUT),
        )

    async def listen_and_act(self, frame: Frame, context: IAgentContext) -> None:
        if not context.addressed_to_me(frame.get(TO)):
            return
        request = self.read(frame)
        log.info(
            "Running command {cmd_id}: {cmd} {args}",
            cmd_id=request.cmd_id,
            cmd=request.cmd,
            args=list(request.args),
            event="cmd-run",
        )
        await act_and_answer(
            frame,
            context,
            "CMD_RUN",
            request.cmd_id,
            lambda: context.run_command(request),
            CmdResults.how_to_say,
            "outcome",
        )


class CmdResults:
    """Guest → controller: how a CMD_RUN ended, or why it could not run."""

    name: ClassVar[str] = "CMD_RESULTS"

    @classmethod
    def how_to_say(
        cls, *, cmd_id: str, identity: str, outcome: CommandOutcome | None = None, error: str | None = None
    ) -> Said:
        results: dict[str, Any] = {"cmd-id": cmd_id}
        if outcome is not None:
            results.update(
                out=outcome.out,
                err=outcome.err,
                finished=outcome.finished,
                exitCodeOrSignal=outcome.exit_code_or_signal,
                resources=dict(outcome.resources),
                timedOut=outcome.timed_out,
                truncated=outcome.truncated,
            )
            if outcome.duration is not None:
                results["duration"] = outcome.duration
            if outcome.error is not None:
                results["error"] = outcome.error
        if error is not None:
            results["error"] = error
        return Said(CONTROLLER, answer_headers(cmd_id, identity, error), json_body(cls.name, results))

    async def listen_and_act(self, frame: Frame, context: IControllerContext) -> None:
        cmd_id = cmd_id_of(frame)
        sender = sender_of(frame)
        try:
            error = answer_error(frame)
            results = json_payload(frame)
            if error is None:
                _check_results(results)
        except MalformedWord as e:
            context.heard_answer(
                Answer(cmd_id, self.name, sender, error=f"malformed {self.name}: {e.reason}")
            )
            raise
        context.heard_answer(Answer(cmd_id, self.name, sender, results, error))


def _check_results(results: Mapping[str, Any]) -> None:
    expected: dict[str, type | tuple[type, ...]] = {
        "out": str,
        "err": str,
        "finished": bool,
        "exitCodeOrSignal": int,
        "resources": dict,
    }
    for key, kind in expected.items():
        if not isinstance(results.get(key), kind):
            raise MalformedWord(f"results lack {key!r} or it has the wrong type")
