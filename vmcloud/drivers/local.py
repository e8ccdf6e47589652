"""The ``local`` cloud driver: VMs as supervised groups of local processes.

So that a laptop without OpenStack runs the whole system, a "VM" here is a process group started
by the controller: the guest agent (and whatever it starts, later the browser stack), in its own
session so that one ``killpg`` ends all of it.  As root, every VM also gets a network namespace
with its own MAC and IP on an isolated bridge (see :mod:`vmcloud.drivers.netns`), so the agent
finds its identity and the broker exactly as in a Nova server.  Without root the VMs share the
host's loopback and identify themselves by their per-VM STOMP login.

Each VM has a directory ``<state_dir>/local/<server_id>/`` that is its working directory:

- ``user-data.ini`` (mode 0600): ``[agent]`` with ``broker``, ``login`` and ``passcode``, the
  user-data a Nova guest would get; its absolute path is also in ``$VMCLOUD_USER_DATA``.  Nothing
  secret goes on a command line, where ``ps`` would show it to every local user.
- ``console.log``: the group's stdout and stderr, written by the processes themselves, so that
  they keep running (and logging) when the controller dies.

and a record ``<state_dir>/local/<server_id>.json`` (server id, name, pid, pgid, start time,
namespace, IP, MAC, metadata, state), so that a restarted controller re-adopts the VMs that are
still alive and really kills those the pool deletes.

One daemon per state directory: the driver holds ``<state_dir>/local.lock``
(:class:`~vmcloud.drivers.claims.StateDirClaim`) from :meth:`LocalDriver.prepare` (or
:meth:`LocalDriver.claim_state_dir`, which the composition root calls before anything reads the
state dir) until :meth:`LocalDriver.stop`.  Daemons with different state directories share the host
safely: their bridge, namespaces, veths and subnet are derived from the state directory, and a
bridge made by another daemon is never used nor removed (see :mod:`vmcloud.drivers.netns`).
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from vmcloud.drivers.claims import (
    HOST_LOCK_PATH,
    HostInUse,
    HostLock,
    StateDirClaim,
    boot_id,
    describe_owner,
    process_start_time,
    stat_fields,
)
from vmcloud.drivers.netns import (
    SYSTEM_PATH,
    HostNetwork,
    NetnsLayout,
    NetworkCommandError,
    VmNetwork,
    bridge_alias,
    check_bridge_name,
    check_subnet,
    choose_subnet,
    derived_bridge,
    find_tool,
    pool_tag,
    process_runner,
)
from vmcloud.pool.interfaces import (
    ACTIVE,
    DELETING,
    ERROR,
    BadCloudRequest,
    BootRequest,
    CloudError,
    CloudUnavailable,
    ICloudDriver,
    QuotaExceeded,
    ServerStatus,
)

log = Logger()

#: The VM's user-data file, relative to its working directory.
USER_DATA_FILE = "user-data.ini"
#: The guest agent's ``workdir`` (files and commands), relative to the VM's working directory.
WORK_DIR = "work"
#: Where the VM's processes write their stdout and stderr, relative to its working directory.
CONSOLE_LOG_FILE = "console.log"

#: What VM processes inherit of the daemon's environment (see :func:`vm_environment`; plus ``HOME``,
#: the VM's directory, and ``VMCLOUD_VMID``, ``VMCLOUD_SERVER_ID``, ``VMCLOUD_USER_DATA``).
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")

#: Builds the argv of a VM's processes from the boot request and the broker address as the guest
#: sees it (a twisted client endpoint description).
AgentArgv = Callable[[BootRequest, str], list[str]]

_RECORD_VERSION = 1

# Record states; they map onto ServerStatus.status (ACTIVE, ERROR, DELETING).
_RUNNING = "running"
_DIED = "died"
_DELETING = "deleting"
_STATUS = {_RUNNING: ACTIVE, _DIED: ERROR, _DELETING: DELETING}


def guest_agent_argv(python: str = sys.executable) -> AgentArgv:
    """The argv of the real guest agent: ``python -m twisted vmcloud-guest --user-data user-data.ini``.

    The broker address and credentials reach the agent through the user-data file in the VM's
    working directory, never through the command line.
    """

    def argv(request: BootRequest, broker: str) -> list[str]:
        # ``python -m twisted`` is ``twist``: it never daemonizes, so the agent stays the leader of
        # the VM's process group and logs to console.log.
        # Text logs: the console's last line is quoted as the reason when an agent dies.
        return [python, "-m", "twisted", "--log-format=text", "vmcloud-guest", "--user-data", USER_DATA_FILE]

    return argv


def vm_environment(daemon_environ: Mapping[str, str]) -> dict[str, str]:
    """The base environment of VM processes: :data:`PASSED_ENVIRONMENT` of the daemon's, never all of it.

    The daemon's environment may hold cloud credentials (``OS_PASSWORD``) that a VM, which runs a
    browser on untrusted pages, must not see.  The composition root passes the result to
    :class:`LocalDriver`, which reads no environment itself.
    """
    env = {name: daemon_environ[name] for name in PASSED_ENVIRONMENT if name in daemon_environ}
    env.setdefault("PATH", SYSTEM_PATH)
    return env


# --------------------------------------------------------------------------- processes, by /proc


def group_members(pgid: int, proc: str = "/proc") -> list[int]:
    """Live (non-zombie) processes in a process group; a scan of /proc, fine for a teardown."""
    members = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            fields = stat_fields(int(entry), proc)
            if fields and len(fields) > 2 and fields[0] not in ("Z", "X") and fields[2] == str(pgid):
                members.append(int(entry))
    return members


# --------------------------------------------------------------------------- the record


@attrs.frozen
class VmRecord:
    """One VM as the driver remembers it, in memory and in ``<server_id>.json``."""

    server_id: str
    vmid: str
    name: str
    metadata: Mapping[str, str]
    pid: int
    pgid: int
    start_time: int | None
    boot_id: str
    created: float
    state: str = _RUNNING
    fault: str | None = None
    slot: int | None = None
    network: VmNetwork | None = None

    def to_json(self) -> bytes:
        data = attrs.asdict(self, recurse=True)
        data["metadata"] = dict(self.metadata)
        data["version"] = _RECORD_VERSION
        return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> VmRecord:
        """Parse a record; raises ValueError saying what is wrong."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.pop("version", None) != _RECORD_VERSION:
                raise ValueError(f"not a version {_RECORD_VERSION} VM record")
            net = data.pop("network", None)
            metadata = data.pop("metadata", {})
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not an object")
            record = cls(
                network=VmNetwork(**net) if net is not None else None,
                metadata={str(k): str(v) for k, v in metadata.items()},
                **data,
            )
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"bad VM record: {e}") from e
        if not isinstance(record.pid, int) or record.pid <= 1 or record.state not in _STATUS:
            raise ValueError(f"bad VM record: pid {record.pid!r}, state {record.state!r}")
        return record

    def status(self) -> ServerStatus:
        return ServerStatus(
            server_id=self.server_id,
            name=self.name,
            status=_STATUS[self.state],
            macs=(self.network.mac,) if self.network else (),
            ips=(self.network.ip,) if self.network else (),
            metadata=dict(self.metadata),
            fault=self.fault,
        )


