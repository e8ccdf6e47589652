"""What the local driver keeps on disk for its VMs, under ``<state_dir>/local/``.

Each VM has a directory ``<server_id>/`` that is its working directory:

- ``user-data.ini`` (mode 0600): ``[agent]`` with ``broker``, ``login`` and ``passcode``, the
  user-data a Nova guest would get.  Nothing secret goes on a command line, where ``ps`` would
  show it to every local user.
- ``work/``: the guest agent's ``workdir`` (files and commands).
- ``console.log``: the VM's stdout and stderr, written by its processes themselves.

and a record ``<server_id>.json`` (:class:`VmRecord`: server id, name, pid, pgid, start time,
namespace, IP, MAC, metadata, state), so that a restarted controller re-adopts the VMs that are
still alive and really kills those the pool deletes.  :class:`VmFiles` reads and writes all of it;
it knows nothing of processes or networks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import attrs
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from vmcloud.drivers.netns import VmNetwork
from vmcloud.drivers.userdata import render_user_data
from vmcloud.pool.interfaces import ACTIVE, DELETING, ERROR, BootRequest, ServerStatus

log = Logger()

#: The VM's user-data file, relative to its working directory.
USER_DATA_FILE = "user-data.ini"
#: The guest agent's ``workdir`` (files and commands), relative to the VM's working directory.
WORK_DIR = "work"
#: Where the VM's processes write their stdout and stderr, relative to its working directory.
CONSOLE_LOG_FILE = "console.log"

_RECORD_VERSION = 1


class RecordState:
    """The ``state`` of a :class:`VmRecord`; each maps onto a ``ServerStatus.status``."""

    RUNNING = "running"  # ACTIVE
    DIED = "died"  # ERROR
    DELETING = "deleting"  # DELETING


_STATUS = {RecordState.RUNNING: ACTIVE, RecordState.DIED: ERROR, RecordState.DELETING: DELETING}


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
    state: str = RecordState.RUNNING
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


class VmFiles:
    """``<state_dir>/local/``: one record and one working directory per VM."""

    def __init__(self, root: FilePath[str]) -> None:
        self.root = root

    def create(self) -> None:
        """Make the directory (only its owner may enter it)."""
        self.root.makedirs(ignoreExistingDirectory=True)
        self.root.chmod(0o700)

    def load(self) -> list[VmRecord]:
        """Every readable record, by file name; an unreadable one is moved aside to ``.bad``."""
        records = []
        for path in sorted(self.root.globChildren("*.json")):
            try:
                records.append(VmRecord.from_json(path.getContent()))
            except (OSError, ValueError) as e:
                log.error(
                    "Ignoring unreadable VM record {path}: {error}; moved aside to .bad",
                    path=path.path,
                    error=str(e),
                    event="vm-record-bad",
                )
                path.moveTo(path.siblingExtension(".bad"))
        return records

    def save(self, record: VmRecord) -> None:
        self._record_path(record.server_id).setContent(record.to_json())

    def vm_dir(self, server_id: str) -> FilePath[str]:
        """The VM's working directory (its processes' ``HOME``)."""
        return self.root.child(server_id)

    def make_vm_dir(self, server_id: str, request: BootRequest, broker: str, browser: str) -> FilePath[str]:
        """Create the VM's directory, its ``work/`` and its private user-data; returns the latter's path."""
        vm_dir = self.vm_dir(server_id)
        vm_dir.makedirs()
        vm_dir.chmod(0o700)
        workdir = vm_dir.child(WORK_DIR)
        workdir.makedirs()
        path = vm_dir.child(USER_DATA_FILE)
        user_data = render_user_data(
            request.credentials, broker=broker, workdir=workdir.path, browser=browser
        )
        _write_private(path, user_data.encode("utf-8"))
        return path

    def remove_vm_dir(self, server_id: str) -> None:
        vm_dir = self.vm_dir(server_id)
        if vm_dir.exists():
            vm_dir.remove()

    def forget(self, server_id: str) -> None:
        """Remove the VM's record, then its working directory."""
        record = self._record_path(server_id)
        if record.exists():
            record.remove()
        self.remove_vm_dir(server_id)

    def remove_unknown(self, owned: Iterable[str]) -> None:
        """Remove the working directories of VMs not in ``owned`` (server ids)."""
        known = set(owned)
        for child in self.root.children():
            if child.isdir() and child.basename() not in known:
                log.info("Removing the directory of unknown VM {path}", path=child.path)
                child.remove()

    def console_log(self, server_id: str) -> FilePath[str]:
        return self.vm_dir(server_id).child(CONSOLE_LOG_FILE)

    def console_tail(self, server_id: str) -> str:
        """The last line the VM's processes wrote, which usually says why they ended."""
        try:
            with open(self.console_log(server_id).path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 400))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return "(no console output)"
        return lines[-1][-200:] if lines else "(no console output)"

    def _record_path(self, server_id: str) -> FilePath[str]:
        return self.root.child(server_id + ".json")


def _write_private(path: FilePath[str], content: bytes) -> None:
    """Create a file only its owner can read (created 0600, never world-readable for a moment)."""
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
