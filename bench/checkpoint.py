"""Benchmark of the pool's checkpoint at the scale target (issue #4): 5,000 VMs.

Prints figures, asserts nothing.  Run from the repository root::

    .venv/bin/python bench/checkpoint.py [--vms 5000] [--handles 3000] [--dir /path/on/the/real/disk]

Builds a real pool state (``PoolState`` with fully described VM records, batches, and handles
holding a lent VM and five events each) and measures, through the pool's own ``SnapshotWriter``
and the ``CheckpointStore``:

* the size of ``checkpoint.json`` and the time to encode it, write it atomically (temp, fsync,
  rename, fsync of the directory) and load it back;
* the pool side, on the reactor thread: the memory the writer's per-record cache keeps, and what
  ``snapshot()`` costs with a cold cache, with nothing changed, and after 1 or 100 VMs or one
  handle changed;
* the reactor thread's cost per ``save()`` (scheduling only) and how a burst of saves coalesces;
* the reactor's lag (how late a 1 ms timer fires) while, every 10 ms, a VM changes and the pool
  snapshots and saves, against the lag while a thread runs json's one-shot C encoder on the same
  state, which holds the GIL for the whole document.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater, react
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from vmcloud.pool.interfaces import BatchOptions, Cookie
from vmcloud.pool.model import VM, PoolSpec, VMState
from vmcloud.pool.snapshot import SnapshotWriter
from vmcloud.pool.state import PoolState
from vmcloud.store.checkpoint import (
    CheckpointStore,
    RealFileOps,
    decode_checkpoint,
    encode_checkpoint,
)
from vmcloud.threads import synchronous_dispatch, thread_dispatcher

NOW = 1_760_000_000.0


def synthetic_pool(vms: int, handles: int) -> PoolState:
    """``vms`` VMs with every field set; ``handles`` of them lent, each handle with five events."""
    state = PoolState("bench", PoolSpec(vms, vms, 60_000))
    options = BatchOptions(cookies=(Cookie("session", "c2Vzc2lvbi12YWx1ZQ", domain="example.org"),))
    homepages = [f"https://example.org/app/{b}" for b in range(max(1, vms // 100))]
    batches = [state.add_batch(100, homepage, options, NOW).id for homepage in homepages]
    for i in range(vms):
        vmid = state.vmid_for(state.next_vmid)
        state.next_vmid += 1
        mac = f"fa:16:3e:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        lent = i < handles
        state.put(
            VM(
                vmid=vmid,
                state=VMState.READY if lent or i % 2 else VMState.FREE,
                created_at=NOW - 3600,
                version=7,
                since=NOW - i % 600,
                server_id=f"5f0c7a8e-1b2d-4c3e-9f40-{i:012d}",
                booted_at=NOW - 3500,
                login=f"vm-{vmid}",
                passcode="c2VjcmV0LXBhc3Njb2RlLTEyMzQ1Ng",
                identity=f"vm-{vmid}",
                mac=mac,
                ip=ip,
                macs=(mac,),
                ips=(ip,),
                batch=batches[i % len(batches)] if lent or i % 2 else None,
                last_used=NOW - 60,
                vnc_password="a1b2c3d4",
                capabilities=("browser", "vnc", "audio"),
            )
        )
        if lent:
            token = f"h{i:06d}-Zm9vYmFyYmF6cXV4cXV1eHF1dXg"
            state.add_handle(batches[i % len(batches)], token, NOW - 120)
            state.assign(token, vmid, NOW - 120)  # the first event: vm-assigned
            for n in range(1, 5):
                page = {"action": "page-load", "url": f"https://example.org/task/{i}/step/{n}?q=abc"}
                state.add_event(token, {**page, "title": f"Task {i} — step {n}"}, NOW - 60 + n)
    return state


def change_vms(state: PoolState, vmids: itertools.cycle[str], count: int) -> None:
    """A new record for ``count`` VMs, as a guest's answer or a beacon would make."""
    for _ in range(count):
        vm = state.vms[next(vmids)]
        state.put(attrs.evolve(vm, version=vm.version + 1, since=vm.since + 1))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def report(label: str, times: list[float]) -> None:
    print(
        f"  {label:<50} median {_ms(statistics.median(times)):>9}   max {_ms(max(times)):>9}"
        f"   ({len(times)} runs)"
    )


def cache_figures(state: PoolState) -> tuple[int, int]:
    """What a writer keeps between snapshots (its per-record cache): bytes by tracemalloc, and
    objects the garbage collector tracks (each one walked by every full collection)."""
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        writer = SnapshotWriter()
        writer.snapshot(state)  # the snapshot itself is dropped at once, as the store drops it
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tracked = len(gc.get_objects()) - objects
    del writer
    return kept, tracked


