"""Crash safety of checkpoint writes (issue #3, acceptance 4).

A write is interrupted at every one of its steps, in two ways:

* the process dies (the k-th file operation raises and nothing after it runs): the real file
  system then holds exactly what the steps before k did;
* the machine loses power: only what was fsynced is certain to be on disk, and a rename may or
  may not have reached the disk unless its directory was fsynced.  A model of the disk gives the
  worst case of both.

In every case the checkpoint must load as exactly the old or exactly the new one, never a torn
one.  A real child process killed with SIGKILL in the middle of a loop of writes completes it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.store.fakes import RecordingFileOps
from vmcloud.pool.snapshot import EncodedRecord
from vmcloud.store.checkpoint import (
    CheckpointStore,
    CorruptCheckpointError,
    FileOps,
    RealFileOps,
    decode_checkpoint,
)
from vmcloud.threads import synchronous_dispatch

OLD = {"vms": [{"vmid": f"{i:04d}", "state": "FREE"} for i in range(200)], "generation": "old"}
NEW = {"vms": [{"vmid": f"{i:04d}", "state": "READY"} for i in range(300)], "generation": "new"}
NEW_SAVED = {**NEW, "vms": [EncodedRecord(vm) for vm in NEW["vms"]]}  # as the pool hands it over
REPO = Path(__file__).resolve().parents[2]


class SimulatedCrashError(OSError):
    """The process died at this file operation."""


class CrashAt:
    """Delegates file operations until the k-th (0-based), which fails, and so does all after it.

    A crash in the middle of ``write`` first writes half of the data, as a real write cut short
    leaves a torn temp file.
    """

    def __init__(self, k: int, inner: FileOps) -> None:
        self.k = k
        self.inner = inner
        self.count = 0

    def _step(self) -> bool:
        """True when this operation is the one that crashes (or comes after the crash)."""
        self.count += 1
        return self.count > self.k

    def open(self, path: FilePath[str]) -> int:
        if self._step():
            raise SimulatedCrashError("crash at open")
        return self.inner.open(path)

    def write(self, fd: int, data: bytes) -> None:
        if self._step():
            self.inner.write(fd, data[: len(data) // 2])
            raise SimulatedCrashError("crash during write")
        self.inner.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._step():
            raise SimulatedCrashError("crash at fsync")
        self.inner.fsync(fd)

    def close(self, fd: int) -> None:
        if self._step():
            raise SimulatedCrashError("crash at close")
        self.inner.close(fd)

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        if self._step():
            raise SimulatedCrashError("crash at rename")
        self.inner.rename(source, target)

    def fsync_dir(self, directory: FilePath[str]) -> None:
        if self._step():
            raise SimulatedCrashError("crash at fsync_dir")
        self.inner.fsync_dir(directory)

    def remove(self, path: FilePath[str]) -> None:
        if self._step():
            raise SimulatedCrashError("crash at remove")
        self.inner.remove(path)


@attrs.define
class Inode:
    cached: bytes = b""  # what readers see now (page cache)
    durable: bytes = b""  # what survives a power loss (fsynced)


class SimulatedDisk:
    """A file system model that knows what a power loss keeps: fsynced data, fsynced entries.

    ``power_loss_views`` gives the contents a path may have after the machine dies now: the
    directory as last fsynced, or as it is (the journal may have committed the rename anyway),
    each with only the durable data of the files.
    """

    def __init__(self) -> None:
        self.inodes: list[Inode] = []
        self.entries: dict[str, int] = {}
        self.durable_entries: dict[str, int] = {}
        self.descriptors: dict[int, int] = {}
        self.fsync_works = True  # False: fsync does nothing (a store that forgot it, a lying cache)

    def open(self, path: FilePath[str]) -> int:
        if path.path in self.entries:
            self.inodes[self.entries[path.path]].cached = b""  # O_TRUNC
        else:
            self.inodes.append(Inode())
            self.entries[path.path] = len(self.inodes) - 1
        fd = len(self.descriptors) + 100
        self.descriptors[fd] = self.entries[path.path]
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self.inodes[self.descriptors[fd]].cached += data

    def fsync(self, fd: int) -> None:
        if self.fsync_works:
            inode = self.inodes[self.descriptors[fd]]
            inode.durable = inode.cached

    def close(self, fd: int) -> None:
        del self.descriptors[fd]

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        self.entries[target.path] = self.entries.pop(source.path)

    def fsync_dir(self, directory: FilePath[str]) -> None:
        self.durable_entries = dict(self.entries)

    def remove(self, path: FilePath[str]) -> None:
        if path.path not in self.entries:
            raise FileNotFoundError(path.path)
        del self.entries[path.path]

    def power_loss_views(self, path: FilePath[str]) -> Iterator[bytes | None]:
        for entries in (self.durable_entries, self.entries):
            inode = entries.get(path.path)
            yield None if inode is None else self.inodes[inode].durable


def parsed(content: bytes | None) -> Any:
    """The state in a checkpoint file's bytes, None for no file, or "torn"."""
    if content is None:
        return None
    try:
        return decode_checkpoint(content)[1]
    except CorruptCheckpointError:
        return "torn"


class InterruptedWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.checkpoint = self.directory.child("checkpoint.json")
        self.clock = Clock()

    def store(self, files: FileOps) -> CheckpointStore:
        return CheckpointStore(
            self.directory, dispatch=synchronous_dispatch, clock=self.clock, files=files, retry_delay=0
        )

    def on_disk(self) -> bytes | None:
        try:
            with open(self.checkpoint.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def steps_of_a_write(self) -> int:
        recording = RecordingFileOps()
        self.store(recording).save(OLD)
        os.remove(self.checkpoint.path)
        return len(recording.calls)

    def test_process_crash_at_every_step_leaves_old_or_new(self) -> None:
        steps = self.steps_of_a_write()
        self.assertGreaterEqual(steps, 6)
        for with_old in (True, False):
            for k in range(steps + 1):
                for child in self.directory.children():
                    child.remove()
                if with_old:
                    self.store(RealFileOps()).save(OLD)
                self.store(CrashAt(k, RealFileOps())).save(NEW_SAVED)
                self.flushLoggedErrors()
                found = parsed(self.on_disk())
                expected = [OLD if with_old else None, NEW]
                self.assertIn(found, expected, f"crash at step {k}: {found!r:.60}")
                if k == steps:
                    self.assertEqual(found, NEW)
                # After the restart, the store loads that same checkpoint and cleans up.
                self.assertEqual(self.store(RealFileOps()).load(), found)
                remaining = [child.basename() for child in self.directory.children()]
                self.assertEqual(remaining, ["checkpoint.json"] if found is not None else [])

    def test_power_loss_at_every_step_leaves_old_or_new(self) -> None:
        steps = self.steps_of_a_write()
        for k in range(steps + 1):
            disk = SimulatedDisk()
            self.store(disk).save(OLD)
            self.store(CrashAt(k, disk)).save(NEW_SAVED)
            self.flushLoggedErrors()
            views = [parsed(content) for content in disk.power_loss_views(self.checkpoint)]
            for found in views:
                self.assertIn(found, [OLD, NEW], f"power loss at step {k}: {found!r:.60}")
            if k == steps:
                self.assertEqual(views, [NEW, NEW], "a finished write must survive a power loss")

    def test_the_power_loss_model_catches_a_missing_fsync(self) -> None:
        """Without fsync before rename, a power loss can leave an empty checkpoint: the model sees it."""
        steps = self.steps_of_a_write()
        torn = []
        for k in range(steps + 1):
            disk = SimulatedDisk()
            self.store(disk).save(OLD)
            disk.fsync_works = False
            self.store(CrashAt(k, disk)).save(NEW_SAVED)
            self.flushLoggedErrors()
            torn += [k for content in disk.power_loss_views(self.checkpoint) if parsed(content) == "torn"]
        self.assertNotEqual(torn, [])


class KilledWriterTests(SynchronousTestCase):
    """A real process writing checkpoints in a loop is killed with SIGKILL at a random moment."""

    def test_sigkill_during_writes_leaves_a_whole_checkpoint(self) -> None:
        for target in (3, 17, 41):
            directory = FilePath(self.mktemp())
            directory.makedirs()
            acknowledged = self.run_and_kill(directory, target)
            store = CheckpointStore(directory, dispatch=synchronous_dispatch, clock=Clock())
            state = store.load()
            assert state is not None
            generation = state["generation"]
            self.assertGreaterEqual(generation, acknowledged, "an acknowledged write was lost")
            self.assertEqual(
                {vm["generation"] for vm in state["vms"]}, {generation}, "checkpoint mixes two writes"
            )
            self.assertEqual(len(state["vms"]), 2000)
            self.assertEqual([c.basename() for c in directory.children()], ["checkpoint.json"])

    def run_and_kill(self, directory: FilePath[str], target: int) -> int:
        """Start the writer, kill it once it reports ``target`` writes done; the last acknowledged."""
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.store.crash_child", directory.path, "5000"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert child.stdout is not None
        acknowledged = -1
        try:
            buffered = b""
            while acknowledged < target:
                ready, _, _ = select.select([child.stdout], [], [], 30)
                self.assertTrue(ready, "writer made no progress in 30 s")
                chunk = os.read(child.stdout.fileno(), 4096)
                if not chunk:
                    self.fail(f"writer exited early with {child.wait(30)}")
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                if lines:
                    acknowledged = int(lines[-1])
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)
            child.stdout.close()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        return acknowledged
