"""The pool's checkpoint on disk: ``checkpoint.json`` in the state directory.

The controller must survive ``kill -9``: after every change the pool hands a fresh snapshot to
:meth:`CheckpointStore.save`, and on start :meth:`CheckpointStore.load` gives back the last one
that fully reached the disk.  Three things make that safe and cheap at 5,000 VMs:

* **Atomic replacement.**  A write goes to ``checkpoint.json.tmp`` in the same directory, is
  flushed and fsynced, renamed over ``checkpoint.json``, and the directory is fsynced.  A crash at
  any step leaves either the old or the new checkpoint, never a torn one.
* **Coalescing.**  At most one write is in flight and at most one snapshot is pending; a save while
  a write is in flight replaces the pending snapshot (newest wins), so a burst of saves costs at
  most two writes.
* **Off the reactor's critical path.**  The file operations, which release the GIL, run through
  an injected ``dispatch`` (a dedicated thread pool in production), and so does putting the
  file's bytes together.  The pool hands its big collections over already encoded, as lists of
  :class:`~vmcloud.pool.snapshot.EncodedRecord` (each record encoded once, when it changed), so
  that thread only joins bytes: encoding a 5,000-VM pool there held the GIL, which the reactor
  thread needs too, for ~50 ms per write.

File format (schema 1)::

    {"schema": 1, "written": <seconds since the epoch, float>, "state": <the pool's snapshot>}

``state`` is whatever JSON object the pool hands to :meth:`CheckpointStore.save` (an encoded
record is written as its bytes); the store never looks inside it.  The file is compact ASCII
JSON ending in a newline, mode 0600 (it holds guest credentials).  A file that is not valid
JSON, is truncated, lacks a field, or carries another schema number is refused: it is moved
aside to ``checkpoint.json.corrupt-<UTC timestamp>`` and the controller starts clean.  A
``checkpoint.json.tmp`` found on load is what a crash left of an unfinished write; it is removed.

Contract with the pool: a snapshot handed to ``save`` is written later on another thread, so the
pool builds a fresh structure each time and never mutates it afterwards (records never change).
"""

from __future__ import annotations

import json
import operator
import os
import time
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from vmcloud.pool.interfaces import ICheckpointStore
from vmcloud.pool.snapshot import EncodedRecord, encode_json
from vmcloud.threads import Dispatch
from vmcloud.timings import CHECKPOINT_WRITE, NO_TIMINGS, ITimings

SCHEMA_VERSION = 1
"""The envelope version this code writes and the only one it reads."""

CHECKPOINT_NAME = "checkpoint.json"
TEMP_SUFFIX = ".tmp"
CORRUPT_INFIX = ".corrupt-"


class CheckpointUnreadableError(Exception):
    """The checkpoint exists but cannot be read (permissions, I/O error).

    Unlike a corrupt file this is not moved aside: starting clean would terminate every VM the
    checkpoint describes, so the controller should stop and let an operator look.
    """


# --------------------------------------------------------------------------- file operations


class FileOps(Protocol):
    """The file system calls a checkpoint write makes, one method per step.

    A seam so that tests can fail (or "crash") at every single step of a write and check that the
    checkpoint on disk is still whole.  Paths are absolute; descriptors are plain ints.
    """

    def open(self, path: FilePath[str]) -> int:
        """Create or truncate ``path`` for writing, readable by the owner only; return a descriptor."""

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data``."""

    def fsync(self, fd: int) -> None:
        """Make what was written to ``fd`` durable."""

    def close(self, fd: int) -> None:
        """Close ``fd``."""

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        """Atomically replace ``target`` with ``source``."""

    def fsync_dir(self, directory: FilePath[str]) -> None:
        """Make the directory's entries (a rename) durable."""

    def remove(self, path: FilePath[str]) -> None:
        """Delete ``path``; raises FileNotFoundError when it is not there."""


class RealFileOps:
    """:class:`FileOps` on the real file system (POSIX)."""

    def open(self, path: FilePath[str]) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path.path, flags, 0o600)
        os.fchmod(fd, 0o600)  # also when an older temp file had other permissions
        return fd

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: FilePath[str], target: FilePath[str]) -> None:
        os.replace(source.path, target.path)

    def fsync_dir(self, directory: FilePath[str]) -> None:
        fd = os.open(directory.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: FilePath[str]) -> None:
        os.remove(path.path)


