"""How long each Nova call took and how it ended, as the driver tells its ITimings (the
``vmcloud_nova_call_seconds`` histogram), through real novaclient against the simulator."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.drivers.test_nova import NovaDriverTestCase, request
from tests.timings import RecordingTimings
from vmcloud.drivers.nova import UnexpectedCloudError, call_outcome
from vmcloud.novasim import FaultRule
from vmcloud.pool.interfaces import (
    BadCloudRequest,
    BootRequest,
    CloudError,
    CloudUnavailable,
    QuotaExceeded,
    RateLimited,
)
from vmcloud.timings import CLOUD_OUTCOMES, NOVA_CALL


class NovaCallTimingTests(NovaDriverTestCase):
    timings: RecordingTimings

    def setUp(self) -> None:
        self.timings = RecordingTimings()
        super().setUp()

    def calls(self) -> list[tuple[str, str]]:
        return [(labels["call"], labels["outcome"]) for _, labels in self.timings.of(NOVA_CALL)]

    async def test_each_call_is_timed_once_by_call_and_outcome(self) -> None:
        server_id = await self.driver.boot(request("1"))
        await self.driver.list_servers()
        await self.driver.delete(server_id)
        self.assertEqual(self.calls(), [("boot", "ok"), ("list", "ok"), ("delete", "ok")])
        # keystone and the API over TCP: some time, far below the timeout
        for seconds, _ in self.timings.of(NOVA_CALL):
            self.assertGreater(seconds, 0.0)
            self.assertLess(seconds, 5.0)

    async def test_failures_are_timed_with_what_went_wrong(self) -> None:
        self.sim.configure(quota_instances=0)
        await self.expect(QuotaExceeded, self.driver.boot(request("1")))
        self.sim.inject_next(FaultRule(status=429, retry_after=7, match="servers"))
        await self.expect(RateLimited, self.driver.list_servers())
        self.sim.inject_next(FaultRule(status=503, match="servers"))
        await self.expect(CloudUnavailable, self.driver.list_servers())
        await self.expect(BadCloudRequest, self.make_driver(flavor="999").boot(request("2")))
        self.assertEqual(
            self.calls(),
            [("boot", "quota"), ("list", "ratelimit"), ("list", "unavailable"), ("boot", "refused")],
        )

    async def test_a_call_that_times_out_is_timed_at_its_timeout(self) -> None:
        driver = self.make_driver(timeout=0.3)
        await driver.list_servers()
        self.sim.inject_next(FaultRule(kind="slow", delay=60, match="servers/detail"))
        await self.expect(CloudUnavailable, driver.list_servers())
        seconds, labels = self.timings.of(NOVA_CALL)[-1]
        self.assertEqual(labels, {"call": "list", "outcome": "unavailable"})
        self.assertGreaterEqual(seconds, 0.3)
        self.assertLess(seconds, 3.0)
        self.sim_clock.advance(60)

    async def test_a_name_refused_before_the_cloud_is_no_call(self) -> None:
        bad = BootRequest(vmid="1", name="nope-1", metadata={}, credentials=request("1").credentials)
        await self.expect(BadCloudRequest, self.driver.boot(bad))
        self.assertEqual(self.timings.seen, [])


class OutcomeTests(SynchronousTestCase):
    def test_every_error_kind_has_its_outcome(self) -> None:
        errors: list[tuple[CloudError, str]] = [
            (QuotaExceeded("q"), "quota"),
            (RateLimited("r", retry_after=1.0), "ratelimit"),
            (CloudUnavailable("503"), "unavailable"),
            (BadCloudRequest("401"), "refused"),
            (UnexpectedCloudError("bug", "traceback"), "error"),
            (CloudError("other"), "error"),
        ]
        self.assertEqual([call_outcome(e) for e, _ in errors], [o for _, o in errors])
        self.assertEqual(set(CLOUD_OUTCOMES), {"ok"} | {o for _, o in errors})
