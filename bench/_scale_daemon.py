"""``twistd vmcloud`` with the scale bench's probes: bench code only, the product is untouched.

Run by ``bench/scale.py`` (not by hand)::

    .venv/bin/python bench/_scale_daemon.py PROBE_DIR -n --logfile ... vmcloud --config ...

Everything after ``PROBE_DIR`` is handed to twistd's own ``run()``, so the daemon is the real
``twistd vmcloud`` plugin, configuration and composition root.  Before that, a few methods of the
pool and the store are wrapped (timing only, each wrapper calls the original):

* ``Reconciler.run_pass`` and ``Reconciler.tick``: wall time and the reactor thread's CPU time
  (``time.thread_time``) per call;
* ``PoolState.observe_servers``: taking in one server listing (it runs outside the pass);
* ``Reconciler.checkpoint``: the reactor thread's part of a checkpoint (building the snapshot,
  handing it to the store);
* ``CheckpointStore._write``: the store thread's part (encode, write, fsync, rename), with the
  size;
* ``PoolService.all_status``: what the bench's own polling costs the reactor;

Python's cyclic garbage collections are timed by generation (``gc.callbacks``), and a 10 ms timer
measures the reactor's lag (how late it fires): ``lag_gc`` when a generation 1 or 2 collection
ran since the previous sample, else ``lag_busy`` when one of the timed reactor calls above took
more than 10 ms, else ``lag_ckpt`` when a checkpoint write was in flight on the store's thread,
else ``lag``.

The bench names the current phase in ``PROBE_DIR/phase``; once a second the probe reads it and
writes ``PROBE_DIR/probe.json``: per phase and per probe, count, sums, maximum and (for phases
that ended) percentiles.  With ``VMCLOUD_BENCH_CPROFILE=phase,phase`` the reactor thread is
profiled with cProfile during those phases (``PROBE_DIR/cprofile-<phase>.pstats``); with
``VMCLOUD_BENCH_TRACEMALLOC=phase,phase`` allocations are traced from the start and a snapshot is
written when each of those phases ends (``PROBE_DIR/tracemalloc-<phase>.snap``).  An experiment:
``VMCLOUD_BENCH_SWITCH_INTERVAL=<seconds>`` sets ``sys.setswitchinterval`` (CPython's default is
0.005) to see how much of the reactor's waiting is the GIL being handed over.  With
``VMCLOUD_BENCH_MEMORY=phase,phase`` a census of live objects by type and the allocators' totals
(glibc ``malloc_stats``, ``sys._debugmallocstats``) is written when those phases end
(``PROBE_DIR/memory-<phase>.json``).
"""

from __future__ import annotations

import cProfile
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

PROFILE_ENV = "VMCLOUD_BENCH_CPROFILE"
TRACEMALLOC_ENV = "VMCLOUD_BENCH_TRACEMALLOC"
SWITCH_ENV = "VMCLOUD_BENCH_SWITCH_INTERVAL"
GEN2_ENV = "VMCLOUD_BENCH_GEN2"
MEMORY_ENV = "VMCLOUD_BENCH_MEMORY"
LAG_INTERVAL = 0.01
LONG_CALL = 0.01
REACTOR_CALLS = frozenset({"pass", "tick", "observe", "snapshot", "all_status"})
MAX_SAMPLES = 50_000


