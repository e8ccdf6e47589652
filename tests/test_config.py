"""The configuration rules an operator relies on: defaults, precedence, and loud errors for typos."""

from twisted.trial.unittest import SynchronousTestCase

from vmcloud.config import ConfigError, listens_on_loopback_only, parse_config


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


class LoopbackTests(SynchronousTestCase):
    def test_loopback_descriptions(self) -> None:
        self.assertTrue(listens_on_loopback_only("tcp:8080:interface=127.0.0.1"))
        self.assertFalse(listens_on_loopback_only("tcp:8080"))
        self.assertFalse(listens_on_loopback_only("tcp:8080:interface=0.0.0.0"))
        self.assertTrue(listens_on_loopback_only("unix:/run/vmcloud.sock"))
