"""Every benchmark README quotes, one after the other, each figure next to its target.

Run from the repository root, on a quiet machine (the figures are CPU-bound and noisy)::

    .venv/bin/python bench/all.py                 # about 15 minutes
    .venv/bin/python bench/all.py --only broker,lock
    .venv/bin/python bench/all.py --smoke         # the quickest settings: checks the runner, not the figures

Each bench runs as README runs it, with fewer repetitions where that only narrows the spread:

* ``broker``: ours, CoilMQ and RabbitMQ (when something listens on 127.0.0.1:61614, as
  ``scripts/rabbitmq-stomp.sh`` sets it up; ``guest:guest``), full sizes, one run of each phase
  instead of the best of two; then ours alone idle with the agent's heart-beats;
* ``lock``: the real daemon, 300 locks;
* ``checkpoint``: 5,000 VMs and 3,000 handles;
* ``scale``: the real daemon, 5,000 VMs on the simulated Nova, a 20 s steady window instead of 60;
* ``browser``: 15 prepare/cleanup rounds instead of 30, capacity up to 8 (root, Chromium);
* ``worker``: ``--daemon``, 20 locks and keys, 20 s of beeps (root, Chromium, PulseAudio).

A bench that cannot run here (not root, no Chromium) is skipped and says why.  Every figure
prints as ``held`` or ``missed`` against its README target, or as ``figure`` next to what README
quotes when README sets no target for it.  The whole output of each bench goes to
``--out`` (default: a fresh directory under /tmp), to read when a figure is missed.  Exits 0
whatever the figures (a bench, not a test); 1 when a bench failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RABBITMQ = ("127.0.0.1", 61614)


@dataclass(frozen=True)
class Row:
    """One line of the summary."""

    bench: str
    text: str
    verdict: str  # held, missed, figure, not measured


def _verdict_lines(bench: str, output: str, pattern: str, held: str, missed: str) -> list[Row]:
    """The bench's own verdict lines (it knows its targets): ``pattern`` finds them."""
    rows = []
    for match in re.finditer(pattern, output, re.MULTILINE):
        line = match.group(0).strip()
        verdict = "held" if held in line else "missed" if missed in line else "not measured"
        rows.append(Row(bench, re.sub(r"^\[(ok|MISS|--)\] ", "", line), verdict))
    return rows


def _number(output: str, pattern: str) -> float | None:
    match = re.search(pattern, output, re.MULTILINE)
    return float(match.group(1).replace(",", "")) if match else None


@dataclass(frozen=True)
class Figure:
    """A figure the bench prints without a verdict: ``pattern``'s first group, in ``unit``."""

    name: str
    pattern: str
    unit: str
    #: at most this (None: README quotes the figure without a target)
    target: float | None = None
    #: what README quotes, for a figure without a target
    readme: str = ""

    def row(self, bench: str, output: str) -> Row:
        value = _number(output, self.pattern)
        if value is None:
            return Row(bench, f"{self.name}: no figure in the output", "not measured")
        shown = f"{self.name}: {value:g} {self.unit}"
        if self.target is None:
            return Row(bench, f"{shown} (README: {self.readme})", "figure")
        verdict = "held" if value <= self.target else "missed"
        return Row(bench, f"{shown} (target <= {self.target:g} {self.unit})", verdict)


@dataclass
class Bench:
    name: str
    #: the runs: argument lists after ``python``, normal and --smoke
    runs: list[list[str]]
    smoke: list[list[str]]
    read: Callable[[str], list[Row]]
    #: why it cannot run here, or None
    unable: Callable[[], str | None] = lambda: None
    timeout: float = 600.0
    rows: list[Row] = field(default_factory=list)


def _broker_runs(smoke: bool) -> list[list[str]]:
    if smoke:
        return [["bench/broker.py", "--start-ours", "--start-coilmq", "--quick"]]
    brokers = ["--start-ours", "--start-coilmq"]
    if _listening(*RABBITMQ):
        brokers += ["--target", f"rabbitmq=guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}"]
    return [
        ["bench/broker.py", *brokers, "--repeat", "1"],
        ["bench/broker.py", "--start-ours", "--phases", "idle", "--idle-heart-beat", "10000,10000"],
    ]


