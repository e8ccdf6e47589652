"""The processes of a browser VM: Xvnc (display + VNC server), PulseAudio, Chromium.

This module knows how to find, start, watch and end them; :mod:`guest_agent.chromium` decides
when.  What it settles, with the reasons:

- **Xvnc** is the X server and the VNC server in one process, so nothing scrapes a framebuffer.
  ``-displayfd`` lets it pick a free display: X sockets in ``/tmp/.X11-unix`` are shared by every
  local VM, even across network namespaces.  VncAuth only, its passwords in a file that Xvnc reads
  at every authentication: writing the file rotates the session's password, and a password nobody
  is told revokes it.  The file's second line is the operator's view-only password, made at random
  when the stack is built and kept for the agent's life: the controller logs in with it to show the
  monitor a VM's screen whatever its state, and Xvnc ignores the input of such a login.
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

:class:`BrowserStack` is these processes for one VM behind :class:`IBrowserStack`: the seam where
:class:`~guest_agent.chromium.ChromiumBrowser` (which decides when to start, restart and give up)
meets processes, so its decisions are tested against a fake stack and a fake CDP peer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import tempfile
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
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from guest_agent.cdp import CdpConnection, connect, read_devtools_port

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
    # Services a VM has no use for; and the omnibox's suggestion popup drawn natively rather than
    # by WebUI pages Chromium keeps loaded in renderers of their own, two per window (the worker
    # sees the same suggestions).  What each flag saves per idle VM: README, "The browser VM".
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider,"
    "WebUIOmniboxPopup,WebUIOmniboxAimPopup,WebUIOmniboxFullPopup",
    # The network service in the browser process, not a utility process of its own: one process
    # fewer per VM.  A crash of it takes the browser down, which the agent repairs anyway.
    "--enable-features=NetworkServiceInProcess2",
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


def vnc_password_file(password: str | None, view_password: str | None = None) -> bytes:
    """The content of a VncAuth password file (``vncpasswd -f``'s format): the full-access password,
    then, when given, the view-only one (TigerVNC reads a second 8 bytes as the view-only password:
    a login with it gets the screen, and Xvnc ignores its keys, pointer and clipboard).

    Empty for None (nobody can log in).  A file with a view-only password must have a full-access
    one too (Xvnc refuses every login when the first is missing, and takes an empty first one as
    the password "" that anyone knows): :func:`unknown_vnc_password` fills it when no session is on.
    VncAuth uses at most 8 characters of a password, so the controller's passwords are 8 long.
    """
    if password is None:
        return b""
    encryptor = Cipher(TripleDES(_VNC_FILE_KEY * 3), modes.ECB()).encryptor()
    raw = password.encode("utf-8")[:8].ljust(8, b"\0")
    if view_password is not None:
        raw += view_password.encode("utf-8")[:8].ljust(8, b"\0")
    return encryptor.update(raw) + encryptor.finalize()


def unknown_vnc_password() -> str:
    """8 random characters nobody is told: Xvnc reads a password up to its first NUL, so none is drawn
    (``secrets.token_urlsafe`` gives letters, digits, ``-`` and ``_``)."""
    return secrets.token_urlsafe(6)[:8]


def xauthority(cookie: bytes) -> bytes:
    """An Xauthority file (libXau's format) holding one MIT-MAGIC-COOKIE-1 for any display, any address.

    Family "wild" with no display number: the server (``-auth``) takes the cookie whatever its
    display turns out to be (``-displayfd`` picks it later), and so does every client given it.
    """

    def counted(data: bytes) -> bytes:
        return len(data).to_bytes(2, "big") + data

    return (
        (0xFFFF).to_bytes(2, "big")
        + counted(b"")
        + counted(b"")
        + counted(b"MIT-MAGIC-COOKIE-1")
        + counted(cookie)
    )


#: The first uid (and gid) of the per-VM browser users (``browser_user = per-vm``): a VM's Chromium
#: runs as PER_VM_UID_BASE + the slot of its run directory.  Above the ranges Debian and systemd
#: hand out (users, DynamicUser, systemd-nspawn's private users end at 0x6FFFFFFF), no passwd entry.
PER_VM_UID_BASE = 2_000_000_000
#: Run directory slots a host may hold (local VMs at once).
RUN_SLOTS = 4096


@attrs.define
class RunDir:
    """A run directory claimed for the life of this agent: ``path`` is ``<base>/<slot>``.

    The claim is a ``flock`` on ``<base>/<slot>.lock`` held by the agent's open file: the kernel
    drops it when the agent ends, however it ends (SIGKILL included), and no child inherits it
    (close-on-exec, and Twisted closes a child's other descriptors).  So whoever takes a slot's
    lock knows that the slot's directory, if any, is a dead agent's leftover.
    """

    path: str
    slot: int
    fd: int | None = attrs.field(default=None, repr=False)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def claim_run_dir(base: str, slots: int = RUN_SLOTS) -> RunDir:
    """The first free slot under ``base``, its directory made afresh (a dead agent's leftover removed).

    ``base`` is made (mode 0711) if missing and refused (:class:`StackError`) unless it is a real
    directory of ours that nobody else may write into: only we create or remove names in it.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o711)
    info = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base):
        raise StackError(f"{base} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise StackError(f"{base} is not ours alone (owner uid {info.st_uid}, mode {info.st_mode & 0o777:o})")
    for slot in range(slots):
        fd = os.open(
            os.path.join(base, f"{slot}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        path = os.path.join(base, str(slot))
        try:
            if os.path.lexists(path):
                log.info(
                    "Removing {path}, left by an agent that is gone",
                    path=path,
                    event="browser-leftover-removed",
                )
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            os.mkdir(path, 0o711)
            os.chmod(path, 0o711)
        except BaseException:
            os.close(fd)
            raise
        return RunDir(path, slot, fd)
    raise StackError(f"all {slots} run directory slots under {base} are taken")


def end_processes_of(uid: int, proc: str = "/proc") -> list[int]:
    """SIGKILL every process running as ``uid``; their pids.

    For a per-VM browser user whose slot we just claimed: whatever runs as it was left by the
    slot's previous agent, which is gone (normally nothing: its processes die with it).
    """
    killed = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "status"), encoding="ascii", errors="replace") as f:
                uids = next((line.split()[1:] for line in f if line.startswith("Uid:")), [])
        except OSError:
            continue
        if str(uid) in uids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


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
    auth_file: str | None = None,
) -> list[str]:
    """Xvnc on a display of its choosing (written to fd 3), VNC on ``host:port`` with VncAuth.

    ``auth_file``: an Xauthority file whose cookie X clients must show; without it any local user
    could open the display (every local VM's, since X sockets are shared across namespaces).
    """
    auth = ["-auth", auth_file] if auth_file is not None else []
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
        *auth,
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


class IBrowserStack(Interface):
    """The processes of one browser VM, as the browser's orchestration sees them."""

    capabilities = Attribute("tuple of str for HELLO: ('cdp', 'vnc') and 'audio' when PulseAudio is there")
    audio = Attribute("bool: PulseAudio runs, so the browser's sound reaches the capture")
    screen = Attribute("(width, height) of the display: no window is larger")
    vnc_address = Attribute("(host, port) where the VNC server listens, for PREPARE's answer")
    on_ended = Attribute(
        "callable(reason: str) -> None or None: a process of the stack ended while it should run"
    )

    async def start() -> CdpConnection:
        """Start Chromium afresh from a wiped profile (ending the running one), and Xvnc or
        PulseAudio first if they do not run; the browser-level CDP connection, open and quiet.
        Raises :class:`StackError` saying why when it cannot."""

    def healthy() -> bool:
        """Every process that should run runs."""

    async def stop() -> None:
        """End every process and remove the run directory."""

    view_password = Attribute(
        "str: the operator's view-only VNC password, for the agent's life; said in HELLO, never to a worker"
    )

    def set_vnc_password(password: str | None) -> None:  # noqa: N805
        """The session's VNC password from now on; None: no worker can log in (the operator's
        view-only password stays)."""

    async def disconnect_viewers() -> None:
        """Close every open VNC connection; failures are logged, never raised."""


@implementer(IBrowserStack)
class BrowserStack:
    """Xvnc, PulseAudio and Chromium of one VM, as processes of the agent.

    ``user`` is the (uid, gid) Chromium runs as (its sandbox refuses root); None runs it as the
    agent's own user.  ``run_dir`` holds the VNC password file, the X cookie, the PulseAudio
    socket, the logs and Chromium's profiles: a claimed :class:`RunDir` (released at stop), or a
    private temporary directory when None.  Only the agent, and ``user``'s group through the
    cookie and the PulseAudio directory, can reach the display and the sound.
    """

    def __init__(
        self,
        reactor: Any,
        programs: StackPrograms,
        *,
        vnc_host: str,
        vnc_port: int = 5900,
        screen: tuple[int, int] = (1280, 800),
        user: tuple[int, int] | None = None,
        run_dir: RunDir | None = None,
        environ: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
        chromium_flags: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self.programs = programs
        self.capabilities: tuple[str, ...] = programs.capabilities
        self.screen = screen
        self.vnc_address = (vnc_host, vnc_port)
        self.view_password = unknown_vnc_password()
        self.on_ended: Callable[[str], None] | None = None
        self._user = user
        self._run_dir_wanted = run_dir
        self.run_dir = ""
        self._environ = dict(environ if environ is not None else base_environment())
        self._start_timeout = start_timeout
        self._chromium_flags = tuple(chromium_flags)
        self.xvnc: ChildProcess | None = None
        self.pulse: ChildProcess | None = None
        self.chromium: ChildProcess | None = None
        self.display: int | None = None
        self._profiles = 0
        self._profile: str | None = None
        self._stopping = False

    @property
    def audio(self) -> bool:
        return self.pulse is not None and self.pulse.running

    @property
    def user(self) -> tuple[int, int] | None:
        """The (uid, gid) Chromium runs as; None: the agent's own."""
        return self._user

    def pids(self) -> list[int]:
        """The pids of the stack's own processes (Chromium's children not included)."""
        processes = (self.xvnc, self.pulse, self.chromium)
        return [p.pid for p in processes if p is not None and p.pid is not None and p.running]

    def healthy(self) -> bool:
        return (
            _running(self.xvnc)
            and _running(self.chromium)
            and (self.programs.pulseaudio is None or _running(self.pulse))
        )

    def _make_run_dir(self) -> None:
        if self._run_dir_wanted is not None:
            self.run_dir = self._run_dir_wanted.path
        else:
            self.run_dir = tempfile.mkdtemp(prefix="vmcloud-browser-")
        os.chmod(self.run_dir, 0o711)
        self.set_vnc_password(None)
        # The X cookie: the agent's (vncconfig) and, through its group, the browser's.
        write_private(self._xauthority(), xauthority(os.urandom(16)), 0o640 if self._user else 0o600)
        if self._user is not None:
            os.chown(self._xauthority(), -1, self._user[1])

    def _xauthority(self) -> str:
        return os.path.join(self.run_dir, "xauthority")

    async def start(self) -> CdpConnection:
        self._stopping = False
        if not self.run_dir:
            self._make_run_dir()
        await end_process(self._reactor, self.chromium, grace=0.0)
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None
        if not _running(self.xvnc):
            await self._start_xvnc()
        if self.programs.pulseaudio is not None and not _running(self.pulse):
            await self._start_pulse()
        return await self._start_chromium()

    async def stop(self) -> None:
        self._stopping = True
        for process in (self.chromium, self.pulse, self.xvnc):
            await end_process(self._reactor, process, grace=2.0)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = ""
        if self._run_dir_wanted is not None:
            self._run_dir_wanted.release()

    # ------------------------------------------------------------------ VNC

    def _password_file(self) -> str:
        return os.path.join(self.run_dir, "vnc-passwd")

    def set_vnc_password(self, password: str | None) -> None:
        """Rotate (or, with None, revoke) the session's VNC password: Xvnc reads the file at each login.

        Revoked, the full-access line is a fresh password nobody is told; the view-only line is the
        operator's, always.
        """
        if self.run_dir:
            content = vnc_password_file(password or unknown_vnc_password(), self.view_password)
            write_private(self._password_file(), content)

    async def disconnect_viewers(self) -> None:
        """``vncconfig -disconnect``, so no viewer outlives its worker."""
        if self.programs.vncconfig is None or self.display is None or not _running(self.xvnc):
            return
        d = getProcessOutputAndValue(
            self.programs.vncconfig,
            ["-display", f":{self.display}", "-disconnect"],
            env=dict(self._environ, XAUTHORITY=self._xauthority()),
            reactor=self._reactor,
        )
        d.addTimeout(5, self._reactor)
        try:
            _out, err, code = await d
        except Exception as e:
            log.warn("vncconfig -disconnect failed: {error}", error=str(e), event="vnc-disconnect-failed")
            return
        if code != 0:
            log.warn(
                "vncconfig -disconnect failed: {err}",
                err=err.decode("utf-8", "replace")[-200:],
                event="vnc-disconnect-failed",
            )

    # ------------------------------------------------------------------ sound

    def pulse_environ(self) -> dict[str, str]:
        """The environment of a client of the VM's PulseAudio: the audio capture's encoder."""
        return dict(self._environ, PULSE_SERVER="unix:" + os.path.join(self.run_dir, "pulse", "native"))

    # ------------------------------------------------------------------ processes

    def _process_ended(self, process: ChildProcess, how: str) -> None:
        if self._stopping or process not in (self.xvnc, self.chromium, self.pulse):
            return
        log.warn("{name} {how}", name=process.name, how=how, event="stack-process-ended")
        if process is self.pulse:
            self.pulse = None
        if self.on_ended is not None:
            self.on_ended(f"{process.name} {how}")

    async def _start_xvnc(self) -> None:
        shown: Deferred[int] = Deferred()
        buffer = bytearray()

        def fd3(data: bytes) -> None:
            buffer.extend(data)
            if b"\n" in buffer and not shown.called:
                shown.callback(int(buffer.split(b"\n")[0]))

        self.display = None
        process = ChildProcess("Xvnc", on_fd3=fd3)
        process.on_end = self._process_ended
        log_path = os.path.join(self.run_dir, "xvnc.log")
        host, port = self.vnc_address
        argv = xvnc_argv(
            self.programs,
            width=self.screen[0],
            height=self.screen[1],
            host=host,
            port=port,
            password_file=self._password_file(),
            auth_file=self._xauthority(),
        )
        self.xvnc = spawn(
            self._reactor,
            process,
            guarded(self.programs, argv),
            env=self._environ,
            log_path=log_path,
            fd3=True,
        )

        def ended(how: str) -> str:
            if not shown.called:
                shown.errback(StackError(f"Xvnc {how}: {tail(log_path)}"))
            return how

        process.ended.addCallback(ended)
        shown.addTimeout(self._start_timeout, self._reactor)
        self.display = await shown
        log.info(
            "Xvnc on display :{display}, VNC on {host}:{port}",
            display=self.display,
            host=host,
            port=port,
            event="xvnc-started",
        )

    async def _start_pulse(self) -> None:
        runtime = os.path.join(self.run_dir, "pulse")
        os.makedirs(runtime, exist_ok=True)
        self._share_pulse_dir(runtime)
        socket_path = os.path.join(runtime, "native")
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        env = dict(self._environ, HOME=runtime, XDG_RUNTIME_DIR=runtime, PULSE_RUNTIME_PATH=runtime)
        process = ChildProcess("pulseaudio")
        process.on_end = self._process_ended
        self.pulse = spawn(
            self._reactor,
            process,
            guarded(self.programs, pulseaudio_argv(self.programs, runtime)),
            env=env,
            log_path=os.path.join(self.run_dir, "pulseaudio.log"),
        )
        try:
            await wait_until(
                self._reactor,
                lambda: os.path.exists(socket_path) or not process.running,
                self._start_timeout,
                "PulseAudio",
            )
        except StackError:
            process.kill()
            raise
        if not process.running:
            self.pulse = None
            log.warn(
                "PulseAudio did not start ({how}); the browser runs without sound",
                how=process.how,
                event="pulseaudio-failed",
            )
            return
        os.chmod(socket_path, 0o777)  # the browser runs as another user
        # PulseAudio makes its runtime directory its own and private (root, 0700) as it starts:
        # without this the browser cannot reach the socket and its sound goes nowhere.
        self._share_pulse_dir(runtime)

    def _share_pulse_dir(self, runtime: str) -> None:
        """The browser's group alone may reach the socket (other local VMs' browsers may not)."""
        os.chmod(runtime, 0o710 if self._user else 0o700)
        if self._user is not None:
            os.chown(runtime, -1, self._user[1])

    async def _start_chromium(self) -> CdpConnection:
        if self.display is None:
            raise StackError("no display")
        self._profiles += 1
        home = os.path.join(self.run_dir, f"chromium-{self._profiles}")
        profile = os.path.join(home, "profile")
        os.makedirs(profile, mode=0o700)
        os.chmod(home, 0o700)
        if self._user is not None:
            for path in (home, profile):
                os.chown(path, *self._user)
        self._profile = home
        env = dict(
            self._environ,
            DISPLAY=f":{self.display}",
            XAUTHORITY=self._xauthority(),
            HOME=home,
            XDG_CONFIG_HOME=os.path.join(home, ".config"),
            XDG_CACHE_HOME=os.path.join(home, ".cache"),
        )
        if self.pulse is not None:
            env["PULSE_SERVER"] = "unix:" + os.path.join(self.run_dir, "pulse", "native")
        argv = chromium_argv(
            self.programs,
            profile=profile,
            width=self.screen[0],
            height=self.screen[1],
            extra=self._chromium_flags,
        )
        process = ChildProcess("chromium")
        process.on_end = self._process_ended
        log_path = os.path.join(self.run_dir, "chromium.log")
        self.chromium = spawn(
            self._reactor, process, guarded(self.programs, argv, self._user), env=env, log_path=log_path
        )
        port_file = os.path.join(profile, "DevToolsActivePort")

        def port_known() -> bool:
            if not process.running:
                raise StackError(f"Chromium {process.how}: {tail(log_path)}")
            content = read_text(port_file)
            return content is not None and content.count("\n") >= 1 and "/devtools/browser/" in content

        try:
            await wait_until(self._reactor, port_known, self._start_timeout, "Chromium's DevTools port", 0.02)
            cdp = await connect(self._reactor, read_devtools_port(read_text(port_file) or ""), timeout=10.0)
        except BaseException:
            await end_process(self._reactor, process, grace=0.0)
            raise
        log.info(
            "Chromium up (pid {pid}) on display :{display}",
            pid=process.pid,
            display=self.display,
            event="chromium-started",
        )
        return cdp


def _running(process: ChildProcess | None) -> bool:
    return process is not None and process.running


async def end_process(reactor: Any, process: ChildProcess | None, grace: float) -> None:
    """End a process: SIGTERM and ``grace`` seconds, then SIGKILL; returns once it is reaped."""
    if process is None or not process.running:
        return
    if grace > 0:
        process.kill(signal.SIGTERM)
        deadline = reactor.seconds() + grace
        while process.running and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05)
    process.kill(signal.SIGKILL)
    deadline = reactor.seconds() + 5.0
    while process.running and reactor.seconds() < deadline:
        await deferLater(reactor, 0.02)
    if process.running:
        log.warn("{name} (pid {pid}) did not end after SIGKILL", name=process.name, pid=process.pid)


def base_environment() -> dict[str, str]:
    """What the stack's processes get of the agent's environment: the basics, nothing secret."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env
