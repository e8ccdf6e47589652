"""CommandRunner: what the controller sees when it says CMD_RUN to a guest.

Most tests run real short processes (``sh -c``) on the real reactor; the timer logic is also
checked on a fake reactor with a ``Clock`` so it needs no waiting.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from guest_agent.commands import CommandResult, CommandRunner


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting for a reaper."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RealProcessTests(TestCase):
    """Real commands on the real reactor; every test takes well under a second or two."""

    timeout = 30

    def runner(self, **kw: Any) -> CommandRunner:
        return CommandRunner(reactor, **kw)

    def run_cmd(
        self,
        runner: CommandRunner,
        script: str,
        env: dict[str, str] | None = None,
        path: str | None = None,
        timeout: float | None = 20,
    ) -> Deferred[CommandResult]:
        return ensureDeferred(runner.run("sh", ["-c", script], env or {}, path, timeout))

    async def test_exit_code_and_output(self) -> None:
        """The seed's example: out, err and the exit code come back as the command produced them."""
        result = await self.run_cmd(self.runner(), "echo hi; echo oops >&2; exit 3")
        self.assertEqual(result.out, "hi\n")
        self.assertEqual(result.err, "oops\n")
        self.assertTrue(result.finished)
        self.assertEqual(result.exit_code_or_signal, 3)
        self.assertFalse(result.timed_out)
        self.assertFalse(result.truncated)
        self.assertIsNone(result.error)
        self.assertGreater(result.duration, 0)

    async def test_resources_of_the_child(self) -> None:
        """Resource usage is the command's own (CPU burnt in the child shows up), from wait4."""
        script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i"
        result = await self.run_cmd(self.runner(), script)
        self.assertEqual(result.out, "20000\n")
        for key in ("ru_utime", "ru_stime", "ru_maxrss", "ru_minflt", "ru_nvcsw"):
            self.assertIn(key, result.resources)
        self.assertGreater(result.resources["ru_utime"] + result.resources["ru_stime"], 0)
        self.assertGreater(result.resources["ru_maxrss"], 0)
        self.assertEqual(result.as_json()["resources"], result.resources)

    async def test_env_overlays_base_env(self) -> None:
        runner = self.runner(base_env={"PATH": "/usr/bin:/bin", "FROM_BASE": "base"})
        result = await self.run_cmd(runner, 'echo "$FROM_BASE $GREETING $PATH"', env={"GREETING": "hé llo"})
        self.assertEqual(result.out, "base hé llo /usr/bin:/bin\n")

    async def test_working_directory(self) -> None:
        where = os.path.realpath(self.mktemp())
        os.makedirs(where)
        result = await self.run_cmd(self.runner(), "pwd", path=where)
        self.assertEqual(result.out, where + "\n")

    async def test_bad_working_directory_is_a_clear_error(self) -> None:
        result = await self.run_cmd(self.runner(), "pwd", path="/no/such/dir")
        self.assertEqual(result.out, "")
        self.assertEqual(result.exit_code_or_signal, 126)
        assert result.error is not None
        self.assertIn("/no/such/dir", result.error)
        self.assertIn("No such file or directory", result.err)
        self.assertNotIn("Traceback", result.err)

    async def test_missing_executable_is_a_clear_error(self) -> None:
        runner = self.runner()
        result = await ensureDeferred(runner.run("no-such-program-xyz", ["a"], {}, None, 5))
        self.assertTrue(result.finished)
        self.assertEqual(result.exit_code_or_signal, 127)
        self.assertEqual(result.error, "cannot run 'no-such-program-xyz': No such file or directory")
        self.assertNotIn("Traceback", result.err)

    async def test_not_executable_is_a_clear_error(self) -> None:
        script = self.mktemp()
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho no\n")
        result = await ensureDeferred(self.runner().run(os.path.abspath(script), [], {}, None, 5))
        self.assertEqual(result.exit_code_or_signal, 126)
        assert result.error is not None
        self.assertIn("Permission denied", result.error)

    async def test_timeout_kills_the_whole_process_group(self) -> None:
        """Grandchildren die with the command; the result says it did not finish, and by which signal."""
        script = "sleep 30 & echo $!; sleep 30"
        result = await self.run_cmd(self.runner(), script, timeout=1.0)
        self.assertFalse(result.finished)
        self.assertTrue(result.timed_out)
        self.assertEqual(result.exit_code_or_signal, signal.SIGTERM)
        grandchild = int(result.out.split()[0])
        self.assertFalse(_alive(grandchild), "the backgrounded sleep survived the timeout")
        self.assertLess(result.duration, 10)
        self.assertIn("ru_utime", result.resources)

    async def test_timeout_escalates_to_sigkill(self) -> None:
        """A command that ignores SIGTERM is killed after the grace."""
        script = "trap '' TERM; echo started; sleep 30"
        result = await self.run_cmd(self.runner(kill_grace=0.5), script, timeout=1.0)
        self.assertFalse(result.finished)
        self.assertEqual(result.exit_code_or_signal, signal.SIGKILL)
        self.assertEqual(result.out, "started\n")

    async def test_command_killed_by_a_signal(self) -> None:
        result = await self.run_cmd(self.runner(), "kill -USR1 $$")
        self.assertFalse(result.finished)
        self.assertFalse(result.timed_out)
        self.assertEqual(result.exit_code_or_signal, signal.SIGUSR1)

    async def test_output_is_truncated_with_a_marker(self) -> None:
        """Past max_output the rest is dropped (and counted), and the command is not blocked by it."""
        runner = self.runner(max_output=1000)
        result = await self.run_cmd(runner, "head -c 300000 /dev/zero | tr '\\0' x; echo done >&2")
        self.assertTrue(result.finished)
        self.assertTrue(result.truncated)
        self.assertTrue(result.out.startswith("x" * 1000 + "\n[vmcloud-guest: output truncated, 299000"))
        self.assertEqual(result.err, "done\n")

    async def test_invalid_utf8_is_replaced(self) -> None:
        result = await self.run_cmd(self.runner(), "printf 'a\\377b'")
        self.assertEqual(result.out, "a\ufffdb")

    async def test_background_leftover_does_not_hold_the_result(self) -> None:
        """A command that starts a daemon and exits answers promptly (the daemon keeps its pipe)."""
        result = await self.run_cmd(self.runner(drain_grace=0.2), "sleep 5 & echo $!", timeout=20)
        self.assertTrue(result.finished)
        self.assertEqual(result.exit_code_or_signal, 0)
        self.assertLess(result.duration, 4)
        os.kill(int(result.out.split()[0]), signal.SIGKILL)

    async def test_stdin_is_closed(self) -> None:
        result = await self.run_cmd(self.runner(), "cat; echo eof")
        self.assertEqual(result.out, "eof\n")

    async def test_cancel_kills_the_command(self) -> None:
        """A caller that gives up (e.g. the agent stopping) leaves no process behind."""
        runner = self.runner()
        d = self.run_cmd(runner, "echo $$; sleep 30")
        while not runner._pids:
            await deferLater(reactor, 0.01)
        (pid,) = runner._pids
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for _ in range(200):
            if not _alive(pid):
                break
            await deferLater(reactor, 0.01)
        self.assertFalse(_alive(pid))
        self.assertEqual(runner.running, 0)

    async def test_concurrency_limit_queues_then_refuses(self) -> None:
        runner = self.runner(max_concurrent=1, max_queued=1)
        first = self.run_cmd(runner, "sleep 0.3; echo first")
        second = self.run_cmd(runner, "echo second")
        third = await self.run_cmd(runner, "echo third")
        self.assertEqual((runner.running, runner.waiting), (1, 1))
        self.assertFalse(first.called)
        self.assertIn("agent busy", third.error or "")
        self.assertEqual(third.out, "")
        self.assertEqual((await first).out, "first\n")
        self.assertEqual((await second).out, "second\n")
        self.assertEqual((runner.running, runner.waiting), (0, 0))


