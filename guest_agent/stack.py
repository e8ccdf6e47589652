"""The processes of a browser VM: Xvnc (display + VNC server), PulseAudio, Chromium.

This module knows how to find, start, watch and end them; :mod:`guest_agent.chromium` decides
when.  What it settles, with the reasons (measured in GUEST-STACK.md):

- **Xvnc** is the X server and the VNC server in one process, so nothing scrapes a framebuffer.
  ``-displayfd`` lets it pick a free display: X sockets in ``/tmp/.X11-unix`` are shared by every
  local VM, even across network namespaces.  VncAuth only, its password in a file that Xvnc reads
  at every authentication: writing the file rotates the password, emptying it revokes it.
  ``UseBlacklist=0`` because every viewer arrives through the controller's proxy, from one
  address: five wrong passwords from anyone would otherwise lock every worker out for a while.
- **PulseAudio** with a null sink as the default sink (the browser's sound, for the capture), no
  D-Bus, no default script, an anonymous unix socket the browser reaches by ``PULSE_SERVER``.
- **Chromium** is ``/usr/lib/chromium/chromium`` itself (the Debian wrapper script adds flags and
  prints noise), as an unprivileged user with its sandbox on, so the worker sees no "unsupported
  flag" infobar.  ``--remote-debugging-port=0``: Chromium picks a free port and writes it into
  ``DevToolsActivePort`` in its profile, so no port is ever guessed (and in a namespace the
  loopback is the VM's own).

Every child is started through ``setpriv --pdeathsig KILL`` when util-linux has it, so it dies
with the agent even when the agent is killed with SIGKILL alone; they also stay in the agent's
process group, which the local driver kills as a whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: Where Debian puts the Chromium binary (the one ``/usr/bin/chromium`` wraps).
CHROMIUM_BINARIES = ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser")

#: Chromium's flags, and why (the window's place and size and the profile are added per start).
CHROMIUM_FLAGS = (
    "--disable-gpu",  # no GPU in a VM; software compositing
    "--disable-background-networking",  # no update checks or field trials talking to Google
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider",
    "--no-first-run",  # no welcome page
    "--no-default-browser-check",  # no "make me your default browser" bar
    "--password-store=basic",  # no keyring prompt without a desktop session
    "--hide-crash-restore-bubble",  # a restarted browser does not offer the last worker's tabs
    "--autoplay-policy=no-user-gesture-required",  # the page's sound plays: the worker hears it
    "--remote-debugging-address=127.0.0.1",  # CDP on the VM's own loopback only
    "--remote-debugging-port=0",  # a free port, written to DevToolsActivePort
)

#: The VNC obfuscation key of the password file format (d3des' bit order applied), as ``vncpasswd -f``.
_VNC_FILE_KEY = bytes.fromhex("e84ad660c4721ae0")


class StackError(Exception):
    """A process of the stack could not start or answer; the message says which and why."""


@attrs.frozen
class StackPrograms:
    """The programs found on this machine; ``pulseaudio`` None: no sound (still a browser)."""

    xvnc: str
    chromium: str
    vncconfig: str | None
    pulseaudio: str | None
    setpriv: str | None

    @property
    def capabilities(self) -> tuple[str, ...]:
        return ("cdp", "vnc", "audio") if self.pulseaudio else ("cdp", "vnc")


def find_stack(
    which: Callable[[str], str | None] = shutil.which,
    exists: Callable[[str], bool] = os.path.exists,
) -> tuple[StackPrograms | None, list[str]]:
    """The stack's programs, or None and what is missing (for the log)."""
    chromium = next((path for path in CHROMIUM_BINARIES if exists(path)), None)
    xvnc = which("Xvnc")
    missing = []
    if chromium is None:
        missing.append("chromium (" + " or ".join(CHROMIUM_BINARIES) + ")")
    if xvnc is None:
        missing.append("Xvnc (tigervnc-standalone-server)")
    if chromium is None or xvnc is None:
        return None, missing
    return (
        StackPrograms(
            xvnc=xvnc,
            chromium=chromium,
            vncconfig=which("vncconfig"),
            pulseaudio=which("pulseaudio"),
            setpriv=which("setpriv"),
        ),
        missing,
    )


def vnc_password_file(password: str | None) -> bytes:
    """The content of a VncAuth password file; empty (nobody can log in) for None.

    VncAuth uses at most 8 characters of a password, so the controller's passwords are 8 long.
    """
    if password is None:
        return b""
    raw = password.encode("utf-8")[:8].ljust(8, b"\0")
    encryptor = Cipher(TripleDES(_VNC_FILE_KEY * 3), modes.ECB()).encryptor()
    return encryptor.update(raw) + encryptor.finalize()


