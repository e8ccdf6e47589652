"""Test doubles for the checkpoint store: a hand-fired dispatcher and file operations that fail."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from vmcloud.store.checkpoint import FileOps, RealFileOps


class ManualDispatch:
    """Queues work instead of running it; a test runs each piece when it wants the write to end."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any], /) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((work, d))
        return d

    def run_next(self) -> None:
        work, d = self.queue.pop(0)
        try:
            result = work()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)


class RecordingFileOps:
    """Real file operations, with a log of every call (operation name and path or descriptor)."""

    def __init__(self, inner: FileOps | None = None) -> None:
        self.inner = inner if inner is not None else RealFileOps()
        self.calls: list[str] = []

    def open(self, path: FilePath[str]) -> int:
        self.calls.append("open")
        return self.inner.open(path)

    def write(self, fd: int, data: bytes) -> None:
        self.calls.append("write")
        self.inner.write(fd, data)

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        self.inner.fsync(fd)

    def close(self, fd: int) -> None:
        self.calls.append("close")
        self.inner.close(fd)

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        self.calls.append("rename")
        self.inner.rename(source, target)

    def fsync_dir(self, directory: FilePath[str]) -> None:
        self.calls.append("fsync_dir")
        self.inner.fsync_dir(directory)

    def remove(self, path: FilePath[str]) -> None:
        self.calls.append("remove")
        self.inner.remove(path)

    def writes(self) -> int:
        """How many checkpoint writes were started (one ``open`` of the temp file each)."""
        return self.calls.count("open")


class FailingFileOps(RecordingFileOps):
    """Fails the named operation with an OSError while ``failing`` is set (disk full, by default)."""

    def __init__(self, operation: str, err: int = errno.ENOSPC) -> None:
        super().__init__()
        self.operation = operation
        self.err = err
        self.failing = True

    def _maybe_fail(self, operation: str) -> None:
        if self.failing and operation == self.operation:
            raise OSError(self.err, {errno.ENOSPC: "No space left on device"}.get(self.err, "failure"))

    def open(self, path: FilePath[str]) -> int:
        self._maybe_fail("open")
        return super().open(path)

    def write(self, fd: int, data: bytes) -> None:
        self._maybe_fail("write")
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        self._maybe_fail("rename")
        super().rename(source, target)

    def fsync_dir(self, directory: FilePath[str]) -> None:
        self._maybe_fail("fsync_dir")
        super().fsync_dir(directory)


def raising_dispatch(work: Callable[[], Any], /) -> Deferred[Any]:
    """A dispatcher whose thread pool is gone: it refuses work synchronously."""
    raise RuntimeError("thread pool stopped")


__all__ = [
    "FailingFileOps",
    "ManualDispatch",
    "RecordingFileOps",
    "raising_dispatch",
]
