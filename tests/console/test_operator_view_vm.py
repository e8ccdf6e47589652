"""The operator's view of a real browser VM: a real daemon, a real guest agent, Xvnc and Chromium.

The guest's HELLO tells the controller its view-only password; ``screen.png`` shows the VM while
it is FREE (before any worker, again after one, and after the controller was killed and restarted:
the guest's HELLO at its reconnect tells it again), and the worker's session password still logs
in while OCCUPIED and dies at release.  The password the controller uses is in nothing the API
answers.  Needs root (namespaces) and the Debian packages, as tests/integration/test_browser_vm.py.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from tests.integration.test_browser_vm import VNCDO, _why, vncdo
from tests.integration.test_daemon_harness import IP, Daemon, running_daemon

if _why is not None:
    pytestmark = pytest.mark.skip(reason=_why)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("opview"), "o", pool_timeout_operation=60) as d:
        yield d


def xvnc_argument(daemon: Daemon, vmid: str, flag: str) -> str:
    """An argument of the VM's Xvnc (found among the processes of the VM's namespace)."""
    namespace = daemon.record(daemon.vm_of(vmid)["serverId"])["network"]["namespace"]
    pids = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True, check=True).stdout
    for pid in pids.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if argv[0].endswith("Xvnc") and flag in argv:
            return argv[argv.index(flag) + 1]
    raise AssertionError(f"no Xvnc with {flag} in {namespace}")


def deobfuscate(obfuscated: bytes) -> str:
    """A password of a VNC password file (``vncpasswd -f``'s fixed DES key, bit-reversed)."""
    decryptor = Cipher(TripleDES(bytes.fromhex("e84ad660c4721ae0") * 3), modes.ECB()).decryptor()
    return (decryptor.update(obfuscated) + decryptor.finalize()).rstrip(b"\0").decode()


def png_size(body: bytes) -> tuple[int, int]:
    assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:40]
    width, height = struct.unpack("!II", body[16:24])
    assert zlib.crc32(body[12:29]) == struct.unpack("!I", body[29:33])[0]
    return width, height


def test_a_free_vm_shows_its_screen_and_a_session_still_dies_at_release(
    daemon: Daemon, tmp_path: Path
) -> None:
    assert Path(VNCDO).exists()
    daemon.set_pool_size(1, 1)
    daemon.wait_vms(FREE=1, timeout=90)
    (vm,) = daemon.status()["vms"]
    assert {"cdp", "vnc"} <= set(vm["capabilities"]), vm
    vmid = vm["vmid"]

    # FREE, no worker ever: the controller logs in with the view-only password its guest told it
    shot = daemon.ok("GET", f"/console/vm/{vmid}/screen.png?width=320")
    assert shot.headers["content-type"] == "image/png"
    assert png_size(shot.body)[0] == 320

    batch = daemon.prepare_batch(1, f"http%3A%2F%2F{daemon.layout.bridge_ip}%3A9%2F")  # unreachable: READY
    handle = daemon.lock(batch)
    status = daemon.wait_assigned(handle, timeout=60)
    password = status["vm"]["vncPassword"]
    ip = daemon.record(daemon.vm_of(status["vmid"])["serverId"])["network"]["ip"]
    address = f"{ip}::5900"
    assert vncdo(address, password, "capture", str(tmp_path / "worker.png")).returncode == 0
    daemon.ok("GET", f"/console/vm/{vmid}/screen.png")  # the operator sees the worker's screen too

    daemon.ok("POST", f"/cancel-batch/{batch}", 204)  # no replacement: the VM stays FREE
    daemon.ok("POST", f"/release/{handle}", 204)
    daemon.wait_vms(FREE=1, timeout=60)
    assert vncdo(address, password, "capture", str(tmp_path / "old.png")).returncode != 0
    shot = daemon.ok("GET", f"/console/vm/{vmid}/screen.png?width=320")  # FREE again: still shown
    assert png_size(shot.body)[0] == 320

    # the view-only password, as the guest wrote it for its Xvnc: in nothing the controller shows
    password_file = Path(xvnc_argument(daemon, vmid, "-PasswordFile"))
    assert password_file.stat().st_mode & 0o777 == 0o600
    view = deobfuscate(password_file.read_bytes()[8:16])
    assert len(view) == 8
    shown = [
        daemon.get("/all-status").text,
        daemon.get("/metrics").text,
        daemon.get(f"/handle-status/{handle}").text,  # unknown now: 404
        daemon.all_logs(),
        (daemon.state_dir / "checkpoint.json").read_text(),
    ]
    assert not any(view in text for text in shown)

    # the controller dies and comes back: the checkpoint knew nothing of the password, the guest's
    # HELLO at its reconnect tells it again, and the FREE VM's screen shows once more
    daemon.wait_for(lambda: vmid in (daemon.state_dir / "checkpoint.json").read_text(), "checkpointed")
    daemon.kill9()
    daemon.start()
    daemon.wait_pool(
        lambda s: s if [(v["vmid"], v["state"], v["recovering"]) for v in s["vms"]] == [(vmid, "FREE", False)]
        else None,
        "the FREE VM recovered (its guest said HELLO again)",
    )  # fmt: skip
    shot = daemon.ok("GET", f"/console/vm/{vmid}/screen.png?width=320")
    assert png_size(shot.body)[0] == 320
