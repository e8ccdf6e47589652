"""The pool's rules end to end: a real daemon, real guest agents in namespaces (issue #3, acceptance 2).

One daemon serves the module; each test starts by giving back every handle and batch the previous
one left, then sets the pool size it needs.  VMs are killed the way a crash kills them: SIGKILL to
the VM's whole process group.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_daemon_harness import NEEDS_NETNS, Daemon, netns_available, running_daemon

pytestmark = pytest.mark.skipif(not netns_available(), reason=NEEDS_NETNS)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("pool"), "p") as d:
        yield d


@pytest.fixture
def pool(daemon: Daemon) -> Daemon:
    """The module's daemon with no handle and no batch left by an earlier test."""
    status = daemon.status()
    for handle in status["handles"]:
        daemon.post(f"/release/{handle['handle']}")
    for batch in status["batches"]:
        daemon.post(f"/cancel-batch/{batch['id']}")
    daemon.wait_pool(
        lambda s: not s["handles"] and not s["batches"] and not s["pendingLocks"],
        "no handle, batch or pending lock left",
    )
    return daemon


def batch_vms(status: dict[str, Any], batch: str, state: str) -> list[str]:
    return [vm["vmid"] for vm in status["vms"] if vm["batch"] == batch and vm["state"] == state]


def events_until(daemon: Daemon, handle: str, last_id: int, action: str) -> list[dict[str, Any]]:
    """Long-poll fetch-events from ``last_id`` until an event ``action`` arrives; every event seen."""
    seen: list[dict[str, Any]] = []

    def poll() -> list[dict[str, Any]] | None:
        nonlocal last_id
        answer = daemon.ok("GET", f"/fetch-events/{handle}/{last_id}?wait=5").json()
        seen.extend(answer["newEvents"])
        last_id = answer["lastId"]
        return seen if any(e["data"]["action"] == action for e in seen) else None

    return daemon.wait_for(poll, f"an event {action} on the handle")


def process_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_lock_before_any_vm_exists(pool: Daemon) -> None:
    """The handle waits, unassigned, and gets the first VM of its batch that becomes READY."""
    pool.set_pool_size(0, 4, 0)
    pool.wait_vms()  # linger 0: idle VMs above the minimum go at once
    batch = pool.prepare_batch(1)
    handle = pool.lock(batch)

    status = pool.status()
    assert [p["handle"] for p in status["pendingLocks"]] == [handle]
    assert not [vm for vm in status["vms"] if vm["state"] in ("READY", "OCCUPIED")], status["vms"]
    waiting = pool.handle_status(handle)
    assert waiting["assigned"] is False and waiting["batch"] == batch and "vm" not in waiting

    assigned = pool.wait_assigned(handle)
    vmid = assigned["vmid"]
    assert assigned["vm"]["state"] == "OCCUPIED"
    status = pool.status()
    assert status["pendingLocks"] == []
    assert pool.vm_of(vmid, status)["handle"] == handle
    events = pool.ok("GET", f"/fetch-events/{handle}/0?wait=0").json()["newEvents"]
    assert [e["data"] for e in events] == [{"action": "vm-assigned", "vmid": vmid}]
    pool.ok("POST", f"/release/{handle}", 204)


def test_guest_killed_while_ready_is_replaced(pool: Daemon) -> None:
    pool.set_pool_size(0, 4)
    batch = pool.prepare_batch(1)
    vmid = pool.wait_pool(lambda s: (batch_vms(s, batch, "READY") or [None])[0], "a READY VM")
    namespace = pool.record(pool.vm_of(vmid)["serverId"])["network"]["namespace"]
    pgid = pool.kill_vm(vmid, signal.SIGKILL)

    def replaced(status: dict[str, Any]) -> str | None:
        if any(vm["vmid"] == vmid for vm in status["vms"]):
            return None
        ready = batch_vms(status, batch, "READY")
        return ready[0] if ready else None

    other = pool.wait_pool(replaced, f"VM {vmid} gone and another READY in batch {batch}")
    assert other != vmid
    # SIGKILLed at once, but a browser VM's dozen processes take a second or two to be reaped
    pool.wait_for(lambda: process_gone(pgid), f"process group {pgid} gone", 15)
    pool.wait_for(lambda: namespace not in pool.namespaces(), f"namespace {namespace} removed")
    pool.assert_no_orphans(pool.status())


