"""Run the commands the controller asks for (CMD_RUN), with timeouts, output limits and accounting.

Every command runs in its own session and process group, so a timeout can kill everything it
started, grandchildren included, and nothing it leaves behind is confused with the agent's own
processes.  Twisted's ``spawnProcess`` has no ``preexec_fn``, so we do not spawn the command
directly: we spawn a tiny *session leader*, :mod:`guest_agent.leader` run as a script
(``python -I -S .../guest_agent/leader.py CWD CMD ARGS``), that calls ``os.setsid()``, starts the
command with ``os.posix_spawnp``, waits for it with ``os.wait4`` and writes one JSON report (exit
status, ``resource`` usage) to file descriptor 3, a pipe only we read.

Why ``os.wait4`` rather than ``resource.getrusage(RUSAGE_CHILDREN)`` deltas: the agent runs up to
``max_concurrent`` commands at once and Twisted reaps children whenever it likes, so deltas of the
agent's own counters would mix commands together.  ``wait4`` in the leader gives exactly the
command's usage (itself plus the descendants it waited for).  The leader ignores SIGTERM so that,
on a timeout, it survives the command long enough to report; the SIGKILL that follows after the
grace kills it too, and then ``resources`` is empty.  The leader is one more Python start-up per
command and one more small process while the command runs.  Linux counts the memory of the image a
process replaced by ``exec`` into ``ru_maxrss``, and ``posix_spawn`` starts from the leader's image,
so ``ru_maxrss`` is never below the leader's own; CPU times, faults and I/O counts are the command's
alone.

Environment: the command gets ``base_env`` (a fixed, minimal environment unless the agent's
composition root passes another) overlaid with the request's ``env``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from guest_agent import leader
from guest_agent.leader import EXIT_CANNOT_EXECUTE, REPORT_FD

MiB = 1024 * 1024

#: The environment every command starts from unless the composition root passes another.
DEFAULT_BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}

#: Bytes of cmd + args + env + path accepted (the kernel's ARG_MAX is about 2 MiB for both together).
MAX_REQUEST_BYTES = 1 * MiB

#: The session leader, run as a script (see :mod:`guest_agent.leader`).
LEADER_SCRIPT = leader.__file__

log = Logger()


@attrs.frozen
class CommandResult:
    """What a command did, in the shape CMD_RESULTS carries (see :meth:`as_json`).

    ``finished`` is true when the command exited on its own; then ``exit_code_or_signal`` is its
    exit code.  Otherwise it was killed (by our timeout or anything else) and
    ``exit_code_or_signal`` is the signal number.  ``error`` explains a command that could not be
    started (missing executable, bad directory, agent busy); such a result is "finished" with the
    shell's exit codes 127 (not found) or 126 (cannot execute), and the reason is also in ``err``.
    """

    out: str
    err: str
    finished: bool
    exit_code_or_signal: int
    resources: dict[str, float]
    duration: float
    truncated: bool = False
    timed_out: bool = False
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The seed-001 CMD_RESULTS keys (camelCase where the seed says so), plus our extras."""
        return {
            "out": self.out,
            "err": self.err,
            "finished": self.finished,
            "exitCodeOrSignal": self.exit_code_or_signal,
            "resources": dict(self.resources),
            "duration": self.duration,
            "truncated": self.truncated,
            "timedOut": self.timed_out,
            "error": self.error,
        }


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._kept = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self._limit - self._kept
        if room > 0:
            part = data[:room]
            self._chunks.append(part)
            self._kept += len(part)
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        text = b"".join(self._chunks).decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[vmcloud-guest: output truncated, {self.dropped} more bytes dropped]\n"
        return text


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; fall back to the leader alone if it has no group yet."""
    try:
        os.killpg(pgid, sig)
        return
    except ProcessLookupError:
        pass  # the leader has not called setsid() yet, or everything is gone already
    except PermissionError as e:
        log.warn(
            "Cannot signal process group {pgid}: {error}", pgid=pgid, error=e, event="command-kill-failed"
        )
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pgid, sig)


class _CommandProtocol(ProcessProtocol):
    """Collects one command's output and the leader's report; fires ``ended`` once."""

    def __init__(self, max_output: int, on_exit: Callable[[Failure], None]) -> None:
        self.stdout = _Capture(max_output)
        self.stderr = _Capture(max_output)
        self._report = bytearray()
        self._on_exit = on_exit
        self.exit_reason: Failure | None = None
        self.end_reason: Failure | None = None
        # Fires with None: a Deferred given a Failure as its result would take the errback path.
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        assert self.transport is not None
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        if childFD == 1:
            self.stdout.feed(data)
        elif childFD == 2:
            self.stderr.feed(data)
        elif childFD == REPORT_FD and len(self._report) < 64 * 1024:
            self._report += data

    def processExited(self, reason: Failure) -> None:  # noqa: N802
        if self.exit_reason is None:
            self.exit_reason = reason
            self._on_exit(reason)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.processExited(reason)
        if self.end_reason is None:
            self.end_reason = reason
            self.ended.callback(None)

    def report(self) -> dict[str, Any]:
        """The leader's JSON report, or ``{}`` when it was killed before writing one."""
        try:
            doc = json.loads(bytes(self._report))
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}