def _read_broker(output: str) -> list[Row]:
    rows = _verdict_lines("broker", output, r"^  \[(ok|MISS|--)\] .*$", "[ok]", "[MISS]")
    # a run of some phases only (the idle one with heart-beats) lists the others' targets as None
    rows = [
        r for r in rows if not (r.verdict == "not measured" and re.search(r": (\S+ )?None( ms)?$", r.text))
    ]
    if any("fan-in" in row.text for row in rows) and not any("rabbitmq" in row.text for row in rows):
        why = "nothing listens on 127.0.0.1:61614 (scripts/rabbitmq-stomp.sh sets it up)"
        rows.append(Row("broker", f"fan-in >= 2x RabbitMQ: {why}", "not measured"))
    return rows


def _read_lock(output: str) -> list[Row]:
    return _verdict_lines("lock", output, r"^  target: .*$", "HOLDS", "MISSED")


CHECKPOINT = [
    Figure(
        "snapshot() after 1 changed VM, median",
        r"after 1 changed VM\s+median\s+([\d.]+) ms",
        "ms",
        None,
        "0.7-1.0 ms",
    ),
    Figure(
        "snapshot() after 100 changed VMs, median",
        r"after 100 changed VMs\s+median\s+([\d.]+) ms",
        "ms",
        None,
        "1.6-2.2 ms",
    ),
    Figure(
        "snapshot(), cold cache, median",
        r"cold cache \(every record\)\s+median\s+([\d.]+) ms",
        "ms",
        None,
        "100-125 ms",
    ),
    Figure(
        "save: encode + atomic write, median",
        r"save: encode \+ temp.*?median\s+([\d.]+) ms",
        "ms",
        None,
        "7-18 ms",
    ),
    Figure(
        "reactor lag p99, a VM changed and saved every 10 ms",
        r"every 10 ms.*\n.*p99 ([\d.]+) ms",
        "ms",
        None,
        "3-12 ms",
    ),
    Figure(
        "writer's cache per VM",
        r"snapshot cache: [\d,]+ bytes \(([\d,]+) bytes per VM",
        "bytes",
        None,
        "1.3 KB",
    ),
]


def _read_checkpoint(output: str) -> list[Row]:
    return [figure.row("checkpoint", output) for figure in CHECKPOINT]


def _read_scale(output: str) -> list[Row]:
    figures = output.partition("=== figures at")[2]
    return _verdict_lines("scale", figures, r"^\s+(?!\().*(HOLDS|MISSED).*$", "HOLDS", "MISSED")


BROWSER = [
    Figure("FREE->READY p50", r"FREE->READY over .*?p50 (\d+) ms", "ms", None, "52-70 ms (load 0.8-2.2)"),
    Figure(
        "PREPARE right after CLEANUP p50",
        r"PREPARE right after CLEANUP .*?p50 (\d+) ms",
        "ms",
        None,
        "218-237 ms (load 0.8-2.2)",
    ),
    Figure("CLEANUP p50", r"CLEANUP: p50 (\d+) ms", "ms", None, "58-69 ms (load 0.8-2.2)"),
    Figure("PSS per idle VM", r"PSS per idle VM .*?mean (\d+) MiB", "MiB", None, "234 MiB (231-238)"),
    Figure("stack start", r"stack start .*?: ([\d.]+) s", "s", None, "1.2-1.5 s"),
]


def _read_browser(output: str) -> list[Row]:
    rows = [figure.row("browser", output) for figure in BROWSER]
    capacity = re.search(r"^capacity: .*$", output, re.MULTILINE)
    if capacity:
        rows.append(Row("browser", capacity.group(0) + " (README: not reached at 16)", "figure"))
    return rows


WORKER = [
    Figure(
        "lock -> first frame on the worker page p50",
        r"first frame \(from the lock call\)\s+p50\s+([\d.]+)",
        "ms",
        700,
    ),
    Figure(
        "key -> screen change p50",
        r"keydown on the page -> the canvas shows the change\s+p50\s+([\d.]+)",
        "ms",
        50,
    ),
    Figure(
        "sound: VM speaker -> the page's worklet p50",
        r"VM speaker -> the page's worklet plays it\s+p50\s+([\d.]+)",
        "ms",
        150,
    ),
    Figure("Opus bandwidth per listener", r"Opus WebSocket listener: ([\d.]+) kbit/s", "kbit/s", 160),
    Figure(
        "sound: VM speaker -> the .ogg stream p50",
        r"VM speaker -> \.ogg listener \(ffmpeg decode\)\s+p50\s+([\d.]+)",
        "ms",
        None,
        "37-52 ms",
    ),
]


