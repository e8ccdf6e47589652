"""A real ``twistd vmcloud`` for end-to-end tests, driven over HTTP from plain synchronous tests.

This module holds no tests: it is the harness that ``test_daemon_*.py`` and ``test_walkthrough.py``
share.  A module's tests share one daemon (a pytest fixture of module scope), which a trial
``TestCase`` cannot do: its janitor kills a child process that outlives one test.  So the daemon
is a :class:`subprocess.Popen`, the tests talk to it with :mod:`http.client`, and they wait by
polling ``/all-status`` (or the daemon's log), never with a fixed sleep.

Every daemon gets names of its own — pool prefix, bridge, subnet, ports, state directory — so a
test never touches the VMs of a daemon someone runs on the defaults, and :meth:`Daemon.cleanup`
(always run, even after a failure) removes everything it may have left: the daemon itself, every
process of its VMs (found by their working directory under the daemon's state directory, and by
``ip netns pids``), its namespaces, veths and bridge.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from tests.integration.conftest import free_port
from vmcloud.drivers.netns import NetnsLayout, find_tool

T = TypeVar("T")

#: Generous: the machine is shared and may be loaded; every wait polls and returns early.
WAIT = 60.0

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


@attrs.frozen
class Answer:
    """One HTTP answer."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


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


class Daemon:
    """One ``twistd vmcloud`` with a test-specific configuration; start, stop, kill -9, restart."""

    def __init__(self, base: Path, kind: str, *, netns: str = "auto", **settings: Any) -> None:
        """``kind``: a letter naming the test module (it goes into the prefix and the bridge name).

        ``settings`` override the ``[pool]``, ``[api]`` and ``[local]`` keys below, as
        ``section_key=value`` (``pool_timeout_operation=120``).
        """
        self.base = base
        self.prefix, self.bridge, self.subnet = _names(kind)
        self.layout = NetnsLayout.from_strings(self.prefix, self.subnet, self.bridge)
        self.state_dir = base / "state"
        self.api_port = free_port()
        self.stomp_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
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
        for name, value in settings.items():
            section, _, key = name.partition("_")
            sections[section][key] = value
        self.config = base / "vmcloud.conf"
        self.config.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                for section, keys in sections.items()
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = base / "daemon-0.log"

    # ------------------------------------------------------------------ life

    def argv(self) -> list[str]:
        twistd = Path(sys.executable).with_name("twistd")
        return [
            str(twistd),
            "--nodaemon",
            "--pidfile=",
            "vmcloud",
            "--config",
            str(self.config),
            "--api",
            f"tcp:{self.api_port}:interface=127.0.0.1",
            "--stomp",
            f"tcp:{self.stomp_port}:interface=127.0.0.1",
            "--state-dir",
            str(self.state_dir),
        ]

    def start(self) -> None:
        """Start the daemon (on the same state directory as any previous run) and wait for its API."""
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.log_path = self.base / f"daemon-{self.runs}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VMCLOUD_", "OS_"))}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.wait_for(self._answers, "the API answers")

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            return self.get("/all-status", timeout=5).status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (twistd's clean stop), SIGKILL if it lingers; the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def kill9(self) -> None:
        """``kill -9`` of the daemon alone: its VMs keep running, as after a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def all_logs(self) -> str:
        return "".join(
            (self.base / f"daemon-{n}.log").read_text("utf-8", "replace")
            for n in range(1, self.runs + 1)
            if (self.base / f"daemon-{n}.log").exists()
        )

    def log_tail(self, lines: int = 80) -> str:
        """The end of the current run's log, without the access log (the tests' own polling)."""
        text = self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
        kept = [line for line in text.splitlines() if '"127.0.0.1" - - [' not in line]
        return f"--- {self.log_path} (last {lines} lines, no access log)\n" + "\n".join(kept[-lines:])

    # ------------------------------------------------------------------ HTTP

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Answer:
        connection = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.call("POST", path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Answer:
        """A request that must answer ``status``."""
        answer = self.call(method, path, **kwargs)
        assert answer.status == status, f"{method} {path}: {answer.status} {answer.text}\n{self.log_tail()}"
        return answer

    def status(self) -> dict[str, Any]:
        return self.ok("GET", "/all-status").json()  # type: ignore[no-any-return]

    def set_pool_size(self, minimum: int, maximum: int, linger: int = 600_000) -> None:
        self.ok("POST", f"/set-pool-size/{minimum}/{maximum}/{linger}", 204)

    def prepare_batch(self, size: int, homepage: str = "https%3A%2F%2Fexample.com%2F") -> str:
        return self.ok("POST", f"/prepare-batch/{size}/{homepage}").text

    def lock(self, batch: str) -> str:
        return self.ok("POST", f"/lock/{batch}").text

    def handle_status(self, handle: str) -> dict[str, Any]:
        return self.ok("GET", f"/handle-status/{handle}").json()  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ waiting

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
        """Poll ``check`` until it returns something truthy; fail with the pool and the log."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                try:
                    pool = json.dumps({k: v for k, v in self.status().items() if k != "cloud"}, indent=1)
                except Exception as e:  # the daemon may be down; the log says why
                    pool = f"(no /all-status: {e})"
                raise AssertionError(
                    f"not within {timeout} s: {what}\n/all-status: {pool}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def wait_pool(self, check: Callable[[dict[str, Any]], T | None], what: str, timeout: float = WAIT) -> T:
        """Poll ``/all-status`` until ``check(status)`` is truthy; its value."""
        return self.wait_for(lambda: check(self.status()), what, timeout)

    def wait_assigned(self, handle: str, timeout: float = WAIT) -> dict[str, Any]:
        def assigned() -> dict[str, Any] | None:
            status = self.handle_status(handle)
            return status if status["assigned"] else None

        return self.wait_for(assigned, f"handle {handle[:6]}… assigned", timeout)

    def wait_vms(self, **counts: int) -> dict[str, Any]:
        """Until the pool holds exactly ``counts`` VMs per state (``FREE=2``) and nothing else."""

        def check(status: dict[str, Any]) -> dict[str, Any] | None:
            seen: dict[str, int] = {}
            for vm in status["vms"]:
                seen[vm["state"]] = seen.get(vm["state"], 0) + 1
            return status if seen == counts else None

        return self.wait_pool(check, f"VMs {counts}")

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

    def traceback_lines(self) -> list[str]:
        return [line for line in self.all_logs().splitlines() if "Traceback" in line]

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
