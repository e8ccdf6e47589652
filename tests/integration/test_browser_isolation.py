"""Two local VMs' browsers on one host (issue #9): each Chromium runs as a uid of its own, sandboxed,
and neither can open the other's display, profile or sound.

X sockets (``/tmp/.X11-unix``) and the filesystem are shared by every local VM, even across network
namespaces, so this is what keeps one VM's browser (a page that broke out of its renderer, say)
away from another worker's screen and cookies.  Needs root (per-VM uids) and the Debian packages;
skips without them, except under ``CI`` where a missing stack fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from guest_agent.chromium import ChromiumBrowser
from guest_agent.stack import PER_VM_UID_BASE, BrowserStack, claim_run_dir, find_stack

XDPYINFO = "/usr/bin/xdpyinfo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_uid(uid: int, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


class PerVmUserTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        programs, missing = find_stack()
        why = None
        if programs is None:
            why = "the browser stack is not installed: " + ", ".join(missing)
        elif os.geteuid() != 0:
            why = "per-VM users need root"
        elif not os.path.exists(XDPYINFO):
            why = "xdpyinfo (x11-utils) is not installed"
        if why is not None:
            if os.environ.get("CI"):
                raise RuntimeError(f"CI must run the browser isolation tests: {why}")
            raise SkipTest(why)
        assert programs is not None
        self.programs = programs
        # every directory above a profile must be open to the browsers' uids: not the work tree
        self.base = os.path.join(tempfile.mkdtemp(prefix="vmcloud-test-"), "runs")
        os.chmod(os.path.dirname(self.base), 0o711)
        self.addCleanup(shutil.rmtree, os.path.dirname(self.base), True)

    def start(self) -> tuple[ChromiumBrowser, BrowserStack, int]:
        run_dir = claim_run_dir(self.base)
        # uids of a slot no test agent uses at once (a real agent's slot 0.. would be in use)
        uid = PER_VM_UID_BASE + 4000 + run_dir.slot
        stack = BrowserStack(
            reactor,
            self.programs,
            vnc_host="127.0.0.1",
            vnc_port=free_port(),
            user=(uid, uid),
            run_dir=run_dir,
        )
        browser = ChromiumBrowser(reactor, stack)
        browser.startService()
        self.addCleanup(browser.stopService)
        return browser, stack, uid

    async def _isolated(self) -> None:
        (a, stack_a, uid_a), (b, stack_b, uid_b) = self.start(), self.start()
        await a.started
        await b.started
        assert stack_a.chromium is not None and stack_a.chromium.pid is not None
        browser_pid = stack_a.chromium.pid
        self.assertEqual(uid_of(browser_pid), uid_a)
        self.assertNotEqual(uid_a, uid_b)
        renderers = [
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and _argv(int(pid)).count("--type=renderer") and _is_child(int(pid), browser_pid)
        ]
        self.assertTrue(renderers, "Chromium has renderers")
        for pid in renderers:  # the sandbox is on: each renderer in a user namespace of its own
            self.assertNotEqual(
                os.readlink(f"/proc/{pid}/ns/user"), os.readlink(f"/proc/{browser_pid}/ns/user")
            )

        xauth_a = os.path.join(stack_a.run_dir, "xauthority")
        display_a = f":{stack_a.display}"
        mine = await deferToThread(as_uid, uid_a, [XDPYINFO, "-display", display_a], XAUTHORITY=xauth_a)
        self.assertEqual(mine.returncode, 0, mine.stderr)
        theirs = await deferToThread(
            as_uid,
            uid_b,
            [XDPYINFO, "-display", display_a],
            XAUTHORITY=os.path.join(stack_b.run_dir, "xauthority"),
        )
        self.assertNotEqual(theirs.returncode, 0, "B opened A's display")
        stolen = await deferToThread(as_uid, uid_b, ["cat", xauth_a])
        self.assertNotEqual(stolen.returncode, 0, "B read A's X cookie")
        profile = await deferToThread(as_uid, uid_b, ["ls", os.path.join(stack_a.run_dir, "chromium-1")])
        self.assertNotEqual(profile.returncode, 0, "B listed A's profile")
        socket_a = os.path.join(stack_a.run_dir, "pulse", "native")
        own_sound = await deferToThread(as_uid, uid_a, ["test", "-w", socket_a])
        self.assertEqual(own_sound.returncode, 0, "A's browser cannot reach its own PulseAudio socket")
        pulse = await deferToThread(as_uid, uid_b, ["test", "-w", socket_a])
        self.assertNotEqual(pulse.returncode, 0, "B reached A's PulseAudio socket")

    def test_each_vms_browser_is_a_user_of_its_own(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._isolated())


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\0", " ").split()  # Chromium rewrites it
    except OSError:
        return []


def _is_child(pid: int, ancestor: int) -> bool:
    seen: set[Any] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False
