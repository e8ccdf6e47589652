"""Pure parts of the Nova driver: server bodies to ServerStatus, exceptions to CloudError, user-data."""

from __future__ import annotations

from keystoneauth1 import exceptions as ks
from novaclient import exceptions as nova
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from guest_agent.config import parse_guest_config
from vmcloud.drivers.nova import (
    NovaConfig,
    NovaDriver,
    UnexpectedCloudError,
    server_status,
    translate,
)
from vmcloud.drivers.userdata import render_user_data
from vmcloud.pool.interfaces import (
    ACTIVE,
    BUILD,
    DELETING,
    ERROR,
    BadCloudRequest,
    CloudUnavailable,
    GuestCredentials,
    QuotaExceeded,
    RateLimited,
)
from vmcloud.threads import synchronous_dispatch


def body(**changes: object) -> dict[str, object]:
    server: dict[str, object] = {
        "id": "s1",
        "name": "pool-1",
        "status": "ACTIVE",
        "OS-EXT-STS:task_state": None,
        "metadata": {"vmcloud-vmid": "1"},
        "addresses": {
            "private": [
                {
                    "version": 4,
                    "addr": "10.0.0.5",
                    "OS-EXT-IPS:type": "fixed",
                    "OS-EXT-IPS-MAC:mac_addr": "FA:16:3E:00:00:05",
                },
                {
                    "version": 4,
                    "addr": "172.24.4.9",
                    "OS-EXT-IPS:type": "floating",
                    "OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:00:00:05",
                },
            ],
            "second": [
                {
                    "version": 6,
                    "addr": "fd00::5",
                    "OS-EXT-IPS:type": "fixed",
                    "OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:00:00:06",
                }
            ],
        },
    }
    server.update(changes)
    return server


class ServerStatusTests(SynchronousTestCase):
    def test_active_server(self) -> None:
        status = server_status(body())
        self.assertEqual(status.status, ACTIVE)
        self.assertEqual(status.macs, ("fa:16:3e:00:00:05", "fa:16:3e:00:00:06"))
        self.assertEqual(status.ips, ("10.0.0.5", "fd00::5", "172.24.4.9"))  # fixed first, floating last
        self.assertEqual(status.metadata, {"vmcloud-vmid": "1"})
        self.assertIsNone(status.fault)

    def test_states(self) -> None:
        self.assertEqual(server_status(body(status="BUILD", addresses={})).status, BUILD)
        self.assertEqual(server_status(body(**{"OS-EXT-STS:task_state": "deleting"})).status, DELETING)
        error = server_status(
            body(status="ERROR", fault={"code": 500, "message": "No valid host was found. "})
        )
        self.assertEqual((error.status, error.fault), (ERROR, "No valid host was found. "))
        off = server_status(body(status="SHUTOFF"))
        self.assertEqual((off.status, off.fault), (ERROR, "server status SHUTOFF"))
        self.assertEqual(server_status(body(status="HARD_REBOOT")).status, ACTIVE)

    def test_odd_bodies_do_not_break_the_listing(self) -> None:
        status = server_status(
            {"id": "s2", "name": "pool-2", "status": "BUILD", "addresses": None, "metadata": None}
        )
        self.assertEqual((status.macs, status.ips, status.metadata), ((), (), {}))


