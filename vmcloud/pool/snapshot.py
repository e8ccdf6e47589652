"""The pool as JSON for the checkpoint, and the pool rebuilt from it after a restart.

``SnapshotWriter.snapshot(state)`` makes the checkpoint's state (schema ``POOL_SCHEMA``): a dict
whose big collections (VMs, batches, handles, pending locks) are lists of :class:`EncodedRecord`,
each record's JSON encoded once, on the reactor, when the record changes.  At 5,000 VMs a fill
changes a few records at a time, so a snapshot costs a few encodings and a list of references;
the checkpoint store then only joins bytes on its thread instead of running json's encoder over
the whole pool with the GIL held (~50 ms at 5,000 VMs, stalling the reactor meanwhile).  Keeping
each record's bytes rather than its dict also makes the cache smaller (about 610 bytes per VM
instead of 770; 2.0 KB per handle with five events, each event's JSON kept beside the record,
instead of 2.5 KB) and leaves the garbage collector one object per VM to walk instead of five.
Records are never changed once made: the checkpoint store writes a snapshot later, on another
thread.

``restore(data, now, config)`` applies the recovery rules: a VM in a stable state (FREE, READY,
OCCUPIED) with a server is kept, *recovering* until its guest says HELLO again; every other VM
with a server is marked ERROR (terminated by the next plan); one without a server is forgotten
(the stray reaper finds whatever the cloud made of it).  Batches, handles, pending locks and
events survive.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs

from vmcloud.pool import model
from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import BatchOptions, Cookie
from vmcloud.pool.model import (
    STABLE,
    VM,
    Batch,
    Event,
    EventLog,
    Handle,
    LostVM,
    PendingLock,
    PoolSpec,
    VMState,
)
from vmcloud.pool.state import PoolState

#: Bumped when the layout changes incompatibly; an unknown one is refused (start clean).
POOL_SCHEMA = 1

T = TypeVar("T")
R = TypeVar("R")


class SnapshotError(ValueError):
    """A checkpoint that cannot be restored: wrong schema, a missing or mistyped field."""


class UnencodableRecordError(ValueError):
    """A record holds a value JSON cannot say (a set, NaN, an infinity); the message says which record."""


# --------------------------------------------------------------------------- JSON text


def _json_default(value: object) -> Any:
    """Let read-only mappings (and encoded records) through; refuse the rest with its type name."""
    if isinstance(value, EncodedRecord):
        return value.decoded()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}: {value!r:.80}")


encode_json: Callable[[Any], str] = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, default=_json_default
).encode
"""The one way checkpoint JSON is written: compact, ASCII only, no NaN or infinity.

The pool's records and the checkpoint store's envelope both use it, so that a record encoded on
its own is byte for byte what encoding the whole document at once would have written.
"""


class EncodedRecord(Mapping[str, Any]):
    """One JSON object of a snapshot (a VM, a batch, a handle with its events), encoded once.

    ``encoded`` is its compact ASCII JSON as :data:`encode_json` writes it, as bytes: the checkpoint
    store joins the records of a snapshot into the file without looking inside them.  It is never
    changed once made.  Read as a mapping, a record is the object it encodes, decoded again on each
    access: that keeps a snapshot readable by tests and tools (and by :func:`restore`), not fast.
    """

    __slots__ = ("encoded",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping):
            raise TypeError(f"a record is a mapping, not a {type(data).__name__}")
        self.encoded: bytes = encode_json(data).encode("ascii")

    @classmethod
    def _assembled(cls, encoded: bytes) -> EncodedRecord:
        """A record from JSON the writer put together from pieces it encoded with encode_json."""
        record = cls.__new__(cls)
        record.encoded = encoded
        return record

    def decoded(self) -> dict[str, Any]:
        """A fresh dict of the record's data."""
        data: dict[str, Any] = json.loads(self.encoded)
        return data

    def __getitem__(self, key: str) -> Any:
        return self.decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decoded())

    def __len__(self) -> int:
        return len(self.decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedRecord):
            return self.encoded == other.encoded or self.decoded() == other.decoded()
        if isinstance(other, Mapping):
            return self.decoded() == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"EncodedRecord({self.encoded.decode('ascii')!r:.100})"