def test_guest_killed_while_occupied(pool: Daemon) -> None:
    """The handle hears vm-died, stays valid but unassigned ("lost"), and the pool is made whole again."""
    pool.set_pool_size(2, 4)
    batch = pool.prepare_batch(1)
    handle = pool.lock(batch)
    vmid = pool.wait_assigned(handle)["vmid"]
    # the batch replaces what the lock took, and the pool keeps its minimum of 2
    pool.wait_pool(lambda s: batch_vms(s, batch, "READY"), "the batch READY again")
    last_id = int(pool.ok("GET", f"/last-event-id/{handle}").text)
    before = {vm["vmid"] for vm in pool.status()["vms"]}

    pool.kill_vm(vmid, signal.SIGKILL)
    events = events_until(pool, handle, last_id, "vm-died")
    died = [e["data"] for e in events if e["data"]["action"] == "vm-died"]
    assert len(died) == 1 and died[0]["vmid"] == vmid and died[0]["reason"], events

    status = pool.handle_status(handle)
    assert status["assigned"] is False and "vm" not in status, status
    assert status["lost"]["vmid"] == vmid and status["lost"]["reason"], status

    def whole(status: dict[str, Any]) -> bool:
        vmids = {vm["vmid"] for vm in status["vms"] if vm["state"] in ("FREE", "READY")}
        return vmid not in {vm["vmid"] for vm in status["vms"]} and len(vmids) >= 2 and bool(vmids - before)

    pool.wait_pool(whole, f"VM {vmid} gone and replaced")
    # not given another VM: the worker's session is gone, the application decides
    assert pool.handle_status(handle)["assigned"] is False
    pool.ok("POST", f"/release/{handle}", 204)
    assert pool.get(f"/handle-status/{handle}").status == 404
    pool.assert_no_orphans(pool.status())


def test_released_vm_is_cleaned_and_reused(pool: Daemon) -> None:
    """release -> CLEANUP -> FREE -> the next batch gets the very same VM (same processes)."""
    pool.set_pool_size(1, 1)
    vmid = pool.wait_vms(FREE=1)["vms"][0]["vmid"]
    server_id = pool.vm_of(vmid)["serverId"]
    pgid = pool.record(server_id)["pgid"]

    first = pool.prepare_batch(1)
    handle = pool.lock(first)
    assert pool.wait_assigned(handle)["vmid"] == vmid
    pool.ok("POST", f"/cancel-batch/{first}", 204)  # the locked VM stays usable
    assert pool.handle_status(handle)["assigned"] is True
    pool.ok("POST", f"/release/{handle}", 204)
    assert pool.get(f"/handle-status/{handle}").status == 404
    pool.wait_pool(
        lambda s: s["batches"] == [] and [(vm["vmid"], vm["state"]) for vm in s["vms"]] == [(vmid, "FREE")],
        f"VM {vmid} FREE again and batch {first} gone",
    )
    log = pool.all_logs()
    assert f"VM {vmid}: OCCUPIED -> WAIT" in log and f"VM {vmid}: WAIT -> FREE" in log

    second = pool.prepare_batch(1)
    pool.wait_pool(lambda s: batch_vms(s, second, "READY") == [vmid], f"VM {vmid} READY for batch {second}")
    assert pool.vm_of(vmid)["serverId"] == server_id and pool.record(server_id)["pgid"] == pgid
    assert not process_gone(pgid)
    handle = pool.lock(second)
    assert pool.wait_assigned(handle)["vmid"] == vmid
    pool.ok("POST", f"/release/{handle}", 204)


def test_shutdown_leaves_nothing(pool: Daemon) -> None:
    pool.set_pool_size(2, 4)
    batch = pool.prepare_batch(1)
    pool.lock(batch)
    pool.wait_pool(lambda s: len(s["vms"]) >= 2 and s["handles"], "VMs and a handle")
    pool.ok("POST", "/shutdown", 202)
    status = pool.wait_pool(lambda s: s if not s["vms"] else None, "every VM terminated")
    assert status["handles"] == [] and status["batches"] == [] and status["shuttingDown"] is True
    assert pool.post(f"/prepare-batch/1/{'http%3A%2F%2Fexample.com%2F'}").status == 409
    assert pool.agent_processes() == {}
    assert pool.namespaces() == []
    assert pool.stop() in (0, -15)
    pool.assert_nothing_left()
    assert pool.traceback_lines() == [], pool.all_logs()