def write_private(path: str, content: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with ``content`` (a reader never sees half a password)."""
    temp = f"{path}.new"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    os.replace(temp, path)


def xvnc_argv(
    programs: StackPrograms,
    *,
    width: int,
    height: int,
    host: str,
    port: int,
    password_file: str,
) -> list[str]:
    """Xvnc on a display of its choosing (written to fd 3), VNC on ``host:port`` with VncAuth."""
    return [
        programs.xvnc,
        "-displayfd",
        "3",
        "-geometry",
        f"{width}x{height}",
        "-depth",
        "24",
        "-nolisten",
        "tcp",
        "-noreset",
        "-rfbport",
        str(port),
        "-interface",
        host,
        "-SecurityTypes",
        "VncAuth",
        "-PasswordFile",
        password_file,
        "-UseBlacklist=0",
        "-AlwaysShared",
        "-desktop",
        "vmcloud",
    ]


def pulseaudio_argv(programs: StackPrograms, runtime_dir: str) -> list[str]:
    """One PulseAudio for the VM: a null sink as default, an anonymous socket ``runtime_dir/native``."""
    assert programs.pulseaudio is not None
    return [
        programs.pulseaudio,
        "-n",
        "--daemonize=no",
        "--exit-idle-time=-1",
        "--use-pid-file=no",
        "--disallow-exit",
        "--load=module-null-sink sink_name=vmsink rate=48000",
        f"--load=module-native-protocol-unix socket={runtime_dir}/native auth-anonymous=1",
        "--load=module-always-sink",
    ]


def chromium_argv(
    programs: StackPrograms, *, profile: str, width: int, height: int, extra: Sequence[str] = ()
) -> list[str]:
    return [
        programs.chromium,
        *CHROMIUM_FLAGS,
        *extra,
        f"--user-data-dir={profile}",
        "--window-position=0,0",
        f"--window-size={width},{height}",
        "about:blank",
    ]


def guarded(programs: StackPrograms, argv: list[str], user: tuple[int, int] | None = None) -> list[str]:
    """``argv`` run by ``setpriv``: dies with the agent, and runs as ``user`` (uid, gid) if given."""
    if programs.setpriv is None:
        if user is not None:
            raise StackError("setpriv (util-linux) is needed to run the browser as an unprivileged user")
        return argv
    prefix = [programs.setpriv, "--pdeathsig", "KILL"]
    if user is not None:
        prefix += [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
    return [*prefix, "--", *argv]


class ChildProcess(ProcessProtocol):
    """One process of the stack: its pid, when it ends and how, and what it writes on fd 3."""

    def __init__(self, name: str, on_fd3: Callable[[bytes], None] | None = None) -> None:
        self.name = name
        self._on_fd3 = on_fd3
        self.ended: Deferred[str] = Deferred()
        self.how: str | None = None
        self.on_end: Callable[[ChildProcess, str], None] | None = None

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    @property
    def running(self) -> bool:
        return self.how is None and self.transport is not None

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803 - Twisted's names
        if childFD == 3 and self._on_fd3 is not None:
            self._on_fd3(data)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        if reason.check(ProcessDone):
            how = "exited with status 0"
        elif isinstance(reason.value, ProcessTerminated):
            value = reason.value
            how = (
                f"killed by signal {value.signal}" if value.signal else f"exited with status {value.exitCode}"
            )
        else:
            how = reason.getErrorMessage()
        self.how = how
        if self.on_end is not None:
            try:
                self.on_end(self, how)
            except Exception:
                log.failure("The end of {name} was not taken in", name=self.name)
        self.ended.callback(how)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def spawn(
    reactor: Any,
    process: ChildProcess,
    argv: list[str],
    *,
    env: Mapping[str, str],
    log_path: str,
    fd3: bool = False,
    path: str | None = None,
) -> ChildProcess:
    """Start ``argv`` with stdout and stderr appended to ``log_path`` (no pipes to fill or break)."""
    stdin = os.open(os.devnull, os.O_RDONLY)
    try:
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        os.close(stdin)
        raise
    fds: dict[int, int | str] = {0: stdin, 1: out, 2: out}
    if fd3:
        fds[3] = "r"
    try:
        reactor.spawnProcess(process, argv[0], argv, env=dict(env), path=path, childFDs=fds)
    finally:
        os.close(stdin)
        os.close(out)
    return process


async def wait_until(
    clock: IReactorTime, ready: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``ready`` until it is true; :class:`StackError` after ``timeout`` seconds."""
    deadline = clock.seconds() + timeout
    while not ready():
        if clock.seconds() >= deadline:
            raise StackError(f"{what}: not ready within {timeout:g} s")
        await deferLater(clock, interval)


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def tail(path: str, size: int = 300) -> str:
    """The last line of a log, to say why a process ended."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""
