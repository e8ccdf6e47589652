"""The controller's configuration: an INI file and command-line flags turned into one frozen record.

Parsing is a pure function of text and flags so that tests (and ``twistd vmcloud``'s option parsing,
which refuses a bad file before anything starts) can exercise every rule without a reactor, a file
system or the environment.  Precedence: flags > file > defaults.
Unknown sections and keys are errors: a typo in a config file must not silently fall back to a
default an operator did not choose.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping

import attrs

DEFAULT_API = "tcp:8080:interface=127.0.0.1"
DEFAULT_STOMP = "tcp:61613:interface=127.0.0.1"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the section and key."""


@attrs.frozen
class ApiConfig:
    listen: str = DEFAULT_API
    token: str = ""
    cors_origins: tuple[str, ...] = ("*",)
    static_dir: str = ""  # empty: the static/ folder shipped with vmcloud
    access_log: str = "access.log"  # relative to the state dir; "-": the daemon's log; "none": off
    long_poll_default: float = 5.0  # seconds fetch-events waits when the client does not say
    long_poll_max: float = 30.0  # the longest ?wait= a client may ask for


@attrs.frozen
class BrokerConfig:
    listen: str = DEFAULT_STOMP
    external: str = ""  # client endpoint of an external broker; empty: embedded
    login: str = ""  # the controller's credentials (on the external broker, or for the embedded one)
    passcode: str = ""
    users: Mapping[str, str] = attrs.field(factory=dict)  # operator users
    guest_login: str = ""  # shared guest credentials on an external broker
    guest_passcode: str = ""
    guest_broker: str = ""  # broker address told to guests; empty: derived from the listener
    anonymous_guests: str = "auto"  # auto | yes | no


@attrs.frozen
class PoolSettings:
    """``[pool]``: the daemon's own keys (driver, state_dir, cloud_threads) and every key of
    :class:`~vmcloud.pool.config.PoolConfig`, which documents their meaning."""

    driver: str = "local"
    prefix: str = "vmcloud-vm-"
    controller_name: str = ""  # empty: the host name
    max_pool_size: int = 30
    state_dir: str = "./state"
    beacon_interval: float = 5.0
    timeout_boot: float = 240.0
    timeout_update: float = 20.0
    timeout_operation: float = 30.0
    timeout_cloud: float = 10.0
    poll_interval: float = 5.0
    events_per_handle: int = 1000
    cloud_threads: int = 4
    quota_retry: float = 60.0
    max_boots_in_flight: int = 16
    max_deletes_in_flight: int = 16
    tick_interval: float = 1.0
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    checkpoint_interval: float = 0.05
    max_pending_locks: int = 10_000
    initial_min: int = 0
    initial_max: int | None = None  # empty: max_pool_size
    initial_linger_ms: int = 60_000


@attrs.frozen
class LocalSettings:
    max_vms: int = 8
    netns: str = "auto"  # auto | yes | no
    subnet: str = ""  # empty: a free /24 of 10.200.0.0/13, probed from a hash of the state dir
    bridge: str = ""  # empty: vmcb + a hash of the state dir and prefix (two daemons never share it)
    browser: str = "auto"  # auto: the real browser stack in every VM where installed; none: no browser


@attrs.frozen
class Config:
    api: ApiConfig = ApiConfig()
    broker: BrokerConfig = BrokerConfig()
    pool: PoolSettings = PoolSettings()
    local: LocalSettings = LocalSettings()
    nova: Mapping[str, str] = attrs.field(factory=dict)  # handed to NovaConfig.from_sources as is


NOVA_KEYS = frozenset(
    {
        "auth_url",
        "username",
        "password",
        "project_name",
        "user_domain_name",
        "project_domain_name",
        "region_name",
        "application_credential_id",
        "application_credential_secret",
        "token",
        "image",
        "flavor",
        "network",
        "key_name",
        "security_groups",
        "microversion",
        "endpoint_override",
        "timeout",
        "floating_ip_pool",
        "insecure",
        "cacert",
    }
)

_SECTIONS: dict[str, type] = {
    "api": ApiConfig,
    "broker": BrokerConfig,
    "pool": PoolSettings,
    "local": LocalSettings,
}

#: Flag name -> (section, key): the flags of ``twistd vmcloud`` that override the file.
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "api": ("api", "listen"),
    "stomp": ("broker", "listen"),
    "state-dir": ("pool", "state_dir"),
    "driver": ("pool", "driver"),
}


def _coerce(section: str, key: str, raw: str, default: object) -> object:
    value = raw.strip()
    where = f"[{section}] {key}"
    if default is None:  # an optional whole number (initial_max): empty is None
        return _coerce(section, key, value, 0) if value else None
    if isinstance(default, bool):
        if value.lower() in ("1", "yes", "true", "on"):
            return True
        if value.lower() in ("0", "no", "false", "off"):
            return False
        raise ConfigError(f"{where}: expected yes or no, got {value!r}")
    if isinstance(default, int):
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{where}: must not be negative, got {number}")
        return number
    if isinstance(default, float):
        try:
            real = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
        if real <= 0:
            raise ConfigError(f"{where}: must be positive, got {real}")
        return real
    if isinstance(default, tuple):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(default, Mapping):
        users: dict[str, str] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            name, sep, password = entry.partition(":")
            if not sep or not name.strip() or not password:
                raise ConfigError(f"{where}: expected name:password entries, got {entry.split(':')[0]!r}")
            users[name.strip()] = password
        return users
    return value


