"""The configuration rules an operator relies on: defaults, precedence, and loud errors for typos."""

import configparser
from collections.abc import Mapping

import attrs
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.config import NOVA_KEYS, Config, ConfigError, listens_on_loopback_only, parse_config
from vmcloud.drivers.nova import NovaConfig
from vmcloud.pool.config import PoolConfig, pool_config

SHIPPED = "etc/vmcloud.conf"


def written(value: object) -> str:
    """A default as the shipped file writes it."""
    if value is None or isinstance(value, Mapping):
        return ""  # initial_max (the cap), [broker] users (none)
    if isinstance(value, bool):
        return "yes" if value else ""  # [nova] insecure: empty is "no, unless OS_INSECURE"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


class ParseConfigTests(SynchronousTestCase):
    def test_embedded_defaults(self) -> None:
        config = parse_config(None)
        self.assertEqual(config.api.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.broker.listen, "tcp:61613:interface=127.0.0.1")
        self.assertEqual(config.pool.driver, "local")
        self.assertEqual(config.pool.state_dir, "./state")
        self.assertEqual(config.api.cors_origins, ("*",))

    def test_shipped_example_is_valid_and_default(self) -> None:
        with open("etc/vmcloud.conf", encoding="utf-8") as f:
            shipped = parse_config(f.read())
        default = parse_config(None)
        for section in ("api", "broker", "pool", "local"):
            self.assertEqual(getattr(shipped, section), getattr(default, section))
        self.assertEqual(shipped.nova, {"microversion": "2.1", "timeout": "10"})

    def test_flags_override_file(self) -> None:
        text = "[api]\nlisten = tcp:9000\ntoken = s3cret\n[pool]\ndriver = nova\n"
        config = parse_config(text, {"api": "tcp:9001:interface=127.0.0.1", "driver": None})
        self.assertEqual(config.api.listen, "tcp:9001:interface=127.0.0.1")
        self.assertEqual(config.pool.driver, "nova")
        self.assertEqual(config.api.token, "s3cret")

    def test_unknown_key_names_it(self) -> None:
        with self.assertRaisesRegex(ConfigError, r"\[pool\] max_pool_sise: unknown key"):
            parse_config("[pool]\nmax_pool_sise = 3\n")

    def test_unknown_section(self) -> None:
        with self.assertRaisesRegex(ConfigError, r"\[poool\]: unknown section"):
            parse_config("[poool]\nx = 1\n")

    def test_bad_numbers(self) -> None:
        with self.assertRaisesRegex(ConfigError, "whole number"):
            parse_config("[pool]\nmax_pool_size = many\n")
        with self.assertRaisesRegex(ConfigError, "positive"):
            parse_config("[pool]\ntimeout_boot = 0\n")

    def test_operator_users(self) -> None:
        config = parse_config("[broker]\nusers = alice:pw1, bob:p:w2\n")
        self.assertEqual(config.broker.users, {"alice": "pw1", "bob": "p:w2"})
        with self.assertRaisesRegex(ConfigError, "name:password"):
            parse_config("[broker]\nusers = alice\n")

    def test_nova_section_passes_through(self) -> None:
        config = parse_config("[nova]\nimage = abc\nflavor = 1\n")
        self.assertEqual(config.nova["image"], "abc")
        with self.assertRaisesRegex(ConfigError, r"\[nova\] imgae"):
            parse_config("[nova]\nimgae = abc\n")

    def test_external_broker_needs_guest_login(self) -> None:
        with self.assertRaisesRegex(ConfigError, "guest_login"):
            parse_config("[broker]\nexternal = tcp:127.0.0.1:61614\n")

    def test_driver_choice(self) -> None:
        with self.assertRaisesRegex(ConfigError, "local or nova"):
            parse_config(None, {"driver": "vbox"})

    def test_local_browser_choice(self) -> None:
        self.assertEqual(parse_config("[local]\nbrowser = none\n").local.browser, "none")
        with self.assertRaisesRegex(ConfigError, r"\[local\] browser"):
            parse_config("[local]\nbrowser = firefox\n")


