"""Benchmark of the checkpoint store at the scale target (issue #4): 5,000 VMs.

Prints figures, asserts nothing.  Run from the repository root::

    .venv/bin/python bench/checkpoint.py [--vms 5000] [--dir /path/on/the/real/disk]

Measures, for a synthetic pool snapshot shaped like the pool's (a dict of ~15 fields per VM,
handles with a few page-load events each):

* size of ``checkpoint.json`` and the time to encode it, write it atomically (temp, fsync,
  rename, fsync of the directory) and load it back;
* the reactor thread's cost per ``save()`` (scheduling only) and how a burst of saves coalesces;
* the reactor's lag (how late a 1 ms timer fires) while checkpoints are written continuously on
  the store's thread, against the lag while a thread runs json's one-shot C encoder on the same
  snapshot, which holds the GIL for the whole document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from vmcloud.store.checkpoint import (
    CheckpointStore,
    RealFileOps,
    encode_checkpoint,
    synchronous_dispatch,
    thread_dispatcher,
)

STATES = ["FREE", "READY", "OCCUPIED", "WAIT", "BOOTING"]


def synthetic_snapshot(vms: int, generation: int = 0) -> dict[str, Any]:
    """A pool snapshot of ``vms`` VMs, half of them locked by a handle with five events each."""
    now = 1_760_000_000.0 + generation
    batches = max(1, vms // 100)
    vm_records = []
    handles = []
    for i in range(vms):
        vmid = f"{i:06d}"
        state = STATES[i % len(STATES)]
        handle = f"h{i:06d}-Zm9vYmFyYmF6cXV4cXV1eHF1dXg" if state == "OCCUPIED" or i % 2 else None
        vm_records.append(
            {
                "vmid": vmid,
                "name": f"vmcloud-vm-{vmid}",
                "serverId": f"5f0c7a8e-1b2d-4c3e-9f40-{i:012d}",
                "state": state,
                "version": 3 + generation,
                "stateSince": now - i % 600,
                "batch": f"b{i % batches}" if state in ("READY", "OCCUPIED") else None,
                "handle": handle,
                "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                "mac": f"fa:16:3e:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
                "login": f"vm-{vmid}",
                "passcode": "c2VjcmV0LXBhc3Njb2RlLTEyMzQ1Ng",
                "vncPassword": "a1b2c3d4",
                "lastBeacon": now - i % 5,
                "agentVersion": "0.1.0",
                "capabilities": ["browser", "vnc", "audio"],
            }
        )
        if handle is not None:
            handles.append(
                {
                    "handle": handle,
                    "batch": f"b{i % batches}",
                    "vmid": vmid,
                    "expireTime": (now + 3600) * 1000,
                    "lastEventId": 5,
                    "dropped": 0,
                    "events": [
                        {
                            "id": n,
                            "time": (now - 60 + n) * 1000,
                            "data": {
                                "action": "page-load",
                                "url": f"https://example.org/task/{i}/step/{n}?q=abc",
                                "title": f"Task {i} — step {n}",
                            },
                        }
                        for n in range(1, 6)
                    ],
                }
            )
    return {
        "poolSize": {"min": vms, "max": vms, "linger": 60000},
        "nextVmid": vms,
        "vms": vm_records,
        "batches": [
            {"batch": f"b{b}", "homepage": "https://example.org/", "size": 100, "cancelled": False}
            for b in range(batches)
        ],
        "preps": [],
        "handles": handles,
        "pendingLocks": [],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def report(label: str, times: list[float]) -> None:
    print(
        f"  {label:<50} median {_ms(statistics.median(times)):>9}   max {_ms(max(times)):>9}"
        f"   ({len(times)} runs)"
    )


def offline_figures(snapshot: dict[str, Any], directory: FilePath[str], runs: int) -> None:
    """Encoding, writing and loading on the calling thread, no reactor involved."""
    from twisted.internet.task import Clock

    data = encode_checkpoint(snapshot, 0.0)
    print(f"  checkpoint size: {len(data):,} bytes ({len(data) / len(snapshot['vms']):.0f} bytes per VM)")
    report("encode (store's piecewise encoder)", measure(lambda: encode_checkpoint(snapshot, 0.0), runs))
    report(
        "encode (json.dumps in one C call, reference)",
        measure(lambda: json.dumps(snapshot, separators=(",", ":")), runs),
    )
    store = CheckpointStore(directory, dispatch=synchronous_dispatch, clock=Clock(), files=RealFileOps())
    report("save: encode + temp + fsync + rename + fsync dir", measure(lambda: store.save(snapshot), runs))
    assert store.stats().failures == 0, store.stats().last_error
    report("load + validate", measure(store.load, runs))


async def reactor_figures(reactor: Any, snapshot: dict[str, Any], directory: FilePath[str]) -> None:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="checkpoint")
    pool.start()
    try:
        store = CheckpointStore(directory, dispatch=thread_dispatcher(reactor, pool), clock=reactor)

        # A burst: what the reactor thread pays per save, and how many writes it costs.
        before = store.stats().writes
        costs = measure(lambda: store.save(snapshot), 1000)
        await store.flush()
        print(
            f"  burst of 1000 saves: reactor thread {statistics.mean(costs) * 1e6:.1f} µs per save"
            f" (max {max(costs) * 1e6:.0f} µs), {store.stats().writes - before} writes"
        )

        # Continuous checkpointing (a save every 10 ms for 3 s) against the reactor's lag.
        lag = await _lag_during(reactor, 3.0, lambda: store.save(snapshot), 0.01)
        stats = store.stats()
        print(
            f"  saving every 10 ms for 3 s: {stats.writes} writes in all, last write"
            f" {_ms(stats.last_write_seconds or 0)} (encode {_ms(stats.last_encode_seconds or 0)})"
        )
        print(f"    reactor lag of a 1 ms timer: p50 {_ms(lag[0])}, p99 {_ms(lag[1])}, max {_ms(lag[2])}")
        await store.flush()

        # Reference: a thread running the one-shot C encoder holds the GIL for a whole document.
        stop = threading.Event()

        def encode_forever() -> None:
            while not stop.is_set():
                json.dumps(snapshot, separators=(",", ":"))

        worker = threading.Thread(target=encode_forever, daemon=True)
        worker.start()
        lag = await _lag_during(reactor, 2.0, None, 0)
        stop.set()
        worker.join()
        print(
            f"  reference, json.dumps looping in a thread: lag p50 {_ms(lag[0])}, p99 {_ms(lag[1])},"
            f" max {_ms(lag[2])}"
        )
        lag = await _lag_during(reactor, 1.0, None, 0)
        print(f"  reference, idle reactor:                    lag p50 {_ms(lag[0])}, max {_ms(lag[2])}")
    finally:
        pool.stop()


async def _lag_during(
    reactor: Any, duration: float, action: Callable[[], None] | None, every: float
) -> tuple[float, float, float]:
    """Run ``action`` every ``every`` s for ``duration`` s; return p50/p99/max lateness of 1 ms ticks."""
    lags: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lags.append(max(0.0, now - last[0] - 0.001))
        last[0] = now

    ticker = LoopingCall(tick)
    ticker.clock = reactor
    ticker.start(0.001)
    saver = None
    if action is not None:
        saver = LoopingCall(action)
        saver.clock = reactor
        saver.start(every)
    await deferLater(reactor, duration)
    ticker.stop()
    if saver is not None:
        saver.stop()
    lags.sort()
    return lags[len(lags) // 2], lags[int(len(lags) * 0.99)], lags[-1]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dir", default=None, help="state directory (default: a fresh one under /tmp)")
    options = parser.parse_args(argv)

    base = options.dir or tempfile.mkdtemp(prefix="vmcloud-bench-checkpoint-")
    directory = FilePath(os.path.abspath(base))
    directory.makedirs(ignoreExistingDirectory=True)
    started = time.perf_counter()
    snapshot = synthetic_snapshot(options.vms)
    print(
        f"checkpoint of {options.vms:,} VMs, {len(snapshot['handles']):,} handles"
        f" (5 events each) in {directory.path}  [built in {_ms(time.perf_counter() - started)}]"
    )
    print("on the calling thread:")
    offline_figures(snapshot, directory, options.runs)
    print("through the reactor and a dedicated thread pool (production wiring):")

    async def run(reactor: Any) -> None:
        await reactor_figures(reactor, snapshot, directory)

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    finally:
        if options.dir is None:
            shutil.rmtree(directory.path, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
