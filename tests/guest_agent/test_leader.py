"""The command runner's session leader as a program of its own (``guest_agent/leader.py``).

``test_commands.py`` drives it through the runner; these tests pin what the runner relies on:
the file ships in the package, importing it does nothing, it needs nothing but the standard
library (it runs under ``-I -S``), and it reports on descriptor 3 and ends as its command did.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import guest_agent
from guest_agent.commands import LEADER_SCRIPT


def run_leader(*argv: str) -> tuple[int, dict[str, object]]:
    """Run the leader as the runner does, with a pipe on descriptor 3; its exit status and report."""
    read, write = os.pipe()

    def report_on_3() -> None:
        os.dup2(write, 3)

    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", LEADER_SCRIPT, *argv],
            preexec_fn=report_on_3,  # a test: no threads to fear
            close_fds=False,  # else descriptor 3 is closed after preexec_fn
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as f:
        raw = f.read()
    return done.returncode, json.loads(raw) if raw else {}


class LeaderTests(SynchronousTestCase):
    def test_the_script_is_a_module_of_the_package(self) -> None:
        """find_packages ships it in the wheel next to commands.py; nothing else is needed."""
        self.assertEqual(Path(LEADER_SCRIPT).parent, Path(guest_agent.__file__).parent)
        self.assertEqual(Path(LEADER_SCRIPT).name, "leader.py")

    def test_it_imports_only_the_standard_modules_it_names(self) -> None:
        tree = ast.parse(Path(LEADER_SCRIPT).read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        self.assertEqual(imported, {"errno", "json", "os", "signal", "sys"})

    def test_importing_it_runs_nothing(self) -> None:
        check = "import os; before = os.getsid(0); import guest_agent.leader; print(os.getsid(0) == before)"
        done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=30)
        self.assertEqual(done.stdout.strip(), "True", done.stderr)

    def test_exit_status_and_report(self) -> None:
        code, report = run_leader("", "sh", "-c", "exit 3")
        self.assertEqual((code, report["exit"]), (3, 3))
        self.assertIn("ru_utime", report["resources"])  # type: ignore[operator]

    def test_a_command_killed_by_a_signal_kills_its_leader_alike(self) -> None:
        code, report = run_leader("", "sh", "-c", "kill -USR1 $$")
        self.assertEqual((code, report["signal"]), (-signal.SIGUSR1, signal.SIGUSR1))

    def test_what_cannot_start_is_reported_with_the_shells_codes(self) -> None:
        code, report = run_leader("", "no-such-command-here")
        self.assertEqual((code, report["code"]), (127, 127))
        self.assertIn("cannot run 'no-such-command-here'", str(report["error"]))
        code, report = run_leader(self.mktemp(), "true")
        self.assertEqual((code, report["code"]), (126, 126))
        self.assertIn("cannot enter directory", str(report["error"]))
