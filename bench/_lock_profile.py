"""py-spy around the lock benchmark's measured phase, and a short text summary of where time went.

``py-spy record --format raw`` writes one line per distinct stack (``frame;frame;... count``).
Only samples of a thread holding the GIL are kept (``--gil``): py-spy's idle detection does not
recognise ``epoll_wait`` or a thread pool's ``Condition.wait`` here, and the GIL is what the
reactor thread and the checkpoint thread compete for.  Time in system calls that release the GIL
(socket sends, fsync) is therefore not in the counts; ``/proc/*/schedstat`` in the benchmark
covers it.  The summary splits the samples by thread and lists the functions that hold them
(self time) and the vmcloud / Klein / twisted frames that include them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RATE = 500  # samples per second
INCLUSIVE_MARKERS = ("vmcloud/", "klein/", "werkzeug/", "twisted/", "json/")


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def record_profile(pid: int, output: Path, *, enabled: bool) -> Iterator[Path | None]:
    """Sample ``pid`` while the block runs (SIGINT makes py-spy write its file); yields the path."""
    tool = py_spy() if enabled else None
    if enabled and tool is None:
        print("  py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
    if tool is None:
        yield None
        return
    argv = [
        tool,
        "record",
        "-p",
        str(pid),
        "-r",
        str(RATE),
        "-f",
        "raw",
        "-t",
        "--gil",
        "--nolineno",
        "--nonblocking",
        "-o",
        str(output),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield output
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate()
        if not output.exists():
            print(f"  py-spy wrote nothing: {err.decode(errors='replace')[-300:]}", file=sys.stderr)


@dataclass
class ProfileSummary:
    """Busy samples of one recording, by thread, by function (self) and by frame (inclusive)."""

    total: int
    threads: Counter[str]
    self_time: Counter[str]
    inclusive: Counter[str]

    @classmethod
    def load(cls, path: Path) -> ProfileSummary:
        threads: Counter[str] = Counter()
        self_time: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count_text = line.rpartition(" ")
                if not stack or not count_text.isdigit():
                    continue
                count = int(count_text)
                frames = stack.split(";")
                total += count
                threads[frames[0]] += count
                self_time[frames[-1]] += count
                for frame in set(frames[1:]):
                    if any(marker in frame for marker in INCLUSIVE_MARKERS):
                        inclusive[frame] += count
        return cls(total, threads, self_time, inclusive)

    def report(self, top: int = 12) -> str:
        if not self.total:
            return "  profile: no samples holding the GIL (py-spy saw the daemon idle)"
        ms = 1000.0 / RATE
        lines = [
            f"  profile of the daemon during the lock phase: {self.total} samples holding the GIL at "
            f"{RATE} Hz ({self.total * ms / 1000:.2f} s of Python work)"
        ]
        lines.append("  by thread:")
        lines += [f"    {n / self.total:6.1%}  {name}" for name, n in self.threads.most_common(4)]
        lines.append("  self time (the function on top of the stack):")
        lines += [f"    {n / self.total:6.1%}  {name}" for name, n in self.self_time.most_common(top)]
        lines.append("  inclusive time (vmcloud, klein, werkzeug, twisted, json frames):")
        lines += [f"    {n / self.total:6.1%}  {name}" for name, n in self.inclusive.most_common(top * 2)]
        return "\n".join(lines)
