"""Integration tests of the local driver with real processes (and, as root, real namespaces).

Every VM runs a small Python "agent" that writes what it sees (its interfaces via netifaces, its
user-data, a grandchild's pid) to a JSON file and sleeps.  The namespace tests use their own
prefix, bridge and 10.252.x subnet and remove everything in tearDown, even after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from vmcloud.drivers.local import LocalDriver
from vmcloud.drivers.localproc import process_start_time
from vmcloud.drivers.netns import NetnsLayout
from vmcloud.pool.interfaces import (
    ACTIVE,
    DELETING,
    ERROR,
    BadCloudRequest,
    BootRequest,
    CloudUnavailable,
    GuestCredentials,
    QuotaExceeded,
    ServerStatus,
)

REPO = FilePath(__file__).parent().parent().parent()

# The fake guest agent: argv = out-file, mode ("sleep" | "die"), broker, [host:port to greet].
VM_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, socket, subprocess, sys, time
    import netifaces
    out, mode, broker = sys.argv[1:4]
    ifaces = {}
    for name in netifaces.interfaces():
        addrs = netifaces.ifaddresses(name)
        link = addrs.get(netifaces.AF_LINK, [{}])[0].get("addr")
        ifaces[name] = {"mac": link, "ips": [a["addr"] for a in addrs.get(netifaces.AF_INET, [])]}
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
    grandchild = subprocess.Popen(["sleep", "300"])
    if len(sys.argv) > 4:
        host, port = sys.argv[4].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(os.environ["VMCLOUD_VMID"].encode() + b"\\n")
    info = {
        "ifaces": ifaces, "pid": os.getpid(), "pgid": os.getpgid(0), "grandchild": grandchild.pid,
        "broker": broker, "cwd": os.getcwd(), "argv": sys.argv, "env": sorted(os.environ),
        "home": os.environ.get("HOME"),
        "user_data": open(os.environ["VMCLOUD_USER_DATA"]).read(),
    }
    with open(out + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(out + ".tmp", out)
    print("agent up", flush=True)
    if mode == "die":
        sys.exit(3)
    time.sleep(300)
    """
)

