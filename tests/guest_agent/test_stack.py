"""The stack's pieces that need no browser: run directory claims, the X cookie, argv, leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.stack import (
    BrowserStack,
    StackError,
    StackPrograms,
    claim_run_dir,
    end_processes_of,
    guarded,
    vnc_password_file,
    xauthority,
    xvnc_argv,
)

PROGRAMS = StackPrograms(
    xvnc="/usr/bin/Xvnc",
    chromium="/usr/lib/chromium/chromium",
    vncconfig=None,
    pulseaudio=None,
    setpriv="/usr/bin/setpriv",
)


class RunDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())

    def test_slots_are_exclusive_while_held(self) -> None:
        first = claim_run_dir(self.base)
        second = claim_run_dir(self.base)
        self.addCleanup(first.release)
        self.addCleanup(second.release)
        self.assertEqual((first.slot, second.slot), (0, 1))
        self.assertEqual(first.path, os.path.join(self.base, "0"))
        self.assertTrue(os.path.isdir(second.path))
        self.assertEqual(os.stat(self.base).st_mode & 0o777, 0o711)

    def test_a_released_slots_leftover_is_removed_by_the_next_claim(self) -> None:
        first = claim_run_dir(self.base)
        Path(first.path, "chromium-1").mkdir()
        Path(first.path, "chromium-1", "Cookies").write_text("the last worker's")
        first.release()  # as the kernel does when the agent dies
        again = claim_run_dir(self.base)
        self.addCleanup(again.release)
        self.assertEqual(again.slot, 0)
        self.assertEqual(os.listdir(again.path), [])

    def test_a_sigkilled_agents_slot_is_taken_back_and_cleaned(self) -> None:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from guest_agent.stack import claim_run_dir\n"
                f"d = claim_run_dir({self.base!r})\n"
                "open(d.path + '/left', 'w').close()\n"
                "print(d.slot, flush=True)\n"
                "time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            self.assertEqual(child.stdout.readline().strip(), "0")
            held = claim_run_dir(self.base)  # the child holds slot 0
            self.assertEqual(held.slot, 1)
            held.release()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stdout.close()  # type: ignore[union-attr]
        reclaimed = claim_run_dir(self.base)
        self.addCleanup(reclaimed.release)
        self.assertEqual(reclaimed.slot, 0)
        self.assertFalse(os.path.exists(os.path.join(reclaimed.path, "left")))

    def test_a_base_others_may_write_into_is_refused(self) -> None:
        os.mkdir(self.base, 0o777)
        os.chmod(self.base, 0o777)
        with self.assertRaises(StackError) as caught:
            claim_run_dir(self.base)
        self.assertIn("not ours alone", str(caught.exception))

    def test_a_symlinked_base_is_refused(self) -> None:
        target = os.path.abspath(self.mktemp())
        os.mkdir(target, 0o711)
        os.symlink(target, self.base)
        self.assertRaises(StackError, claim_run_dir, self.base)

    def test_no_free_slot_is_a_clear_error(self) -> None:
        held = claim_run_dir(self.base, slots=1)
        self.addCleanup(held.release)
        with self.assertRaises(StackError) as caught:
            claim_run_dir(self.base, slots=1)
        self.assertIn("all 1 run directory slots", str(caught.exception))


class LeftoverProcessTests(SynchronousTestCase):
    def test_only_processes_of_the_uid_are_killed(self) -> None:
        proc = Path(self.mktemp())
        for pid, uid in ((2**22 + 1, 2000000007), (2**22 + 2, 1000)):
            (proc / str(pid)).mkdir(parents=True)
            (proc / str(pid) / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (proc / "self").mkdir()
        # pids that do not exist: the kill finds nothing, nothing raises, nothing is claimed killed
        self.assertEqual(end_processes_of(2000000007, str(proc)), [])
        self.assertEqual(end_processes_of(1234, str(proc)), [])

    def test_a_real_process_of_the_uid_is_killed(self) -> None:
        if os.geteuid() != 0:
            self.skipTest("needs root to run a process as another uid")
        uid = 2000004095  # the last per-VM uid: no test VM uses it
        child = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "60"]
        )
        try:
            deadline = time.monotonic() + 5
            killed: list[int] = []
            while child.pid not in killed and time.monotonic() < deadline:
                killed = end_processes_of(uid)
                time.sleep(0.05)
            self.assertIn(child.pid, killed)
            self.assertEqual(child.wait(5), -signal.SIGKILL)
        finally:
            child.kill()
            child.wait()


class ArgvTests(SynchronousTestCase):
    def test_the_x_cookie_file_is_libxaus_format_for_any_display(self) -> None:
        cookie = bytes(range(16))
        content = xauthority(cookie)
        self.assertEqual(content[:2], b"\xff\xff")  # FamilyWild
        self.assertEqual(content[2:6], b"\x00\x00\x00\x00")  # no address, no display number
        self.assertEqual(content[6:8], b"\x00\x12")
        self.assertEqual(content[8:26], b"MIT-MAGIC-COOKIE-1")
        self.assertEqual(content[26:], b"\x00\x10" + cookie)

    def test_xvnc_asks_for_the_cookie_and_vnc_auth(self) -> None:
        argv = xvnc_argv(
            PROGRAMS,
            width=1280,
            height=800,
            host="10.0.0.5",
            port=5900,
            password_file="/r/p",
            auth_file="/r/x",
        )
        self.assertEqual(argv[argv.index("-auth") + 1], "/r/x")
        self.assertEqual(argv[argv.index("-SecurityTypes") + 1], "VncAuth")
        self.assertEqual(argv[argv.index("-interface") + 1], "10.0.0.5")

    def test_guarded_runs_as_the_user_and_dies_with_the_agent(self) -> None:
        self.assertEqual(
            guarded(PROGRAMS, ["/bin/true"], (2000000001, 2000000001)),
            [
                "/usr/bin/setpriv",
                "--pdeathsig",
                "KILL",
                "--reuid=2000000001",
                "--regid=2000000001",
                "--clear-groups",
                "--",
                "/bin/true",
            ],
        )
        no_setpriv = StackPrograms("/x", "/c", None, None, None)
        self.assertRaises(StackError, guarded, no_setpriv, ["/bin/true"], (1, 1))
        self.assertEqual(guarded(no_setpriv, ["/bin/true"]), ["/bin/true"])

    def test_the_view_only_password_is_the_files_second_eight_bytes(self) -> None:
        # as ``vncpasswd -f`` writes two passwords; Xvnc reading it: tests/console/test_view_only_live.py
        both = vnc_password_file("secret12", "viewpw34")
        self.assertEqual(both, vnc_password_file("secret12") + vnc_password_file("viewpw34"))

    def test_revoking_keeps_the_view_only_password_and_tells_nobody_the_first(self) -> None:
        stack = BrowserStack(Clock(), PROGRAMS, vnc_host="127.0.0.1")
        stack.run_dir = self.mktemp()
        os.makedirs(stack.run_dir)
        path = Path(stack.run_dir, "vnc-passwd")
        view = stack.view_password
        self.assertEqual(len(view), 8)
        self.assertNotIn("\0", view)
        self.assertNotEqual(view, BrowserStack(Clock(), PROGRAMS, vnc_host="127.0.0.1").view_password)
        stack.set_vnc_password("secret12")
        self.assertEqual(path.read_bytes(), vnc_password_file("secret12", view))
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        stack.set_vnc_password(None)
        revoked = path.read_bytes()
        self.assertEqual(revoked[8:], vnc_password_file(view))
        # the first password is neither the session's nor the empty one (which anyone could use)
        self.assertNotIn(revoked[:8], (vnc_password_file("secret12"), vnc_password_file("")))
        stack.set_vnc_password(None)
        self.assertNotEqual(path.read_bytes()[:8], revoked[:8])  # a fresh unknown one each time

    def test_vnc_password_file_is_eight_bytes_or_empty(self) -> None:
        # Xvnc reading it is proven end to end (tests/integration/test_browser_vm.py: vncdo logs in)
        self.assertEqual(len(vnc_password_file("secret12")), 8)
        self.assertEqual(vnc_password_file("secret12"), vnc_password_file("secret12-and-more"))
        self.assertEqual(vnc_password_file(None), b"")
