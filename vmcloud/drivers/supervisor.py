"""The local driver's VMs as process groups: started in a session of their own, watched, ended.

A local "VM" is the process group that its first process (the guest agent) leads: ``setsid``
makes that process the leader of a new session, so that one ``killpg`` ends everything the VM
started.  The group's stdio goes to ``/dev/null`` and the VM's console log, never to pipes to the
controller: the VM outlives a controller crash instead of dying of SIGPIPE on its next log line,
and a restarted controller re-adopts it by its record (:mod:`vmcloud.drivers.localfiles`).

:class:`GroupSupervisor` starts a group, tells its owner when the first process of a group it
started ends, tells a recorded group from a later one that reused its ids, and ends a group:
SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from vmcloud.drivers.localfiles import VmRecord
from vmcloud.drivers.localproc import boot_id, group_members, process_start_time, signal_group

log = Logger()

#: Told the server id of a group this supervisor started, and how its first process ended.
LeaderEnded = Callable[[str, str], None]


class _GroupLeader(ProcessProtocol):
    """Tells the supervisor when the first process of a VM (the one it spawned) ends."""

    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self._ended(reason)


def describe_end(reason: Failure) -> str:
    """How a process ended, as a VM's fault says it ("exited with status 3", "killed by signal 9")."""
    if reason.check(ProcessDone):
        return "exited with status 0"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


class GroupSupervisor:
    """Starts VMs' process groups, hears their leaders end, and ends groups (TERM, then KILL).

    ``setsid`` is the path of setsid(1); ``kill_grace`` the seconds a group has between SIGTERM
    and SIGKILL; ``proc`` the root of ``/proc``; ``signal_group`` sends a signal to a group.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        clock: IReactorTime,
        *,
        setsid: str,
        kill_grace: float,
        proc: str = "/proc",
        signal_group: Callable[[int, int], None] = signal_group,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._setsid = setsid
        self._kill_grace = kill_grace
        self._proc = proc
        self._signal_group = signal_group
        self._children: dict[str, IProcessTransport] = {}  # groups this process spawned, by server id

    def spawn(
        self,
        server_id: str,
        argv: list[str],
        env: dict[str, str],
        cwd: FilePath[str],
        console: FilePath[str],
        ended: LeaderEnded,
    ) -> int | None:
        """Start ``argv`` as the leader of a new session with stdio on /dev/null and ``console``, no pipes.

        Returns its pid, which is also the group's id; None when it was reaped within
        ``spawnProcess`` (it could not even start).  ``ended`` hears when it ends.
        """
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            log_fd = os.open(console.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            os.close(stdin)
            raise
        argv = [self._setsid, *argv]
        try:
            transport = self._reactor.spawnProcess(
                _GroupLeader(lambda reason: self._leader_ended(server_id, reason, ended)),
                argv[0],
                argv,
                env=env,
                path=cwd.path,
                childFDs={0: stdin, 1: log_fd, 2: log_fd},
            )
        finally:
            os.close(stdin)
            os.close(log_fd)
        self._children[server_id] = transport
        pid: int | None = transport.pid
        return pid

    def _leader_ended(self, server_id: str, reason: Failure, ended: LeaderEnded) -> None:
        self._children.pop(server_id, None)
        ended(server_id, describe_end(reason))

    def spawned(self, server_id: str) -> bool:
        """Whether this process started the VM's group and its leader still runs (else it was adopted)."""
        return server_id in self._children

    def abandon(self, server_id: str) -> None:
        """Kill at once a group this process started (its boot failed after the spawn)."""
        transport = self._children.pop(server_id, None)
        if transport is not None:
            self._signal_group(transport.pid or 0, signal.SIGKILL)

    def forget(self, server_id: str) -> None:
        """The VM is gone: its leader is no longer watched."""
        self._children.pop(server_id, None)

    def leader_alive(self, record: VmRecord, this_boot: str | None = None) -> bool:
        """Whether the recorded leader still runs (not a later process that reused its pid).

        ``this_boot`` is :func:`~vmcloud.drivers.localproc.boot_id`, when the caller read it already.
        """
        this_boot = boot_id(self._proc) if this_boot is None else this_boot
        return record.boot_id == this_boot and process_start_time(record.pid, self._proc) == record.start_time

    def group_is_ours(self, record: VmRecord) -> bool:
        """False when the group leader's pid now belongs to another process (then the group is not ours).

        While any member of our group lives the kernel does not hand its id out again, so a
        process whose pid equals our pgid but whose start time differs proves our group is gone.
        """
        start = process_start_time(record.pgid, self._proc)
        return start is None or (start == record.start_time and record.boot_id == boot_id(self._proc))

    async def reap(self, record: VmRecord) -> None:
        """Wait until the VM's group is gone, sending SIGKILL once it ignored SIGTERM for the grace.

        Gives up, saying so, when processes survive SIGKILL too (after the grace, or 2 s).
        """
        deadline = self._clock.seconds() + self._kill_grace
        killed = False
        while group_members(record.pgid, self._proc):
            if not killed and self._clock.seconds() >= deadline:
                log.warn(
                    "VM {server_id} ignored SIGTERM for {grace} s; sending SIGKILL",
                    server_id=record.server_id,
                    grace=self._kill_grace,
                )
                self._signal_group(record.pgid, signal.SIGKILL)
                killed = True
                deadline = self._clock.seconds() + max(self._kill_grace, 2.0)
            elif killed and self._clock.seconds() >= deadline:
                log.error(
                    "VM {server_id}: processes {pids} survive SIGKILL",
                    server_id=record.server_id,
                    pids=group_members(record.pgid, self._proc),
                )
                break
            await deferLater(self._clock, 0.05)