def _read_worker(output: str) -> list[Row]:
    return [figure.row("worker", output) for figure in WORKER]


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _needs_root_and_chromium() -> str | None:
    if os.geteuid() != 0:
        return "needs root (browser VMs in namespaces, a uid per browser)"
    if not Path("/usr/lib/chromium/chromium").exists():
        return "needs Chromium (/usr/lib/chromium/chromium)"
    return None


def benches(smoke: bool) -> list[Bench]:
    return [
        Bench("broker", _broker_runs(False), _broker_runs(True), _read_broker, timeout=900),
        Bench("lock", [["bench/lock.py"]], [["bench/lock.py", "--quick"]], _read_lock),
        Bench(
            "checkpoint",
            [["bench/checkpoint.py"]],
            [["bench/checkpoint.py", "--vms", "500", "--handles", "300", "--runs", "3"]],
            _read_checkpoint,
        ),
        Bench(
            "scale",
            [["bench/scale.py", "--steady-seconds", "20"]],
            [["bench/scale.py", "--quick"]],
            _read_scale,
            timeout=1200,
        ),
        Bench(
            "browser",
            [["bench/browser.py", "--rounds", "15", "--capacity", "8"]],
            [["bench/browser.py", "--rounds", "2", "--vms", "1", "--capacity", "1"]],
            _read_browser,
            _needs_root_and_chromium,
        ),
        Bench(
            "worker",
            [["bench/worker.py", "--daemon", "--sound-seconds", "20"]],
            [
                [
                    "bench/worker.py",
                    "--daemon",
                    "--runs",
                    "3",
                    "--parts",
                    "frames,keys,sound",
                    "--sound-seconds",
                    "5",
                ]
            ],
            _read_worker,
            _needs_root_and_chromium,
        ),
    ]


def run(bench: Bench, smoke: bool, out: Path) -> bool:
    """Run ``bench``; its rows go to ``bench.rows``; False when it failed to run."""
    why = bench.unable()
    if why is not None:
        bench.rows = [Row(bench.name, f"skipped: {why}", "not measured")]
        print(f"== {bench.name}: skipped, {why}", flush=True)
        return True
    output = ""
    ok = True
    for i, args in enumerate(bench.smoke if smoke else bench.runs):
        log = out / f"{bench.name}-{i + 1}.txt"
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"== {bench.name}: {' '.join(args)} (load {load}; output in {log})", flush=True)
        began = time.monotonic()
        try:
            done = subprocess.run(
                [PYTHON, *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=bench.timeout,
                check=False,
            )
            text, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as e:
            text, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
        log.write_text(text)
        print(f"   {time.monotonic() - began:.0f} s, exit {code}", flush=True)
        if code != 0:
            ok = False
            tail = "\n".join(text.splitlines()[-5:])
            print(f"   failed; the last lines:\n{tail}", flush=True)
        output += text
    bench.rows = bench.read(output)
    if not ok:
        bench.rows.append(
            Row(bench.name, "the bench failed to run to its end (see its output)", "not measured")
        )
    return ok


def summary(all_rows: Sequence[Row]) -> None:
    print("\n=== README figures ===")
    width = max(len(r.bench) for r in all_rows)
    for r in all_rows:
        print(f"{r.bench:<{width}}  {r.verdict:<12}  {r.text}")
    counts = {v: sum(r.verdict == v for r in all_rows) for v in ("held", "missed", "figure", "not measured")}
    print("\n" + ", ".join(f"{n} {v}" for v, n in counts.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [b.name for b in benches(False)]
    parser.add_argument("--only", help=f"comma list of {','.join(names)}")
    parser.add_argument("--smoke", action="store_true", help="the quickest settings: checks the runner only")
    parser.add_argument("--out", help="directory for each bench's output (default: a fresh one under /tmp)")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else names
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown bench: {', '.join(sorted(unknown))}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vmcloud-bench-all-"))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"bench/all.py {'--smoke ' if args.smoke else ''}{time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}, output in {out}",
        flush=True,
    )
    began = time.monotonic()
    ok = True
    rows: list[Row] = []
    for bench in benches(args.smoke):
        if bench.name in chosen:
            ok = run(bench, args.smoke, out) and ok
            rows += bench.rows
    summary(rows)
    print(f"total {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
