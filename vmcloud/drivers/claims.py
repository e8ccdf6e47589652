"""Who owns what on this host: the local driver's claim on its state directory, and the host-network lock.

Two local-driver daemons on one host must never take each other's VMs, namespaces or bridge for
their own leftovers.  Names derived from the state directory keep daemons with different state
directories apart (:mod:`vmcloud.drivers.netns`); what is left is two daemons started on the *same*
state directory, and two daemons racing to pick a bridge subnet.  Both are settled here with
``flock(2)``, whose locks the kernel drops the moment their holder dies (``kill -9`` included), so
a crashed daemon never leaves a claim behind that would need a stale-pid heuristic to break:

- :class:`StateDirClaim`: an exclusive lock on ``<state_dir>/local.lock``, held for the driver's
  whole life.  The file also says who holds it (pid, its start time and the boot id, the state
  directory), for the refusal message of a second daemon and for a neighbour that finds this
  daemon's bridge.
- :class:`HostLock`: a short host-wide lock around "look at the host's addresses, pick a subnet,
  create the bridge", so two daemons starting together cannot both pick the same free subnet.

The locks are ``flock`` locks on separate open files, so two drivers in one process exclude each
other too (the tests rely on that).  The descriptors are close-on-exec: a VM's processes, which
outlive the daemon on purpose, must never inherit the claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from vmcloud.drivers.localproc import boot_id, process_start_time
from vmcloud.pool.interfaces import BadCloudRequest

#: The state directory's lock file, relative to the state directory.
STATE_LOCK_FILE = "local.lock"

#: The host-wide lock around choosing a subnet and creating a bridge (removed when released).
HOST_LOCK_PATH = "/run/lock/vmcloud-local-net.lock"


class HostInUse(BadCloudRequest):
    """What this daemon needs on the host belongs to another daemon; the message says whose and what to do.

    A :class:`~vmcloud.pool.interfaces.BadCloudRequest`: retrying does not help, an operator must act.
    """


# --------------------------------------------------------------------------- flock


def try_lock(path: str) -> int | None:
    """Open ``path`` (creating it) and take an exclusive ``flock`` without waiting.

    Returns the descriptor holding the lock, or None while another open file holds it.  A holder
    may remove the file as it lets go (:class:`HostLock` does); whoever opened the old file just
    before then locks a file that no longer has this name, so the name is checked again after
    locking, and on a mismatch the new file is tried.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        held = os.fstat(fd)
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


# --------------------------------------------------------------------------- the state dir


@attrs.frozen
class OwnerRecord:
    """Who holds a state directory's claim: what ``local.lock`` says."""

    pid: int
    start_time: int | None
    boot_id: str
    state_dir: str

    def to_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> OwnerRecord | None:
        """The record, or None for an empty or unreadable file (a daemon that died while writing it)."""
        try:
            data = json.loads(raw)
            record = cls(
                pid=int(data["pid"]),
                start_time=None if data["start_time"] is None else int(data["start_time"]),
                boot_id=str(data["boot_id"]),
                state_dir=str(data["state_dir"]),
            )
        except (ValueError, TypeError, KeyError):
            return None
        return record

    def running(self, proc: str = "/proc") -> bool:
        """Whether the process that wrote this record still runs (not a later one reusing its pid)."""
        return (
            self.pid > 0
            and self.boot_id == boot_id(proc)
            and process_start_time(self.pid, proc) == self.start_time
        )


def read_owner(state_dir: str) -> OwnerRecord | None:
    """What ``<state_dir>/local.lock`` says about its holder (None: no such file or unreadable)."""
    try:
        with open(os.path.join(state_dir, STATE_LOCK_FILE), "rb") as f:
            return OwnerRecord.from_json(f.read(4096))
    except OSError:
        return None


def claim_held(state_dir: str, proc: str = "/proc") -> bool | None:
    """Whether a process holds ``<state_dir>/local.lock`` right now (None: cannot tell).

    Read from ``/proc/locks``, so the lock is only looked at, never taken: a probe that took it,
    even for a moment, could make its owner's own start fail.
    """
    try:
        st = os.stat(os.path.join(state_dir, STATE_LOCK_FILE))
    except FileNotFoundError:
        return False
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(f"{proc}/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146731 0 EOF"; waiters have "->" in the second field
    return any(
        len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key for fields in map(str.split, lines)
    )


def describe_owner(state_dir: str, proc: str = "/proc") -> str:
    """How a refusal names the daemon of another state directory: running (with its pid) or not."""
    owner = read_owner(state_dir)
    held = claim_held(state_dir, proc)
    if held is None:  # no /proc/locks: the recorded pid is the next best witness
        held = owner is not None and owner.running(proc)
    if held:
        pid = f"as pid {owner.pid} " if owner is not None else ""
        return f"the vmcloud daemon running {pid}with state dir {state_dir}"
    return f"the vmcloud daemon with state dir {state_dir}, which is not running (its VMs may be)"


class StateDirClaim:
    """An exclusive ``flock`` on ``<state_dir>/local.lock``: one local-driver daemon per state directory.

    Taken when the daemon starts and held until its driver stops; the kernel drops it when the
    process dies.  The file is never removed (removing a held lock file would let a second daemon
    lock a new file of the same name); it is a few bytes.
    """

    def __init__(self, state_dir: str, proc: str = "/proc") -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, STATE_LOCK_FILE)
        self._proc = proc
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the claim (again: a no-op but for the pid, which changes when twistd daemonizes).

        Raises :class:`HostInUse` naming the holder when another daemon has it.
        """
        if self._fd is None:
            fd = try_lock(self.path)
            if fd is None:
                owner = read_owner(self.state_dir)
                who = f"pid {owner.pid}" if owner is not None else "its pid is not recorded yet"
                raise HostInUse(
                    f"the state dir {self.state_dir} is in use by another vmcloud daemon ({who}; "
                    f"lock {self.path}); stop that daemon first, or give this one a --state-dir of its own"
                )
            self._fd = fd
        elif (owner := self._read()) is not None and owner.pid == os.getpid():
            return
        record = OwnerRecord(
            pid=os.getpid(),
            start_time=process_start_time(os.getpid(), self._proc),
            boot_id=boot_id(self._proc),
            state_dir=self.state_dir,
        )
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record.to_json(), 0)

    def _read(self) -> OwnerRecord | None:
        assert self._fd is not None
        return OwnerRecord.from_json(os.pread(self._fd, 4096, 0))

    def release(self) -> None:
        """Let go (idempotent); the record stays, naming a pid that no longer holds the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class HostLock:
    """The host-wide lock around picking a subnet and creating a bridge; waited for without blocking.

    ``async with HostLock(path, clock):`` polls every 50 ms (another daemon holds it for a few
    ``ip`` commands) and gives up with :class:`HostInUse` after ``timeout`` seconds.  The file is
    removed on release, so nothing is left in ``/run`` once every daemon is up.
    """

    def __init__(self, path: str, clock: IReactorTime, timeout: float = 30.0) -> None:
        self.path = path
        self._clock = clock
        self._timeout = timeout
        self._fd: int | None = None

    async def __aenter__(self) -> HostLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        deadline = self._clock.seconds() + self._timeout
        while (fd := try_lock(self.path)) is None:
            if self._clock.seconds() >= deadline:
                raise HostInUse(
                    f"{self.path} stayed locked for {self._timeout:g} s (another vmcloud daemon setting "
                    "up its bridge, or one that hangs there)"
                )
            await deferLater(self._clock, 0.05)
        self._fd = fd
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(fd)