REAL_FILE_OPS = RealFileOps()
"""The default :class:`FileOps`; stateless, so one instance serves every store."""


# --------------------------------------------------------------------------- encoding

# Whatever encodes the checkpoint holds the GIL meanwhile, so the reactor thread waits too: json's
# C encoder over a whole 5,000-VM pool took ~50 ms.  So the pool hands its big collections over
# as lists of EncodedRecord, whose JSON it made on the reactor when each record changed; here
# those are only joined, one copy of the bytes at the end (a few ms at 5,000 VMs).  Any other
# value (the small rest of the pool's state, or plain data from another caller) goes through the
# C encoder in short calls: the top levels of the state (state -> "vms" -> ...) and every
# container with many members are opened, and json gets groups of members sized to produce about
# _PIECE_CHARS of text per call; between calls the thread passes through the interpreter loop,
# where it gives up the GIL when the reactor asks for it.  A member that is not opened (a small
# object, a record nested in one) is encoded in one call.
_PIECE_CHARS = 32_768
_OPEN_DEPTH = 2
_OPEN_MEMBERS = 256  # a container with more members than this is opened at any depth
_CONTAINERS = (dict, list, tuple)

_encoded_of = operator.attrgetter("encoded")


def _opened(value: object, depth: int) -> bool:
    """Whether ``value``, at ``depth`` in the state, is put in the file as pieces of its own."""
    if isinstance(value, EncodedRecord):
        return True
    if type(value) in _CONTAINERS or isinstance(value, Mapping | list | tuple):
        return depth < _OPEN_DEPTH or len(value) > _OPEN_MEMBERS  # type: ignore[arg-type]
    return False


def _key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"checkpoint keys must be strings, not {type(key).__name__}: {key!r:.80}")
    return key


def _put(value: Any, depth: int, out: list[bytes]) -> None:
    """Append the JSON of ``value``, at ``depth`` in the state, to ``out`` in pieces."""
    if isinstance(value, EncodedRecord):
        out.append(value.encoded)
    elif isinstance(value, list | tuple) and value and all(map(isinstance, value, repeat(EncodedRecord))):
        joined = [b","] * (2 * len(value) - 1)  # records and commas, without a loop in Python
        joined[::2] = map(_encoded_of, value)
        out.append(b"[")
        out += joined
        out.append(b"]")
    elif not _opened(value, depth):
        out.append(encode_json(value).encode("ascii"))
    else:
        _put_members(value, depth, out)