class _GroupLeader(ProcessProtocol):
    """Tells the driver when the first process of a VM (the one it spawned) ends."""

    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self._ended = ended

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self._ended(reason)


def _describe_end(reason: Failure) -> str:
    if reason.check(ProcessDone):
        return "exited with status 0"
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


# --------------------------------------------------------------------------- the driver


@implementer(ICloudDriver)
class LocalDriver:
    """Boots VMs as local process groups, in network namespaces when root (``netns``).

    Call :meth:`prepare` at start (every other method awaits it anyway): it claims the state dir,
    decides the mode, re-adopts the VMs of a previous run, checks that the bridge is free or its
    own, creates it and removes its own stale namespaces and veths.  Call :meth:`stop` at shutdown.
    ``bridge`` and ``subnet`` None (the default) derive both from the state dir: the bridge
    ``vmcb<tag>``, the first free /24 of :data:`~vmcloud.drivers.netns.AUTO_SUBNETS` from the tag
    on.  What belongs to another daemon refuses :meth:`prepare` with
    :class:`~vmcloud.drivers.claims.HostInUse`, whose message says whose and what to do.
    """

    name = "local"

    def __init__(
        self,
        reactor: IReactorProcess,
        *,
        prefix: str,
        state_dir: FilePath[str],
        agent_argv: AgentArgv,
        max_vms: int = 8,
        netns: bool | None = None,
        broker_port: int = 61613,
        subnet: str | None = None,
        bridge: str | None = None,
        kill_grace: float = 5.0,
        environ: Mapping[str, str] | None = None,
        proc: str = "/proc",
        host_lock: str = HOST_LOCK_PATH,
        browser: str = "auto",
    ) -> None:
        """``environ`` is the base environment of the VMs' processes (see :func:`vm_environment`).

        None means only ``PATH``: the driver never reads the daemon's environment itself.
        ``subnet`` and ``bridge`` raise ValueError when malformed; None derives them.
        ``browser`` goes into every VM's user-data: ``auto`` (the real stack where installed) or
        ``none`` (agents without a browser: a pool of command runners, or tests of the pool's rules).
        """
        if max_vms < 0:
            raise ValueError(f"max_vms must be >= 0, not {max_vms}")
        self.prefix = prefix
        self.max_vms = max_vms
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._agent_argv = agent_argv
        self._netns = netns
        self._broker_port = broker_port
        # names are derived from the resolved path: a symlink to the state dir is the same daemon
        self._owner = os.path.realpath(state_dir.path)
        self._tag = pool_tag(self._owner, prefix)
        self._bridge = check_bridge_name(bridge) if bridge else derived_bridge(self._tag)
        self._subnet = check_subnet(subnet) if subnet else None
        self._layout_decided: NetnsLayout | None = None
        self._ip = find_tool("ip")
        self._host = HostNetwork(process_runner(reactor), self._ip, find_tool("bridge"))
        self._host_lock = host_lock
        self._setsid = find_tool("setsid")
        self._kill_grace = kill_grace
        self._browser = browser
        self._environ = environ if environ is not None else {"PATH": SYSTEM_PATH}
        self._proc = proc
        self._claim = StateDirClaim(self._owner, proc)
        self._dir = state_dir.child("local")
        self._vms: dict[str, VmRecord] = {}
        self._children: dict[str, IProcessTransport] = {}  # VMs this process spawned
        self._booting: dict[str, tuple[int | None, VmNetwork | None]] = {}  # server id -> slot, network
        self._booting_vmids: set[str] = set()
        self._boots: dict[str, Deferred[None]] = {}
        self._prepare_lock = DeferredLock()
        self._prepared = False
        self._refused: HostInUse | None = None
        self._stopping = False
        self._stopped = False
        self._delete_locks: dict[str, DeferredLock] = {}

    # ------------------------------------------------------------------ start and stop

    @property
    def uses_netns(self) -> bool:
        """Whether VMs get namespaces; known once :meth:`prepare` ran (or netns was given)."""
        if self._netns is None:
            raise RuntimeError("LocalDriver.prepare() must run before the mode is known")
        return self._netns

    @property
    def layout(self) -> NetnsLayout:
        """The names and addresses of this daemon's VMs; known once :meth:`prepare` ran in netns mode."""
        if self._layout_decided is None:
            raise RuntimeError("LocalDriver.prepare() must run (in netns mode) before the subnet is known")
        return self._layout_decided

    @property
    def bridge(self) -> str:
        """The bridge's name (configured, or derived from the state dir)."""
        return self._bridge

    def broker_listen_interface(self) -> str | None:
        """The extra address the embedded broker must listen on for guests: the bridge's, in netns mode."""
        return self.layout.bridge_ip if self.uses_netns else None

    def broker_for_guest(self) -> str:
        """The broker as a guest reaches it (a client endpoint description)."""
        host = self.layout.bridge_ip if self.uses_netns else "127.0.0.1"
        return f"tcp:{host}:{self._broker_port}"

    def claim_state_dir(self) -> None:
        """Take ``<state_dir>/local.lock`` now; :class:`HostInUse` when another daemon holds it.

        :meth:`prepare` does it too; the composition root calls this first, so that a second
        daemon on one state dir is refused before it reads or writes anything there.
        """
        os.makedirs(self._owner, exist_ok=True)
        self._claim.acquire()

    async def prepare(self) -> None:
        """Claim the state dir, decide the mode, re-adopt VMs, set up the bridge, remove stale leftovers.

        Raises :class:`HostInUse` (every time, once refused) when what it needs belongs to another daemon.
        """
        async with self._prepare_lock:
            if self._refused is not None:
                raise self._refused
            if self._stopped:
                raise CloudUnavailable("the local driver has stopped")
            if self._prepared:
                return
            try:
                await self._prepare()
            except HostInUse as e:
                self._refused = e
                self._claim.release()
                log.error(
                    "Local driver refused to start: {reason}", reason=str(e), event="local-driver-refused"
                )
                raise
            self._prepared = True
        for record in list(self._vms.values()):
            if record.state == _DELETING:
                log.info("Resuming the deletion of VM {server_id}", server_id=record.server_id)
                Deferred.fromCoroutine(self.delete(record.server_id)).addErrback(
                    _log_delete_failure, server_id=record.server_id
                )

    async def _prepare(self) -> None:
        self.claim_state_dir()
        if self._netns is None:
            self._netns = os.geteuid() == 0 and await self._host.available()
        log.info(
            "Local driver for prefix {prefix}: network namespaces {netns}, state in {path}",
            prefix=self.prefix,
            netns=f"on (bridge {self._bridge})" if self._netns else "off",
            path=self._dir.path,
        )
        self._dir.makedirs(ignoreExistingDirectory=True)
        self._dir.chmod(0o700)
        self._adopt_recorded()
        if self._netns:
            try:
                async with HostLock(self._host_lock, self._clock):
                    subnet = choose_subnet(
                        await self._host.view(self._bridge),
                        bridge=self._bridge,
                        state_dir=self._owner,
                        tag=self._tag,
                        subnet=self._subnet,
                        describe_owner=lambda owner: describe_owner(owner, self._proc),
                    )
                    layout = NetnsLayout(
                        prefix=self.prefix, subnet=subnet, bridge=self._bridge, state_dir=self._owner
                    )
                    await self._host.ensure_bridge(layout, bridge_alias(self._owner))
            except NetworkCommandError as e:
                raise CloudUnavailable(f"cannot set up bridge {self._bridge}: {e}") from e
            except OSError as e:  # the host lock's directory or file
                raise CloudUnavailable(f"cannot lock {self._host_lock}: {e}") from e
            self._layout_decided = layout
            log.info(
                "Local driver bridge {bridge} at {address}/{prefixlen}; names tagged {tag}",
                bridge=self._bridge,
                address=layout.bridge_ip,
                prefixlen=subnet.prefixlen,
                tag=self._tag,
                event="local-driver-bridge",
            )
        await self.cleanup_stale()

    def _adopt_recorded(self) -> None:
        """Load every record; VMs whose leader process is gone are marked died."""
        this_boot = boot_id(self._proc)
        for path in sorted(self._dir.globChildren("*.json")):
            try:
                record = VmRecord.from_json(path.getContent())
            except (OSError, ValueError) as e:
                log.error(
                    "Ignoring unreadable VM record {path}: {error}; moved aside to .bad",
                    path=path.path,
                    error=str(e),
                    event="vm-record-bad",
                )
                path.moveTo(path.siblingExtension(".bad"))
                continue
            self._vms[record.server_id] = record
            if record.state == _RUNNING and not self._leader_alive(record, this_boot):
                record = self._mark_died(record, "the agent process ended while the controller was down")
            log.info(
                "Re-adopted VM {server_id} ({name}), pid {pid}, {state}",
                server_id=record.server_id,
                name=record.name,
                pid=record.pid,
                state=record.state,
                event="vm-adopted",
            )

    def _leader_alive(self, record: VmRecord, this_boot: str | None = None) -> bool:
        this_boot = boot_id(self._proc) if this_boot is None else this_boot
        return record.boot_id == this_boot and process_start_time(record.pid, self._proc) == record.start_time

    async def cleanup_stale(self) -> None:
        """Remove this pool's namespaces, veths and VM directories that no recorded VM owns.

        Only names carrying this daemon's tag (its state dir and prefix) are ever touched, and
        only while it holds the state dir's claim, so no other running daemon can own them.
        """
        if not self._claim.held:
            return
        owned = {r.server_id for r in self._vms.values()} | set(self._booting)
        for child in self._dir.children():
            if child.isdir() and child.basename() not in owned:
                log.info("Removing the directory of unknown VM {path}", path=child.path)
                child.remove()
        if not self._netns or self._layout_decided is None:
            return
        layout = self._layout_decided
        nets = [r.network for r in self._vms.values()] + [net for _, net in self._booting.values()]
        live_ns = {n.namespace for n in nets if n is not None}
        live_veths = {n.veth for n in nets if n is not None}
        for ns in await self._host.namespaces():
            if layout.is_pool_namespace(ns) and ns not in live_ns:
                pids = await self._host.namespace_pids(ns)
                log.warn(
                    "Removing stale namespace {netns} (killing {count} processes in it)",
                    netns=ns,
                    count=len(pids),
                    event="vm-stale-netns",
                )
                for pid in pids:
                    _signal(pid, signal.SIGKILL)
                await self._host.destroy(ns, None)
        for link in await self._host.links():
            if layout.is_pool_veth(link) and link not in live_veths:
                log.warn("Removing stale veth {veth}", veth=link, event="vm-stale-veth")
                await self._host.destroy(None, link)

    async def stop(self, keep_vms: bool) -> None:
        """Stop for daemon shutdown: leave the VMs running for the next run, or remove everything.

        Either way the state dir's claim goes, so a successor can start; a driver that was refused,
        or stopped already, does nothing more (what it would remove is not its own).
        """
        if self._stopped or self._refused is not None:
            self._stopped = True
            self._claim.release()
            return
        self._stopping = True
        try:
            if self._boots:
                await gatherResults(list(self._boots.values()), consumeErrors=True)
            if keep_vms:
                log.info("Local driver stopped; {count} VMs left running", count=len(self._vms))
                return
            await self.prepare()  # a driver stopped before it started still removes a previous run's VMs
            await gatherResults([Deferred.fromCoroutine(self.delete(sid)) for sid in list(self._vms)])
            await self.cleanup_stale()
            if self._layout_decided is not None:
                await self._host.remove_bridge(self._layout_decided.bridge)
            log.info("Local driver stopped; every VM removed", event="local-driver-stopped")
        finally:
            self._stopped = True
            self._claim.release()

    # ------------------------------------------------------------------ ICloudDriver

    async def boot(self, request: BootRequest) -> str:
        """Start one VM; returns its server id.  QuotaExceeded past ``max_vms``."""
        await self.prepare()
        if self._stopping:
            raise CloudUnavailable("the local driver is stopping")
        if not request.name.startswith(self.prefix):
            raise BadCloudRequest(f"server name {request.name!r} lacks the prefix {self.prefix!r}")
        creds = request.credentials
        if any(c in v for v in (creds.broker, creds.login, creds.passcode) for c in "\r\n\0"):
            raise BadCloudRequest("guest credentials must not contain line breaks")
        if any(r.vmid == request.vmid for r in self._vms.values()) or request.vmid in self._booting_vmids:
            # never two VMs of one vmid: they would share a namespace name, and tearing down
            # a failed boot would take the running VM's network with it
            raise BadCloudRequest(f"a VM with vmid {request.vmid!r} already exists")
        if len(self._vms) + len(self._booting) >= self.max_vms:
            raise QuotaExceeded(f"the local driver runs at most {self.max_vms} VMs", retry_after=30.0)
        slot = self._free_slot() if self.uses_netns else None
        net = self.layout.vm_network(request.vmid, request.name, slot) if slot is not None else None
        server_id = uuid.uuid4().hex
        self._booting[server_id] = (slot, net)
        self._booting_vmids.add(request.vmid)
        done: Deferred[None] = Deferred()
        self._boots[server_id] = done
        try:
            return await self._boot(server_id, slot, net, request)
        finally:
            del self._booting[server_id]
            self._booting_vmids.discard(request.vmid)
            del self._boots[server_id]
            done.callback(None)

    def _free_slot(self) -> int:
        used = {r.slot for r in self._vms.values()} | {slot for slot, _ in self._booting.values()}
        for slot in range(1, self.layout.max_slot + 1):
            if slot not in used:
                return slot
        raise QuotaExceeded(f"no free address left in {self.layout.subnet}", retry_after=30.0)

    async def _boot(
        self, server_id: str, slot: int | None, net: VmNetwork | None, request: BootRequest
    ) -> str:
        vm_dir = self._dir.child(server_id)
        transport = None
        try:
            vm_dir.makedirs()
            vm_dir.chmod(0o700)
            workdir = vm_dir.child(WORK_DIR)
            workdir.makedirs()
            user_data = vm_dir.child(USER_DATA_FILE)
            _write_private(user_data, user_data_ini(request, self.broker_for_guest(), workdir, self._browser))
            if net is not None:
                await self._host.create(net, self.layout.bridge)
            argv = self._agent_argv(request, self.broker_for_guest())
            if net is not None:
                argv = [self._ip, "netns", "exec", net.namespace, *argv]
            argv = [self._setsid, *argv]
            env = dict(self._environ)
            env.update(
                HOME=vm_dir.path,
                VMCLOUD_VMID=request.vmid,
                VMCLOUD_SERVER_ID=server_id,
                VMCLOUD_USER_DATA=user_data.path,
            )
            transport = self._spawn(server_id, argv, env, vm_dir)
            pid = transport.pid
            if pid is None:  # reaped within spawnProcess: it could not even start
                raise BadCloudRequest(f"the VM's first process exited at once: {self._console_tail(vm_dir)}")
            record = VmRecord(
                server_id=server_id,
                vmid=request.vmid,
                name=request.name,
                metadata=dict(request.metadata),
                pid=pid,
                pgid=pid,  # setsid makes the first process the leader of a new group
                start_time=process_start_time(pid, self._proc),
                boot_id=boot_id(self._proc),
                created=self._clock.seconds(),
                slot=slot,
                network=net,
            )
            self._save(record)
        except Exception as e:
            if transport is not None:
                self._children.pop(server_id, None)
                _signal_group(transport.pid or 0, signal.SIGKILL)
            if net is not None:
                await self._host.destroy(net.namespace, net.veth)
            if vm_dir.exists():
                vm_dir.remove()
            log.error(
                "Could not boot VM {vmid}: {error}",
                vmid=request.vmid,
                error=str(e),
                event="vm-boot-failed",
            )
            if isinstance(e, CloudError | CancelledError):
                raise
            if isinstance(e, NetworkCommandError):
                raise CloudUnavailable(f"cannot set up the VM's network: {e}") from e
            raise BadCloudRequest(f"cannot start the VM's processes: {e}") from e
        self._vms[server_id] = record
        log.info(
            "Booted VM {vmid} as {server_id}: pid {pid}, namespace {netns}, ip {ip}, mac {mac}",
            vmid=request.vmid,
            server_id=server_id,
            pid=record.pid,
            netns=net.namespace if net else None,
            ip=net.ip if net else None,
            mac=net.mac if net else None,
            event="vm-booted",
        )
        return server_id

    @staticmethod
    def _console_tail(vm_dir: FilePath[str]) -> str:
        """The last line the VM's processes wrote, which usually says why they ended."""
        try:
            with open(vm_dir.child(CONSOLE_LOG_FILE).path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 400))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return "(no console output)"
        return lines[-1][-200:] if lines else "(no console output)"

    def _spawn(
        self, server_id: str, argv: list[str], env: dict[str, str], vm_dir: FilePath[str]
    ) -> IProcessTransport:
        """Start the VM's first process with stdio on /dev/null and the console log, no pipes.

        Without pipes to the controller the VM outlives a controller crash instead of dying of
        SIGPIPE on its next log line.
        """
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            console = os.open(
                vm_dir.child(CONSOLE_LOG_FILE).path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        except OSError:
            os.close(stdin)
            raise
        try:
            transport = self._reactor.spawnProcess(
                _GroupLeader(lambda reason: self._leader_ended(server_id, reason)),
                argv[0],
                argv,
                env=env,
                path=vm_dir.path,
                childFDs={0: stdin, 1: console, 2: console},
            )
        finally:
            os.close(stdin)
            os.close(console)
        self._children[server_id] = transport
        return transport

    def _leader_ended(self, server_id: str, reason: Failure) -> None:
        self._children.pop(server_id, None)
        record = self._vms.get(server_id)
        how = _describe_end(reason)
        if record is None or record.state == _DELETING:
            log.info(
                "VM {server_id} processes ended ({how})",
                server_id=server_id,
                how=how,
                event="vm-process-ended",
            )
            return
        self._mark_died(record, f"the agent process {how}: {self._console_tail(self._dir.child(server_id))}")

    def _mark_died(self, record: VmRecord, fault: str) -> VmRecord:
        record = attrs.evolve(record, state=_DIED, fault=fault)
        self._vms[record.server_id] = record
        log.warn(
            "VM {vmid} ({server_id}) died: {fault}",
            vmid=record.vmid,
            server_id=record.server_id,
            fault=fault,
            event="vm-process-died",
        )
        if not self._claim.held:  # stopped: the state dir may be a successor's by now
            return record
        try:
            self._save(record)
        except OSError as e:
            log.error("Could not record VM {server_id}: {error}", server_id=record.server_id, error=str(e))
        return record

    async def list_servers(self) -> list[ServerStatus]:
        """Every VM of the prefix; a VM adopted from a previous run is checked by one /proc read."""
        await self.prepare()
        this_boot = None
        for record in list(self._vms.values()):
            if record.state == _RUNNING and record.server_id not in self._children:
                this_boot = boot_id(self._proc) if this_boot is None else this_boot
                if not self._leader_alive(record, this_boot):
                    self._mark_died(record, "the agent process is gone")
        return [self._vms[sid].status() for sid in sorted(self._vms, key=lambda s: self._vms[s].created)]

    async def delete(self, server_id: str) -> None:
        """Kill the VM's process group (TERM, then KILL after the grace) and remove its network."""
        await self.prepare()
        lock = self._delete_locks.setdefault(server_id, DeferredLock())
        try:
            async with lock:
                record = self._vms.get(server_id)
                if record is None:
                    return
                await self._teardown(record)
        finally:
            if not lock.locked and not lock.waiting:
                self._delete_locks.pop(server_id, None)

    async def _teardown(self, record: VmRecord) -> None:
        record = attrs.evolve(record, state=_DELETING)
        self._vms[record.server_id] = record
        self._save(record)
        net = record.network
        ours = self._group_is_ours(record)
        if ours:
            _signal_group(record.pgid, signal.SIGTERM)
        strays = await self._host.namespace_pids(net.namespace) if net else []
        for pid in strays:
            _signal(pid, signal.SIGTERM)
        deadline = self._clock.seconds() + self._kill_grace
        killed = False
        while ours and group_members(record.pgid, self._proc):
            if not killed and self._clock.seconds() >= deadline:
                log.warn(
                    "VM {server_id} ignored SIGTERM for {grace} s; sending SIGKILL",
                    server_id=record.server_id,
                    grace=self._kill_grace,
                )
                _signal_group(record.pgid, signal.SIGKILL)
                killed = True
                deadline = self._clock.seconds() + max(self._kill_grace, 2.0)
            elif killed and self._clock.seconds() >= deadline:
                log.error(
                    "VM {server_id}: processes {pids} survive SIGKILL",
                    server_id=record.server_id,
                    pids=group_members(record.pgid, self._proc),
                )
                break
            await deferLater(self._clock, 0.05)
        if net is not None:
            for pid in await self._host.namespace_pids(net.namespace):
                _signal(pid, signal.SIGKILL)
            await self._host.destroy(net.namespace, net.veth)
        if self._record_path(record).exists():
            self._record_path(record).remove()
        vm_dir = self._dir.child(record.server_id)
        if vm_dir.exists():
            vm_dir.remove()
        self._vms.pop(record.server_id, None)
        self._children.pop(record.server_id, None)
        log.info(
            "Deleted VM {vmid} ({server_id})",
            vmid=record.vmid,
            server_id=record.server_id,
            event="vm-deleted",
        )

    def _group_is_ours(self, record: VmRecord) -> bool:
        """False when the group leader's pid now belongs to another process (then the group is not ours).

        While any member of our group lives the kernel does not hand its id out again, so a
        process whose pid equals our pgid but whose start time differs proves our group is gone.
        """
        start = process_start_time(record.pgid, self._proc)
        return start is None or (start == record.start_time and record.boot_id == boot_id(self._proc))

    # ------------------------------------------------------------------ records

    def _record_path(self, record: VmRecord) -> FilePath[str]:
        return self._dir.child(record.server_id + ".json")

    def _save(self, record: VmRecord) -> None:
        self._record_path(record).setContent(record.to_json())


def user_data_ini(request: BootRequest, broker: str, workdir: FilePath[str], browser: str = "auto") -> bytes:
    """The ``[agent]`` INI section a Nova guest would receive as user-data (see guest_agent/config.py).

    On top of what Nova guests get, ``workdir``: local VMs share one filesystem, so each needs
    its own directory for the files and commands of its agent; and ``browser`` when the operator
    wants agents without one.
    """
    ini = configparser.ConfigParser(interpolation=None)
    ini["agent"] = {
        "broker": broker,
        "login": request.credentials.login,
        "passcode": request.credentials.passcode,
        "workdir": workdir.path,
    }
    if request.credentials.beacon_interval is not None:
        ini["agent"]["beacon_interval"] = f"{request.credentials.beacon_interval:g}"
    if browser != "auto":
        ini["agent"]["browser"] = browser
    text = io.StringIO()
    ini.write(text)
    return text.getvalue().encode("utf-8")


def _write_private(path: FilePath[str], content: bytes) -> None:
    """Create a file only its owner can read (created 0600, never world-readable for a moment)."""
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)


def _log_delete_failure(failure: Failure, /, server_id: str) -> None:
    """Errback of a fire-and-forget delete: the failure is logged, never left unhandled."""
    log.failure("Deleting VM {server_id} failed", failure, server_id=server_id)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