class RefusalTests(SynchronousTestCase):
    """Requests that cannot be run are answered at once, with a reason and no process."""

    def test_bad_requests(self) -> None:
        fake = FakeProcessReactor()
        runner = CommandRunner(fake)
        bad: list[tuple[Any, Any, Any, Any, Any]] = [
            ("", [], {}, None, None),
            ("sh", "not-a-list", {}, None, None),
            ("sh", [1], {}, None, None),
            ("sh", [], {"A": 1}, None, None),
            ("sh", [], {"A=B": "x"}, None, None),
            ("sh", ["a\0b"], {}, None, None),
            ("sh", [], {}, "", None),
            ("sh", [], {}, None, -1),
            ("sh", [], {}, None, True),
            ("sh", ["\udc80"], {}, None, None),
            ("sh", ["x" * (2 * 1024 * 1024)], {}, None, None),
        ]
        for cmd, args, env, path, timeout in bad:
            result = self.successResultOf(ensureDeferred(runner.run(cmd, args, env, path, timeout)))
            self.assertIsNotNone(result.error, (cmd, args, env, path, timeout))
            self.assertEqual(result.exit_code_or_signal, 126)
        self.assertEqual(fake.spawned, [])

    def test_reactor_must_run_processes(self) -> None:
        self.assertRaises(TypeError, CommandRunner, Clock())


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A Clock that records spawnProcess calls and hands out fake process transports."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str]]] = []
        self.fail_with: Exception | None = None

    def spawnProcess(self, protocol: Any, executable: Any, args: Any, env: Any = None, **kw: Any) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        transport = FakeTransport(4242 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, list(args), dict(env)))
        return transport


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.closed: list[Any] = []

    def closeStdin(self) -> None:
        self.closed.append("stdin")

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)


