"""Issue #4, acceptance 4: ``kill -9`` of the daemon and a restart on its checkpoint, on the Nova path.

Before the crash the pool holds FREE VMs, an OCCUPIED one lent to a handle, and a VM whose server
is stuck in BUILD (BOOTING: not stable).  The guests stay up (they are the simulator's processes,
as VMs are a cloud's) and reconnect to the restarted broker with their own credentials.  After the
restart the stable VMs are the same (vmids, servers), the handle still works, and the unstable
VM's server is deleted and replaced.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from tests.integration.test_nova_harness import Daemon, NovaTestCase

STABLE = ("FREE", "READY", "OCCUPIED")


def _checkpointed(daemon: Daemon) -> list[dict[str, Any]]:
    """The VMs in the daemon's checkpoint (empty until one is written)."""
    path = daemon.state_dir / "checkpoint.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return []
    found: list[dict[str, Any]] = []

    def walk(item: Any) -> None:
        if isinstance(item, dict):
            if "vmid" in item and "state" in item and "serverId" in item:
                found.append(item)
            else:
                for value in item.values():
                    walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(data)
    return found


class RestartTests(NovaTestCase):
    def test_kill_9_and_restart_keeps_stable_vms_and_deletes_the_rest(self) -> None:
        # the guests need a little longer than a beacon timeout to find the restarted broker
        cloud, daemon = self.make(pool_timeout_update=15)
        daemon.set_pool_size(3, 6)
        daemon.wait_vms(FREE=3)
        batch = daemon.ok("POST", "/prepare-batch/1/" + quote("https://example.org/", safe="")).text
        handle = daemon.ok("POST", f"/lock/{batch}").text
        lent = daemon.wait_assigned(handle)["vmid"]

        settled = daemon.wait_pool(
            lambda s: s if s["vms"] and all(vm["state"] in STABLE for vm in s["vms"]) else None,
            "a settled pool",
        )
        stable = {vm["vmid"]: vm["serverId"] for vm in settled["vms"]}
        states = {vm["vmid"]: vm["state"] for vm in settled["vms"]}
        self.assertEqual(states[lent], "OCCUPIED")

        cloud.configure(boot_rules=[{"pattern": "", "outcome": "stuck", "rate": 1.0}])
        daemon.set_pool_size(len(stable) + 1, 6)
        status = daemon.wait_pool(
            lambda s: s if [vm for vm in s["vms"] if vm["state"] == "BOOTING" and vm["serverId"]] else None,
            "a VM BOOTING on a server stuck in BUILD",
        )
        [stuck] = [vm for vm in status["vms"] if vm["state"] == "BOOTING"]
        self.assertEqual(
            {vm["vmid"]: vm["state"] for vm in status["vms"]}, {**states, stuck["vmid"]: "BOOTING"}
        )
        daemon.wait_for(
            lambda: (
                {vm["vmid"]: vm["state"] for vm in _checkpointed(daemon)}
                == {**states, stuck["vmid"]: "BOOTING"}
            ),
            "the checkpoint holding the pool as it is",
            15,
        )

        daemon.kill9()
        cloud.configure(boot_rules=[])
        daemon.start()
        watch = self.watch(daemon)

        def replaced(s: dict[str, Any]) -> dict[str, Any] | None:
            vms = {vm["vmid"]: vm["state"] for vm in s["vms"]}
            new = [state for vmid, state in vms.items() if vmid not in states]
            kept = {vmid: state for vmid, state in vms.items() if vmid in states}
            back = all(not vm["recovering"] for vm in s["vms"])  # every guest said HELLO again
            return s if kept == states and new == ["FREE"] and back else None

        status = daemon.wait_pool(replaced, "stable VMs back as they were, the unstable one replaced", 60)
        recovered = {vm["vmid"]: vm["serverId"] for vm in status["vms"] if vm["vmid"] in stable}
        self.assertEqual(recovered, stable, "same vmids on the same servers")
        self.assertNotIn(stuck["vmid"], {vm["vmid"] for vm in status["vms"]})
        servers = daemon.wait_no_leak()
        self.assertNotIn(stuck["serverId"], servers, "the unstable VM's server was deleted")
        deleted = [r for r in cloud.requests() if r.method == "DELETE"]
        self.assertEqual([r.path.rsplit("/", 1)[1] for r in deleted], [stuck["serverId"]])

        answer = daemon.ok("GET", f"/handle-status/{handle}").json()
        self.assertTrue(answer["assigned"])
        self.assertEqual((answer["vmid"], answer["vm"]["state"]), (lent, "OCCUPIED"))
        daemon.ok("POST", f"/release/{handle}", 204)
        daemon.wait_pool(
            lambda s: any(vm["vmid"] == lent and vm["state"] == "FREE" for vm in s["vms"]),
            "the VM lent before the crash cleaned by its own guest, FREE again",
        )
        self.assert_answered(watch)