class ShippedFileTests(SynchronousTestCase):
    """``etc/vmcloud.conf`` is the reference of every key: each one, with its default, nothing else."""

    def setUp(self) -> None:
        self.shipped = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
        with open(SHIPPED, encoding="utf-8") as f:
            self.shipped.read_file(f)

    def test_every_key_with_its_default_and_nothing_else(self) -> None:
        defaults = Config()
        self.assertEqual(self.shipped.sections(), ["api", "broker", "pool", "local", "nova"])
        for section in ("api", "broker", "pool", "local"):
            record = getattr(defaults, section)
            expected = {
                field.name: written(getattr(record, field.name)) for field in attrs.fields(type(record))
            }
            with self.subTest(section):
                self.assertEqual(dict(self.shipped.items(section)), expected)

    def test_every_nova_key_with_its_default(self) -> None:
        """Empty ones are filled from ``OS_*``; the two set are NovaConfig's own defaults."""
        nova = NovaConfig()
        self.assertEqual(NOVA_KEYS, {field.name for field in attrs.fields(NovaConfig)})
        self.assertEqual(set(self.shipped.options("nova")), NOVA_KEYS)
        given = {key: value for key, value in self.shipped.items("nova") if value}
        self.assertEqual(given, {"microversion": nova.microversion, "timeout": written(nova.timeout)})


class PoolConfigTests(SynchronousTestCase):
    """The pool's record is derived from the file's: every field can be set there."""

    def test_the_defaults_users_get(self) -> None:
        """The daemon ran with these before the two records became one (poll every 5 s, not
        PoolConfig's 10; a client's ?wait= capped at 30 s by the API, not PoolConfig's 60)."""
        config = pool_config(parse_config(None), "host-1")
        self.assertEqual(config, PoolConfig(controller_name="host-1"))
        self.assertEqual(
            (config.poll_interval, config.long_poll_default, config.long_poll_max), (5.0, 5.0, 30.0)
        )

    def test_every_field_is_a_key_of_the_file(self) -> None:
        defaults = PoolConfig()
        keys = [field.name for field in attrs.fields(PoolConfig) if field.name != "controller_name"]
        lines = {"api": [], "pool": []}
        expected = {}
        for number, key in enumerate(keys, start=2):
            value = getattr(defaults, key)
            changed: object = number if isinstance(value, int | None) else float(number) + 0.5
            if key == "prefix":
                changed = "other-"
            elif key == "max_pool_size":
                changed = 500
            expected[key] = changed
            lines["api" if key.startswith("long_poll_") else "pool"].append(f"{key} = {changed}")
        text = "".join(f"[{section}]\n" + "\n".join(body) + "\n" for section, body in lines.items())
        derived = attrs.asdict(pool_config(parse_config(text), "host-1"))
        self.assertEqual(derived, {"controller_name": "host-1", **expected})

    def test_initial_max_empty_is_the_cap(self) -> None:
        self.assertIsNone(parse_config("[pool]\ninitial_max =\n").pool.initial_max)
        self.assertEqual(parse_config("[pool]\ninitial_max = 7\n").pool.initial_max, 7)
        with self.assertRaisesRegex(ConfigError, r"\[pool\] initial_max: expected a whole number"):
            parse_config("[pool]\ninitial_max = all\n")


class LoopbackTests(SynchronousTestCase):
    def test_loopback_descriptions(self) -> None:
        self.assertTrue(listens_on_loopback_only("tcp:8080:interface=127.0.0.1"))
        self.assertFalse(listens_on_loopback_only("tcp:8080"))
        self.assertFalse(listens_on_loopback_only("tcp:8080:interface=0.0.0.0"))
        self.assertTrue(listens_on_loopback_only("unix:/run/vmcloud.sock"))
