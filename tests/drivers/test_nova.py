"""The Nova driver through real python-novaclient and keystoneauth1, over TCP, against the simulator.

The simulator's life cycle runs on a Clock (advanced by the tests); HTTP runs on the real reactor,
novaclient in a real small thread pool, as in production.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from guest_agent.config import parse_guest_config
from vmcloud.drivers.nova import NovaConfig, NovaDriver
from vmcloud.novasim import BootRule, CloudSettings, FaultRule, Simulator
from vmcloud.novasim.model import CreateSpec
from vmcloud.pool.interfaces import (
    ACTIVE,
    BUILD,
    DELETING,
    ERROR,
    BadCloudRequest,
    BootRequest,
    CloudError,
    CloudUnavailable,
    GuestCredentials,
    ICloudDriver,
    QuotaExceeded,
    RateLimited,
    ServerStatus,
)
from vmcloud.timings import NO_TIMINGS, ITimings

T = TypeVar("T")
IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
NET = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"
PREFIX = "vmc-test-"
GET_ONE = "GET /v2.1/servers/{id}"
LIST = "GET /v2.1/servers/detail"
AUTH = "POST /identity/v3/auth/tokens"


def request(vmid: str, **metadata: str) -> BootRequest:
    return BootRequest(
        vmid=vmid,
        name=PREFIX + vmid,
        metadata={"vmcloud-batch": "none", **metadata},
        credentials=GuestCredentials(
            broker="tcp:10.0.0.1:61613", login=f"vm-{vmid}", passcode=f"pass-{vmid}-x1"
        ),
    )


class NovaDriverTestCase(TestCase):
    threads = 1
    settings = CloudSettings(build_seconds=2, delete_seconds=1)
    timings: ITimings = NO_TIMINGS

    def setUp(self) -> None:
        self.sim_clock = Clock()
        self.clock = Clock()  # the driver's clock (health timestamps)
        self.sim = Simulator(self.sim_clock, settings=self.settings, seed=5)
        self.sim.listen(reactor)
        self.addCleanup(self.sim.stop)
        self.pool = ThreadPool(minthreads=self.threads, maxthreads=self.threads, name="nova-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.driver = self.make_driver()

    def dispatch(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, self.pool, fn)

    def config(self, **changes: Any) -> NovaConfig:
        values: dict[str, Any] = {
            "auth_url": self.sim.auth_url,
            "username": "demo",
            "password": "secret",
            "project_name": "demo",
            "image": IMAGE,
            "flavor": "1",
            "network": NET,
            "key_name": "vmcloud",
            "security_groups": ("default",),
            "timeout": 5.0,
        }
        values.update(changes)
        return NovaConfig(**values)

    def make_driver(self, **changes: Any) -> NovaDriver:
        return NovaDriver(
            self.config(**changes),
            prefix=PREFIX,
            dispatch=self.dispatch,
            clock=self.clock,
            controller_name="ctl-1",
            timings=self.timings,
        )

    async def expect(self, kind: type[CloudError], call: Any) -> CloudError:
        try:
            await call
        except kind as e:
            self.assertIsNone(e.__cause__)
            self.assertIsNone(e.__context__)  # nothing of novaclient travels with it
            return e
        except Exception as e:  # pragma: no cover - the assertion below explains
            self.fail(f"expected {kind.__name__}, got {type(e).__name__}: {e}")
        self.fail(f"expected {kind.__name__}, nothing raised")


class BootListDeleteTests(NovaDriverTestCase):
    def test_it_is_a_cloud_driver(self) -> None:
        self.assertTrue(verifyObject(ICloudDriver, self.driver))
        self.assertEqual((self.driver.name, self.driver.prefix), ("nova", PREFIX))

    async def test_boot_sends_one_create_with_everything_the_guest_needs(self) -> None:
        server_id = await self.driver.boot(request("7"))
        [view] = self.sim.servers()
        self.assertEqual((view.id, view.name), (server_id, "vmc-test-7"))
        self.assertEqual(
            view.metadata,
            {
                "vmcloud-controller": "ctl-1",
                "vmcloud-vmid": "7",
                "vmcloud-image": IMAGE,
                "vmcloud-batch": "none",
            },
        )
        server = self.sim.cloud.get(server_id)
        self.assertEqual((server.key_name, server.security_groups), ("vmcloud", ("default",)))
        self.assertEqual((server.image.id, server.flavor.id), (IMAGE, "1"))
        assert view.user_data is not None
        guest = parse_guest_config({}, None, view.user_data)
        self.assertEqual(
            (guest.broker, guest.login, guest.passcode), ("tcp:10.0.0.1:61613", "vm-7", "pass-7-x1")
        )
        self.assertEqual(self.sim.count("POST /v2.1/servers"), 1)
        self.assertEqual(self.sim.count(GET_ONE), 0)  # the 202 body was not "completed" by a GET

    async def test_list_reports_states_addresses_metadata_and_faults(self) -> None:
        self.sim.configure(boot_rules=(BootRule(pattern="-bad$", outcome="error", message="no disk"),))
        good = await self.driver.boot(request("1"))
        bad = await self.driver.boot(request("bad"))
        building = {s.server_id: s for s in await self.driver.list_servers()}
        self.assertEqual((building[good].status, building[bad].status), (BUILD, BUILD))
        self.sim_clock.advance(2)
        listed = {s.server_id: s for s in await self.driver.list_servers()}
        up = listed[good]
        self.assertEqual(up.status, ACTIVE)
        self.assertEqual((up.macs, up.ips), (("fa:16:3e:00:00:01",), ("10.0.0.2",)))
        self.assertEqual(up.metadata["vmcloud-vmid"], "1")
        self.assertEqual(up.image, IMAGE)  # the image it was booted with, on every listing
        self.assertIsNone(up.fault)
        self.assertEqual(listed[bad].status, ERROR)
        self.assertEqual(listed[bad].fault, f"Build of instance {bad} aborted: no disk")
        await self.driver.delete(good)
        deleting = {s.server_id: s for s in await self.driver.list_servers()}
        self.assertEqual(deleting[good].status, DELETING)
        self.sim_clock.advance(1)
        self.assertEqual([s.server_id for s in await self.driver.list_servers()], [bad])
        for status in deleting.values():
            self.assertIsInstance(status, ServerStatus)
            self.assertIs(type(status.metadata), dict)
        self.assertEqual(self.sim.count(GET_ONE), 0)

    async def test_list_pages_past_max_limit_and_sees_only_the_prefix(self) -> None:
        self.sim.configure(max_limit=5, quota_instances=100, quota_cores=100)
        for n in range(12):
            self.sim.cloud.create(
                CreateSpec(name=f"{PREFIX}{n}", image_ref=IMAGE, flavor_ref="1"), project_id="p", user_id="u"
            )
        for name in ("other-1", f"x{PREFIX}2"):
            self.sim.cloud.create(
                CreateSpec(name=name, image_ref=IMAGE, flavor_ref="1"), project_id="p", user_id="u"
            )
        listed = await self.driver.list_servers()
        self.assertEqual(sorted(s.name for s in listed), sorted(f"{PREFIX}{n}" for n in range(12)))
        self.assertEqual(self.sim.count(LIST), 4)  # 5 + 5 + 2, then the empty page that ends the loop

    async def test_a_cloud_ignoring_the_marker_is_an_error_not_an_endless_walk(self) -> None:
        self.sim.configure(max_limit=5, quota_instances=100, quota_cores=100)
        for n in range(7):
            self.sim.cloud.create(
                CreateSpec(name=f"{PREFIX}{n}", image_ref=IMAGE, flavor_ref="1"), project_id="p", user_id="u"
            )
        page = self.sim.cloud.page
        self.patch(self.sim.cloud, "page", lambda filters, marker, limit: page(filters, None, limit))
        error = await self.expect(CloudUnavailable, self.driver.list_servers())
        self.assertIn("same servers again", str(error))
        self.assertEqual(self.sim.count(LIST), 2)  # novaclient's own limit=-1 walk never ends here

    async def test_delete_of_a_missing_server_is_a_success(self) -> None:
        await self.driver.delete("00000000-0000-4000-8000-00000000dead")
        self.assertEqual(self.sim.count("DELETE /v2.1/servers/{id}"), 1)
        self.assertEqual(self.driver.health().consecutive_failures, 0)

    async def test_a_name_without_the_prefix_is_refused_before_the_cloud(self) -> None:
        bad = BootRequest(vmid="1", name="nope-1", metadata={}, credentials=request("1").credentials)
        await self.expect(BadCloudRequest, self.driver.boot(bad))
        self.assertEqual(self.sim.count("POST /v2.1/servers"), 0)


class FaultTests(NovaDriverTestCase):
    async def test_quota_exceeded(self) -> None:
        self.sim.configure(quota_instances=0)
        error = await self.expect(QuotaExceeded, self.driver.boot(request("1")))
        self.assertIn("Quota exceeded for instances", str(error))
        self.assertTrue(self.driver.health().quota_exceeded)
        self.sim.configure(quota_instances=5)
        await self.driver.boot(request("1"))
        self.assertFalse(self.driver.health().quota_exceeded)

    async def test_rate_limits_carry_retry_after(self) -> None:
        self.clock.advance(100)
        for status in (413, 429):
            self.sim.inject_next(FaultRule(status=status, retry_after=7, match="servers"))
            error = await self.expect(RateLimited, self.driver.list_servers())
            self.assertEqual(error.retry_after, 7.0)
        self.assertEqual(self.driver.health().backoff_until, 107.0)
        self.assertEqual(self.driver.health().last_error_kind, "RateLimited")

    async def test_server_errors_are_unavailable(self) -> None:
        for status in (500, 502, 503, 504):
            self.sim.inject_next(FaultRule(status=status, match="servers"))
            error = await self.expect(CloudUnavailable, self.driver.boot(request("1")))
            self.assertIn(str(status), str(error))
        self.assertEqual(self.sim.servers(), [])
        self.assertEqual(self.driver.health().consecutive_failures, 4)
        await self.driver.list_servers()
        self.assertEqual(self.driver.health().consecutive_failures, 0)

    async def test_dropped_connection_is_unavailable_and_not_retried(self) -> None:
        await self.driver.list_servers()
        self.sim.inject_next(FaultRule(kind="drop", match="servers/detail"))
        await self.expect(CloudUnavailable, self.driver.list_servers())
        self.assertEqual(self.sim.count(LIST), 2)  # the first list, then exactly one dropped try

    async def test_slow_answer_times_out(self) -> None:
        driver = self.make_driver(timeout=0.3)
        await driver.list_servers()
        self.sim.inject_next(FaultRule(kind="slow", delay=60, match="servers/detail"))
        error = await self.expect(CloudUnavailable, driver.list_servers())
        self.assertIn("timed out", str(error))
        self.sim_clock.advance(60)  # the late answer goes to a closed connection, harmlessly

    async def test_bad_flavor_is_a_bad_request(self) -> None:
        driver = self.make_driver(flavor="999")
        error = await self.expect(BadCloudRequest, driver.boot(request("1")))
        self.assertIn("Flavor 999 could not be found.", str(error))

    async def test_wrong_password_is_a_bad_request(self) -> None:
        driver = self.make_driver(password="wrong")
        await self.expect(BadCloudRequest, driver.list_servers())
        self.assertEqual(self.sim.count(LIST), 0)

    async def test_keystone_down_is_unavailable(self) -> None:
        self.sim.inject_next(FaultRule(status=503, match="identity"))
        await self.expect(CloudUnavailable, self.driver.list_servers())

    async def test_nothing_listening_is_unavailable(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        driver = self.make_driver(auth_url=f"http://127.0.0.1:{port}/identity/v3")
        error = await self.expect(CloudUnavailable, driver.list_servers())
        self.assertIn("cannot reach the cloud", str(error))
        self.assertEqual(driver.health().last_error, f"list: {error}")


class AuthenticationTests(NovaDriverTestCase):
    async def test_reauthenticates_once_after_token_revocation(self) -> None:
        await self.driver.list_servers()
        self.assertEqual(self.sim.count(AUTH), 1)
        await self.driver.list_servers()
        self.assertEqual(self.sim.count(AUTH), 1)  # the session keeps its token
        self.assertEqual(self.sim.revoke_tokens(), 1)
        await self.driver.list_servers()
        self.assertEqual(self.sim.count(AUTH), 2)
        self.assertEqual(self.sim.count(LIST), 4)  # two lists, then one answered 401 and its retry

    async def test_application_credential(self) -> None:
        driver = self.make_driver(
            username="",
            password="",
            application_credential_id="vmcloud-sim-appcred",
            application_credential_secret="appcred-secret",
        )
        await driver.boot(request("1"))
        self.assertEqual(len(await driver.list_servers()), 1)

    async def test_token_with_endpoint_override_never_calls_keystone(self) -> None:
        sim = Simulator(self.sim_clock, seed=6, identity=self.sim.identity.__class__(static_token="tok-1"))
        sim.listen(reactor)
        self.addCleanup(sim.stop)
        driver = self.make_driver(
            auth_url="", username="", password="", token="tok-1", endpoint_override=sim.compute_url
        )
        await driver.boot(request("1"))
        self.assertEqual(len(await driver.list_servers()), 1)
        self.assertEqual(sim.count(AUTH), 0)


class ThreadTests(NovaDriverTestCase):
    threads = 2

    async def test_each_worker_thread_has_its_own_client(self) -> None:
        from twisted.internet.defer import gatherResults

        lists = [Deferred.fromCoroutine(self.driver.list_servers()) for _ in range(8)]
        results = await gatherResults(lists)
        self.assertEqual(results, [[]] * 8)
        self.assertIn(self.sim.count(AUTH), (1, 2))  # one session (and token) per thread that ran
        self.assertEqual(self.sim.count(LIST), 8)