def _put_members(value: Any, depth: int, out: list[bytes]) -> None:
    """Append an opened container: its members in groups, each group from one encoder call."""
    is_mapping = isinstance(value, Mapping)
    out.append(b"{" if is_mapping else b"[")
    separator = b""
    group: list[Any] = []
    group_size = 16  # members per call, adapted to the size of what they encode to

    def put_group() -> None:
        nonlocal group, group_size, separator
        text = encode_json({_key(k): v for k, v in group} if is_mapping else group)[1:-1]
        group_size = max(1, min(4096, group_size * _PIECE_CHARS // max(1, len(text))))
        out.append(separator + text.encode("ascii"))
        group, separator = [], b","

    for member in value.items() if is_mapping else value:
        if not _opened(member[1] if is_mapping else member, depth + 1):
            group.append(member)
            if len(group) >= group_size:
                put_group()
            continue
        if group:
            put_group()
        if is_mapping:
            out.append(separator + encode_json(_key(member[0])).encode("ascii") + b":")
            _put(member[1], depth + 1, out)
        else:
            out.append(separator)
            _put(member, depth + 1, out)
        separator = b","
    if group:
        put_group()
    out.append(b"}" if is_mapping else b"]")


def encode_checkpoint(state: Mapping[str, Any], written: float) -> bytes:
    """The file's bytes for ``state``: the schema-1 envelope, compact ASCII JSON, final newline.

    ``state`` is plain JSON data that may hold :class:`EncodedRecord` values (written as they
    are).  Raises TypeError or ValueError when it holds something JSON cannot say (a set, NaN, a
    non-string key).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a checkpoint's state is a mapping, not a {type(state).__name__}")
    head = f'{{"schema":{SCHEMA_VERSION},"written":{encode_json(float(written))},"state":'
    out = [head.encode("ascii")]
    _put(state, 0, out)
    out.append(b"}\n")
    return b"".join(out)


class CorruptCheckpointError(ValueError):
    """The bytes are not a schema-1 checkpoint; the message says why."""


def decode_checkpoint(data: bytes) -> tuple[float, dict[str, Any]]:
    """``(written, state)`` from a file's bytes, or :class:`CorruptCheckpointError` with the reason."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"not valid JSON ({e})") from e
    if not isinstance(document, dict):
        raise CorruptCheckpointError(f"a JSON {type(document).__name__}, not an object")
    schema = document.get("schema")
    if schema is None:
        raise CorruptCheckpointError("no schema number")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise CorruptCheckpointError(f"unknown schema {schema!r:.40} (this vmcloud reads {SCHEMA_VERSION})")
    written = document.get("written")
    if not isinstance(written, int | float) or isinstance(written, bool):
        raise CorruptCheckpointError("no 'written' time")
    state = document.get("state")
    if not isinstance(state, dict):
        raise CorruptCheckpointError("no 'state' object")
    return float(written), state


# --------------------------------------------------------------------------- the store


@attrs.frozen
class CheckpointStats:
    """How checkpointing goes, for /all-status and metrics."""

    saves: int  # save() calls
    writes: int  # writes that reached the disk
    failures: int  # writes that failed (each logged with its reason)
    coalesced: int  # snapshots replaced by a newer one before being written
    last_written: float | None  # clock time of the last good write
    last_size: int | None  # bytes
    last_encode_seconds: float | None  # making the bytes (joining records, encoding the rest)
    last_write_seconds: float | None  # encoding + file operations of the last good write
    last_error: str | None  # reason of the last failure, None once a write succeeds again


@attrs.frozen
class _Written:
    size: int
    encode_seconds: float
    write_seconds: float


@implementer(ICheckpointStore)
class CheckpointStore:
    """Keeps the pool's checkpoint in ``<state dir>/checkpoint.json``.

    ``dispatch`` runs a write off the reactor thread (see :mod:`vmcloud.threads`); ``clock``
    stamps checkpoints, names corrupt files and times retries; ``files`` performs the file
    operations of a write; ``timings`` is told how long each good write took.

    A failed write is logged with its reason and the newest snapshot is tried again
    ``retry_delay`` seconds later (saves in between only replace it, so a full disk costs one
    log line per ``retry_delay``, not one per change); with ``retry_delay=0`` it is tried at the
    next save.  ``min_interval`` (default 0: write as fast as the disk allows) spaces the starts of
    consecutive writes, bounding the CPU a busy 5,000-VM pool spends on checkpoints.  Nothing here
    ever raises into the pool.
    """

    log = Logger()

    def __init__(
        self,
        path: FilePath[str],
        *,
        dispatch: Dispatch,
        clock: IReactorTime,
        files: FileOps = REAL_FILE_OPS,
        retry_delay: float = 5.0,
        min_interval: float = 0.0,
        timings: ITimings = NO_TIMINGS,
    ) -> None:
        self.directory = path
        self.target = path.child(CHECKPOINT_NAME)
        self.temp = path.child(CHECKPOINT_NAME + TEMP_SUFFIX)
        self._dispatch = dispatch
        self._clock = clock
        self._files = files
        self._retry_delay = retry_delay
        self._min_interval = min_interval
        self._timings = timings

        # Snapshots are numbered by save().  At most one is being written and at most one waits
        # (the newest); a waiting snapshot may be held back by a timer (retry or min_interval).
        self._saved = 0
        self._started = 0  # number of the newest snapshot a write was started for
        self._writing: int | None = None
        self._pending: tuple[int, Mapping[str, Any]] | None = None
        self._hold: IDelayedCall | None = None
        self._not_before = 0.0  # clock time before which no new write starts (unless flushed)
        self._waiters: list[tuple[int, Deferred[None]]] = []  # (snapshot number, flush)

        self._writes = 0
        self._failures = 0
        self._coalesced = 0
        self._last_written: float | None = None
        self._last: _Written | None = None
        self._last_error: str | None = None

    # ------------------------------------------------------------------ ICheckpointStore

    def load(self) -> Mapping[str, Any] | None:
        """The state of the last good checkpoint, or None when there is none to use.

        A leftover temporary file from an interrupted write is removed.  A corrupt, truncated or
        wrong-schema checkpoint is moved aside (``event="checkpoint-corrupt"``) and None returned.
        Raises :class:`CheckpointUnreadableError` when the file exists but cannot be read.
        Blocking: call it once, at start, before the reactor has work to do.
        """
        self._remove_leftover_temp()
        try:
            data = self.target.getContent()
        except FileNotFoundError:
            self.log.info(
                "No checkpoint at {path}: starting clean", path=self.target.path, event="checkpoint-none"
            )
            return None
        except OSError as e:
            raise CheckpointUnreadableError(f"cannot read {self.target.path}: {e.strerror or e}") from e
        try:
            written, state = decode_checkpoint(data)
        except CorruptCheckpointError as e:
            self._move_aside(str(e))
            return None
        self.log.info(
            "Loaded checkpoint {path} ({size} bytes, written {age:.1f} s ago)",
            path=self.target.path,
            size=len(data),
            age=self._clock.seconds() - written,
            event="checkpoint-loaded",
        )
        return state

    def save(self, snapshot: Mapping[str, Any]) -> None:
        """Schedule a write of ``snapshot``; returns at once and never raises.

        The snapshot is written later, on another thread: the caller hands over a fresh structure
        of plain JSON data (dicts, lists, str, int, float, bool, None; string keys) or
        :class:`~vmcloud.pool.snapshot.EncodedRecord` values, and never mutates it afterwards.
        A snapshot still waiting when a newer one arrives is dropped unwritten (newest wins).
        """
        self._saved += 1
        if self._pending is not None and self._pending[0] > self._started:
            self._coalesced += 1
        self._pending = (self._saved, snapshot)
        if self._writing is None and self._hold is None:
            self._schedule()

    async def flush(self) -> None:
        """Wait until a snapshot at least as new as every one saved so far has been written.

        Used on clean shutdown: a snapshot held back (by a retry delay or ``min_interval``) is
        written at once.  Returns, without raising, also when that write fails (it is logged).
        """
        if self._pending is None and self._writing is None:
            return
        target = self._saved if self._pending is not None else self._writing
        assert target is not None
        waiter: Deferred[None] = Deferred()
        self._waiters.append((target, waiter))
        if self._writing is None:
            self._release()
        await waiter

    # ------------------------------------------------------------------ observability

    def stats(self) -> CheckpointStats:
        """Counters and the figures of the last write."""
        return CheckpointStats(
            saves=self._saved,
            writes=self._writes,
            failures=self._failures,
            coalesced=self._coalesced,
            last_written=self._last_written,
            last_size=self._last.size if self._last else None,
            last_encode_seconds=self._last.encode_seconds if self._last else None,
            last_write_seconds=self._last.write_seconds if self._last else None,
            last_error=self._last_error,
        )

    # ------------------------------------------------------------------ writing (reactor side)

    def _release(self) -> None:
        """Start the waiting snapshot now, whatever held it back."""
        if self._hold is not None:
            if self._hold.active():
                self._hold.cancel()
            self._hold = None
        if self._pending is not None and self._writing is None:
            self._write_next()

    def _schedule(self) -> None:
        """Start the waiting snapshot now, or hold it until ``_not_before``."""
        wait = self._not_before - self._clock.seconds()
        if wait > 0:
            self._hold = self._clock.callLater(wait, self._release)
        else:
            self._write_next()

    def _write_next(self) -> None:
        assert self._pending is not None and self._writing is None
        number, snapshot = self._pending
        self._pending = None
        self._writing = self._started = number
        started = self._clock.seconds()
        try:
            d = self._dispatch(lambda: self._write(snapshot, started))
        except Exception:
            d = fail(Failure())
        d.addCallbacks(
            self._succeeded,
            self._failed,
            callbackArgs=(number, started),
            errbackArgs=(number, snapshot, started),
        )
        d.addErrback(lambda f: self.log.failure("Checkpoint bookkeeping failed", f))

    def _succeeded(self, result: _Written, number: int, started: float) -> None:
        self._writes += 1
        self._last = result
        self._timings.observe(CHECKPOINT_WRITE, result.write_seconds)
        self._last_written = started
        if self._last_error is not None:
            self.log.info(
                "Checkpoint {path} written again after failures",
                path=self.target.path,
                event="checkpoint-recovered",
            )
        self._last_error = None
        self._ended(number, started + self._min_interval)

    def _failed(self, failure: Failure, number: int, snapshot: Mapping[str, Any], started: float) -> None:
        self._failures += 1
        error = failure.value
        if isinstance(error, OSError):
            reason = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
            self.log.error(
                "Checkpoint write to {path} failed: {reason}; trying again in {delay} s",
                path=self.target.path,
                reason=reason,
                delay=self._retry_delay,
                event="checkpoint-write-failed",
            )
        else:
            reason = f"{type(error).__name__}: {error}"
            self.log.failure(
                "Checkpoint write to {path} failed: {reason}; trying again in {delay} s",
                failure,
                path=self.target.path,
                reason=reason,
                delay=self._retry_delay,
                event="checkpoint-write-failed",
            )
        self._last_error = reason
        if self._pending is None:
            self._pending = (number, snapshot)  # nothing newer: this one is retried
        if self._retry_delay > 0:
            self._ended(number, self._clock.seconds() + self._retry_delay)
        else:
            self._ended(number, None)

    def _ended(self, number: int, not_before: float | None) -> None:
        """A write ended: wake the flushes it satisfies, then start, hold or park the next one.

        No write starts before ``not_before`` unless a flush waits; None parks a retried snapshot
        until the next save or flush.
        """
        self._writing = None
        self._not_before = 0.0 if not_before is None else not_before
        done = [d for target, d in self._waiters if target <= number]
        self._waiters = [(target, d) for target, d in self._waiters if target > number]
        for d in done:
            d.callback(None)
        if self._pending is None or self._writing is not None or self._hold is not None:
            return  # nothing waits, or a flush or save woken above already took care of it
        if self._waiters:
            self._write_next()
        elif not_before is not None:
            self._schedule()

    # ------------------------------------------------------------------ writing (thread side)

    def _write(self, snapshot: Mapping[str, Any], written: float) -> _Written:
        """Encode and atomically replace the checkpoint; runs on the dispatcher's thread."""
        started = time.perf_counter()
        data = encode_checkpoint(snapshot, written)
        encoded = time.perf_counter()
        files = self._files
        os.makedirs(self.directory.path, mode=0o700, exist_ok=True)
        fd = files.open(self.temp)
        try:
            try:
                files.write(fd, data)
                files.fsync(fd)
            except BaseException:
                with suppress(OSError):
                    files.close(fd)
                raise
            files.close(fd)
            files.rename(self.temp, self.target)
        except BaseException:
            with suppress(OSError):
                files.remove(self.temp)
            raise
        files.fsync_dir(self.directory)
        return _Written(len(data), encoded - started, time.perf_counter() - started)

    # ------------------------------------------------------------------ loading helpers

    def _remove_leftover_temp(self) -> None:
        try:
            self._files.remove(self.temp)
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.warn(
                "Cannot remove leftover {path}: {reason}",
                path=self.temp.path,
                reason=e.strerror or str(e),
                event="checkpoint-temp-stuck",
            )
            return
        self.log.info(
            "Removed {path} left by an interrupted checkpoint write",
            path=self.temp.path,
            event="checkpoint-temp-removed",
        )

    def _move_aside(self, reason: str) -> None:
        stamp = datetime.fromtimestamp(self._clock.seconds(), UTC).strftime("%Y%m%dT%H%M%SZ")
        base = CHECKPOINT_NAME + CORRUPT_INFIX + stamp
        aside = self.directory.child(base)
        n = 1
        while aside.exists():
            n += 1
            aside = self.directory.child(f"{base}-{n}")
        try:
            self._files.rename(self.target, aside)
        except OSError as e:
            self.log.error(
                "Checkpoint {path} is unusable ({reason}) and cannot be moved aside ({error});"
                " starting clean, the next save overwrites it",
                path=self.target.path,
                reason=reason,
                error=e.strerror or str(e),
                event="checkpoint-corrupt",
            )
            return
        self.log.error(
            "Checkpoint {path} is unusable ({reason}); moved it to {aside} and starting clean",
            path=self.target.path,
            reason=reason,
            aside=aside.path,
            event="checkpoint-corrupt",
        )


__all__ = [
    "CHECKPOINT_NAME",
    "SCHEMA_VERSION",
    "CheckpointStats",
    "CheckpointStore",
    "CheckpointUnreadableError",
    "CorruptCheckpointError",
    "FileOps",
    "RealFileOps",
    "decode_checkpoint",
    "encode_checkpoint",
]
