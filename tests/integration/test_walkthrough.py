"""The README's walkthrough, run as written against a real daemon (acceptance 1 of issue #3).

The ``.. code-block:: sh`` of the README's "Walkthrough" section is extracted and run with bash,
its first line ``V=http://127.0.0.1:8080`` pointed at a test daemon (own ports, prefix, bridge,
subnet and state directory).  Every answer the walkthrough prints is checked for the shape the
README promises, and afterwards the daemon must hold nothing and leave nothing behind.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_daemon_harness import Daemon, running_daemon

README = Path(__file__).resolve().parents[2] / "README.rst"
DEFAULT_V = "V=http://127.0.0.1:8080"


def walkthrough_script(readme: str) -> str:
    """The shell code of the README's Walkthrough section (its one ``code-block:: sh``)."""
    match = re.search(r"^Walkthrough\n-+\n(.*?)^\S[^\n]*\n-+\n", readme, re.MULTILINE | re.DOTALL)
    assert match, "README.rst has no Walkthrough section"
    blocks = re.findall(r"^\.\. code-block:: sh\n\n((?:    .*\n|\n)+)", match.group(1), re.MULTILINE)
    assert len(blocks) == 1, f"the Walkthrough section should hold one sh code block, not {len(blocks)}"
    return "\n".join(line[4:] for line in blocks[0].splitlines())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("walkthrough"), "w") as d:
        yield d


def test_script_is_found() -> None:
    script = walkthrough_script(README.read_text("utf-8"))
    assert script.splitlines()[0] == DEFAULT_V
    assert "curl" in script and "/shutdown" in script


def test_walkthrough_as_written(daemon: Daemon) -> None:
    script = walkthrough_script(README.read_text("utf-8"))
    assert script.count(DEFAULT_V) == 1
    script = script.replace(DEFAULT_V, f"V={daemon.url}")
    run = subprocess.run(
        ["bash", "-c", "set -eu\n" + script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=daemon.base,
    )
    context = f"\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}\n{daemon.log_tail()}"
    assert run.returncode == 0, f"the walkthrough failed ({run.returncode}){context}"
    lines = run.stdout.splitlines()

    def take(what: str, pattern: str) -> re.Match[str]:
        assert lines, f"expected {what}, the output ended{context}"
        line = lines.pop(0)
        match = re.fullmatch(pattern, line)
        assert match, f"expected {what}, got {line!r}{context}"
        return match

    take("set-pool-size's 204", "204")
    free = 0
    while lines and lines[0].startswith('"vmid"'):
        free += take("a VM and its state", r'"vmid":"[^"]+","state":"(FREE|WAIT|READY)"').group(1) == "FREE"
    assert free >= 2, f"two VMs FREE before the batch{context}"
    batch = take("the batch id", r"batch (\S+)").group(1)
    handle = take("a handle", r"handle ([A-Za-z0-9_-]{22,})").group(1)

    status = json.loads(take("handle-status", r"\{.*\}").group(0))
    assert status["assigned"] is True and status["batch"] == batch, context
    vmid = status["vmid"]
    assert status["vm"]["state"] == "OCCUPIED" and status["vm"]["vmid"] == vmid, context
    assert status["vm"]["console"] == f"/console/{handle}" and status["vm"]["vncPassword"], context
    assert status["expires"] is False and status["expireTime"] is None, context

    last_id = int(take("the last event id", r"last event id (\d+)").group(1))
    assert last_id >= 1, context
    events = json.loads(take("fetch-events after 0", r"\{.*\}").group(0))
    assert events["lastId"] == last_id, context
    assert events["newEvents"][0]["data"] == {"action": "vm-assigned", "vmid": vmid}, context
    assert [e["id"] for e in events["newEvents"]] == list(range(1, last_id + 1)), context
    empty = json.loads(take("a long poll with nothing new", r"\{.*\}").group(0))
    assert empty == {"lastId": last_id, "newEvents": [], "dropped": 0}, context

    take("renew-expire's 204", "204")
    expired = take("the expired handle's 404", r"(\{.*\}) 404")
    assert json.loads(expired.group(1))["error"] == "unknown-handle", context
    take("release's 204", "204")
    take("cancel-batch's 204", "204")
    take("shutdown's 202", "202")
    take("an empty pool", r'"vms":\[\]')
    assert not lines, f"unexpected output {lines}{context}"

    status = daemon.status()
    assert status["vms"] == [] and status["handles"] == [] and status["batches"] == [], status
    assert status["shuttingDown"] is True
    assert daemon.agent_processes() == {}, daemon.agent_processes()
    # twistd ends by the signal it was stopped with, after a clean shutdown
    assert daemon.stop() in (0, -15), daemon.log_tail()
    assert "Server Shut Down." in daemon.log_tail(5), daemon.log_tail()
    daemon.assert_nothing_left()
    assert daemon.traceback_lines() == [], daemon.all_logs()