# --------------------------------------------------------------------------- writing


def vm_json(vm: VM) -> dict[str, Any]:
    return {
        "vmid": vm.vmid,
        "state": vm.state.value,
        "version": vm.version,
        "since": vm.since,
        "createdAt": vm.created_at,
        "serverId": vm.server_id,
        "bootedAt": vm.booted_at,
        "login": vm.login,
        "passcode": vm.passcode,
        "identity": vm.identity,
        "mac": vm.mac,
        "ip": vm.ip,
        "macs": list(vm.macs),
        "ips": list(vm.ips),
        "batch": vm.batch,
        "handle": vm.handle,
        "lastUsed": vm.last_used,
        "vncPassword": vm.vnc_password,
        "capabilities": list(vm.capabilities),
        "recovering": vm.recovering,
        "reason": vm.reason,
        # written only when set, so that files without them stay what they were
        **({"vncPort": vm.vnc_port} if vm.vnc_port is not None else {}),
        **({"audioPort": vm.audio_port} if vm.audio_port is not None else {}),
    }


def cookie_json(cookie: Cookie) -> dict[str, Any]:
    """A cookie as the PREPARE word and the checkpoint spell it."""
    return {
        "name": cookie.name,
        "value": cookie.value,
        "domain": cookie.domain,
        "path": cookie.path,
        "secure": cookie.secure,
        "httpOnly": cookie.http_only,
        "expires": cookie.expires,
    }


def batch_json(batch: Batch) -> dict[str, Any]:
    options = batch.options
    return {
        "id": batch.id,
        "size": batch.size,
        "homepage": batch.homepage,
        "createdAt": batch.created_at,
        "cancelled": batch.cancelled,
        "options": {
            "cookies": [cookie_json(c) for c in options.cookies],
            "window": {"width": options.window_width, "height": options.window_height},
            "audio": options.audio,
        },
    }


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "time": event.time, "data": dict(event.data)}


def handle_json(handle: Handle, with_events: bool = True) -> dict[str, Any]:
    """A handle and its events, which come last: the writer adds them to a record made without."""
    lost = handle.lost
    return {
        "token": handle.token,
        "batch": handle.batch,
        "createdAt": handle.created_at,
        "vmid": handle.vmid,
        "expireAt": handle.expire_at,
        "lost": None if lost is None else {"vmid": lost.vmid, "reason": lost.reason, "at": lost.at},
        "events": {
            "nextId": handle.events.next_id,
            "dropped": handle.events.dropped,
            "items": [event_json(e) for e in handle.events] if with_events else [],
        },
    }


def pending_json(lock: PendingLock) -> dict[str, Any]:
    return {"handle": lock.handle, "batch": lock.batch, "since": lock.since}


def _encoded(what: str, key: str, data: Mapping[str, Any]) -> bytes:
    """``data`` as JSON bytes; a value JSON cannot say is reported with the record it is in."""
    try:
        return encode_json(data).encode("ascii")
    except (TypeError, ValueError) as e:
        raise UnencodableRecordError(f"{what} {key!r} cannot be checkpointed: {e}") from e


class _CachedRecord(EncodedRecord, Generic[R]):
    """An encoded record with the pool's record it was made from: one object per VM in the cache."""

    __slots__ = ("source",)

    def __init__(self, source: R, encoded: bytes) -> None:
        self.source = source
        self.encoded = encoded


class _Records(Generic[R]):
    """The encoded records of one collection of the pool (VMs by vmid, batches by id, ...).

    The pool's records are frozen: a changed record is a new object, so one identity test per
    record says whether its JSON must be made again.
    """

    __slots__ = ("_cache", "_layout", "_what")

    def __init__(self, what: str, layout: Callable[[R], Mapping[str, Any]]) -> None:
        self._what = what
        self._layout = layout
        self._cache: dict[str, _CachedRecord[R]] = {}

    def records(self, current: Mapping[str, R]) -> list[EncodedRecord]:
        """A fresh list of the records of ``current``, in its order."""
        cache = self._cache
        records: list[EncodedRecord] = []
        for key, source in current.items():
            record = cache.get(key)
            if record is None or record.source is not source:
                record = _CachedRecord(source, _encoded(self._what, key, self._layout(source)))
                cache[key] = record
            records.append(record)
        if len(cache) > len(current):  # the loop added what is new: anything more is gone
            for key in [k for k in cache if k not in current]:
                del cache[key]
        return records


