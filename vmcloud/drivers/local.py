"""The ``local`` cloud driver: VMs as supervised groups of local processes.

So that a laptop without OpenStack runs the whole system, a "VM" here is a process group started
by the controller: the guest agent (and whatever it starts, later the browser stack), in its own
session so that one ``killpg`` ends all of it.  As root, every VM also gets a network namespace
with its own MAC and IP on an isolated bridge (see :mod:`vmcloud.drivers.netns`), so the agent
finds its identity and the broker exactly as in a Nova server.  Without root the VMs share the
host's loopback and identify themselves by their per-VM STOMP login.

Each VM has a working directory and a record under ``<state_dir>/local/`` (see
:mod:`vmcloud.drivers.localfiles`), so that a restarted controller re-adopts the VMs that are still
alive and really kills those the pool deletes.

One daemon per state directory: the driver holds ``<state_dir>/local.lock``
(:class:`~vmcloud.drivers.claims.StateDirClaim`) from :meth:`LocalDriver.prepare` (or
:meth:`LocalDriver.claim_state_dir`, which the composition root calls before anything reads the
state dir) until :meth:`LocalDriver.stop`.  Daemons with different state directories share the host
safely: their bridge, namespaces, veths and subnet are derived from the state directory, and a
bridge made by another daemon is never used nor removed (see :mod:`vmcloud.drivers.netns`).

:class:`LocalDriver` decides and sequences; the jobs are done by :class:`~vmcloud.drivers.localfiles.VmFiles`
(records and VM directories), :class:`~vmcloud.drivers.supervisor.GroupSupervisor` (the process groups),
:class:`~vmcloud.drivers.localnet.PoolNetwork` (bridge and namespaces) and
:mod:`vmcloud.drivers.localproc` (what ``/proc`` says of a pid).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Callable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from vmcloud.drivers.claims import HOST_LOCK_PATH, HostInUse, StateDirClaim
from vmcloud.drivers.localfiles import USER_DATA_FILE, RecordState, VmFiles, VmRecord
from vmcloud.drivers.localnet import PoolNetwork
from vmcloud.drivers.localproc import boot_id, process_start_time, signal_group, signal_pid
from vmcloud.drivers.netns import (
    SYSTEM_PATH,
    HostNetwork,
    NetnsLayout,
    NetworkCommandError,
    VmNetwork,
    check_bridge_name,
    check_subnet,
    derived_bridge,
    find_tool,
    pool_tag,
    process_runner,
)
from vmcloud.drivers.supervisor import GroupSupervisor
from vmcloud.pool.interfaces import (
    BadCloudRequest,
    BootRequest,
    CloudError,
    CloudUnavailable,
    ICloudDriver,
    QuotaExceeded,
    ServerStatus,
)

log = Logger()

#: What VM processes inherit of the daemon's environment (see :func:`vm_environment`; plus ``HOME``,
#: the VM's directory, and ``VMCLOUD_VMID``, ``VMCLOUD_SERVER_ID``, ``VMCLOUD_USER_DATA``).
PASSED_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")

#: Builds the argv of a VM's processes from the boot request and the broker address as the guest
#: sees it (a twisted client endpoint description).
AgentArgv = Callable[[BootRequest, str], list[str]]


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
        self._clock = IReactorTime(reactor)
        self._agent_argv = agent_argv
        self._netns = netns
        self._broker_port = broker_port
        # names are derived from the resolved path: a symlink to the state dir is the same daemon
        self._owner = os.path.realpath(state_dir.path)
        tag = pool_tag(self._owner, prefix)
        ip = find_tool("ip")
        self._network = PoolNetwork(
            HostNetwork(process_runner(reactor), ip, find_tool("bridge")),
            self._clock,
            ip=ip,
            prefix=prefix,
            owner=self._owner,
            tag=tag,
            bridge=check_bridge_name(bridge) if bridge else derived_bridge(tag),
            subnet=check_subnet(subnet) if subnet else None,
            host_lock=host_lock,
            proc=proc,
        )
        self._groups = GroupSupervisor(
            reactor, self._clock, setsid=find_tool("setsid"), kill_grace=kill_grace, proc=proc
        )
        self._browser = browser
        self._environ = environ if environ is not None else {"PATH": SYSTEM_PATH}
        self._proc = proc
        self._claim = StateDirClaim(self._owner, proc)
        self._files = VmFiles(state_dir.child("local"))
        self._vms: dict[str, VmRecord] = {}
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
        if self._network.layout is None:
            raise RuntimeError("LocalDriver.prepare() must run (in netns mode) before the subnet is known")
        return self._network.layout

    @property
    def bridge(self) -> str:
        """The bridge's name (configured, or derived from the state dir)."""
        return self._network.bridge

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
            if record.state == RecordState.DELETING:
                log.info("Resuming the deletion of VM {server_id}", server_id=record.server_id)
                Deferred.fromCoroutine(self.delete(record.server_id)).addErrback(
                    _log_delete_failure, server_id=record.server_id
                )

    async def _prepare(self) -> None:
        self.claim_state_dir()
        if self._netns is None:
            self._netns = await self._network.usable()
        log.info(
            "Local driver for prefix {prefix}: network namespaces {netns}, state in {path}",
            prefix=self.prefix,
            netns=f"on (bridge {self.bridge})" if self._netns else "off",
            path=self._files.root.path,
        )
        self._files.create()
        self._adopt_recorded()
        if self._netns:
            await self._network.set_up()
        await self.cleanup_stale()

    def _adopt_recorded(self) -> None:
        """Load every record; VMs whose leader process is gone are marked died."""
        this_boot = boot_id(self._proc)
        for record in self._files.load():
            self._vms[record.server_id] = record
            if record.state == RecordState.RUNNING and not self._groups.leader_alive(record, this_boot):
                record = self._mark_died(record, "the agent process ended while the controller was down")
            log.info(
                "Re-adopted VM {server_id} ({name}), pid {pid}, {state}",
                server_id=record.server_id,
                name=record.name,
                pid=record.pid,
                state=record.state,
                event="vm-adopted",
            )

    async def cleanup_stale(self) -> None:
        """Remove this pool's namespaces, veths and VM directories that no recorded VM owns.

        Only names carrying this daemon's tag (its state dir and prefix) are ever touched, and
        only while it holds the state dir's claim, so no other running daemon can own them.
        """
        if not self._claim.held:
            return
        self._files.remove_unknown([*self._vms, *self._booting])
        if not self._netns:
            return
        nets = [r.network for r in self._vms.values()] + [net for _, net in self._booting.values()]
        await self._network.remove_stale(nets)

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
            await self._network.remove_bridge()
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
        used = [r.slot for r in self._vms.values()] + [slot for slot, _ in self._booting.values()]
        return self._network.free_slot(self.layout, used)

    async def _boot(
        self, server_id: str, slot: int | None, net: VmNetwork | None, request: BootRequest
    ) -> str:
        vm_dir = self._files.vm_dir(server_id)
        spawned = False
        try:
            user_data = self._files.make_vm_dir(server_id, request, self.broker_for_guest(), self._browser)
            if net is not None:
                await self._network.create(net)
            argv = self._agent_argv(request, self.broker_for_guest())
            if net is not None:
                argv = self._network.inside(net, argv)
            env = dict(self._environ)
            env.update(
                HOME=vm_dir.path,
                VMCLOUD_VMID=request.vmid,
                VMCLOUD_SERVER_ID=server_id,
                VMCLOUD_USER_DATA=user_data.path,
            )
            pid = self._groups.spawn(
                server_id, argv, env, vm_dir, self._files.console_log(server_id), self._leader_ended
            )
            spawned = True
            if pid is None:  # reaped within spawnProcess: it could not even start
                raise BadCloudRequest(
                    f"the VM's first process exited at once: {self._files.console_tail(server_id)}"
                )
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
            self._files.save(record)
        except Exception as e:
            if spawned:
                self._groups.abandon(server_id)
            if net is not None:
                await self._network.destroy(net)
            self._files.remove_vm_dir(server_id)
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

    def _leader_ended(self, server_id: str, how: str) -> None:
        record = self._vms.get(server_id)
        if record is None or record.state == RecordState.DELETING:
            log.info(
                "VM {server_id} processes ended ({how})",
                server_id=server_id,
                how=how,
                event="vm-process-ended",
            )
            return
        self._mark_died(record, f"the agent process {how}: {self._files.console_tail(server_id)}")

    def _mark_died(self, record: VmRecord, fault: str) -> VmRecord:
        record = attrs.evolve(record, state=RecordState.DIED, fault=fault)
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
            self._files.save(record)
        except OSError as e:
            log.error("Could not record VM {server_id}: {error}", server_id=record.server_id, error=str(e))
        return record

    async def list_servers(self) -> list[ServerStatus]:
        """Every VM of the prefix; a VM adopted from a previous run is checked by one /proc read."""
        await self.prepare()
        this_boot = None
        for record in list(self._vms.values()):
            if record.state == RecordState.RUNNING and not self._groups.spawned(record.server_id):
                this_boot = boot_id(self._proc) if this_boot is None else this_boot
                if not self._groups.leader_alive(record, this_boot):
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
        record = attrs.evolve(record, state=RecordState.DELETING)
        self._vms[record.server_id] = record
        self._files.save(record)
        net = record.network
        ours = self._groups.group_is_ours(record)
        if ours:
            signal_group(record.pgid, signal.SIGTERM)
        strays = await self._network.pids(net) if net else []
        for pid in strays:
            signal_pid(pid, signal.SIGTERM)
        if ours:
            await self._groups.reap(record)
        if net is not None:
            for pid in await self._network.pids(net):
                signal_pid(pid, signal.SIGKILL)
            await self._network.destroy(net)
        self._files.forget(record.server_id)
        self._vms.pop(record.server_id, None)
        self._groups.forget(record.server_id)
        log.info(
            "Deleted VM {vmid} ({server_id})",
            vmid=record.vmid,
            server_id=record.server_id,
            event="vm-deleted",
        )


def _log_delete_failure(failure: Failure, /, server_id: str) -> None:
    """Errback of a fire-and-forget delete: the failure is logged, never left unhandled."""
    log.failure("Deleting VM {server_id} failed", failure, server_id=server_id)