class TimerTests(SynchronousTestCase):
    """The timeout / grace / drain logic against an injected clock."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.signals: list[tuple[int, int]] = []
        self.runner = CommandRunner(
            self.reactor,
            kill_grace=5,
            drain_grace=1,
            signal_group=lambda pgid, sig: self.signals.append((pgid, sig)),
        )

    def start(self, timeout: float | None = 10) -> tuple[Deferred[CommandResult], Any]:
        d = ensureDeferred(self.runner.run("sleep", ["100"], {"X": "1"}, "/tmp", timeout))
        protocol, argv, env = self.reactor.spawned[-1]
        self.assertEqual(argv[-3:], ["/tmp", "sleep", "100"])
        self.assertEqual(env["X"], "1")
        self.assertIn("PATH", env)
        return d, protocol

    def test_sigterm_then_sigkill(self) -> None:
        d, protocol = self.start(timeout=10)
        self.reactor.advance(9.9)
        self.assertEqual(self.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        self.reactor.advance(5)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM), (4242, signal.SIGKILL)])
        protocol.childDataReceived(1, b"partial")
        protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        result = self.successResultOf(d)
        self.assertEqual((result.finished, result.exit_code_or_signal), (False, signal.SIGKILL))
        self.assertEqual(result.out, "partial")
        self.assertEqual(result.resources, {})
        self.assertAlmostEqual(result.duration, 15)

    def test_default_timeout(self) -> None:
        self.runner.default_timeout = 3
        d, protocol = self.start(timeout=None)
        self.reactor.advance(3)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        protocol.childDataReceived(3, b'{"signal": 15, "resources": {"ru_utime": 0.5}}')
        protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        result = self.successResultOf(d)
        self.assertEqual((result.finished, result.exit_code_or_signal), (False, 15))
        self.assertEqual(result.resources, {"ru_utime": 0.5})

    def test_trapped_sigterm_still_reports_not_finished(self) -> None:
        d, protocol = self.start(timeout=1)
        self.reactor.advance(1)
        protocol.childDataReceived(3, b'{"exit": 0, "resources": {}}')
        protocol.processEnded(Failure(ProcessDone(0)))
        result = self.successResultOf(d)
        self.assertTrue(result.timed_out)
        self.assertEqual((result.finished, result.exit_code_or_signal), (False, signal.SIGTERM))

    def test_no_signal_after_the_end(self) -> None:
        d, protocol = self.start(timeout=1)
        protocol.childDataReceived(3, b'{"exit": 0, "resources": {}}')
        protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(self.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drain_abandons_pipes_held_by_leftovers(self) -> None:
        d, protocol = self.start(timeout=100)
        protocol.childDataReceived(3, b'{"exit": 0, "resources": {}}')
        protocol.processExited(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.reactor.advance(1)
        result = self.successResultOf(d)
        self.assertEqual((result.finished, result.exit_code_or_signal), (True, 0))
        self.assertEqual(protocol.transport.closed, ["stdin", 1, 2, 3])

    def test_garbage_report_falls_back_to_exit_status(self) -> None:
        d, protocol = self.start()
        protocol.childDataReceived(3, b"\xff not json")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=4)))
        result = self.successResultOf(d)
        self.assertEqual((result.finished, result.exit_code_or_signal), (True, 4))

    def test_spawn_failure_is_a_result(self) -> None:
        self.reactor.fail_with = OSError(24, "Too many open files")
        result = self.successResultOf(ensureDeferred(self.runner.run("true", [], {}, None, None)))
        assert result.error is not None
        self.assertIn("Too many open files", result.error)
        self.assertEqual(self.runner.running, 0)

    def test_cancelled_while_queued_leaves_the_queue(self) -> None:
        self.runner.max_concurrent = 1
        first, protocol = self.start()
        queued = ensureDeferred(self.runner.run("true", [], None, None, None))
        self.assertEqual(self.runner.waiting, 1)
        queued.cancel()
        self.failureResultOf(queued, CancelledError)
        self.assertEqual((self.runner.running, self.runner.waiting), (1, 0))
        protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(first)
        self.assertEqual((self.runner.running, self.runner.waiting), (0, 0))
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_kill_all(self) -> None:
        self.start()
        self.start()
        self.runner.kill_all()
        self.assertEqual(sorted(self.signals), [(4242, signal.SIGKILL), (4243, signal.SIGKILL)])