class _HandleRecord:
    """A handle's encoded record, kept in step with its event log.

    A log holds up to ``events_per_handle`` events (1,000 by default) and grows one event at a
    time; encoding a full log again for each new event costs the reactor 2.4 ms.  So each event's
    JSON is made once and kept, in log order: a new record is the handle's own JSON (made again:
    10 µs) with the kept events joined into its ``items``.
    """

    __slots__ = ("events", "handle", "next_id", "record")

    handle: Handle  # what the record was made from...
    next_id: int  # ...and its log's next_id then (the log grows in place)
    record: EncodedRecord
    events: list[bytes]  # the JSON of each event of the log, oldest first

    def __init__(self, handle: Handle) -> None:
        self._write(handle, [], list(handle.events))

    def current(self, handle: Handle) -> bool:
        """Whether the record still says what ``handle`` and its events say."""
        return self.handle is handle and self.next_id == handle.events.next_id

    def update(self, handle: Handle) -> None:
        """Make the record say what ``handle`` says, encoding only the events it does not hold."""
        log = handle.events
        if log is not self.handle.events:  # another log (the pool keeps one per handle): start over
            self._write(handle, [], list(log))
            return
        new, _ = log.after(self.next_id - 1)
        self._write(handle, self.events, new)

    def _write(self, handle: Handle, held: list[bytes], new: list[Event]) -> None:
        """The record of ``handle``: the events ``held`` and the ``new`` ones, the oldest dropped as
        the log dropped them.  Nothing changes when a value cannot be encoded."""
        token = handle.token
        head = _encoded("handle", token, handle_json(handle, with_events=False))
        events = held + [_encoded("handle", token, event_json(e)) for e in new]
        del events[: len(events) - len(handle.events)]  # what the log dropped
        self.events = events
        # handle_json puts the events last: its JSON ends in '"items":[]}}', and they go in there
        self.record = EncodedRecord._assembled(b"".join([head[: -len(b"]}}")], b",".join(events), b"]}}"]))
        self.next_id = handle.events.next_id
        self.handle = handle


class SnapshotWriter:
    """Makes snapshots of one pool, encoding each record once, when it changes."""

    def __init__(self) -> None:
        self._vms: _Records[VM] = _Records("VM", vm_json)
        self._batches: _Records[Batch] = _Records("batch", batch_json)
        self._pending: _Records[PendingLock] = _Records("pending lock", pending_json)
        self._handles: dict[str, _HandleRecord] = {}

    def snapshot(self, state: PoolState) -> dict[str, Any]:
        """The checkpoint's state: plain JSON data, with lists of :class:`EncodedRecord`.

        Raises :class:`UnencodableRecordError` when a record holds a value JSON cannot say.
        """
        spec = state.spec
        return {
            "schema": POOL_SCHEMA,
            "epoch": state.epoch,
            "nextVmid": state.next_vmid,
            "nextBatch": state.next_batch,
            "spec": {"min": spec.minimum, "max": spec.maximum, "linger": spec.linger_ms},
            "shuttingDown": state.shutting_down,
            "vms": self._vms.records(state.vms),
            "batches": self._batches.records(state.batches),
            "handles": self._handle_records(state.handles),
            "pending": self._pending.records(state.pending),
        }

    def _handle_records(self, handles: Mapping[str, Handle]) -> list[EncodedRecord]:
        cache = self._handles
        records = []
        for token, handle in handles.items():
            held = cache.get(token)
            if held is None:
                held = cache[token] = _HandleRecord(handle)
            elif not held.current(handle):
                held.update(handle)
            records.append(held.record)
        if len(cache) > len(handles):
            for token in [t for t in cache if t not in handles]:
                del cache[token]
        return records


