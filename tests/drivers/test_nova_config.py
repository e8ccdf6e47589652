"""``[nova]`` settings: OS_* filling, validation with the key named, secrets kept out of reprs."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vmcloud.drivers.nova import NovaConfig, NovaConfigError

IDS = {"image": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "flavor": "1"}
OPENRC = {
    "OS_AUTH_URL": "https://keystone.example/v3",
    "OS_USERNAME": "alice",
    "OS_PASSWORD": "s3cret",
    "OS_PROJECT_NAME": "crowd",
    "OS_USER_DOMAIN_NAME": "Default",
    "OS_PROJECT_DOMAIN_NAME": "Default",
    "OS_REGION_NAME": "RegionTwo",
}


class FromSourcesTests(SynchronousTestCase):
    def test_empty_keys_come_from_the_openrc_environment(self) -> None:
        config = NovaConfig.from_sources({**IDS, "microversion": "2.1", "timeout": "10"}, OPENRC)
        self.assertEqual(config.auth_url, "https://keystone.example/v3")
        self.assertEqual(
            (config.username, config.password, config.project_name), ("alice", "s3cret", "crowd")
        )
        self.assertEqual(config.region_name, "RegionTwo")
        self.assertEqual(config.auth_method, "password")
        self.assertEqual(config.timeout, 10.0)

    def test_the_file_wins_over_the_environment(self) -> None:
        config = NovaConfig.from_sources({**IDS, "username": "bob", "region_name": " "}, OPENRC)
        self.assertEqual(config.username, "bob")
        self.assertEqual(config.region_name, "RegionTwo")  # blank counts as empty

    def test_legacy_tenant_name_and_auth_token(self) -> None:
        env = {"OS_AUTH_URL": "https://k/v3", "OS_TENANT_NAME": "old", "OS_AUTH_TOKEN": "t0k"}
        config = NovaConfig.from_sources(IDS, env)
        self.assertEqual((config.project_name, config.token, config.auth_method), ("old", "t0k", "token"))

    def test_lists_booleans_and_versions(self) -> None:
        config = NovaConfig.from_sources(
            {**IDS, "security_groups": "default, web ,", "insecure": "yes", "microversion": "2.47"}, OPENRC
        )
        self.assertEqual(config.security_groups, ("default", "web"))
        self.assertTrue(config.insecure)
        self.assertEqual(config.microversion, "2.47")

    def test_application_credential_needs_no_user(self) -> None:
        env = {
            "OS_AUTH_URL": "https://k/v3",
            "OS_APPLICATION_CREDENTIAL_ID": "ac1",
            "OS_APPLICATION_CREDENTIAL_SECRET": "acs",
        }
        self.assertEqual(NovaConfig.from_sources(IDS, env).auth_method, "application-credential")

    def test_token_and_endpoint_override_need_no_keystone(self) -> None:
        section = {**IDS, "token": "t", "endpoint_override": "http://nova.example/v2.1"}
        self.assertEqual(NovaConfig.from_sources(section, {}).auth_method, "token-endpoint")

    def test_refusals_name_the_key(self) -> None:
        cases = [
            ({**IDS, "colour": "blue"}, OPENRC, "[nova] colour: unknown key"),
            ({**IDS, "timeout": "soon"}, OPENRC, "[nova] timeout: expected seconds"),
            ({**IDS, "timeout": "0"}, OPENRC, "[nova] timeout: must be within"),
            ({**IDS, "insecure": "maybe"}, OPENRC, "[nova] insecure"),
            ({**IDS, "microversion": "2.latest"}, OPENRC, "[nova] microversion"),
            ({"flavor": "1"}, OPENRC, "[nova] image: required"),
            (IDS, {}, "[nova] auth_url: required"),
            (IDS, {"OS_AUTH_URL": "https://k/v3", "OS_USERNAME": "a"}, "[nova] password: required"),
            (
                IDS,
                {"OS_AUTH_URL": "https://k/v3", "OS_APPLICATION_CREDENTIAL_ID": "x"},
                "give both or neither",
            ),
        ]
        for section, env, message in cases:
            with self.assertRaises(NovaConfigError) as caught:
                NovaConfig.from_sources(section, env)
            self.assertIn(message, str(caught.exception))

    def test_secrets_stay_out_of_repr(self) -> None:
        config = NovaConfig.from_sources(
            {
                **IDS,
                "application_credential_id": "ac",
                "application_credential_secret": "acsecret",
                "token": "tok3n",
            },
            OPENRC,
        )
        text = repr(config)
        for secret in ("s3cret", "acsecret", "tok3n"):
            self.assertNotIn(secret, text)
        self.assertIn("alice", text)