class TranslateTests(SynchronousTestCase):
    def test_novaclient_errors(self) -> None:
        quota = nova.Forbidden(
            403, "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances"
        )
        self.assertIsInstance(translate(quota), QuotaExceeded)
        self.assertIsInstance(
            translate(nova.OverLimit(413, "Quota exceeded for ram")), QuotaExceeded
        )  # pre-Newton Nova
        limited = translate(nova.RateLimit(429, "slow down", retry_after="12"))
        self.assertIsInstance(limited, RateLimited)
        self.assertEqual(limited.retry_after, 12.0)
        self.assertIsNone(
            translate(nova.OverLimit(413, "slow down")).retry_after
        )  # no header: the pool decides
        self.assertIsInstance(translate(nova.ClientException(503, "Service Unavailable")), CloudUnavailable)
        self.assertIsInstance(translate(nova.Conflict(409, "busy")), CloudUnavailable)
        self.assertIsInstance(
            translate(nova.BadRequest(400, "Flavor 9 could not be found.")), BadCloudRequest
        )
        self.assertIsInstance(translate(nova.Forbidden(403, "Policy doesn't allow")), BadCloudRequest)
        self.assertIsInstance(translate(nova.Unauthorized(401, "no")), BadCloudRequest)
        self.assertIsInstance(
            translate(nova.NotAcceptable(406, "Version 2.99 is not supported")), BadCloudRequest
        )

    def test_keystoneauth_errors(self) -> None:
        self.assertIsInstance(translate(ks.ConnectFailure("refused")), CloudUnavailable)
        self.assertIsInstance(translate(ks.ConnectTimeout("timed out")), CloudUnavailable)
        self.assertIsInstance(translate(ks.UnknownConnectionError("odd", None)), CloudUnavailable)
        self.assertIsInstance(translate(ks.http.ServiceUnavailable()), CloudUnavailable)
        self.assertIsInstance(translate(ks.http.Unauthorized()), BadCloudRequest)
        self.assertIsInstance(translate(ks.http.TooManyRequests()), RateLimited)
        self.assertIsInstance(translate(ks.EndpointNotFound("no compute in RegionX")), BadCloudRequest)

    def test_anything_else(self) -> None:
        self.assertIsInstance(
            translate(ValueError("nics are required after microversion 2.36")), BadCloudRequest
        )
        try:
            {}["id"]
        except KeyError as e:
            surprise = translate(e)
        self.assertIsInstance(surprise, UnexpectedCloudError)
        self.assertIsInstance(surprise, CloudUnavailable)  # retried with backoff like an outage
        self.assertIn("KeyError", str(surprise))
        self.assertIn('{}["id"]', surprise.traceback)  # where it happened, for the log


class UserDataTests(SynchronousTestCase):
    def test_the_guest_agent_reads_what_the_driver_writes(self) -> None:
        creds = GuestCredentials(broker="tcp:10.0.0.1:61613", login="vm-4f2a", passcode="9d1c-_%=x")
        text = render_user_data(creds)
        self.assertTrue(text.startswith("[agent]\n"))
        guest = parse_guest_config({}, None, text.encode())
        self.assertEqual(
            (guest.broker, guest.login, guest.passcode), (creds.broker, creds.login, creds.passcode)
        )

    def test_values_that_would_not_survive_ini_are_refused(self) -> None:
        for passcode in ("a b", "a;b", "x#y", "line\nbreak", ""):
            creds = GuestCredentials(broker="tcp:10.0.0.1:61613", login="vm-1", passcode=passcode)
            with self.assertRaises(BadCloudRequest):
                render_user_data(creds)


class _BrokenServers:
    def list(self, **kw: object) -> list[object]:
        return [{}["id"]]  # a bug deep in the client


class _BrokenClient:
    servers = _BrokenServers()


class _DriverWithBrokenClient(NovaDriver):
    def _build_client(self) -> object:
        return _BrokenClient()


class UnexpectedErrorTests(SynchronousTestCase):
    def test_a_bug_in_the_thread_is_logged_with_its_traceback_and_raised_as_unavailable(self) -> None:
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = NovaConfig(
            auth_url="http://127.0.0.1:1/v3",
            username="u",
            password="p",
            project_name="x",
            image="i",
            flavor="1",
        )
        driver = _DriverWithBrokenClient(
            config, prefix="p-", dispatch=synchronous_dispatch, clock=Clock(), controller_name="c"
        )
        failure = self.failureResultOf(Deferred.fromCoroutine(driver.list_servers()), CloudUnavailable)
        self.assertIn("unexpected KeyError", str(failure.value))
        [logged] = [e for e in events if e.get("event") == "nova-call-failed"]
        self.assertIn('return [{}["id"]]', str(logged["traceback"]))
        self.assertEqual(driver.health().last_error_kind, "UnexpectedCloudError")