def _build_section(section: str, values: Mapping[str, str]) -> object:
    record = _SECTIONS[section]
    defaults = record()
    fields = {field.name for field in attrs.fields(record)}
    kwargs: dict[str, object] = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(section, key, raw, getattr(defaults, key))
    return record(**kwargs)


def parse_config(text: str | None, flags: Mapping[str, str | None] | None = None) -> Config:
    """Build the configuration from the file's text (None: no file) and the flags that were given."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    if text:
        try:
            parser.read_string(text)
        except configparser.Error as e:
            raise ConfigError(f"config file: {e.message}") from None
    sections: dict[str, dict[str, str]] = {name: {} for name in (*_SECTIONS, "nova")}
    for name in parser.sections():
        if name not in sections:
            raise ConfigError(f"[{name}]: unknown section (known: {', '.join(sorted(sections))})")
        sections[name].update(parser.items(name))
    for flag, value in (flags or {}).items():
        if value is None:
            continue
        if flag not in FLAG_KEYS:
            raise ConfigError(f"--{flag}: not a configuration flag")
        section, key = FLAG_KEYS[flag]
        sections[section][key] = value
    for key in sections["nova"]:
        if key not in NOVA_KEYS:
            raise ConfigError(f"[nova] {key}: unknown key (known: {', '.join(sorted(NOVA_KEYS))})")
    built = {name: _build_section(name, values) for name, values in sections.items() if name in _SECTIONS}
    config = Config(nova={k: v.strip() for k, v in sections["nova"].items() if v.strip()}, **built)  # type: ignore[arg-type]
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.pool.driver not in ("local", "nova"):
        raise ConfigError(f"[pool] driver: expected local or nova, got {config.pool.driver!r}")
    if config.broker.anonymous_guests not in ("auto", "yes", "no"):
        raise ConfigError("[broker] anonymous_guests: expected auto, yes or no")
    if config.local.netns not in ("auto", "yes", "no"):
        raise ConfigError("[local] netns: expected auto, yes or no")
    if config.local.browser not in ("auto", "none"):
        raise ConfigError("[local] browser: expected auto or none")
    if config.pool.driver == "local":
        from vmcloud.drivers.netns import check_bridge_name, check_subnet

        for key, check in (("subnet", check_subnet), ("bridge", check_bridge_name)):
            value = getattr(config.local, key)
            if value:
                try:
                    check(value)
                except ValueError as e:
                    raise ConfigError(f"[local] {key}: {e}") from None
    if not config.pool.prefix:
        raise ConfigError("[pool] prefix: must not be empty (it is what marks our servers in the cloud)")
    if config.pool.max_pool_size < 1:
        raise ConfigError("[pool] max_pool_size: must be at least 1")
    if config.broker.external and config.broker.guest_login == "":
        raise ConfigError("[broker] guest_login: needed with an external broker (guests share it there)")


#: The shortest kernel queue of not-yet-accepted connections any of the daemon's listeners gets.
#: Twisted's default is 50: when a restarted broker comes back, every guest of the pool connects
#: within the same second, and with 50 slots the rest of their SYNs are dropped and retried one,
#: three, seven seconds later (2,000 simultaneous connects stalled for up to a second).
MIN_LISTEN_BACKLOG = 1024

#: strports kinds that take a ``backlog=`` argument (systemd's inherited sockets, for one, do not:
#: their backlog is the socket unit's ``Backlog=``).
_BACKLOG_KINDS = frozenset({"tcp", "tcp6", "ssl", "unix"})


def listen_backlog(max_pool_size: int) -> int:
    """The backlog of the daemon's listeners: room for every guest of the largest pool, and a few
    operators or tools, to connect at once (each guest has one connection, so one SYN at a time).

    The kernel caps it at ``net.core.somaxconn`` (4096 by default since Linux 5.4).
    """
    return max(MIN_LISTEN_BACKLOG, max_pool_size + 64)


def _split_description(description: str) -> list[str]:
    """A strports description's ``:``-separated parts (``\\:`` is a colon inside a part)."""
    parts, part, escaped = [], [], False
    for char in description:
        if escaped:
            part.append(char)
            escaped = False
        elif char == "\\":
            part.append(char)
            escaped = True
        elif char == ":":
            parts.append("".join(part))
            part = []
        else:
            part.append(char)
    parts.append("".join(part))
    return parts


def with_backlog(description: str, backlog: int) -> str:
    """``description`` listening with ``backlog``, unless it already says ``backlog=`` (the
    operator's choice stands) or is of a kind that takes none."""
    parts = _split_description(description)
    if parts[0] not in _BACKLOG_KINDS or any(part.startswith("backlog=") for part in parts[1:]):
        return description
    return f"{description}:backlog={backlog}"


def listens_on_loopback_only(description: str) -> bool:
    """Whether a strports server description binds to the loopback interface only."""
    parts = description.split(":")
    if parts[0] == "unix":
        return True
    for part in parts[1:]:
        if part.startswith("interface="):
            interface = part.removeprefix("interface=")
            return interface.startswith("127.") or interface in ("::1", "localhost")
    return False