def pool_figures(state: PoolState, runs: int) -> None:
    """The pool's side of a checkpoint: the writer's cache and snapshot() on the reactor thread."""
    vms = len(state.vms)
    kept, tracked = cache_figures(state)
    print(
        f"  snapshot cache: {kept:,} bytes ({kept / vms:,.0f} bytes per VM, handles included),"
        f" {tracked:,} objects tracked by the GC"
    )
    report("snapshot(), cold cache (every record)", measure(lambda: SnapshotWriter().snapshot(state), runs))
    writer = SnapshotWriter()
    writer.snapshot(state)
    vmids = itertools.cycle(list(state.vms))
    report("snapshot(), nothing changed", measure(lambda: writer.snapshot(state), runs))
    report(
        "snapshot() after 1 changed VM",
        measure(lambda: writer.snapshot(state), runs, lambda: change_vms(state, vmids, 1)),
    )
    report(
        "snapshot() after 100 changed VMs",
        measure(lambda: writer.snapshot(state), runs, lambda: change_vms(state, vmids, 100)),
    )
    tokens = itertools.cycle(list(state.handles))
    page = {"action": "page-load", "url": "https://example.org/"}
    report(
        "snapshot() after 1 new event on a handle",
        measure(lambda: writer.snapshot(state), runs, lambda: state.add_event(next(tokens), page, NOW)),
    )
    busy = next(tokens)
    for _ in range(state.events_limit):
        state.add_event(busy, page, NOW)
    writer.snapshot(state)
    report(
        f"... on a handle with a full log ({state.events_limit:,} events)",
        measure(lambda: writer.snapshot(state), runs, lambda: state.add_event(busy, page, NOW)),
    )


def offline_figures(state: PoolState, directory: FilePath[str], runs: int) -> None:
    """Encoding, writing and loading on the calling thread, no reactor involved."""
    from twisted.internet.task import Clock

    snapshot = SnapshotWriter().snapshot(state)
    data = encode_checkpoint(snapshot, 0.0)
    plain = decode_checkpoint(data)[1]  # the same state as plain JSON data, for the reference
    print(f"  checkpoint size: {len(data):,} bytes ({len(data) / len(state.vms):.0f} bytes per VM)")
    report("encode (the store's encoder)", measure(lambda: encode_checkpoint(snapshot, 0.0), runs))
    report(
        "encode (json.dumps in one C call, reference)",
        measure(lambda: json.dumps(plain, separators=(",", ":")), runs),
    )
    store = CheckpointStore(directory, dispatch=synchronous_dispatch, clock=Clock(), files=RealFileOps())
    report("save: encode + temp + fsync + rename + fsync dir", measure(lambda: store.save(snapshot), runs))
    assert store.stats().failures == 0, store.stats().last_error
    report("load + validate", measure(store.load, runs))


async def reactor_figures(reactor: Any, state: PoolState, directory: FilePath[str]) -> None:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="checkpoint")
    pool.start()
    try:
        store = CheckpointStore(directory, dispatch=thread_dispatcher(reactor, pool), clock=reactor)
        writer = SnapshotWriter()
        snapshot = writer.snapshot(state)

        # A burst: what the reactor thread pays per save, and how many writes it costs.
        before = store.stats().writes
        costs = measure(lambda: store.save(snapshot), 1000)
        await store.flush()
        print(
            f"  burst of 1000 saves: reactor thread {statistics.mean(costs) * 1e6:.1f} µs per save"
            f" (max {max(costs) * 1e6:.0f} µs), {store.stats().writes - before} writes"
        )

        # Continuous checkpointing (a VM changes, snapshot and save every 10 ms for 3 s) against
        # the reactor's lag.
        vmids = itertools.cycle(list(state.vms))

        def change_and_save() -> None:
            change_vms(state, vmids, 1)
            store.save(writer.snapshot(state))

        lag = await _lag_during(reactor, 3.0, change_and_save, 0.01)
        stats = store.stats()
        print(
            f"  a VM changes, snapshot + save every 10 ms for 3 s: {stats.writes} writes in all, last"
            f" write {_ms(stats.last_write_seconds or 0)} (encode {_ms(stats.last_encode_seconds or 0)})"
        )
        print(f"    reactor lag of a 1 ms timer: p50 {_ms(lag[0])}, p99 {_ms(lag[1])}, max {_ms(lag[2])}")
        await store.flush()

        # Reference: a thread running the one-shot C encoder holds the GIL for a whole document.
        plain = decode_checkpoint(encode_checkpoint(snapshot, 0.0))[1]
        stop = threading.Event()

        def encode_forever() -> None:
            while not stop.is_set():
                json.dumps(plain, separators=(",", ":"))

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
        print(
            f"  reference, idle reactor:                    lag p50 {_ms(lag[0])}, p99 {_ms(lag[1])},"
            f" max {_ms(lag[2])}"
        )
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
    parser.add_argument("--handles", type=int, default=3000, help="VMs lent, each with a handle")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dir", default=None, help="state directory (default: a fresh one under /tmp)")
    options = parser.parse_args(argv)

    base = options.dir or tempfile.mkdtemp(prefix="vmcloud-bench-checkpoint-")
    directory = FilePath(os.path.abspath(base))
    directory.makedirs(ignoreExistingDirectory=True)
    started = time.perf_counter()
    state = synthetic_pool(options.vms, min(options.handles, options.vms))
    print(
        f"checkpoint of {options.vms:,} VMs, {len(state.handles):,} handles (5 events each),"
        f" {len(state.batches)} batches in {directory.path}  [built in {_ms(time.perf_counter() - started)}]"
    )
    print("the pool's side, on the reactor thread:")
    pool_figures(state, options.runs)
    print("the store, on the calling thread:")
    offline_figures(state, directory, options.runs)
    print("through the reactor and a dedicated thread pool (production wiring):")

    async def run(reactor: Any) -> None:
        await reactor_figures(reactor, state, directory)

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    finally:
        if options.dir is None:
            shutil.rmtree(directory.path, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
