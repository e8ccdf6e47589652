"""Every open console viewer and audio stream, by what gave it access, so that access can end.

A worker's socket must close within a second of its handle's release or expiry or its VM's
death (SPEC), and an operator's when the VM dies.  The proxies register each open socket (and each
audio capture) under its :data:`~vmcloud.console.targets.Key`; the pool tells this registry when a
handle or a VM ends (:meth:`PoolService.watch_access`), and every member under that key is
revoked at once.  It also answers the per-key and total counts the proxies' limits need.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from vmcloud.console.targets import Key, handle_key, vm_key

log = Logger()


class Revocable(Protocol):
    """A socket (or a capture) that closes itself, promptly, when its access ends."""

    def revoke(self, reason: str) -> None: ...


class AccessRegistry:
    """Open sockets by key; :meth:`end` revokes all of a key's at once."""

    def __init__(self) -> None:
        self._members: dict[Key, dict[Revocable, None]] = {}
        self._total = 0

    def add(self, key: Key, member: Revocable) -> None:
        members = self._members.setdefault(key, {})
        if member not in members:
            members[member] = None
            self._total += 1

    def discard(self, key: Key, member: Revocable) -> None:
        members = self._members.get(key)
        if members is None or member not in members:
            return
        del members[member]
        self._total -= 1
        if not members:
            del self._members[key]

    def count(self, key: Key) -> int:
        return len(self._members.get(key, ()))

    @property
    def total(self) -> int:
        return self._total

    def end(self, key: Key, reason: str) -> int:
        """Revoke every member under ``key``; returns how many there were."""
        members = self._members.pop(key, None)
        if not members:
            return 0
        self._total -= len(members)
        for member in members:
            try:
                member.revoke(reason)
            except Exception:
                log.failure("Could not revoke a console or audio socket ({reason})", reason=reason)
        return len(members)

    # ------------------------------------------------------------------ what the pool says

    def handle_ended(self, token: str, reason: str) -> None:
        """The handle was released or expired, or its VM died: its sockets close."""
        count = self.end(handle_key(token), reason)
        if count:
            log.info(
                "Closed {count} console/audio sockets of handle {handle}...: {reason}",
                count=count,
                handle=token[:6],
                reason=reason,
                event="console-revoked",
            )

    def vm_ended(self, vmid: str, reason: str) -> None:
        """The VM died or is being terminated: the operator's consoles of it close."""
        count = self.end(vm_key(vmid), reason)
        if count:
            log.info(
                "Closed {count} operator consoles of VM {vmid}: {reason}",
                count=count,
                vmid=vmid,
                reason=reason,
                event="console-revoked",
            )
