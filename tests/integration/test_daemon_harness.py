"""A real ``twistd vmcloud`` on the local driver for end-to-end tests, driven over HTTP.

This module holds no tests: it is the harness that ``test_daemon_*.py`` and ``test_walkthrough.py``
share, on top of :class:`~tests.integration.vmcloud_daemon.VmcloudDaemon` (the configuration file,
the child process, its logs, HTTP and the polling waits, shared with the Nova harness).  What is
here belongs to the local driver: its VMs are processes of this host, in network namespaces.

Every daemon gets names of its own -- pool prefix, bridge, subnet, ports, state directory -- so a
test never touches the VMs of a daemon someone runs on the defaults, and :meth:`Daemon.cleanup`
(always run, even after a failure) removes everything it may have left: the daemon itself, every
process of its VMs (found by their working directory under the daemon's state directory, and by
``ip netns pids``), its namespaces, veths and bridge.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integration.vmcloud_daemon import VmcloudDaemon
from vmcloud.drivers.netns import NetnsLayout, find_tool

IP = find_tool("ip")

_serial = itertools.count()


def is_root() -> bool:
    return os.geteuid() == 0


def netns_available() -> bool:
    """Root and a working ``ip netns`` (the local driver's namespace mode)."""
    if not is_root():
        return False
    try:
        return subprocess.run([IP, "netns", "list"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


NEEDS_NETNS = "needs root and `ip netns` (the local driver gives every VM a network namespace as root)"


def _subnet_in_use(third: int) -> bool:
    try:
        out = subprocess.run([IP, "-4", "-o", "addr"], capture_output=True, text=True, timeout=20).stdout
        out += subprocess.run([IP, "-4", "route"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False  # no `ip`: no namespaces either, the subnet is never used
    return f"10.253.{third}." in out


def _names(kind: str) -> tuple[str, str, str]:
    """A pool prefix, bridge and subnet no other daemon on this host uses."""
    serial = next(_serial)
    tag = f"{os.getpid() % 100000}{kind}{serial}"
    third = (os.getpid() * 7 + serial * 13) % 240 + 10
    for _ in range(240):
        if not _subnet_in_use(third):
            break
        third = (third - 10 + 1) % 240 + 10
    return f"t{tag}-", f"vt{tag}"[:15], f"10.253.{third}.0/24"


class Daemon(VmcloudDaemon):
    """``twistd vmcloud`` on the local driver, with names of its own; and the processes of its VMs."""

    def __init__(self, base: Path, kind: str, *, netns: str = "auto", **settings: Any) -> None:
        """``kind``: a letter naming the test module (it goes into the prefix and the bridge name).

        ``settings`` override the keys below as ``section_key=value`` (``pool_timeout_operation=120``).
        """
        self.prefix, self.bridge, self.subnet = _names(kind)
        sections: dict[str, dict[str, Any]] = {
            "pool": {
                "prefix": self.prefix,
                "max_pool_size": 6,
                "beacon_interval": 1,
                "timeout_boot": 60,
                # beacons come every beacon_interval (1 s); 20 s of silence keeps a loaded machine safe
                "timeout_update": 20,
                "timeout_operation": 30,
                "timeout_cloud": 20,
                "poll_interval": 1,
            },
            "local": {"max_vms": 6, "netns": netns, "subnet": self.subnet, "bridge": self.bridge},
            "api": {"long_poll_default": 2},
        }
        super().__init__(base, sections, settings)
        # the names of namespaces and veths carry a hash of the daemon's resolved state dir
        self.layout = NetnsLayout.from_strings(
            self.prefix, self.subnet, self.bridge, os.path.realpath(self.state_dir)
        )

    # ------------------------------------------------------------------ the VMs' processes

    def vm_of(self, vmid: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        for vm in (status or self.status())["vms"]:
            if vm["vmid"] == vmid:
                return vm  # type: ignore[no-any-return]
        raise AssertionError(f"no VM {vmid} in /all-status")

    def record(self, server_id: str) -> dict[str, Any]:
        """The local driver's record of a VM (pid, pgid, namespace)."""
        path = self.state_dir / "local" / f"{server_id}.json"
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def agent_processes(self) -> dict[int, str]:
        """Every live process working in a VM directory of this daemon: pid -> server id."""
        root = str(self.state_dir / "local") + "/"
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if cwd.startswith(root) and state not in (b"Z", b"X"):
                found[int(entry)] = cwd[len(root) :].split("/")[0]
        return found

    def namespaces(self) -> list[str]:
        if not is_root():
            return []
        out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, timeout=20).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [name for name in names if self.layout.is_pool_namespace(name)]

    def links(self) -> list[str]:
        if not is_root():
            return []
        out = subprocess.run([IP, "-o", "link"], capture_output=True, text=True, timeout=20).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
        return [n for n in names if n == self.bridge or self.layout.is_pool_veth(n)]

    def kill_vm(self, vmid: str, sig: int = signal.SIGKILL) -> int:
        """Signal the whole process group of a VM, as a crash of the VM would; its pgid."""
        vm = self.vm_of(vmid)
        pgid = int(self.record(vm["serverId"])["pgid"])
        os.killpg(pgid, sig)
        return pgid

    def assert_no_orphans(self, status: dict[str, Any]) -> None:
        """Every VM process alive belongs to a VM of ``/all-status``; so does every namespace."""
        servers = {vm["serverId"] for vm in status["vms"]}
        orphans = {pid: sid for pid, sid in self.agent_processes().items() if sid not in servers}
        assert not orphans, f"processes of VMs the pool does not track: {orphans}"
        if is_root():
            expected = set()
            for vm in status["vms"]:
                with contextlib.suppress(OSError, KeyError, TypeError):
                    expected.add(self.record(vm["serverId"])["network"]["namespace"])
            stray = set(self.namespaces()) - expected
            assert not stray, f"namespaces of VMs the pool does not track: {stray}"

    def assert_nothing_left(self) -> None:
        """No VM process, namespace, veth or bridge of this daemon (call once it stopped)."""
        assert not self.agent_processes(), f"VM processes left: {self.agent_processes()}"
        assert not self.namespaces(), f"namespaces left: {self.namespaces()}"
        assert not self.links(), f"links left: {self.links()}"

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Stop the daemon and remove everything of its VMs, whatever state the test left."""
        with contextlib.suppress(Exception):
            self.stop(timeout=20)
        for _ in range(3):
            for pid in self.agent_processes():
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for namespace in self.namespaces():
                out = subprocess.run(
                    [IP, "netns", "pids", namespace], capture_output=True, text=True, timeout=20
                ).stdout
                for pid in out.split():
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                subprocess.run([IP, "netns", "del", namespace], capture_output=True, timeout=20)
            if not self.agent_processes() and not self.namespaces():
                break
            time.sleep(0.5)
        for link in self.links():
            subprocess.run([IP, "link", "del", link], capture_output=True, timeout=20)


@contextlib.contextmanager
def running_daemon(base: Path, kind: str, **settings: Any) -> Iterator[Daemon]:
    """A started daemon, cleaned up after the block whatever happens."""
    daemon = Daemon(base, kind, **settings)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
