"""Unit tests of the local driver's parts: /proc facts, the VM files, the process groups, the pool network.

Everything here runs in memory or in a temporary directory: a fake ``/proc`` tree, a
``MemoryReactorClock`` that records spawns, an ``ip`` runner that records commands.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.drivers.test_local_layout import RecordingRunner
from vmcloud.drivers.localfiles import RecordState, VmFiles, VmRecord
from vmcloud.drivers.localnet import PoolNetwork
from vmcloud.drivers.localproc import boot_id, group_members, process_start_time, stat_fields
from vmcloud.drivers.netns import HostNetwork, NetnsLayout
from vmcloud.drivers.supervisor import GroupSupervisor, describe_end
from vmcloud.pool.interfaces import BootRequest, GuestCredentials, QuotaExceeded


def _defer(coro):  # type: ignore[no-untyped-def]
    return Deferred.fromCoroutine(coro)


def stat_line(pid: int, comm: str, state: str, pgid: int, start: int) -> str:
    """A ``/proc/<pid>/stat`` line: pid (comm) state ppid pgrp ... starttime (field 22) ..."""
    rest = [state, "1", str(pgid)] + ["0"] * 16 + [str(start), "0", "0"]
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


class FakeProc:
    """A ``/proc`` tree with the stat files and boot id the driver reads."""

    def __init__(self, root: str, boot: str = "boot-1") -> None:
        self.root = root
        os.makedirs(os.path.join(root, "sys", "kernel", "random"))
        with open(os.path.join(root, "sys", "kernel", "random", "boot_id"), "w") as f:
            f.write(boot + "\n")

    def add(self, pid: int, *, pgid: int, start: int, state: str = "S", comm: str = "agent") -> None:
        os.makedirs(os.path.join(self.root, str(pid)), exist_ok=True)
        with open(os.path.join(self.root, str(pid), "stat"), "w") as f:
            f.write(stat_line(pid, comm, state, pgid, start))

    def remove(self, pid: int) -> None:
        os.remove(os.path.join(self.root, str(pid), "stat"))
        os.rmdir(os.path.join(self.root, str(pid)))


def record(**kw: object) -> VmRecord:
    fields: dict[str, object] = {
        "server_id": "s1",
        "vmid": "7",
        "name": "p-7",
        "metadata": {"vmid": "7"},
        "pid": 4000,
        "pgid": 4000,
        "start_time": 555,
        "boot_id": "boot-1",
        "created": 1.0,
    }
    fields.update(kw)
    return VmRecord(**fields)  # type: ignore[arg-type]


class ProcTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.proc = FakeProc(self.mktemp())

    def test_a_command_name_with_spaces_and_parentheses_is_skipped(self) -> None:
        self.proc.add(42, pgid=40, start=1234, comm="a (weird) name")
        fields = stat_fields(42, self.proc.root)
        assert fields is not None
        self.assertEqual((fields[0], fields[2], fields[19]), ("S", "40", "1234"))
        self.assertEqual(process_start_time(42, self.proc.root), 1234)

    def test_gone_and_zombie_processes_have_no_start_time(self) -> None:
        self.proc.add(43, pgid=43, start=9, state="Z")
        self.assertIsNone(process_start_time(43, self.proc.root))
        self.assertIsNone(process_start_time(44, self.proc.root))
        self.assertIsNone(stat_fields(44, self.proc.root))

    def test_group_members_are_the_live_processes_of_the_group(self) -> None:
        self.proc.add(50, pgid=50, start=1)
        self.proc.add(51, pgid=50, start=2)
        self.proc.add(52, pgid=50, start=3, state="Z")
        self.proc.add(53, pgid=60, start=4)
        self.assertEqual(sorted(group_members(50, self.proc.root)), [50, 51])

    def test_boot_id(self) -> None:
        self.assertEqual(boot_id(self.proc.root), "boot-1")
        self.assertEqual(boot_id(self.mktemp()), "")


class VmFilesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files = VmFiles(FilePath(self.mktemp()).child("local"))
        self.files.create()

    def test_the_directory_is_private(self) -> None:
        self.assertEqual(stat.S_IMODE(os.stat(self.files.root.path).st_mode), 0o700)

    def test_saved_records_load_again_and_bad_ones_are_moved_aside(self) -> None:
        one, two = record(server_id="a", created=1.0), record(server_id="b", state=RecordState.DIED)
        self.files.save(one)
        self.files.save(two)
        self.files.root.child("c.json").setContent(b"{not json")
        self.assertEqual(self.files.load(), [one, two])
        self.assertTrue(self.files.root.child("c.json.bad").exists())
        self.assertFalse(self.files.root.child("c.json").exists())

    def test_a_vm_dir_holds_private_user_data_naming_its_work_dir(self) -> None:
        request = BootRequest("7", "p-7", {}, GuestCredentials("x", "vm-7", "secret"))
        user_data = self.files.make_vm_dir("s1", request, "tcp:127.0.0.1:61613", "none")
        self.assertEqual(stat.S_IMODE(os.stat(user_data.path).st_mode), 0o600)
        text = user_data.getContent().decode()
        self.assertIn("passcode = secret", text)
        self.assertIn(f"workdir = {self.files.vm_dir('s1').child('work').path}", text)
        self.assertTrue(self.files.vm_dir("s1").child("work").isdir())
        self.assertRaises(OSError, self.files.make_vm_dir, "s1", request, "b", "auto")  # never twice

    def test_forget_removes_record_and_directory(self) -> None:
        self.files.save(record())
        self.files.vm_dir("s1").makedirs()
        self.files.forget("s1")
        self.files.forget("s1")  # and again: nothing left to remove
        self.assertEqual(self.files.root.children(), [])

    def test_unknown_directories_go_records_stay(self) -> None:
        for name in ("known", "unknown"):
            self.files.vm_dir(name).makedirs()
        self.files.save(record(server_id="unknown"))
        self.files.remove_unknown(["known"])
        self.assertEqual(sorted(c.basename() for c in self.files.root.children()), ["known", "unknown.json"])

    def test_console_tail_is_the_last_line(self) -> None:
        self.assertEqual(self.files.console_tail("s1"), "(no console output)")
        self.files.vm_dir("s1").makedirs()
        self.files.console_log("s1").setContent(b"starting\n" + b"x" * 1000 + b"\nTraceback: boom\n\n")
        self.assertEqual(self.files.console_tail("s1"), "Traceback: boom")


class Spawned:
    """What a process transport tells: its pid."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid


