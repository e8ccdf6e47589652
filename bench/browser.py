"""Benchmark of the browser VM's stack (issue #9): prepare and cleanup times, memory, capacity.

Prints figures, asserts nothing.  Run from the repository root (as root: each Chromium then runs
as a uid of its own with its sandbox on, as in a VM)::

    .venv/bin/python bench/browser.py [--rounds 30] [--idle 1] [--vms 3] [--capacity 12]

Drives :class:`guest_agent.chromium.ChromiumBrowser` directly, several at once on the host's
loopback (one display, VNC port and profile each), with a home page served locally:

* FREE→READY: ``prepare`` (two cookies into the spare window's fresh context, home page loaded)
  p50/p99 over ``--rounds``, each after ``--idle`` seconds FREE and followed by a ``cleanup``
  (contexts disposed, proven clean): CLEANUP p50.  Then the same with PREPARE sent the moment
  CLEANUP answered (it waits for the spare window being opened);
* PSS per idle VM: ``--vms`` stacks started and idle, the PSS (``/proc/PID/smaps_rollup``) of
  every process of each stack (Xvnc, PulseAudio, Chromium and all its children) summed, per VM;
  summed RSS would count Chromium's shared pages many times;
* capacity: stacks started one by one, each prepared (READY) and kept, until a prepare passes
  1 s (or ``--capacity`` stacks).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import psutil
from twisted.internet import defer, task
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from guest_agent.chromium import ChromiumBrowser
from guest_agent.stack import PER_VM_UID_BASE, BrowserStack, claim_run_dir, find_stack

HOME_PAGE = b"<html><head><title>Bench home</title></head><body style='background:#0f0'>home</body></html>"
COOKIES = [{"name": "task", "value": "t-7"}, {"name": "worker", "value": "w-42"}]


def pss_of(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def stack_pids(browser: ChromiumBrowser) -> set[int]:
    pids: set[int] = set()
    assert isinstance(browser.stack, BrowserStack)
    for pid in browser.stack.pids():
        pids.add(pid)
        with contextlib.suppress(psutil.Error):
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    user = browser.stack.user
    if user is not None:  # and Chromium's crash handlers, which leave its tree (double fork)
        pids.update(
            p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == user[0]
        )
    return pids


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(reactor: Any, options: argparse.Namespace) -> None:
    programs, missing = find_stack()
    if programs is None:
        raise SystemExit(f"no browser stack: {', '.join(missing)}")
    root = Resource()
    root.putChild(b"", Data(HOME_PAGE, "text/html"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    home = f"http://127.0.0.1:{port.getHost().port}/"
    # run directories and per-VM uids as the agent has them (uids of slots no live agent uses)
    base = os.path.join(tempfile.mkdtemp(prefix="vmcloud-bench-"), "runs")
    os.chmod(os.path.dirname(base), 0o711)
    browsers: list[ChromiumBrowser] = []

    async def start() -> ChromiumBrowser:
        run_dir = claim_run_dir(base)
        uid = PER_VM_UID_BASE + 3000 + run_dir.slot
        user = (uid, uid) if os.geteuid() == 0 else None
        stack = BrowserStack(
            reactor, programs, vnc_host="127.0.0.1", vnc_port=free_port(), user=user, run_dir=run_dir
        )
        browser = ChromiumBrowser(reactor, stack)
        browser.startService()
        await browser.started
        browsers.append(browser)
        return browser

    async def prepare(browser: ChromiumBrowser) -> float:
        began = time.perf_counter()
        await browser.prepare(home, COOKIES, (1280, 800), True, vnc_password="bench123")
        return time.perf_counter() - began

    try:
        began = time.perf_counter()
        first = await start()
        print(f"stack start (Xvnc, PulseAudio, Chromium, CDP): {time.perf_counter() - began:.2f} s")
        prepares, cleanups = [], []
        for _ in range(options.rounds):
            await task.deferLater(reactor, options.idle, lambda: None)  # FREE a while: the spare is made
            prepares.append(await prepare(first))
            await task.deferLater(reactor, 0.2, lambda: None)
            began = time.perf_counter()
            await first.cleanup()
            cleanups.append(time.perf_counter() - began)
        print(
            f"FREE->READY over {options.rounds} rounds ({options.idle:g} s FREE before each):"
            f" p50 {statistics.median(prepares) * 1000:.0f} ms, p99 {pct(prepares, 99) * 1000:.0f} ms"
        )
        p50, p99 = statistics.median(cleanups) * 1000, pct(cleanups, 99) * 1000
        print(f"CLEANUP: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
        at_once = []
        for _ in range(options.rounds):
            at_once.append(await prepare(first))
            await task.deferLater(reactor, 0.2, lambda: None)
            await first.cleanup()  # and PREPARE at once: it waits for the spare being made
        print(
            f"PREPARE right after CLEANUP over {options.rounds} rounds:"
            f" p50 {statistics.median(at_once) * 1000:.0f} ms, p99 {pct(at_once, 99) * 1000:.0f} ms"
        )

        while len(browsers) < options.vms:
            await start()
        await task.deferLater(reactor, 3.0, lambda: None)  # idle: start-up work done
        per_vm = [pss_of(stack_pids(b)) for b in browsers]
        ours = set().union(*(stack_pids(b) for b in browsers))
        others = [
            p.pid
            for p in psutil.process_iter(["exe"])
            if p.info["exe"] and "chromium" in p.info["exe"] and p.pid not in ours
        ]
        if others:  # they map the same binary and libraries: every PSS share gets smaller
            print(f"  (caution: {len(others)} other Chromium processes on this host lower the PSS figure)")
        print(
            f"PSS per idle VM ({len(browsers)} VMs, smaps_rollup):"
            f" mean {statistics.mean(per_vm) / 2**20:.0f} MiB,"
            f" range {min(per_vm) / 2**20:.0f}-{max(per_vm) / 2**20:.0f} MiB"
        )

        held = 0
        for browser in browsers:
            await prepare(browser)
            held += 1
        while len(browsers) < options.capacity:
            browser = await start()
            took = await prepare(browser)
            held += 1
            print(f"  prepared VM {held}: {took * 1000:.0f} ms")
            if took > 1.0:
                print(f"capacity: prepare passed 1 s at VM {held}; {held - 1} prepared VMs held before that")
                break
        else:
            print(f"capacity: {held} prepared VMs held, every prepare under 1 s (stopped at --capacity)")
    finally:
        for browser in browsers:
            await browser.stopService()
        await port.stopListening()
        shutil.rmtree(os.path.dirname(base), ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds a VM stays FREE before its PREPARE")
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=12)
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