# A controller that boots one VM and is then killed -9, to test re-adoption after a crash.
CRASH_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.filepath import FilePath
    from vmcloud.drivers.local import LocalDriver
    from vmcloud.pool.interfaces import BootRequest, GuestCredentials
    cfg = json.loads(sys.argv[1])
    def argv(request, broker):
        return [sys.executable, cfg["script"], cfg["out"], "sleep", broker]
    driver = LocalDriver(reactor, prefix=cfg["prefix"], state_dir=FilePath(cfg["state"]), agent_argv=argv,
                         netns=cfg["netns"], subnet=cfg["subnet"], bridge=cfg["bridge"])
    async def main():
        sid = await driver.boot(BootRequest(vmid="crash", name=cfg["prefix"] + "crash",
                                            metadata={"tag": "before-crash"},
                                            credentials=GuestCredentials("b", "l", "p")))
        sys.stdout.write(sid + "\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    Deferred.fromCoroutine(main()).addErrback(lambda f: (f.printTraceback(), os._exit(2)))
    reactor.run()
    """
)


def alive(pid: int) -> bool:
    """A process counts as alive unless it is gone or a zombie."""
    return process_start_time(pid) is not None


def ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10).stdout
    return json.loads(out) if out.strip() else []


def netns_usable() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0
    except OSError:
        return False


class LocalDriverMixin:
    """The tests both modes share; subclasses say whether namespaces are used."""

    netns: ClassVar[bool]
    timeout = 60

    def setUp(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        uniq = f"{os.getpid() % 1000}{id(self) % 1000}"
        self.prefix = f"t{uniq}-vm-"
        self.bridge = f"tb{uniq}"[:15]
        self.subnet = f"10.252.{os.getpid() % 200 + 10}.0/24"
        self.state = FilePath(test.mktemp())
        self.state.makedirs()
        self.layout = NetnsLayout.from_strings(
            self.prefix, self.subnet, self.bridge, os.path.realpath(self.state.path)
        )
        self.out = FilePath(test.mktemp())
        self.out.makedirs()
        self.script = self.out.child("vm.py")
        self.script.setContent(VM_SCRIPT.encode())
        self.pids: dict[int, int | None] = {}  # pid -> start time, to kill in tearDown
        self.mode: dict[str, str] = {}
        self.greet: str | None = None
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        test.addCleanup(self.scrub)
        self.drivers: list[LocalDriver] = []
        self.driver = self.make_driver()

    def make_driver(self, **kw: Any) -> LocalDriver:
        def default_argv(request: BootRequest, broker: str) -> list[str]:
            args = [sys.executable, self.script.path, self.info_path(request.vmid).path]
            args += [self.mode.get(request.vmid, "sleep"), broker]
            return args + ([self.greet] if self.greet else [])

        driver = LocalDriver(
            reactor,
            prefix=self.prefix,
            state_dir=self.state,
            agent_argv=kw.pop("agent_argv", default_argv),
            netns=self.netns,
            subnet=self.subnet,
            bridge=self.bridge,
            broker_port=61999,
            kill_grace=kw.pop("kill_grace", 2.0),
            **kw,
        )
        self.drivers.append(driver)
        return driver

    def track(self, *pids: int) -> None:
        for pid in pids:
            self.pids[pid] = process_start_time(pid)

    def info_path(self, vmid: str) -> FilePath[str]:
        return self.out.child(f"{vmid}.json")

    async def scrub(self) -> None:
        """Remove everything a test may have left, whatever happened: processes, namespaces, bridge."""
        for driver in self.drivers:
            with contextlib.suppress(Exception):
                await driver.stop(keep_vms=False)
        for pid, started in self.pids.items():
            if process_start_time(pid) == started:  # still that process, not a reuse of its pid
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if self.netns:
            for entry in ip_json("netns", "list"):
                if self.layout.is_pool_namespace(entry["name"]):
                    subprocess.run(["ip", "netns", "del", entry["name"]], timeout=10)
            for entry in ip_json("link", "show"):
                if self.layout.is_pool_veth(entry["ifname"]) or entry["ifname"] == self.bridge:
                    subprocess.run(["ip", "link", "del", entry["ifname"]], timeout=10)

    def request(self, vmid: str) -> BootRequest:
        return BootRequest(
            vmid=vmid,
            name=self.prefix + vmid,
            metadata={"vmcloud-controller": "test", "vmid": vmid},
            credentials=GuestCredentials(broker="ignored", login=f"vm-{vmid}", passcode=f"secret-{vmid}"),
        )

    async def wait_for(self, check: Any, what: str, timeout: float = 20.0) -> Any:
        """Poll ``check()`` until it returns something truthy (real processes take real time)."""
        for _ in range(int(timeout / 0.05)):
            result = await check()
            if result:
                return result
            await deferLater(reactor, 0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def boot_and_wait(self, vmid: str, driver: LocalDriver | None = None) -> tuple[str, dict[str, Any]]:
        sid = await (driver or self.driver).boot(self.request(vmid))
        path = self.info_path(vmid)

        async def read() -> dict[str, Any] | None:
            return json.loads(path.getContent()) if path.exists() else None

        info = await self.wait_for(read, f"VM {vmid} to start")
        self.track(info["pid"], info["grandchild"])
        return sid, info

    async def status_of(self, sid: str, driver: LocalDriver | None = None) -> ServerStatus | None:
        for server in await (driver or self.driver).list_servers():
            if server.server_id == sid:
                return server
        return None

    def our_namespaces(self) -> list[str]:
        return [e["name"] for e in ip_json("netns", "list") if self.layout.is_pool_namespace(e["name"])]

    def our_links(self) -> list[str]:
        return [
            e["ifname"]
            for e in ip_json("link", "show")
            if self.layout.is_pool_veth(e["ifname"]) or e["ifname"] == self.bridge
        ]

    # ------------------------------------------------------------------ the tests

    async def test_boot_two_vms(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        await self.driver.prepare()
        sid1, info1 = await self.boot_and_wait("1")
        sid2, info2 = await self.boot_and_wait("2")
        servers = {s.server_id: s for s in await self.driver.list_servers()}
        test.assertEqual(set(servers), {sid1, sid2})
        for sid, vmid, info in ((sid1, "1", info1), (sid2, "2", info2)):
            server = servers[sid]
            test.assertEqual(server.status, ACTIVE)
            test.assertEqual(server.name, self.prefix + vmid)
            test.assertEqual(dict(server.metadata), {"vmcloud-controller": "test", "vmid": vmid})
            # one process group, led by the spawned process; credentials only in a private file
            test.assertEqual(info["pgid"], info["pid"])
            test.assertIn(f"passcode = secret-{vmid}", info["user_data"])
            test.assertIn(f"login = vm-{vmid}", info["user_data"])
            test.assertIn(f"workdir = {info['cwd']}/work\n", info["user_data"])
            test.assertNotIn(f"secret-{vmid}", " ".join(info["argv"]))
            user_data = FilePath(info["cwd"]).child("user-data.ini")
            test.assertEqual(stat.S_IMODE(os.stat(user_data.path).st_mode), 0o600)
            test.assertIn(f"broker = {info['broker']}", info["user_data"])
            # the daemon's environment (cloud secrets, say) does not leak into a VM
            allowed = {"PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "HOME", "LC_CTYPE"}
            allowed |= {"VMCLOUD_VMID", "VMCLOUD_SERVER_ID", "VMCLOUD_USER_DATA"}
            test.assertLessEqual(set(info["env"]), allowed)
            test.assertEqual(info["home"], info["cwd"])
            if self.netns:
                eth0 = info["ifaces"]["eth0"]
                test.assertEqual(server.macs, (eth0["mac"],))
                test.assertEqual(server.ips, tuple(eth0["ips"]))
                test.assertEqual(sorted(info["ifaces"]), ["eth0", "lo"])
                test.assertEqual(info["broker"], f"tcp:{self.layout.bridge_ip}:61999")
            else:
                test.assertEqual((server.macs, server.ips), ((), ()))
                test.assertEqual(info["broker"], "tcp:127.0.0.1:61999")
        if self.netns:
            test.assertNotEqual(servers[sid1].ips, servers[sid2].ips)
            test.assertNotEqual(servers[sid1].macs, servers[sid2].macs)
            test.assertEqual(self.driver.broker_listen_interface(), self.layout.bridge_ip)
        else:
            test.assertIsNone(self.driver.broker_listen_interface())

    async def test_delete_kills_processes_that_ignore_sigterm(self) -> None:
        """SIGKILL follows the grace period; meanwhile the VM lists as DELETING."""
        test: TestCase = self  # type: ignore[assignment]
        driver = self.make_driver(kill_grace=0.5)
        self.mode["st"] = "stubborn"
        sid, info = await self.boot_and_wait("st", driver)
        deleting = Deferred.fromCoroutine(driver.delete(sid))
        server = await self.status_of(sid, driver)
        test.assertEqual(server.status if server else None, DELETING)
        await deleting
        test.assertFalse(alive(info["pid"]))
        test.assertFalse(alive(info["grandchild"]))
        test.assertEqual(await driver.list_servers(), [])

    async def test_delete_kills_the_whole_group(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        sid, info = await self.boot_and_wait("7")
        vm_dir = FilePath(info["cwd"])
        test.assertTrue(alive(info["grandchild"]))
        await self.driver.delete(sid)
        test.assertFalse(alive(info["pid"]), "the agent survived delete")
        test.assertFalse(alive(info["grandchild"]), "a grandchild survived delete")
        test.assertEqual(await self.driver.list_servers(), [])
        test.assertFalse(vm_dir.exists())
        if self.netns:
            test.assertEqual(self.our_namespaces(), [])
            test.assertEqual(self.our_links(), [self.bridge])
        # idempotent: again, and an id nobody knows
        await self.driver.delete(sid)
        await self.driver.delete("no-such-server")
        test.assertFalse([e for e in self.events if e.get("event") == "vm-process-died"])

    async def test_a_vm_whose_agent_dies_shows_error(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        self.mode["3"] = "die"
        sid, info = await self.boot_and_wait("3")

        async def errored() -> ServerStatus | None:
            server = await self.status_of(sid)
            return server if server is not None and server.status == ERROR else None

        server = await self.wait_for(errored, "the VM to show ERROR")
        test.assertIn("exited with status 3: agent up", server.fault or "")
        died = [e for e in self.events if e.get("event") == "vm-process-died"]
        test.assertEqual([e["server_id"] for e in died], [sid])
        # the orphaned grandchild is still the VM's, and delete ends it
        test.assertTrue(alive(info["grandchild"]))
        await self.driver.delete(sid)
        test.assertFalse(alive(info["grandchild"]))

    async def test_bad_agent_command_gives_a_clear_fault(self) -> None:
        """A missing executable is an ERROR VM whose fault says why; nothing is left after delete."""
        test: TestCase = self  # type: ignore[assignment]
        driver = self.make_driver(agent_argv=lambda request, broker: ["/nonexistent/vmcloud-agent"])
        sid = await driver.boot(self.request("bad"))

        async def errored() -> ServerStatus | None:
            server = await self.status_of(sid, driver)
            return server if server is not None and server.status == ERROR else None

        server = await self.wait_for(errored, "the VM to show ERROR")
        test.assertIn("No such file", server.fault or "")
        await driver.delete(sid)
        test.assertEqual(await driver.list_servers(), [])
        if self.netns:
            test.assertEqual(self.our_namespaces(), [])

    async def test_refused_boots_leave_nothing(self) -> None:
        """A duplicate vmid or a failing argv builder is refused with a CloudError, not a crash."""
        test: TestCase = self  # type: ignore[assignment]
        sid, _ = await self.boot_and_wait("d")
        with test.assertRaises(BadCloudRequest):
            await self.driver.boot(self.request("d"))

        def broken(request: BootRequest, broker: str) -> list[str]:
            raise KeyError("agent")

        await self.driver.stop(keep_vms=True)  # one driver per state dir: the next one takes over
        driver = self.make_driver(agent_argv=broken)
        with test.assertRaises(BadCloudRequest):
            await driver.boot(self.request("e"))
        test.assertEqual([s.server_id for s in await driver.list_servers()], [sid])
        test.assertEqual(len(self.state.child("local").globChildren("*.json")), 1)
        if self.netns:
            test.assertEqual(self.our_namespaces(), [self.layout.namespace("d")])
        failed = [e for e in self.events if e.get("event") == "vm-boot-failed"]
        test.assertEqual([e["vmid"] for e in failed], ["e"])

    async def test_quota(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        driver = self.make_driver(max_vms=1)
        await self.boot_and_wait("q1", driver)
        with test.assertRaises(QuotaExceeded):
            await driver.boot(self.request("q2"))
        test.assertEqual(len(await driver.list_servers()), 1)

    async def test_readopted_after_a_controller_crash(self) -> None:
        """A controller killed -9 leaves its VM running; the next one reports it and can delete it."""
        test: TestCase = self  # type: ignore[assignment]
        crash = self.out.child("crash.py")
        crash.setContent(CRASH_SCRIPT.encode())
        cfg = {
            "prefix": self.prefix,
            "state": self.state.path,
            "script": self.script.path,
            "out": self.info_path("crash").path,
            "netns": self.netns,
            "subnet": self.subnet,
            "bridge": self.bridge,
        }
        done = subprocess.run(
            [sys.executable, crash.path, json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO.path,
            env={**os.environ, "PYTHONPATH": REPO.path},
        )
        test.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        sid = done.stdout.strip()
        path = self.info_path("crash")

        async def started() -> bool:
            return path.exists()

        await self.wait_for(started, "the crashed controller's VM to start")
        info = json.loads(path.getContent())
        self.track(info["pid"], info["grandchild"])

        server = await self.status_of(sid)
        assert server is not None
        test.assertEqual(server.status, ACTIVE)
        test.assertEqual(dict(server.metadata), {"tag": "before-crash"})
        if self.netns:
            test.assertEqual(server.macs, (info["ifaces"]["eth0"]["mac"],))
        adopted = [e for e in self.events if e.get("event") == "vm-adopted"]
        test.assertEqual([e["server_id"] for e in adopted], [sid])

        await self.driver.delete(sid)
        test.assertFalse(alive(info["pid"]))
        test.assertFalse(alive(info["grandchild"]))
        test.assertEqual(await self.driver.list_servers(), [])

    async def test_adopted_vm_that_dies_shows_error(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        sid, info = await self.boot_and_wait("a")
        await self.driver.stop(keep_vms=True)
        second = self.make_driver()  # takes over the state dir, as a restarted controller would
        test.assertEqual((await self.status_of(sid, second) or ServerStatus("", "", "")).status, ACTIVE)
        os.kill(info["pid"], signal.SIGKILL)

        async def errored() -> ServerStatus | None:
            server = await self.status_of(sid, second)
            return server if server is not None and server.status == ERROR else None

        server = await self.wait_for(errored, "the adopted VM to show ERROR")
        test.assertIn("gone", server.fault or "")
        await second.delete(sid)
        test.assertFalse(alive(info["grandchild"]))

    async def test_stop_leaves_nothing_behind(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        _, info1 = await self.boot_and_wait("s1")
        _, info2 = await self.boot_and_wait("s2")
        await self.driver.stop(keep_vms=False)
        for info in (info1, info2):
            test.assertFalse(alive(info["pid"]))
            test.assertFalse(alive(info["grandchild"]))
        test.assertEqual(self.state.child("local").children(), [])
        if self.netns:
            test.assertEqual(self.our_namespaces(), [])
            test.assertEqual(self.our_links(), [])

    async def test_stop_keeping_vms(self) -> None:
        test: TestCase = self  # type: ignore[assignment]
        sid, info = await self.boot_and_wait("k1")
        await self.driver.stop(keep_vms=True)
        test.assertTrue(alive(info["pid"]))
        with test.assertRaises(CloudUnavailable):
            await self.driver.boot(self.request("k2"))
        successor = self.make_driver()
        test.assertEqual([s.server_id for s in await successor.list_servers()], [sid])


class LoopbackDriverTests(LocalDriverMixin, TestCase):
    """``netns=False``: what a laptop without root runs."""

    netns = False


class NamespaceDriverTests(LocalDriverMixin, TestCase):
    """``netns=True``: a namespace, veth and address per VM on an isolated bridge (needs root)."""

    netns = True
    if not netns_usable():
        skip = "network namespaces need root and a working `ip netns`"

    async def test_guest_reaches_the_host_on_the_bridge_address(self) -> None:
        """The broker's path: a guest connects to the bridge address, and the host sees its VM address."""
        await self.driver.prepare()
        peers: list[tuple[str, bytes]] = []
        got: Deferred[None] = Deferred()

        class Greeting(Protocol):
            def dataReceived(self, data: bytes) -> None:
                peers.append((self.transport.getPeer().host, data))
                if not got.called:
                    got.callback(None)

        port = reactor.listenTCP(0, Factory.forProtocol(Greeting), interface=self.layout.bridge_ip)
        self.addCleanup(port.stopListening)
        self.greet = f"{self.layout.bridge_ip}:{port.getHost().port}"
        sid, _ = await self.boot_and_wait("g")
        await got
        server = await self.status_of(sid)
        assert server is not None
        self.assertEqual(peers, [(server.ips[0], b"g\n")])

    async def test_stale_namespaces_and_veths_removed_at_start(self) -> None:
        """Leftovers of this prefix (and a process inside) go; another pool's namespace stays."""
        ns = self.layout.namespace("stale")
        other = NetnsLayout.from_strings(self.prefix + "x-", self.subnet, self.bridge).namespace("1")
        veth = self.layout.veth(200)
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        subprocess.run(["ip", "netns", "add", other], check=True, timeout=10)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", other], timeout=10)
        subprocess.run(
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True
        )
        sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"], start_new_session=True)
        self.addCleanup(sleeper.kill)
        self.track(sleeper.pid)

        async def inside() -> bool:
            return bool(
                subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip()
            )

        await self.wait_for(inside, "the stale process to enter its namespace")
        await self.driver.prepare()
        self.assertEqual(self.our_namespaces(), [])
        self.assertEqual(self.our_links(), [self.bridge])
        self.assertIn(other, [e["name"] for e in ip_json("netns", "list")])
        self.assertEqual(await deferLater(reactor, 0, sleeper.wait, 5), -signal.SIGKILL)
