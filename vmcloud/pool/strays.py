"""Strays: servers of the pool's prefix that no VM tracks, counted on each listing of the cloud.

A server the pool does not know may be the leftover of a crash, a boot whose answer was lost, or
another controller's mistake.  The plan deletes a stray only once it was seen in two listings in a
row (nodepool's rule), so :class:`Strays` counts how many listings in a row saw each one and
forgets those a listing no longer shows.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from vmcloud.pool.interfaces import ServerStatus
from vmcloud.pool.model import Stray


class Strays:
    """The strays of the last listing, by server id, with how many listings in a row saw them."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[str, Stray] = {}

    def count(self, untracked: Iterable[ServerStatus]) -> bool:
        """Take in the untracked servers of one listing; whether anything changed."""
        strays: dict[str, Stray] = {}
        for status in untracked:
            before = self.seen.get(status.server_id)
            if before is None:
                strays[status.server_id] = Stray(status.server_id, status.name)
            else:
                strays[status.server_id] = attrs.evolve(before, seen=before.seen + 1)
        if strays == self.seen:
            return False
        self.seen = strays
        return True

    def deleting(self, server_id: str, now: float) -> None:
        """The delete of a stray was asked for at ``now``."""
        stray = self.seen.get(server_id)
        if stray is not None:
            self.seen[server_id] = attrs.evolve(stray, deleting_since=now)

    def deleted(self, server_id: str) -> None:
        self.seen.pop(server_id, None)
