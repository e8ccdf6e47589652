"""Waiting for autobahn's batched timers, so a test's reactor is clean when it ends.

autobahn schedules a WebSocket's timeouts in txaio's batched timers (buckets of 0.2 s).  Cancelling
one call leaves its bucket's reactor call pending until the bucket fires, so a test that ends right
after a connection went (a killed browser's CDP socket) would meet trial's dirty-reactor check.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import deferLater


async def batched_timers_run_out(reactor: Any, timeout: float = 5.0) -> None:
    """Return once no batched-timer bucket is pending (polled every 0.1 s, ``timeout`` at most)."""
    for _ in range(int(timeout / 0.1)):
        if not any(getattr(c.func, "__name__", "") == "_notify_bucket" for c in reactor.getDelayedCalls()):
            return
        await deferLater(reactor, 0.1)
