"""The session leader of one command the agent runs: ``python -I -S leader.py CWD CMD [ARG...]``.

Twisted's ``spawnProcess`` has no ``preexec_fn``, so :class:`~guest_agent.commands.CommandRunner`
does not spawn a command directly: it runs this file, as a script, which

1. calls ``os.setsid()`` (its pid becomes the process group id, known to the runner as the
   spawned pid), so that a timeout kills everything the command started, grandchildren included;
2. enters ``CWD`` (empty: stay) and starts the command with ``os.posix_spawnp``, which reports a
   missing executable or a permission problem as an ``OSError`` here instead of a child that
   silently exits 127;
3. waits for it with ``os.wait4`` and writes one JSON report (exit status or signal, and the
   ``resource`` usage of the command alone) to file descriptor 3, a pipe only the runner reads;
   then ends the way the command ended (the same exit status, or killed by the same signal).

It ignores SIGTERM so that, on a timeout, it outlives the command long enough to report; the
SIGKILL that follows after the grace kills it too, and then there is no report.

Run with ``-I -S`` (no site, no environment, not even its own directory on ``sys.path``), it must
import nothing but the standard modules below: it is started for every command, and the guest
agent's package is not importable here.  Nothing runs on import: the runner imports this module
only to find its file.
"""

import errno
import json
import os
import signal
import sys

#: The descriptor the report is written to.
REPORT_FD = 3

#: How the leader exits when it cannot start the command (the shell's conventions).
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126

#: Signals the leader ignores (so that it can report) and the command gets back at their defaults.
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_RESET = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGQUIT)


def report(doc: dict[str, object]) -> None:
    """Write the one JSON report to :data:`REPORT_FD`, all of it."""
    data = json.dumps(doc).encode()
    while data:
        data = data[os.write(REPORT_FD, data) :]


def main(argv: list[str]) -> None:
    """Lead the command ``argv[2:]`` in directory ``argv[1]``; never returns."""
    os.setsid()
    for ignored in _IGNORED:
        signal.signal(ignored, signal.SIG_IGN)
    cwd, command = argv[1], argv[2:]
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            report({"error": f"cannot enter directory {cwd!r}: {e.strerror}", "code": EXIT_CANNOT_EXECUTE})
            os._exit(EXIT_CANNOT_EXECUTE)
    try:
        pid = os.posix_spawnp(
            command[0],
            command,
            os.environ,
            setsigdef=_RESET,
            file_actions=[(os.POSIX_SPAWN_CLOSE, REPORT_FD)],
        )
    except OSError as e:
        code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        report({"error": f"cannot run {command[0]!r}: {e.strerror}", "code": code})
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    resources = {name: getattr(usage, name) for name in dir(usage) if name.startswith("ru_")}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        report({"signal": sig, "resources": resources})
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    code = os.waitstatus_to_exitcode(status)
    report({"exit": code, "resources": resources})
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