@implementer(IReactorProcess)
class SpawnRecorder(Clock):
    """A Clock that records spawnProcess calls and starts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.pid: int | None = 4000

    def spawnProcess(self, protocol: Any, executable: Any, args: Any, **kw: Any) -> Any:
        self.spawned.append({"protocol": protocol, "executable": executable, "args": args, **kw})
        return Spawned(self.pid)


class GroupSupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = SpawnRecorder()
        self.proc = FakeProc(self.mktemp())
        self.signals: list[tuple[int, int]] = []
        self.groups = GroupSupervisor(
            self.reactor,
            self.reactor,
            setsid="/usr/bin/setsid",
            kill_grace=5.0,
            proc=self.proc.root,
            signal_group=lambda pgid, sig: self.signals.append((pgid, sig)),
        )
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.ended: list[tuple[str, str]] = []

    def spawn(self, server_id: str = "s1") -> int | None:
        return self.groups.spawn(
            server_id,
            ["agent", "--flag"],
            {"PATH": "/bin"},
            self.dir,
            self.dir.child("console.log"),
            lambda sid, how: self.ended.append((sid, how)),
        )

    def test_the_leader_starts_a_session_with_no_pipes(self) -> None:
        self.assertEqual(self.spawn(), 4000)
        (call,) = self.reactor.spawned
        self.assertEqual(call["executable"], "/usr/bin/setsid")
        self.assertEqual(call["args"], ["/usr/bin/setsid", "agent", "--flag"])
        self.assertEqual((call["env"], call["path"]), ({"PATH": "/bin"}, self.dir.path))
        self.assertEqual(sorted(call["childFDs"]), [0, 1, 2])
        self.assertTrue(all(isinstance(fd, int) for fd in call["childFDs"].values()))  # files, no pipes
        self.assertTrue(self.dir.child("console.log").exists())
        self.assertTrue(self.groups.spawned("s1"))

    def test_the_owner_hears_how_the_leader_ended(self) -> None:
        self.spawn()
        self.reactor.spawned[0]["protocol"].processEnded(Failure(ProcessTerminated(exitCode=3)))
        self.assertEqual(self.ended, [("s1", "exited with status 3")])
        self.assertFalse(self.groups.spawned("s1"))

    def test_describe_end(self) -> None:
        self.assertEqual(describe_end(Failure(ProcessDone(0))), "exited with status 0")
        self.assertEqual(describe_end(Failure(ProcessTerminated(signal=9))), "killed by signal 9")

    def test_a_recycled_pid_is_not_our_leader_nor_our_group(self) -> None:
        ours = record(pid=4000, pgid=4000, start_time=555)
        self.proc.add(4000, pgid=4000, start=555)
        self.assertTrue(self.groups.leader_alive(ours))
        self.assertTrue(self.groups.group_is_ours(ours))
        self.proc.add(4000, pgid=4000, start=999)  # another process got the pid
        self.assertFalse(self.groups.leader_alive(ours))
        self.assertFalse(self.groups.group_is_ours(ours))
        self.proc.remove(4000)  # the leader is gone, members of its group may live on
        self.assertFalse(self.groups.leader_alive(ours))
        self.assertTrue(self.groups.group_is_ours(ours))
        self.proc.add(4000, pgid=4000, start=555)
        self.assertFalse(self.groups.leader_alive(ours, this_boot="boot-2"))  # recorded before a reboot

    def test_reap_kills_a_group_that_ignores_sigterm_after_the_grace(self) -> None:
        self.proc.add(4000, pgid=4000, start=555)
        self.proc.add(4001, pgid=4000, start=556)
        reaped = _defer(self.groups.reap(record()))
        self.reactor.pump([0.05] * 99)  # 4.95 s
        self.assertEqual(self.signals, [])
        self.reactor.pump([0.05] * 2)
        self.assertEqual(self.signals, [(4000, signal.SIGKILL)])
        self.proc.remove(4000)
        self.proc.remove(4001)
        self.reactor.advance(0.05)
        self.successResultOf(reaped)

    def test_reap_gives_up_on_processes_that_survive_sigkill(self) -> None:
        self.proc.add(4000, pgid=4000, start=555)
        reaped = _defer(self.groups.reap(record()))
        self.reactor.pump([0.05] * 250)
        self.successResultOf(reaped)
        self.assertEqual(self.signals, [(4000, signal.SIGKILL)])

    def test_abandon_kills_the_group_at_once(self) -> None:
        self.spawn()
        self.groups.abandon("s1")
        self.groups.abandon("s1")  # only once
        self.assertFalse(self.groups.spawned("s1"))
        self.assertEqual(self.signals, [(4000, signal.SIGKILL)])

    def test_a_leader_reaped_within_the_spawn_has_no_pid(self) -> None:
        self.reactor.pid = None
        self.assertIsNone(self.spawn())
        self.groups.abandon("s1")
        self.assertEqual(self.signals, [(0, signal.SIGKILL)])  # which signal_group ignores


class PoolNetworkTests(SynchronousTestCase):
    def network(self, runner: RecordingRunner, bridge: str = "tbr0") -> PoolNetwork:
        return PoolNetwork(
            HostNetwork(runner),
            Clock(),
            ip="ip",
            prefix="p-",
            owner="/srv/a",
            tag="abcd",
            bridge=bridge,
            subnet=None,
            host_lock=os.path.join(self.mktemp(), "net.lock"),
        )

    def test_free_slot_is_the_lowest_unused(self) -> None:
        network = self.network(RecordingRunner())
        plan = NetnsLayout.from_strings("p-", "10.252.9.0/29", "tbr0", "/srv/a")
        self.assertEqual(network.free_slot(plan, [None, 2]), 1)
        self.assertEqual(network.free_slot(plan, [1, None, 3]), 2)
        self.assertRaises(QuotaExceeded, network.free_slot, plan, range(1, plan.max_slot + 1))

    def test_commands_enter_the_vms_namespace(self) -> None:
        plan = NetnsLayout.from_strings("p-", "10.252.9.0/24", "tbr0", "/srv/a")
        net = plan.vm_network("7", "p-7", 1)
        argv = self.network(RecordingRunner()).inside(net, ["agent"])
        self.assertEqual(argv, ["ip", "netns", "exec", net.namespace, "agent"])

    def test_only_stale_names_of_this_pool_are_removed(self) -> None:
        plan = NetnsLayout.from_strings("p-", "10.252.9.0/24", "tbr0", "/srv/a")
        live, stale = plan.vm_network("1", "p-1", 1), plan.vm_network("2", "p-2", 2)
        other = NetnsLayout.from_strings("p-", "10.252.8.0/24", "tbr1", "/srv/b").vm_network("3", "p-3", 3)
        namespaces = [{"name": n.namespace} for n in (live, stale, other)]
        links = [{"ifname": n} for n in (live.veth, stale.veth, other.veth, "eth0")]
        runner = RecordingRunner(
            outputs={"netns list": json.dumps(namespaces), "link show": json.dumps(links)}
        )
        network = self.network(runner)
        self.successResultOf(_defer(network.remove_stale([live])))
        self.assertEqual(runner.calls, [])  # no bridge set up: nothing is known to be ours
        network.layout = plan
        self.successResultOf(_defer(network.remove_stale([live, None])))
        removed = [" ".join(c) for c in runner.calls if "del" in c]
        self.assertEqual(removed, [f"ip netns del {stale.namespace}", f"ip link del {stale.veth}"])