def _status_from_reason(reason: Failure) -> tuple[bool, int]:
    """(finished, exit code or signal) of the leader, from Twisted's end reason."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return True, 0
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return False, int(value.signal)
        return True, int(value.exitCode or 0)
    return False, 0


class CommandRunner:
    """Runs commands for the agent: at most ``max_concurrent`` at once, the rest wait in turn.

    ``reactor`` must provide ``IReactorProcess`` and ``IReactorTime``.  Up to ``max_queued``
    commands wait for a slot; past that a command is refused with a "busy" result rather than
    queued without bound.  ``default_timeout`` applies when a request gives none; the clock of a
    command starts when it gets its slot.  On timeout the process group gets SIGTERM, then SIGKILL
    after ``kill_grace`` seconds.  After the command exits, output still held open by background
    processes it left is read for ``drain_grace`` seconds more, then abandoned.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        max_output: int = 1 * MiB,
        default_timeout: float = 300.0,
        max_concurrent: int = 8,
        max_queued: int = 64,
        kill_grace: float = 5.0,
        drain_grace: float = 1.0,
        base_env: Mapping[str, str] = DEFAULT_BASE_ENV,
        python: str = sys.executable,
        signal_group: Callable[[int, int], None] = signal_group,
    ) -> None:
        if not IReactorProcess.providedBy(reactor) or not IReactorTime.providedBy(reactor):
            raise TypeError("CommandRunner needs a reactor providing IReactorProcess and IReactorTime")
        if max_output < 0 or max_concurrent < 1 or max_queued < 0 or default_timeout <= 0:
            raise ValueError("max_output >= 0, max_concurrent >= 1, max_queued >= 0, default_timeout > 0")
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.max_output = max_output
        self.default_timeout = default_timeout
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.kill_grace = kill_grace
        self.drain_grace = drain_grace
        self._base_env = dict(base_env)
        self._python = python
        self._signal_group = signal_group
        self._running = 0
        self._waiting: deque[Deferred[None]] = deque()
        self._pids: set[int] = set()

    @property
    def running(self) -> int:
        """How many commands run now (for status and tests)."""
        return self._running

    @property
    def waiting(self) -> int:
        """How many commands wait for a slot."""
        return len(self._waiting)

    async def run(
        self,
        cmd: str,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        path: str | None,
        timeout: float | None,
    ) -> CommandResult:
        """Run ``cmd`` with ``args`` (``argv[1:]``); never raises for anything the request holds.

        ``env`` is laid over the runner's base environment (None: the base alone); ``path`` is the
        working directory (None: the agent's own); ``timeout`` in seconds (None: the default).
        Cancelling the returned coroutine's Deferred kills the command's process group.
        """
        problem = _check_request(cmd, args, env, path, timeout)
        if problem is not None:
            log.warn("Refused command {cmd!r}: {reason}", cmd=cmd, reason=problem, event="command-refused")
            return _refusal(problem, EXIT_CANNOT_EXECUTE)
        if self._running >= self.max_concurrent:
            if len(self._waiting) >= self.max_queued:
                reason = (
                    f"agent busy: {self._running} commands running and {len(self._waiting)} waiting"
                    f" (limits {self.max_concurrent} and {self.max_queued})"
                )
                log.warn("Refused command {cmd!r}: {reason}", cmd=cmd, reason=reason, event="command-refused")
                return _refusal(reason, EXIT_CANNOT_EXECUTE)
            turn: Deferred[None] = Deferred(self._waiting.remove)  # cancelled: leave the queue
            self._waiting.append(turn)
            await turn  # the slot is handed over by _release, already counted
        else:
            self._running += 1
        try:
            return await self._run_in_slot(cmd, list(args), env or {}, path, timeout or self.default_timeout)
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)
        else:
            self._running -= 1

    def kill_all(self) -> None:
        """SIGKILL every running command's process group (the agent is stopping)."""
        for pid in list(self._pids):
            self._signal_group(pid, signal.SIGKILL)

    async def _run_in_slot(
        self, cmd: str, args: list[str], env: Mapping[str, str], path: str | None, timeout: float
    ) -> CommandResult:
        started = self._clock.seconds()
        calls: list[IDelayedCall] = []
        sent: list[int] = []

        def on_exit(reason: Failure) -> None:
            # The leader is gone; give pipes held by leftovers a moment, then stop reading.
            if protocol.ended.called:  # nobody waits any more (cancelled)
                return
            calls.append(self._clock.callLater(self.drain_grace, abandon_pipes))

        protocol = _CommandProtocol(self.max_output, on_exit)
        full_env = {**self._base_env, **env}
        argv = [self._python, "-I", "-S", LEADER_SCRIPT, path or "", cmd, *args]
        try:
            transport: IProcessTransport = self._reactor.spawnProcess(
                protocol,
                self._python,
                argv,
                env=full_env,
                path=None,
                childFDs={0: "w", 1: "r", 2: "r", REPORT_FD: "r"},
            )
        except (OSError, ValueError) as e:
            problem = f"cannot start the command: {e}"
            log.error("Cannot spawn {cmd!r}: {reason}", cmd=cmd, reason=problem, event="command-spawn-failed")
            return _refusal(problem, EXIT_CANNOT_EXECUTE)
        pid: int | None = transport.pid
        log.info(
            "Command {cmd!r} started as process group {pid}, timeout {timeout}s",
            cmd=cmd,
            pid=pid,
            timeout=timeout,
            event="command-started",
        )

        def kill(sig: int) -> None:
            if pid is not None and protocol.end_reason is None:
                sent.append(sig)
                self._signal_group(pid, sig)

        def on_timeout() -> None:
            log.warn(
                "Command {cmd!r} (process group {pid}) over its {timeout}s timeout: killing it",
                cmd=cmd,
                pid=pid,
                timeout=timeout,
                event="command-timeout",
            )
            kill(signal.SIGTERM)
            calls.append(self._clock.callLater(self.kill_grace, kill, signal.SIGKILL))

        def abandon_pipes() -> None:
            if protocol.ended.called or protocol.exit_reason is None:
                return
            log.info(
                "Command {cmd!r} exited but processes it left hold its output open; not waiting for them",
                cmd=cmd,
                event="command-output-abandoned",
            )
            for fd in (1, 2, REPORT_FD):
                transport.closeChildFD(fd)
            protocol.processEnded(protocol.exit_reason)

        calls.append(self._clock.callLater(timeout, on_timeout))
        if pid is not None:
            self._pids.add(pid)
        try:
            await protocol.ended
        except CancelledError:
            log.info("Command {cmd!r} cancelled: killing it", cmd=cmd, event="command-cancelled")
            kill(signal.SIGKILL)
            raise
        finally:
            for call in calls:
                if call.active():
                    call.cancel()
            if pid is not None:
                self._pids.discard(pid)
        assert protocol.end_reason is not None
        return self._result(cmd, protocol, protocol.end_reason, sent, self._clock.seconds() - started)

    def _result(
        self, cmd: str, protocol: _CommandProtocol, reason: Failure, sent: list[int], duration: float
    ) -> CommandResult:
        report = protocol.report()
        err = protocol.stderr.text()
        error = report.get("error")
        resources = report.get("resources")
        resources = {k: v for k, v in resources.items() if isinstance(v, int | float)} if resources else {}
        if isinstance(error, str):
            err = (err + error + "\n") if err else error + "\n"
            code = report.get("code")
            finished, value = True, code if isinstance(code, int) else EXIT_CANNOT_EXECUTE
        elif isinstance(report.get("signal"), int):
            finished, value = False, report["signal"]
        elif isinstance(report.get("exit"), int):
            finished, value = True, report["exit"]
        else:
            finished, value = _status_from_reason(reason)
        timed_out = bool(sent)
        if timed_out and finished:
            # It trapped our SIGTERM and exited by itself: still a command that did not finish in time.
            finished, value = False, sent[-1]
        result = CommandResult(
            out=protocol.stdout.text(),
            err=err,
            finished=finished,
            exit_code_or_signal=value,
            resources=resources,
            duration=duration,
            truncated=bool(protocol.stdout.dropped or protocol.stderr.dropped),
            timed_out=timed_out,
            error=error if isinstance(error, str) else None,
        )
        log.info(
            "Command {cmd!r} ended: finished={finished} exit_code_or_signal={code} in {duration:.3f}s",
            cmd=cmd,
            finished=result.finished,
            code=result.exit_code_or_signal,
            duration=duration,
            event="command-ended",
        )
        return result


