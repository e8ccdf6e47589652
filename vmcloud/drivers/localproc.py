"""Processes by pid: the few facts the local driver reads of them in ``/proc``, and signals.

A pid alone names nothing for long: the kernel hands it out again once its process is gone.  The
local driver and the state-dir claim therefore remember a process as (pid, start time, boot id)
and ask here whether that very process still runs.  The readers take the ``/proc`` root as an
argument, so tests point it at a directory of their own.
"""

from __future__ import annotations

import contextlib
import os


def stat_fields(pid: int, proc: str = "/proc") -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name, which may hold spaces)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_start_time(pid: int, proc: str = "/proc") -> int | None:
    """When a live (non-zombie) process started, in clock ticks since boot; None if it is gone.

    Together with the boot id this tells a process from a later one that reused its pid.
    """
    fields = stat_fields(pid, proc)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def boot_id(proc: str = "/proc") -> str:
    """The kernel's id of this boot: a pid recorded before a reboot means nothing after it."""
    try:
        with open(f"{proc}/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def group_members(pgid: int, proc: str = "/proc") -> list[int]:
    """Live (non-zombie) processes in a process group; a scan of /proc, fine for a teardown."""
    members = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            fields = stat_fields(int(entry), proc)
            if fields and len(fields) > 2 and fields[0] not in ("Z", "X") and fields[2] == str(pgid):
                members.append(int(entry))
    return members


def signal_pid(pid: int, sig: int) -> None:
    """Signal a process that may be gone already, or not ours to signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already; never group 0 or 1 (ours, init's)."""
    if pgid <= 1:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
