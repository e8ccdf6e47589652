"""The guest agent's configuration: flags, a file and the cloud's user-data turned into one frozen record.

Three sources, highest precedence first:

1. **flags** of ``twistd vmcloud-guest`` (``--broker``, ``--identity``, ...; a mapping of key to
   value where ``None`` means "not given"; dashes and underscores are the same);
2. **the file** (``etc/vmcloud-guest.conf``, ``--config``): an INI document with one section,
   ``[agent]``, holding any of the keys below;
3. **user-data**, what the controller puts into a cloud VM when it boots it.  The Nova driver
   writes exactly this small INI document (seen by the guest through the metadata service or a
   config drive)::

       [agent]
       broker = tcp:10.0.0.1:61613
       login = vm-4f2a
       passcode = 9d1c...

   It may hold any key of the ``[agent]`` section, but the controller only ever sets ``broker``,
   ``login`` and ``passcode``.  User-data that is not such a document (a ``#cloud-config`` an
   operator added, a shell script) is not for us: it is ignored and the log says so.  User-data
   that *has* an ``[agent]`` section is held to the same rules as the file.

4. the defaults below.

Keys (all optional):

==================  ==========================  ============================================
key                 default                     meaning
==================  ==========================  ============================================
broker              default gateway, port 61613 client endpoint of the broker (``tcp:host:port``;
                                                a bare ``host:port`` means tcp)
identity            login, else the MAC         name of the guest's command destination
login / passcode    none                        STOMP credentials (per VM, minted by the controller)
workdir             /var/lib/vmcloud-guest      root of FILE_PUT / FILE_GET, cwd of commands
beacon_interval     5                           seconds between STILL_ALIVE beacons
max_output          1MiB                        bytes of stdout and of stderr kept per command
max_file_size       64MiB                       largest file FILE_PUT / FILE_GET will move
command_timeout     300                         seconds, when CMD_RUN gives no timeout
max_commands        8                           commands running at once
browser             auto                        ``auto``: Chromium on Xvnc where installed, else
                                                none; ``none``: no browser (``no-browser``)
browser_user        per-vm                      who Chromium runs as when the agent is root:
                                                ``per-vm``, a uid of its own per VM (no passwd
                                                entry; 2000000000 + the VM's run slot), so
                                                local VMs cannot read each other's profiles,
                                                display or sound; or a user name
vnc_port            5900                        the VNC server's port on the VM's address (on a
                                                shared loopback a free port is taken instead)
==================  ==========================  ============================================

Sizes take an optional suffix: ``k``/``K``/``KiB`` (1024), ``M``/``MiB``, ``G``/``GiB``.
Unknown sections and keys are errors naming the key: a typo must not silently fall back to a
default nobody chose.  The parser is pure (text in, record out), so the composition root
(``guest_agent/tap.py``) reads the files and the metadata service and tests need neither.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from guest_agent.identity import HostIdentity, default_broker
from vmcloud.words.destinations import IDENTITY_RE, identity_from_mac

MiB = 1024 * 1024
DEFAULT_WORKDIR = "/var/lib/vmcloud-guest"
SECTION = "agent"

log = Logger()


class GuestConfigError(ValueError):
    """The configuration cannot be used; the message names the source and the key."""


@attrs.frozen
class GuestConfig:
    """Everything the agent needs to run; ``broker`` / ``identity`` None mean "discover them"."""

    broker: str | None = None
    identity: str | None = None
    login: str | None = None
    passcode: str | None = attrs.field(default=None, repr=False)  # a secret: never in logs or reprs
    workdir: str = DEFAULT_WORKDIR
    beacon_interval: float = 5.0
    max_output: int = 1 * MiB
    max_file_size: int = 64 * MiB
    command_timeout: float = 300.0
    max_commands: int = 8
    browser: str = "auto"
    browser_user: str = "per-vm"
    vnc_port: int = 5900


#: Every configuration key, in the order of the example file.
GUEST_CONFIG_KEYS: tuple[str, ...] = tuple(field.name for field in attrs.fields(GuestConfig))

_SIZE_RE = re.compile(r"^(\d+)\s*(?:([kKmMgG])(?:i?B)?|B)?$")
_SIZE_UNITS = {"k": 1024, "m": MiB, "g": 1024 * MiB}
_HOST_PORT_RE = re.compile(r"^[A-Za-z0-9.\-]+:\d{1,5}$")
_ENDPOINT_TYPES = ("tcp", "tls", "ssl", "unix")


def parse_guest_config(
    flags: Mapping[str, Any], file_text: str | None, user_data: bytes | None
) -> GuestConfig:
    """Merge the three sources (flags > file > user-data > defaults) into a checked record."""
    values: dict[str, tuple[str, object]] = {}  # key -> (where it came from, raw value)
    if user_data:
        for key, raw in _user_data_values(user_data).items():
            values[key] = ("user-data", raw)
    if file_text:
        for key, raw in _ini_values(file_text, "config file").items():
            values[key] = ("config file", raw)
    for flag, raw in flags.items():
        if raw is None:
            continue
        key = flag.replace("-", "_")
        if key not in GUEST_CONFIG_KEYS:
            raise GuestConfigError(f"--{flag}: not a configuration flag")
        values[key] = (f"--{flag.replace('_', '-')}", raw)
    kwargs = {key: _coerce(key, where, raw) for key, (where, raw) in values.items()}
    config = GuestConfig(**kwargs)  # type: ignore[arg-type]
    if (config.login is None) != (config.passcode is None):
        raise GuestConfigError("login and passcode: give both or neither")
    return config


def resolve_guest_config(config: GuestConfig, host: HostIdentity) -> GuestConfig:
    """Fill what was left to discovery: the broker (the gateway's port 61613) and the identity.

    The identity is, in order: the configured one, the login (per-VM credentials name the guest's
    destination), the MAC of the default-route interface.
    """
    broker = config.broker or default_broker(host)
    identity = config.identity or config.login or identity_from_mac(host.mac)
    if not IDENTITY_RE.match(identity):
        raise GuestConfigError(
            f"identity: {identity!r} cannot name a destination (letters, digits, '.', '_', '-' only);"
            " set identity explicitly"
        )
    return attrs.evolve(config, broker=broker, identity=identity)


def _ini_values(text: str, where: str) -> dict[str, str]:
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\0no default section"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=where)
    except configparser.Error as e:
        raise GuestConfigError(f"{where}: {e.message}") from None
    for name in parser.sections():
        if name != SECTION:
            raise GuestConfigError(f"{where}: [{name}]: unknown section (the only section is [{SECTION}])")
    values = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    for key in values:
        if key not in GUEST_CONFIG_KEYS:
            raise GuestConfigError(
                f"{where}: [{SECTION}] {key}: unknown key (known: {', '.join(GUEST_CONFIG_KEYS)})"
            )
    return values


def _user_data_values(user_data: bytes) -> dict[str, str]:
    try:
        text = user_data.decode("utf-8")
    except UnicodeDecodeError:
        log.info("User-data is not text; it is not for the agent", event="user-data-ignored")
        return {}
    if not re.search(rf"^\s*\[{SECTION}\]\s*$", text, re.MULTILINE):
        log.info("User-data has no [agent] section; it is not for the agent", event="user-data-ignored")
        return {}
    return _ini_values(text, "user-data")


def _coerce(key: str, where: str, raw: object) -> object:
    """The typed value of ``key``, or an error naming where the bad value came from."""
    label = f"{where}: {key}" if where.startswith("--") else f"{where}: [{SECTION}] {key}"
    value = raw.strip() if isinstance(raw, str) else raw
    if key in ("beacon_interval", "command_timeout"):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise GuestConfigError(f"{label}: expected a number of seconds, got {raw!r}") from None
        if not 0 < seconds < 1e7:
            raise GuestConfigError(f"{label}: must be a positive number of seconds, got {raw!r}")
        return seconds
    if key in ("max_output", "max_file_size"):
        return _size(label, value)
    if key in ("max_commands", "vnc_port"):
        try:
            number = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise GuestConfigError(f"{label}: expected a whole number, got {raw!r}") from None
        if number < 1:
            raise GuestConfigError(f"{label}: must be at least 1, got {number}")
        if key == "vnc_port" and number > 65535:
            raise GuestConfigError(f"{label}: not a TCP port, got {number}")
        return number
    if not isinstance(value, str):
        raise GuestConfigError(f"{label}: expected text, got {raw!r}")
    if key == "broker":
        return _broker(label, value)
    if key == "identity" and not IDENTITY_RE.match(value):
        raise GuestConfigError(
            f"{label}: {value!r} cannot name a destination (letters, digits, '.', '_', '-'; at most 128)"
        )
    if key == "browser" and value not in ("auto", "none"):
        raise GuestConfigError(f"{label}: expected auto or none, got {value!r}")
    if key == "browser_user" and not value:
        raise GuestConfigError(f"{label}: must not be empty")
    if key == "login" and not value:
        raise GuestConfigError(f"{label}: must not be empty")
    if key == "workdir" and not value.startswith("/"):
        raise GuestConfigError(f"{label}: must be an absolute path, got {value!r}")
    return value


def _size(label: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _SIZE_RE.match(str(value))
        if match is None:
            raise GuestConfigError(
                f"{label}: expected a size in bytes such as 1048576 or 1MiB, got {value!r}"
            )
        unit = match.group(2)
        number = int(match.group(1)) * (_SIZE_UNITS[unit.lower()] if unit else 1)
    if number < 1:
        raise GuestConfigError(f"{label}: must be at least 1 byte")
    return number


def _broker(label: str, value: str) -> str:
    if _HOST_PORT_RE.match(value):
        value = "tcp:" + value
    kind, sep, rest = value.partition(":")
    if not sep or kind not in _ENDPOINT_TYPES or not rest:
        raise GuestConfigError(
            f"{label}: expected a client endpoint such as tcp:10.0.0.1:61613 or host:port, got {value!r}"
        )
    if kind in ("tcp", "tls", "ssl") and "=" not in rest and "\\" not in rest:
        host, _, port = rest.partition(":")
        port = port.split(":")[0]
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise GuestConfigError(f"{label}: expected {kind}:host:port, got {value!r}")
    return value
