"""Issue #8, point 7, on real daemons: a daemon that would take another's state dir or bridge won't start.

Daemon A runs with a VM.  Daemon B is configured with A's bridge (its own state dir, ports and
everything else): it must stop by itself with a log line naming A's pid and state dir, having
touched nothing of A's.  A third start on A's very state dir (same configuration) must refuse at
once, before it listens or reads the checkpoint, with the reason on stderr and exit status 1.
A's VM, namespace and bridge are checked after each.  (Two drivers with derived names running
side by side are ``tests/drivers/test_local_neighbours.py``.)
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_daemon_harness import IP, NEEDS_NETNS, Daemon, netns_available, running_daemon
from tests.integration.vmcloud_daemon import WAIT, child_env

pytestmark = pytest.mark.skipif(not netns_available(), reason=NEEDS_NETNS)


def bridge_address(name: str) -> str:
    return subprocess.run(
        [IP, "-4", "-o", "addr", "show", "dev", name], capture_output=True, text=True
    ).stdout


def assert_intact(daemon: Daemon, vmid: str, server_id: str) -> None:
    """A's VM is still FREE with its processes, its namespace and its bridge with the bridge address."""
    vm = daemon.vm_of(vmid)
    assert (vm["state"], vm["serverId"]) == ("FREE", server_id), vm
    assert server_id in daemon.agent_processes().values(), "the VM's processes are gone"
    assert daemon.record(server_id)["network"]["namespace"] in daemon.namespaces()
    assert f"{daemon.layout.bridge_ip}/" in bridge_address(daemon.bridge), "the bridge lost its address"


def test_a_second_daemon_refuses_what_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_daemon(tmp_path / "a", "n") as a:
        assert a.process is not None
        a.set_pool_size(1, 1)
        vmid = a.wait_vms(FREE=1)["vms"][0]["vmid"]
        server_id = a.vm_of(vmid)["serverId"]

        # B: another state dir, but A's bridge
        b = Daemon(tmp_path / "b", "n", local_bridge=a.bridge)
        try:
            with open(b.base / "daemon-1.log", "wb") as log:
                b.process = subprocess.Popen(
                    b.argv(), cwd=b.base, stdout=log, stderr=subprocess.STDOUT, env=child_env()
                )
            b.process.wait(WAIT)  # it stops by itself
            text = (b.base / "daemon-1.log").read_text("utf-8", "replace")
            expected = (
                f"Stopping: bridge {a.bridge} belongs to the vmcloud daemon running as pid {a.process.pid} "
                f"with state dir {os.path.realpath(a.state_dir)}; refusing to use or remove it"
            )
            assert expected in text, text
            assert "Traceback" not in text, text
            assert_intact(a, vmid, server_id)
        finally:
            b.cleanup()

        # C: A's own configuration and state dir, while A runs
        started = time.monotonic()
        c = subprocess.run(
            a.argv(), cwd=a.base, capture_output=True, text=True, timeout=WAIT, env=child_env()
        )
        assert c.returncode == 1, (c.returncode, c.stdout, c.stderr)
        assert (
            f"vmcloud: refusing to start: the state dir {os.path.realpath(a.state_dir)} is in use by another "
            f"vmcloud daemon (pid {a.process.pid};"
        ) in c.stderr, c.stderr
        assert "Traceback" not in c.stderr, c.stderr
        assert time.monotonic() - started < WAIT
        assert_intact(a, vmid, server_id)
        assert a.status()["vms"][0]["vmid"] == vmid  # A's API and pool carry on

        a.ok("POST", "/shutdown", 202)
        a.wait_pool(lambda s: s if not s["vms"] else None, "every VM terminated")
        assert a.stop() in (0, -15)
        a.assert_nothing_left()
        assert a.traceback_lines() == [], a.all_logs()
