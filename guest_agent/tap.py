"""The composition root of ``twistd vmcloud-guest``: the only place that reads files, the environment,
the network configuration and the reactor.

``twistd -n vmcloud-guest [--broker ENDPOINT] [--identity NAME] [--login L --passcode P]
[--config FILE] [--workdir DIR] [--beacon-interval S] [--user-data FILE]``

Configuration precedence: flags > the config file > the user-data the controller gave the VM >
defaults (see :mod:`guest_agent.config`).  With none of them the agent finds its identity (the MAC
of the default-route interface) and its broker (the default gateway, port 61613) by itself.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import tempfile
from importlib import metadata
from typing import Any, TypeVar

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

from guest_agent.agent import GuestAgent
from guest_agent.browser import IBrowser, NoBrowser
from guest_agent.commands import CommandRunner
from guest_agent.config import GuestConfig, GuestConfigError, parse_guest_config, resolve_guest_config
from guest_agent.files import FileStore
from guest_agent.identity import NO_MAC, discover
from guest_agent.stack import (
    PER_VM_UID_BASE,
    BrowserStack,
    StackError,
    claim_run_dir,
    end_processes_of,
    find_stack,
)
from vmcloud.service import SequentialMultiService
from vmcloud.stomp.client import ReconnectingSession
from vmcloud.threads import ThreadPoolService
from vmcloud.words.files import MAX_FILE_BYTES

T = TypeVar("T")

log = Logger()

#: Where the configuration file is looked for when ``--config`` is not given, first found wins.
DEFAULT_CONFIG_FILES = ("/etc/vmcloud/vmcloud-guest.conf", "etc/vmcloud-guest.conf")
#: Environment variable naming the user-data file when ``--user-data`` is not given (local VMs).
USER_DATA_ENV = "VMCLOUD_USER_DATA"


def agent_version() -> str:
    try:
        return metadata.version("vmcloud")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Options(usage.Options):
    """The flags of ``twistd vmcloud-guest``; they override the config file and the user-data."""

    optParameters = [
        [
            "broker",
            "b",
            None,
            "client endpoint of the broker, e.g. tcp:10.0.0.1:61613 (default: gateway:61613)",
        ],
        ["identity", "i", None, "name of this guest's command destination (default: login, else the MAC)"],
        ["login", None, None, "STOMP login (default: the identity, for brokers that take guests by name)"],
        ["passcode", None, None, "STOMP passcode"],
        [
            "config",
            "c",
            None,
            f"INI file with an [agent] section (default: first of {', '.join(DEFAULT_CONFIG_FILES)})",
        ],
        [
            "workdir",
            "w",
            None,
            "root of FILE_PUT/FILE_GET and cwd of commands (default /var/lib/vmcloud-guest)",
        ],
        ["beacon-interval", None, None, "seconds between STILL_ALIVE beacons (default 5)"],
        ["user-data", None, None, f"file holding the cloud's user-data (default: ${USER_DATA_ENV})"],
    ]

    config: GuestConfig

    def postOptions(self) -> None:  # noqa: N802 - Twisted's name
        if self["workdir"]:
            self["workdir"] = os.path.abspath(self["workdir"])
        file_text = self._config_text()
        user_data = self._user_data()
        flags = {
            key: self[key]
            for key in ("broker", "identity", "login", "passcode", "workdir", "beacon-interval")
        }
        try:
            self.config = parse_guest_config(flags, file_text, user_data)
        except GuestConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            FilePath(self.config.workdir).makedirs(ignoreExistingDirectory=True)
        except OSError as e:
            raise usage.UsageError(f"workdir {self.config.workdir}: {e.strerror}") from None

    def _config_text(self) -> str | None:
        path = self["config"]
        if path is None:
            path = next((p for p in DEFAULT_CONFIG_FILES if os.path.isfile(p)), None)
            if path is None:
                return None
        try:
            return FilePath(path).getContent().decode("utf-8")
        except OSError as e:
            raise usage.UsageError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise usage.UsageError(f"config file {path} is not UTF-8 text") from None

    def _user_data(self) -> bytes | None:
        path = self["user-data"] or os.environ.get(USER_DATA_ENV)
        if not path:
            return None
        try:
            return FilePath(path).getContent()
        except OSError as e:
            raise usage.UsageError(f"cannot read user-data {path}: {e.strerror}") from None


def make_browser(reactor: Any, config: GuestConfig, ip: str | None) -> IBrowser:
    """The real browser stack where it is installed (and not switched off), else :class:`NoBrowser`."""
    if config.browser == "none":
        log.info("No browser: switched off by the configuration (browser = none)", event="browser-none")
        return NoBrowser(reactor)
    programs, missing = find_stack()
    if programs is None:
        log.warn(
            "No browser: {missing} not installed (scripts/install.sh installs them); capability no-browser",
            missing=", ".join(missing),
            event="browser-none",
        )
        return NoBrowser(reactor)
    from guest_agent.chromium import ChromiumBrowser

    host = ip or "127.0.0.1"
    port = config.vnc_port
    if ipaddress.ip_address(host).is_loopback:
        port = _free_port(host)  # the host's loopback is shared by every local VM
    try:
        run_dir = claim_run_dir(browser_run_base())
    except (OSError, StackError) as e:
        raise SystemExit(f"vmcloud-guest: no run directory for the browser: {e}") from None
    user = None
    if os.geteuid() == 0:
        if config.browser_user == PER_VM_USER:
            uid = PER_VM_UID_BASE + run_dir.slot
            left = end_processes_of(uid)
            if left:
                log.warn(
                    "Killed {count} processes of uid {uid} left by a gone agent",
                    count=len(left),
                    uid=uid,
                    event="browser-leftover-killed",
                )
            user = (uid, uid)
        else:
            try:
                entry = pwd.getpwnam(config.browser_user)
            except KeyError:
                raise SystemExit(
                    f"vmcloud-guest: browser_user {config.browser_user!r} does not exist"
                ) from None
            user = (entry.pw_uid, entry.pw_gid)
    stack = BrowserStack(reactor, programs, vnc_host=host, vnc_port=port, user=user, run_dir=run_dir)
    return with_sound(reactor, ChromiumBrowser(reactor, stack), stack, host)


def with_sound(reactor: Any, browser: IBrowser, stack: BrowserStack, host: str) -> IBrowser:
    """The browser with the VM's audio capture server beside it, on the VM's address, port 5901 (a
    free port on the host's shared loopback, as the VNC server's); no capture without a usable ffmpeg."""
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

    from guest_agent.audio import AUDIO_PORT, AudibleBrowser, find_encoder

    ffmpeg, why = (None, "") if "audio" not in browser.capabilities else find_encoder()
    if why:
        log.warn(
            "No sound for workers: {why} (scripts/install.sh installs ffmpeg)", why=why, event="audio-none"
        )
    address = ipaddress.ip_address(host)
    port = _free_port(host) if address.is_loopback else AUDIO_PORT
    endpoint_type = TCP6ServerEndpoint if address.version == 6 else TCP4ServerEndpoint
    return AudibleBrowser(
        browser,
        reactor,
        ffmpeg=ffmpeg,
        endpoint=endpoint_type(reactor, port, interface=host),
        host=host,
        environ=stack.pulse_environ,
    )


#: ``browser_user`` meaning: a uid of its own for each VM's Chromium (see :data:`PER_VM_UID_BASE`).
PER_VM_USER = "per-vm"


def browser_run_base() -> str:
    """Where the browsers' run directories are claimed: a directory only root may write into when
    root (a user who made /tmp/vmcloud-browser first would own it), else one in the temp dir."""
    if os.geteuid() == 0:
        return "/var/lib/vmcloud-browser"
    return os.path.join(tempfile.gettempdir(), f"vmcloud-browser-{os.geteuid()}")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_agent(
    reactor: Any, config: GuestConfig, *, ip: str | None, mac: str | None, browser: IBrowser | None = None
) -> IService:
    """The agent's service tree for a resolved ``config`` (broker and identity known); not started.

    Start order: file threads, the STOMP session, the agent.  Stop order is the reverse, one at a
    time: the agent says BYE, then the session disconnects with a receipt (so BYE arrives), then
    the threads stop.
    """
    assert config.broker is not None and config.identity is not None
    root = SequentialMultiService()
    # fsync of a FILE_PUT must not block the reactor
    threads = ThreadPoolService(reactor, "vmcloud-guest-files", 2)
    threads.setServiceParent(root)
    session = ReconnectingSession(
        reactor,
        config.broker,
        # Guests of the embedded broker log in as their identity (per-VM credentials name it).
        login=config.login or config.identity,
        passcode=config.passcode,
    )
    session.setServiceParent(root)
    runner = CommandRunner(
        reactor,
        max_output=config.max_output,
        default_timeout=config.command_timeout,
        max_concurrent=config.max_commands,
    )
    files = FileStore(FilePath(config.workdir), max_size=min(config.max_file_size, MAX_FILE_BYTES))
    if browser is None:
        browser = make_browser(reactor, config, ip)
    if IService.providedBy(browser):
        IService(browser).setServiceParent(root)  # started before the agent, stopped after it
    agent = GuestAgent(
        reactor,
        session,
        identity=config.identity,
        ip=ip,
        mac=mac,
        agent_version=agent_version(),
        runner=runner,
        files=files,
        browser=browser,
        workdir=files.root,
        beacon_interval=config.beacon_interval,
        dispatch=threads.dispatch,
    )
    session.on_connected = agent.connected
    agent.setServiceParent(root)
    return root


def makeService(options: Options) -> IService:  # noqa: N802 - twistd's name
    from twisted.internet import reactor

    host = discover()
    try:
        config = resolve_guest_config(options.config, host)
    except GuestConfigError as e:
        raise SystemExit(f"vmcloud-guest: {e}") from None
    return build_agent(reactor, config, ip=host.ip, mac=None if host.mac == NO_MAC else host.mac)