def _refusal(reason: str, code: int) -> CommandResult:
    return CommandResult(
        out="",
        err=reason + "\n",
        finished=True,
        exit_code_or_signal=code,
        resources={},
        duration=0.0,
        error=reason,
    )


def _check_request(cmd: object, args: object, env: object, path: object, timeout: object) -> str | None:
    """Why a request cannot be run as given, or None.  Guards against what JSON can carry."""
    if not isinstance(cmd, str) or not cmd:
        return "cmd must be a non-empty string"
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        return "args must be a list of strings"
    if not all(isinstance(a, str) for a in args):
        return "args must be a list of strings"
    if env is None:
        env = {}
    if not isinstance(env, Mapping):
        return "env must be a mapping of strings to strings"
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k:
            return f"bad environment entry {k!r}"
    if path is not None and (not isinstance(path, str) or not path):
        return "path must be a non-empty string or absent"
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 1e9
    ):
        return "timeout must be a positive number of seconds"
    texts = [cmd, *args, *(env.keys()), *(env.values()), *([path] if path else [])]
    if any("\0" in t for t in texts):
        return "NUL characters are not allowed in cmd, args, env or path"
    try:
        size = sum(len(t.encode("utf-8")) + 1 for t in texts)
    except UnicodeEncodeError:
        return "cmd, args, env and path must be valid Unicode text"
    if size > MAX_REQUEST_BYTES:
        return f"cmd, args, env and path together exceed {MAX_REQUEST_BYTES} bytes"
    return None
