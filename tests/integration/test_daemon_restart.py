"""``kill -9`` of the daemon and a restart on the same state directory (issue #3, acceptance 2).

Before the crash the pool holds a VM in each stable state — FREE, READY (batch A) and OCCUPIED
(a handle on batch A, with an expiry) — and one in the middle of an operation: a PREPARE for batch
B in flight.  That one is made deterministic by stopping its guest agent (SIGSTOP) before batch B
is asked for, so the only FREE VM is sent PREPARE and stays in WAIT; it is woken up (SIGCONT) after
the crash, so that it says HELLO to the new daemon like the others.  (A VM caught while BOOTING is
not covered: nothing here can hold a boot open deterministically.)

After the restart: the stable VMs are the same VMs (same vmid, server and processes) in the same
states, the handle is the same token, still assigned, with its events and expiry; the VM that was
mid-operation is terminated and batch B gets another; no VM process or namespace is left that
``/all-status`` does not show; a shutdown then leaves nothing.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_daemon_harness import NEEDS_NETNS, Daemon, netns_available, running_daemon

pytestmark = pytest.mark.skipif(not netns_available(), reason=NEEDS_NETNS)


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # a long operation timeout: the stopped guest's PREPARE must still be in flight at the crash
    with running_daemon(tmp_path_factory.mktemp("restart"), "r", pool_timeout_operation=120) as d:
        yield d


def checkpointed(daemon: Daemon) -> dict[str, str]:
    """vmid -> state, as the checkpoint on disk has them."""
    try:
        data = json.loads((daemon.state_dir / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}
    return {vm["vmid"]: vm["state"] for vm in data["state"]["vms"]}


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_9_and_restart(daemon: Daemon) -> None:
    daemon.set_pool_size(3, 6)
    daemon.wait_vms(FREE=3)
    batch_a = daemon.prepare_batch(1)
    handle = daemon.lock(batch_a)
    occupied = daemon.wait_assigned(handle)["vmid"]
    daemon.ok("POST", f"/renew-expire/{handle}/600000", 204)
    status = daemon.wait_vms(OCCUPIED=1, READY=1, FREE=1)
    ready = next(vm["vmid"] for vm in status["vms"] if vm["state"] == "READY")
    free = next(vm["vmid"] for vm in status["vms"] if vm["state"] == "FREE")
    before = daemon.handle_status(handle)
    last_id = int(daemon.ok("GET", f"/last-event-id/{handle}").text)

    # the only FREE VM gets batch B's PREPARE, which its stopped guest cannot answer
    busy_pgid = daemon.kill_vm(free, signal.SIGSTOP)
    batch_b = daemon.prepare_batch(1)
    daemon.wait_pool(lambda s: daemon.vm_of(free, s)["state"] == "WAIT", f"VM {free} preparing")
    daemon.wait_for(
        lambda: checkpointed(daemon) == {occupied: "OCCUPIED", ready: "READY", free: "WAIT"},
        "the checkpoint on disk has the three VMs",
        timeout=30,
    )
    stable = {vm["vmid"]: vm for vm in daemon.status()["vms"] if vm["vmid"] != free}
    pgids = {vmid: daemon.record(vm["serverId"])["pgid"] for vmid, vm in stable.items()}

    daemon.kill9()
    os.killpg(busy_pgid, signal.SIGCONT)
    assert all(alive(pgid) for pgid in pgids.values()), "VMs must outlive the controller"
    daemon.start()

    def recovered(status: dict[str, Any]) -> dict[str, Any] | None:
        vms = {vm["vmid"]: vm for vm in status["vms"]}
        done = all(vmid in vms and not vms[vmid]["recovering"] for vmid in stable) and free not in vms
        return status if done else None

    status = daemon.wait_pool(recovered, "the stable VMs recovered and the busy one terminated")
    vms = {vm["vmid"]: vm for vm in status["vms"]}
    assert vms[occupied]["state"] == "OCCUPIED" and vms[occupied]["handle"] == handle
    assert vms[ready]["state"] == "READY" and vms[ready]["batch"] == batch_a
    for vmid, vm in stable.items():
        assert vms[vmid]["serverId"] == vm["serverId"], f"VM {vmid} is another server now"
        assert daemon.record(vm["serverId"])["pgid"] == pgids[vmid] and alive(pgids[vmid]), vmid

    after = daemon.handle_status(handle)
    assert after["assigned"] is True and after["vmid"] == occupied, after
    assert after["vm"]["vncPassword"] == before["vm"]["vncPassword"]
    assert after["expires"] is True and after["expireTime"] == before["expireTime"], (before, after)
    assert int(daemon.ok("GET", f"/last-event-id/{handle}").text) == last_id
    assert daemon.ok("GET", f"/fetch-events/{handle}/0?wait=0").json()["lastId"] == last_id

    # the VM that was mid-operation: its processes and namespace are gone, batch B has another
    daemon.wait_for(lambda: not alive(busy_pgid), f"VM {free}'s processes ended")

    def batch_b_ready(status: dict[str, Any]) -> str | None:
        ready_b = [vm["vmid"] for vm in status["vms"] if vm["batch"] == batch_b and vm["state"] == "READY"]
        return ready_b[0] if ready_b else None

    replacement = daemon.wait_pool(batch_b_ready, f"batch {batch_b} READY again")
    assert replacement not in (free, occupied, ready)
    assert "no HELLO" not in daemon.log_path.read_text()  # every stable guest came back in time
    daemon.assert_no_orphans(daemon.status())

    # the recovered handle works as before: release -> cleanup -> FREE
    daemon.ok("POST", f"/release/{handle}", 204)
    daemon.wait_pool(lambda s: daemon.vm_of(occupied, s)["state"] == "FREE", f"VM {occupied} FREE again")

    daemon.ok("POST", "/shutdown", 202)
    daemon.wait_pool(lambda s: not s["vms"], "every VM terminated")
    assert daemon.stop() in (0, -15)
    daemon.assert_nothing_left()
    assert daemon.traceback_lines() == [], daemon.all_logs()
