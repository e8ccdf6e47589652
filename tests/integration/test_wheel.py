"""The package as an operator installs it: a plain ``pip install .`` into a fresh virtualenv.

An editable install runs from the checkout and hides a file the wheel forgot (``static/`` once was)
or a dependency nobody declared (``werkzeug`` once was).  This test installs the way users do, starts
the daemon from a folder that is not the checkout, and fetches what a browser would.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.integration.conftest import free_port
from tests.integration.vmcloud_daemon import stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.read()


def test_the_installed_wheel_serves_its_pages(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout

    run = tmp_path / "run"  # not the checkout: nothing may come from it
    run.mkdir()
    (run / "vmcloud.conf").write_text("[local]\nnetns = no\n")
    api = free_port()
    log = (run / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [
            str(venv / "bin" / "twistd"),
            "--nodaemon",
            "--pidfile=",
            "vmcloud",
            "--config",
            "vmcloud.conf",
            "--api",
            f"tcp:{api}:interface=127.0.0.1",
            "--stomp",
            f"tcp:{free_port()}:interface=127.0.0.1",
            "--state-dir",
            "state",
        ],
        cwd=run,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{api}"

    def answers() -> bool:
        assert daemon.poll() is None, (run / "daemon.log").read_text()
        try:
            return fetch(base + "/openapi.json")[0] == 200
        except OSError:
            return False

    try:
        wait_for(answers, "the installed daemon answers", 60, lambda: (run / "daemon.log").read_text())
        status, page = fetch(base + "/")  # redirected to the monitor
        assert status == 200 and b"<html" in page.lower()
        status, script = fetch(base + "/static/vmcloud.js")
        assert status == 200 and b"vmcloud" in script
        for name in (ROOT / "static").rglob("*"):
            if name.is_file():
                path = name.relative_to(ROOT / "static").as_posix()
                assert fetch(f"{base}/static/{path}")[0] == 200, path
    finally:
        stop_process(daemon, 30)
        log.close()
    assert "Traceback" not in (run / "daemon.log").read_text()
