"""parse_guest_config: how an operator's flags, file and the cloud's user-data become the agent's settings."""

from __future__ import annotations

from pathlib import Path

from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.config import (
    GUEST_CONFIG_KEYS,
    GuestConfig,
    GuestConfigError,
    parse_guest_config,
    resolve_guest_config,
)
from guest_agent.identity import HostIdentity

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "vmcloud-guest.conf"
HOST = HostIdentity(mac="FA:16:3E:00:00:01", ip="10.0.0.5", interface="eth0", gateway="10.0.0.1")

# What the Nova driver writes into a VM's user-data.
NOVA_USER_DATA = b"[agent]\nbroker = tcp:192.168.1.10:61613\nlogin = vm-7\npasscode = s3cret\n"


class ParseTests(SynchronousTestCase):
    def error(self, flags: dict[str, object], text: str | None = None, user_data: bytes | None = None) -> str:
        with self.assertRaises(GuestConfigError) as caught:
            parse_guest_config(flags, text, user_data)
        return str(caught.exception)

    def test_defaults(self) -> None:
        config = parse_guest_config({}, None, None)
        self.assertEqual(config, GuestConfig())
        self.assertEqual(
            (config.broker, config.identity, config.beacon_interval, config.max_output, config.max_file_size),
            (None, None, 5.0, 1024 * 1024, 64 * 1024 * 1024),
        )
        self.assertEqual((config.command_timeout, config.max_commands), (300.0, 8))

    def test_user_data_from_the_controller(self) -> None:
        config = parse_guest_config({}, None, NOVA_USER_DATA)
        self.assertEqual(
            (config.broker, config.login, config.passcode), ("tcp:192.168.1.10:61613", "vm-7", "s3cret")
        )

    def test_precedence_flags_over_file_over_user_data(self) -> None:
        text = "[agent]\nbroker = tcp:10.9.9.9:61613\nbeacon_interval = 2\nmax_commands = 3\n"
        config = parse_guest_config({"max-commands": "5", "identity": None}, text, NOVA_USER_DATA)
        self.assertEqual(config.broker, "tcp:10.9.9.9:61613")  # file beats user-data
        self.assertEqual(config.login, "vm-7")  # only user-data says it
        self.assertEqual(config.beacon_interval, 2.0)
        self.assertEqual(config.max_commands, 5)  # the flag beats the file; None flags are "not given"

    def test_typed_flag_values(self) -> None:
        config = parse_guest_config({"max_output": 4096, "command_timeout": 1.5}, None, None)
        self.assertEqual((config.max_output, config.command_timeout), (4096, 1.5))

    def test_sizes_and_broker_shorthand(self) -> None:
        text = (
            "[agent]\nmax_output = 64k ; inline comment\nmax_file_size = 2MiB\nbroker = ctl.example:61613\n"
        )
        config = parse_guest_config({}, text, None)
        self.assertEqual((config.max_output, config.max_file_size), (65536, 2 * 1024 * 1024))
        self.assertEqual(config.broker, "tcp:ctl.example:61613")

    def test_unknown_keys_are_named(self) -> None:
        self.assertIn("[agent] brokr: unknown key", self.error({}, "[agent]\nbrokr = x:1\n"))
        self.assertIn(
            "user-data: [agent] colour: unknown key", self.error({}, None, b"[agent]\ncolour = red\n")
        )
        self.assertIn("--verbose: not a configuration flag", self.error({"verbose": "1"}))
        self.assertIn("[browser]: unknown section", self.error({}, "[agent]\n[browser]\nx = 1\n"))
        self.assertIn("[DEFAULT]: unknown section", self.error({}, "[DEFAULT]\nbroker = tcp:a:1\n"))

    def test_bad_values_name_the_key_and_source(self) -> None:
        cases = {
            "beacon_interval = -1": "config file: [agent] beacon_interval: must be a positive",
            "beacon_interval = soon": "config file: [agent] beacon_interval: expected a number of seconds",
            "max_output = lots": "config file: [agent] max_output: expected a size",
            "max_output = 0": "config file: [agent] max_output: must be at least 1 byte",
            "max_commands = 0": "config file: [agent] max_commands: must be at least 1",
            "max_commands = 2.5": "config file: [agent] max_commands: expected a whole number",
            "broker = http://x": "config file: [agent] broker: expected a client endpoint",
            "broker = tcp:host:99999": "config file: [agent] broker: expected tcp:host:port",
            "identity = has space": "config file: [agent] identity: 'has space' cannot name a destination",
            "workdir = relative/dir": "config file: [agent] workdir: must be an absolute path",
        }
        for line, message in cases.items():
            self.assertIn(message, self.error({}, f"[agent]\n{line}\n"), line)
        self.assertIn("--command-timeout: command_timeout", self.error({"command-timeout": "x"}))

    def test_login_needs_passcode(self) -> None:
        self.assertIn("login and passcode", self.error({"login": "vm-1"}))

    def test_broken_ini(self) -> None:
        self.assertIn("config file:", self.error({}, "broker = tcp:a:1\n"))  # no section header
        self.assertIn("user-data:", self.error({}, None, b"[agent]\nbroker = tcp:a:1\nbroker = tcp:b:1\n"))

    def test_foreign_user_data_is_ignored_and_logged(self) -> None:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for foreign in (b"#cloud-config\npackages: [htop]\n", b"#!/bin/sh\necho hi\n", b"\xff\xfe\x00"):
            self.assertEqual(parse_guest_config({}, None, foreign), GuestConfig())
        self.assertEqual([e.get("event") for e in events].count("user-data-ignored"), 3)

    def test_passcode_is_not_in_the_repr(self) -> None:
        config = parse_guest_config({}, None, NOVA_USER_DATA)
        self.assertNotIn("s3cret", repr(config))

    def test_example_file_documents_every_key_and_parses(self) -> None:
        """etc/vmcloud-guest.conf is valid as shipped, and uncommented it is valid too."""
        text = EXAMPLE.read_text()
        self.assertEqual(parse_guest_config({}, text, None), GuestConfig())
        for key in GUEST_CONFIG_KEYS:
            self.assertIn(f"\n;{key} =", text)
        uncommented = "\n".join(
            line[1:]
            if line.startswith(";")
            and "=" in line
            and not line.startswith(";login")
            and not line.startswith(";passcode")
            else line
            for line in text.splitlines()
        )
        config = parse_guest_config({}, uncommented, None)
        self.assertEqual((config.broker, config.identity), ("tcp:10.0.0.1:61613", "test-1"))
        self.assertEqual((config.max_output, config.max_file_size), (1024 * 1024, 64 * 1024 * 1024))


class ResolveTests(SynchronousTestCase):
    def test_discovered_defaults(self) -> None:
        config = resolve_guest_config(parse_guest_config({}, None, None), HOST)
        self.assertEqual((config.broker, config.identity), ("tcp:10.0.0.1:61613", "fa-16-3e-00-00-01"))

    def test_login_names_the_guest(self) -> None:
        config = resolve_guest_config(parse_guest_config({}, None, NOVA_USER_DATA), HOST)
        self.assertEqual((config.broker, config.identity), ("tcp:192.168.1.10:61613", "vm-7"))

    def test_explicit_identity_wins(self) -> None:
        config = resolve_guest_config(parse_guest_config({"identity": "test-1"}, None, NOVA_USER_DATA), HOST)
        self.assertEqual(config.identity, "test-1")

    def test_login_that_cannot_name_a_destination(self) -> None:
        config = parse_guest_config({"login": "a b", "passcode": "p"}, None, None)
        self.assertRaises(GuestConfigError, resolve_guest_config, config, HOST)
