"""Issue #8, point 1, replayed end to end: a hostile guest inside one VM tries to take another.

A real daemon on the local driver in namespace mode; the attacker runs inside a VM's own network
namespace (where a hostile guest image would run), with stomp.py, against the broker's address on
the bridge.  Before the fix the broker took an anonymous ``evilguest`` there, and a HELLO naming
the victim's MAC rebound the victim VM to it.
"""

from __future__ import annotations

import configparser
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_daemon_harness import IP, NEEDS_NETNS, Daemon, netns_available, running_daemon
from tests.integration.vmcloud_daemon import PYTHON

pytestmark = pytest.mark.skipif(not netns_available(), reason=NEEDS_NETNS)

# Runs inside the attacker's VM namespace: connect with the given login/passcode, say HELLO as the
# given identity naming the victim's MAC and IP, and print what the broker answered.
ATTACK = r"""
import json, sys, time
import stomp
host, port, login, passcode, identity, mac, ip = sys.argv[1:8]
result = {"connected": False, "errors": []}

class Listener(stomp.ConnectionListener):
    def on_error(self, frame):
        result["errors"].append(frame.headers.get("message", ""))

conn = stomp.Connection12([(host, int(port))], reconnect_attempts_max=1)
conn.set_listener("", Listener())
try:
    conn.connect(login, passcode or None, wait=True, headers={"host": "/"})
    result["connected"] = True
    conn.subscribe(f"/queue/vmcloud.guest.{identity}", id="1")
    conn.send("/queue/vmcloud.controller", "HELLO",
              headers={"identity": identity, "mac": mac, "ip": ip, "agent-version": "1.0"})
    time.sleep(2)
    conn.disconnect()
except Exception as e:
    result["errors"].append(f"{type(e).__name__}: {e}")
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("takeover"), "k") as d:
        yield d


def attack(daemon: Daemon, namespace: str, *args: str) -> dict[str, Any]:
    host = daemon.layout.bridge_ip
    out = subprocess.run(
        [IP, "netns", "exec", namespace, PYTHON, "-c", ATTACK, host, str(daemon.stomp_port), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_hostile_guest_cannot_take_another_vm(daemon: Daemon) -> None:
    daemon.set_pool_size(2, 2)
    status = daemon.wait_vms(FREE=2)
    attacker, victim = sorted(status["vms"], key=lambda vm: vm["vmid"])
    attacker_ns = daemon.record(attacker["serverId"])["network"]["namespace"]
    victim_mac, victim_ip = victim["mac"], victim["ip"]
    assert victim["identity"] and victim_mac and victim_ip, victim

    # 1. anonymous from a VM's namespace: refused (it used to be a guest named evilguest)
    anonymous = attack(daemon, attacker_ns, "evilguest", "", "evilguest", victim_mac, victim_ip)
    assert not anonymous["connected"], anonymous
    refusals = [line for line in daemon.all_logs().splitlines() if "evilguest" in line and "refused" in line]
    assert any("loopback" in line for line in refusals), refusals

    # 2. the attacker's own, valid credentials, claiming the victim's MAC and IP: it stays itself
    user_data = configparser.ConfigParser()
    user_data.read(daemon.state_dir / "local" / attacker["serverId"] / "user-data.ini")
    login, passcode = user_data["agent"]["login"], user_data["agent"]["passcode"]
    claimed = attack(daemon, attacker_ns, login, passcode, login, victim_mac, victim_ip)
    assert claimed["connected"], claimed

    after = {vm["vmid"]: vm for vm in daemon.status()["vms"]}
    assert after[victim["vmid"]]["identity"] == victim["identity"]
    assert after[attacker["vmid"]]["identity"] == attacker["identity"]
    # ... and the victim still answers its own words: a batch of two becomes READY on both
    batch = daemon.prepare_batch(2)
    daemon.wait_pool(
        lambda s: sum(1 for vm in s["vms"] if vm["batch"] == batch and vm["state"] == "READY") == 2 or None,
        "both VMs READY for the batch",
    )
    assert daemon.traceback_lines() == []
