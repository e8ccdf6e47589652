"""The pool as JSON for the checkpoint, and the pool rebuilt from it after a restart.

``SnapshotWriter.snapshot(state)`` makes a JSON-able dict (schema ``POOL_SCHEMA``); it caches the
dict of every VM and handle record it has seen, so that at thousands of VMs a snapshot after each
change costs a list of references rather than thousands of new dicts.  Cached dicts are never
mutated once made: the checkpoint store encodes a snapshot on another thread.

``restore(data, now, config)`` applies the recovery rules: a VM in a stable state (FREE, READY,
OCCUPIED) with a server is kept, *recovering* until its guest says HELLO again; every other VM
with a server is marked ERROR (terminated by the next plan); one without a server is forgotten
(the stray reaper finds whatever the cloud made of it).  Batches, handles, pending locks and
events survive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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


class SnapshotError(ValueError):
    """A checkpoint that cannot be restored: wrong schema, a missing or mistyped field."""


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


def handle_json(handle: Handle) -> dict[str, Any]:
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
            "items": [event_json(e) for e in handle.events],
        },
    }


class SnapshotWriter:
    """Makes snapshots of one pool, reusing the dicts of records that did not change."""

    def __init__(self) -> None:
        self._vms: dict[str, tuple[VM, dict[str, Any]]] = {}
        self._handles: dict[str, tuple[Handle, int, dict[str, Any]]] = {}

    def snapshot(self, state: PoolState) -> dict[str, Any]:
        vms = []
        cache = self._vms
        for vmid, vm in state.vms.items():
            hit = cache.get(vmid)
            if hit is None or hit[0] is not vm:
                hit = (vm, vm_json(vm))
                cache[vmid] = hit
            vms.append(hit[1])
        if len(cache) > len(state.vms):
            for vmid in [v for v in cache if v not in state.vms]:
                del cache[vmid]
        handles = []
        hcache = self._handles
        for token, handle in state.handles.items():
            seen = handle.events.next_id
            hhit = hcache.get(token)
            if hhit is None or hhit[0] is not handle or hhit[1] != seen:
                hhit = (handle, seen, handle_json(handle))
                hcache[token] = hhit
            handles.append(hhit[2])
        if len(hcache) > len(state.handles):
            for token in [t for t in hcache if t not in state.handles]:
                del hcache[token]
        spec = state.spec
        return {
            "schema": POOL_SCHEMA,
            "epoch": state.epoch,
            "nextVmid": state.next_vmid,
            "nextBatch": state.next_batch,
            "spec": {"min": spec.minimum, "max": spec.maximum, "linger": spec.linger_ms},
            "shuttingDown": state.shutting_down,
            "vms": vms,
            "batches": [batch_json(b) for b in state.batches.values()],
            "handles": handles,
            "pending": [
                {"handle": p.handle, "batch": p.batch, "since": p.since} for p in state.pending.values()
            ],
        }


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
    return [read(item) for item in items]


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