def snapshot(state: PoolState) -> dict[str, Any]:
    """A one-off snapshot (no cache)."""
    return SnapshotWriter().snapshot(state)


# --------------------------------------------------------------------------- reading


def _get(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], what: str) -> T:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise SnapshotError(f"{what}: {key} is missing or not {_kind_name(kind)}")
    return value  # type: ignore[return-value]


def _opt(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], what: str) -> T | None:
    if not isinstance(data, Mapping):
        raise SnapshotError(f"{what}: not an object")
    if data.get(key) is None:
        return None
    return _get(data, key, kind, what)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


_NUMBER = (int, float)


def _strs(data: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    items = _get(data, key, list, what)
    if not all(isinstance(i, str) for i in items):
        raise SnapshotError(f"{what}: {key} must hold strings")
    return tuple(items)


def _each(data: Mapping[str, Any], key: str, read: Callable[[Any], T]) -> list[T]:
    items = _get(data, key, list, "checkpoint")
    return [read(item.decoded() if isinstance(item, EncodedRecord) else item) for item in items]


def read_vm(data: Mapping[str, Any]) -> VM:
    what = f"VM {data.get('vmid')!r}" if isinstance(data, Mapping) else "VM"
    try:
        state = VMState(_get(data, "state", str, what))
    except ValueError:
        raise SnapshotError(f"{what}: unknown state {data.get('state')!r}") from None
    return VM(
        vmid=_get(data, "vmid", str, what),
        state=state,
        version=_get(data, "version", int, what),
        since=float(_get(data, "since", _NUMBER, what)),
        created_at=float(_get(data, "createdAt", _NUMBER, what)),
        server_id=_opt(data, "serverId", str, what),
        booted_at=_opt(data, "bootedAt", _NUMBER, what),
        login=_opt(data, "login", str, what),
        passcode=_opt(data, "passcode", str, what),
        identity=_opt(data, "identity", str, what),
        mac=_opt(data, "mac", str, what),
        ip=_opt(data, "ip", str, what),
        macs=_strs(data, "macs", what),
        ips=_strs(data, "ips", what),
        batch=_opt(data, "batch", str, what),
        handle=_opt(data, "handle", str, what),
        last_used=float(_get(data, "lastUsed", _NUMBER, what)),
        vnc_password=_opt(data, "vncPassword", str, what),
        capabilities=_strs(data, "capabilities", what),
        recovering=_get(data, "recovering", bool, what),
        reason=_opt(data, "reason", str, what),
        vnc_port=_opt(data, "vncPort", int, what),
        audio_port=_opt(data, "audioPort", int, what),
    )


def read_cookie(data: Mapping[str, Any]) -> Cookie:
    what = "cookie"
    expires = _opt(data, "expires", _NUMBER, what)
    return Cookie(
        name=_get(data, "name", str, what),
        value=_get(data, "value", str, what),
        domain=_opt(data, "domain", str, what),
        path=_get(data, "path", str, what),
        secure=_get(data, "secure", bool, what),
        http_only=_get(data, "httpOnly", bool, what),
        expires=None if expires is None else float(expires),
    )


def read_batch(data: Mapping[str, Any]) -> Batch:
    what = f"batch {data.get('id')!r}" if isinstance(data, Mapping) else "batch"
    options = _get(data, "options", dict, what)
    window = _get(options, "window", dict, what)
    return Batch(
        id=_get(data, "id", str, what),
        size=_get(data, "size", int, what),
        homepage=_get(data, "homepage", str, what),
        created_at=float(_get(data, "createdAt", _NUMBER, what)),
        cancelled=_get(data, "cancelled", bool, what),
        options=BatchOptions(
            cookies=tuple(read_cookie(c) for c in _get(options, "cookies", list, what)),
            window_width=_get(window, "width", int, what),
            window_height=_get(window, "height", int, what),
            audio=_get(options, "audio", bool, what),
        ),
    )


def read_handle(data: Mapping[str, Any], limit: int) -> Handle:
    what = "handle"
    events = _get(data, "events", dict, what)
    items = []
    for item in _get(events, "items", list, what):
        items.append(
            Event(
                id=_get(item, "id", int, "event"),
                time=float(_get(item, "time", _NUMBER, "event")),
                data=_get(item, "data", dict, "event"),
            )
        )
    lost_data = _opt(data, "lost", dict, what)
    lost = None
    if lost_data is not None:
        lost = LostVM(
            vmid=_get(lost_data, "vmid", str, what),
            reason=_get(lost_data, "reason", str, what),
            at=float(_get(lost_data, "at", _NUMBER, what)),
        )
    expire_at = _opt(data, "expireAt", _NUMBER, what)
    return Handle(
        token=_get(data, "token", str, what),
        batch=_get(data, "batch", str, what),
        created_at=float(_get(data, "createdAt", _NUMBER, what)),
        events=EventLog(
            limit,
            next_id=_get(events, "nextId", int, what),
            dropped=_get(events, "dropped", int, what),
            events=items,
        ),
        vmid=_opt(data, "vmid", str, what),
        expire_at=None if expire_at is None else float(expire_at),
        lost=lost,
    )


def read_pending(data: Mapping[str, Any]) -> PendingLock:
    what = "pending lock"
    return PendingLock(
        handle=_get(data, "handle", str, what),
        batch=_get(data, "batch", str, what),
        since=float(_get(data, "since", _NUMBER, what)),
    )


def restore(data: Mapping[str, Any], now: float, config: PoolConfig) -> PoolState:
    """The pool a checkpoint describes, with the recovery rules applied at ``now``.

    Raises :class:`SnapshotError` when the checkpoint cannot be read; nothing is half restored.
    """
    if not isinstance(data, Mapping):
        raise SnapshotError("checkpoint: not an object")
    schema = data.get("schema")
    if schema != POOL_SCHEMA:
        raise SnapshotError(f"checkpoint: pool schema {schema!r}, this controller reads {POOL_SCHEMA}")
    spec_data = _get(data, "spec", dict, "checkpoint")
    spec = PoolSpec(
        _get(spec_data, "min", int, "spec"),
        _get(spec_data, "max", int, "spec"),
        _get(spec_data, "linger", int, "spec"),
    )
    vms = _each(data, "vms", read_vm)
    batches = _each(data, "batches", read_batch)
    handles = _each(data, "handles", lambda h: read_handle(h, config.events_per_handle))
    pending = _each(data, "pending", read_pending)

    state = PoolState(_get(data, "epoch", str, "checkpoint"), spec, config.events_per_handle)
    state.next_vmid = _get(data, "nextVmid", int, "checkpoint")
    state.next_batch = _get(data, "nextBatch", int, "checkpoint")
    state.shutting_down = _get(data, "shuttingDown", bool, "checkpoint")
    for batch in batches:
        state.batches[batch.id] = batch
    for handle in handles:
        state.handles[handle.token] = handle
    for vm in vms:
        if vm.server_id is None:
            continue
        if vm.state in STABLE:
            state.put(attrs.evolve(vm, recovering=True, version=vm.version + 1, since=now))
        elif vm.alive:
            state.put(model.failed(vm, f"was {vm.state.value} when the controller stopped", now))
        else:
            state.put(model.failed(vm, vm.reason or "was being terminated", now))
    for token, handle in list(state.handles.items()):
        if handle.vmid is None:
            continue
        lent = state.vms.get(handle.vmid)
        if lent is None or lent.state is not VMState.OCCUPIED or lent.handle != token:
            reason = "not recovered after the controller restarted"
            state.handles[token] = attrs.evolve(handle, vmid=None, lost=LostVM(handle.vmid, reason, now))
            handle.events.append({"action": "vm-died", "vmid": handle.vmid, "reason": reason}, now)
    for vm in list(state.vms.values()):
        if vm.handle is not None and vm.handle not in state.handles:
            state.put(attrs.evolve(vm, handle=None))  # its handle is gone: cleaned once back
    for lock in pending:
        waiting = state.handles.get(lock.handle)
        if (
            waiting is not None
            and waiting.vmid is None
            and waiting.lost is None
            and lock.batch in state.batches
        ):
            state.add_pending(lock)
    return state