class Tally:
    """Count, sums and maximum of one probe in one phase, plus bounded samples for percentiles."""

    def __init__(self) -> None:
        self.count = 0
        self.cpu = 0.0
        self.wall = 0.0
        self.max_wall = 0.0
        self.max_cpu = 0.0
        self.size = 0
        self.walls: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.cpus: deque[float] = deque(maxlen=MAX_SAMPLES)

    def add(self, cpu: float, wall: float, size: int = 0) -> None:
        self.count += 1
        self.cpu += cpu
        self.wall += wall
        self.max_wall = max(self.max_wall, wall)
        self.max_cpu = max(self.max_cpu, cpu)
        self.size = size or self.size
        self.walls.append(wall)
        self.cpus.append(cpu)

    def as_json(self, percentiles: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "count": self.count,
            "cpu_ms": round(self.cpu * 1000, 3),
            "wall_ms": round(self.wall * 1000, 3),
            "max_wall_ms": round(self.max_wall * 1000, 3),
            "max_cpu_ms": round(self.max_cpu * 1000, 3),
            "last_size": self.size,
        }
        if percentiles and self.walls:
            for name, samples in (("wall", sorted(self.walls)), ("cpu", sorted(self.cpus))):
                for p in (50, 90, 99):
                    index = min(len(samples) - 1, len(samples) * p // 100)
                    data[f"p{p}_{name}_ms"] = round(samples[index] * 1000, 3)
        return data


class Probe:
    """Per-phase tallies, the lag timer, the phase file and the output file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.phase = "start"
        # reentrant: a garbage collection may start inside add() (it allocates), and the
        # collection's callback adds its own timing: a plain Lock deadlocked the daemon once
        self.lock = threading.RLock()
        self.current: dict[str, Tally] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.writing = 0  # checkpoint writes in flight on the store thread
        self.writes_seen = 0  # writes started or ended (so a write between two lag samples counts)
        self.full_collections = 0  # gc generation 1 and 2 collections ended
        self.long_calls = 0  # timed reactor calls (pass, tick, listing, all-status) longer than 10 ms
        self._lag_marks = (0, 0, 0)
        self.store: Any = None
        self.profile_phases = {p for p in os.environ.get(PROFILE_ENV, "").split(",") if p}
        self.profiler: cProfile.Profile | None = None
        self.memory_phases = {p for p in os.environ.get(TRACEMALLOC_ENV, "").split(",") if p}
        if self.memory_phases:
            tracemalloc.start(8)
        self.census_phases = {p for p in os.environ.get(MEMORY_ENV, "").split(",") if p}
        self.clock: Any = None
        self._next_lag = 0.0
        self._started = False

    def add(self, name: str, cpu: float, wall: float, size: int = 0) -> None:
        with self.lock:
            tally = self.current.get(name)
            if tally is None:
                tally = self.current[name] = Tally()
            tally.add(cpu, wall, size)
            if wall > LONG_CALL and name in REACTOR_CALLS:
                self.long_calls += 1

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - cpu, time.perf_counter() - wall)

        wrapper.__name__ = fn.__name__
        wrapper.__qualname__ = fn.__qualname__
        return wrapper

    # ------------------------------------------------------------------ on the reactor

    def start(self, clock: Any) -> None:
        if self._started:
            return
        self._started = True
        self.clock = clock
        self._switch(self._read_phase())
        self._next_lag = time.perf_counter() + LAG_INTERVAL
        clock.callLater(LAG_INTERVAL, self._lag)
        clock.callLater(1.0, self._second)
        from twisted.internet import reactor

        reactor.addSystemEventTrigger("before", "shutdown", self._final)  # type: ignore[attr-defined]

    def _lag(self) -> None:
        now = time.perf_counter()
        lag = max(0.0, now - self._next_lag)
        marks = (self.writes_seen, self.full_collections, self.long_calls)
        if marks[1] != self._lag_marks[1]:
            self.add("lag_gc", 0.0, lag)  # a gen 1/2 garbage collection ran since the last sample
        elif marks[2] != self._lag_marks[2]:
            self.add("lag_busy", 0.0, lag)  # the reactor itself ran a long pass, listing, all-status
        elif self.writing or marks[0] != self._lag_marks[0]:
            self.add("lag_ckpt", 0.0, lag)
        else:
            self.add("lag", 0.0, lag)
        self._lag_marks = marks
        self._next_lag = now + LAG_INTERVAL
        self.clock.callLater(LAG_INTERVAL, self._lag)

    def _read_phase(self) -> str:
        try:
            with open(os.path.join(self.directory, "phase")) as f:
                return f.read().strip() or self.phase
        except OSError:
            return self.phase

    def _second(self) -> None:
        try:
            phase = self._read_phase()
            if phase != self.phase:
                self._switch(phase)
            self._dump()
        finally:
            self.clock.callLater(1.0, self._second)

    def _switch(self, phase: str) -> None:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(os.path.join(self.directory, f"cprofile-{self.phase}.pstats"))
            self.profiler = None
        if self.phase in self.memory_phases:
            tracemalloc.take_snapshot().dump(os.path.join(self.directory, f"tracemalloc-{self.phase}.snap"))
        if self.phase in self.census_phases:
            started = time.perf_counter()
            census = memory_census(self.directory)
            census["seconds"] = time.perf_counter() - started
            with open(os.path.join(self.directory, f"memory-{self.phase}.json"), "w") as f:
                json.dump(census, f)
        with self.lock:
            self.done[self.phase] = self._summary(percentiles=True)
            self.phase = phase
            self.current = {}
        if phase in self.profile_phases:
            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def _summary(self, percentiles: bool) -> dict[str, Any]:
        data: dict[str, Any] = {name: t.as_json(percentiles) for name, t in self.current.items()}
        if self.store is not None:
            stats = self.store.stats()
            data["store"] = {
                "saves": stats.saves,
                "writes": stats.writes,
                "failures": stats.failures,
                "coalesced": stats.coalesced,
                "last_size": stats.last_size,
                "last_write_ms": None
                if stats.last_write_seconds is None
                else stats.last_write_seconds * 1000,
            }
        data["thread_cpu_s"] = time.thread_time()
        data["process_cpu_s"] = time.process_time()
        data["time"] = time.monotonic()
        return data

    def _dump(self) -> None:
        with self.lock:
            current = self._summary(percentiles=False)
            document = {"phase": self.phase, "current": current, "done": dict(self.done)}
        path = os.path.join(self.directory, "probe.json")
        with open(path + ".tmp", "w") as f:
            json.dump(document, f)
        os.replace(path + ".tmp", path)

    def _final(self) -> None:
        self._switch("stopped")
        self._dump()


def _allocator_stats(directory: str) -> str:
    """What glibc's ``malloc_stats()`` and CPython's ``sys._debugmallocstats()`` print on stderr."""
    import ctypes

    path = os.path.join(directory, "allocator.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
        ctypes.CDLL("libc.so.6").malloc_stats()
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    with open(path) as f:
        return f.read()


def _number_after(text: str, label: str, start: int = 0) -> int:
    at = text.find(label, start)
    if at == -1:
        return -1
    line = text[at + len(label) :].split("\n", 1)[0]
    return int(line.replace("=", "").replace(",", "").strip() or -1)


def memory_census(directory: str) -> dict[str, Any]:
    """Live Python objects by type (gc-tracked ones and what they hold), allocator totals, RSS.

    Blocks the reactor for a few seconds at a phase boundary; only with ``VMCLOUD_BENCH_MEMORY``.
    """
    import gc

    # the daemon freezes long-lived objects (vmcloud.memory.FreezeSurvivors): gc.get_objects()
    # does not list frozen ones, so thaw them for the census and freeze them again after
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    unreachable = gc.collect()
    counts: dict[str, list[int]] = {}
    seen: set[int] = set()

    def add(obj: object) -> None:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        entry = counts.get(name)
        if entry is None:
            entry = counts[name] = [0, 0]
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)

    tracked = gc.get_objects()
    for obj in tracked:
        seen.add(id(obj))
        add(obj)
    for obj in tracked:
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not gc.is_tracked(ref):
                seen.add(id(ref))
                add(ref)
    del tracked
    if frozen:
        gc.freeze()
    text = _allocator_stats(directory)
    total_at = text.find("Total (incl. mmap):")
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {
        "types": counts,
        "frozen": frozen,
        "unreachable": unreachable,
        "rss": rss,
        "malloc_system": _number_after(text, "system bytes", total_at),
        "malloc_in_use": _number_after(text, "in use bytes", total_at),
        "pymalloc_arenas": _number_after(text, "# arenas allocated current"),
        "pymalloc_allocated": _number_after(text, "# bytes in allocated blocks"),
        "pymalloc_available": _number_after(text, "# bytes in available blocks"),
        "pymalloc_total": _number_after(text, "Total ", text.find("# arenas allocated current")),
    }


SLOW_PASS = 0.010


def _explain_slow_passes(probe: Probe, run_pass: Callable[..., Any]) -> Callable[..., Any]:
    """A pass over SLOW_PASS of CPU leaves a line in ``slow-passes.txt``: its actions, its collections."""
    import gc

    from vmcloud.pool import reconciler

    planned: list[Any] = []
    original_plan = reconciler.plan

    def plan(*args: Any) -> Any:
        actions = original_plan(*args)
        planned.append(actions)
        return actions

    reconciler.plan = plan  # type: ignore[assignment]
    collections: list[int] = [0, 0, 0]

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            collections[info["generation"]] += 1

    gc.callbacks.append(count)

    def wrapper(self: Any) -> Any:
        planned.clear()
        before = list(collections)
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return run_pass(self)
        finally:
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if cpu > SLOW_PASS:
                kinds = Counter(type(a).__name__ for actions in planned for a in actions)
                gcs = [a - b for a, b in zip(collections, before, strict=True)]
                with open(os.path.join(probe.directory, "slow-passes.txt"), "a") as f:
                    f.write(
                        f"{probe.phase} cpu {cpu * 1000:.1f} ms wall {wall * 1000:.1f} ms"
                        f" actions {dict(kinds)} collections gen0/1/2 {gcs}"
                        f" words queued {len(self._words)}\n"
                    )

    return wrapper


def install(probe: Probe) -> None:
    """Wrap the methods the probe times; nothing else of the daemon changes."""
    from vmcloud.pool.reconciler import Reconciler
    from vmcloud.pool.service import PoolService
    from vmcloud.pool.state import PoolState
    from vmcloud.store.checkpoint import CheckpointStore

    Reconciler.run_pass = probe.timed("pass", _explain_slow_passes(probe, Reconciler.run_pass))  # type: ignore[method-assign]
    Reconciler.tick = probe.timed("tick", Reconciler.tick)  # type: ignore[method-assign]
    Reconciler.checkpoint = probe.timed("snapshot", Reconciler.checkpoint)  # type: ignore[method-assign]
    PoolState.observe_servers = probe.timed("observe", PoolState.observe_servers)  # type: ignore[method-assign]
    PoolService.all_status = probe.timed("all_status", PoolService.all_status)  # type: ignore[method-assign]

    original_start = Reconciler.start

    def start(self: Reconciler) -> None:
        probe.store = self.store
        probe.start(self.clock)
        original_start(self)

    Reconciler.start = start  # type: ignore[method-assign]

    import gc

    collecting: list[tuple[float, float]] = []

    census_of_old = int(os.environ.get(GEN2_ENV, "0") or 0)

    def collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal census_of_old
        if phase == "start":
            if census_of_old and info["generation"] == 2 and probe.phase == "steady":
                # what a full collection is about to walk: the oldest generation, by type
                census_of_old -= 1
                kinds = Counter(type(o).__qualname__ for o in gc.get_objects(2))
                with open(os.path.join(probe.directory, "gen2.txt"), "a") as f:
                    f.write(f"{sum(kinds.values())} objects: {kinds.most_common(25)}\n")
            collecting.append((time.thread_time(), time.perf_counter()))
        elif collecting:
            cpu, wall = collecting.pop()
            probe.add(f"gc{info['generation']}", time.thread_time() - cpu, time.perf_counter() - wall)
            if info["generation"] > 0:
                probe.full_collections += 1

    gc.callbacks.append(collection)

    original_write = CheckpointStore._write

    def write(self: CheckpointStore, snapshot: Any, written: float) -> Any:
        probe.writing += 1
        probe.writes_seen += 1
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            result = original_write(self, snapshot, written)
        finally:
            probe.writing -= 1
            probe.writes_seen += 1
        probe.add("ckpt_write", time.thread_time() - cpu, time.perf_counter() - wall, result.size)
        probe.add("ckpt_encode", 0.0, result.encode_seconds)
        return result

    CheckpointStore._write = write  # type: ignore[method-assign]


def main() -> None:
    directory = sys.argv[1]
    probe = Probe(directory)
    install(probe)
    if os.environ.get(SWITCH_ENV):
        sys.setswitchinterval(float(os.environ[SWITCH_ENV]))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
