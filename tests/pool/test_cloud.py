"""What the pool does with the cloud: listings, strays, errors and back-off."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.pool.answers import all_status
from tests.pool.fakes import CONFIG, PREFIX, World, two_listed_vms
from vmcloud.pool.config import PoolConfig
from vmcloud.pool.interfaces import (
    ACTIVE,
    ERROR,
    BadCloudRequest,
    CloudUnavailable,
    GuestInfo,
    QuotaExceeded,
    RateLimited,
    ServerStatus,
)
from vmcloud.pool.model import CloudHealth, VMState
from vmcloud.pool.reconciler import after_cloud_failure, after_cloud_success


class ListingTests(SynchronousTestCase):
    def test_one_listing_per_poll_interval_for_the_whole_pool(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(5, 5, 0)
        w.settle()
        calls = []
        original = w.driver.list_servers

        async def counting() -> list[ServerStatus]:
            calls.append(w.clock.seconds())
            return await original()

        w.driver.list_servers = counting  # type: ignore[method-assign]
        for _ in range(int(CONFIG.poll_interval * 3)):
            w.advance(1)
        self.assertEqual(len(calls), 3)

    def test_a_server_gone_from_the_cloud_fails_its_vm(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(2, 2, 0)
        w.settle()
        victim = w.vms(VMState.FREE)[0]
        del w.driver.servers[victim.server_id]
        w.advance(CONFIG.poll_interval)
        self.assertNotIn(victim.vmid, w.state.vms)  # terminated (already gone) and forgotten
        w.settle()
        self.assertEqual(w.counts(), {"FREE": 2})

    def test_a_server_in_error_is_replaced(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(1, 1, 0)
        w.settle()
        (vm,) = w.vms(VMState.FREE)
        old = w.driver.servers[vm.server_id]
        w.driver.servers[vm.server_id] = ServerStatus(old.server_id, old.name, ERROR, fault="host died")
        w.advance(CONFIG.poll_interval)
        self.assertNotIn(vm.server_id, w.driver.servers)
        w.settle()
        self.assertEqual(w.counts(), {"FREE": 1})

    def test_listing_gives_the_addresses_a_hello_is_matched_by(self) -> None:
        w, req_a, req_b = two_listed_vms(
            (("FA:16:3E:00:00:01",), ("10.0.0.5",)), (("fa:16:3e:00:00:02",), ("10.0.0.6",))
        )
        w.channel.hello("fa-16-3e-00-00-01", mac="fa:16:3e:00:00:01")  # by MAC (any spelling)
        w.channel.hello("guest-b", ip="10.0.0.6")  # by IP
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].state, VMState.FREE)
        self.assertEqual(w.state.vms[req_a.vmid].identity, "fa-16-3e-00-00-01")
        self.assertEqual(w.state.vms[req_b.vmid].identity, "guest-b")

    def test_vms_share_what_their_guests_say_alike(self) -> None:
        """At 5,000 VMs one copy of each repeated string or tuple is worth a few megabytes."""
        w, req_a, req_b = two_listed_vms((("fa:16:3e:00:00:01",), ("10.0.0.5",)), ((), ()))

        def fresh(text: str | None) -> str | None:
            """An equal string, another object: as the channel parses it off the wire."""
            return None if text is None else text.encode().decode()

        a, b = w.state.vms[req_a.vmid], w.state.vms[req_b.vmid]
        for vm, mac, ip in ((a, "fa:16:3e:00:00:01", "10.0.0.5"), (b, None, None)):
            said = fresh(vm.login)
            capabilities = tuple(["cmd", "file"])
            w.pool.guest_hello(
                GuestInfo(said, said, fresh(ip), fresh(mac), "1.0", capabilities, w.clock.seconds())
            )  # type: ignore[arg-type]
        w.turn()
        a, b = w.state.vms[req_a.vmid], w.state.vms[req_b.vmid]
        self.assertEqual((a.state, b.state), (VMState.FREE, VMState.FREE))
        self.assertIs(a.identity, a.login)
        self.assertIs(a.mac, a.macs[0])
        self.assertIs(a.ip, a.ips[0])
        self.assertIs(a.capabilities, b.capabilities)

    def test_a_hello_before_the_listing_is_matched_once_it_comes(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 0)
        w.turn()
        ((request, d),) = w.driver.boots
        w.driver.boots.clear()
        d.callback(w.driver.accept(request, macs=("fa:16:3e:00:00:09",)))
        w.channel.hello("early", mac="fa:16:3e:00:00:09")
        w.turn()
        self.assertEqual(w.state.vms[request.vmid].state, VMState.BOOTING)
        w.advance(CONFIG.poll_interval)
        w.driver.answer_lists()
        w.turn()
        self.assertEqual(w.state.vms[request.vmid].state, VMState.FREE)

    def test_a_hello_before_the_boot_answer_counts(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 0)
        w.turn()
        ((request, _d),) = w.driver.boots
        w.channel.hello(request.credentials.login, login=request.credentials.login)
        w.driver.answer_boots()
        w.turn()
        self.assertEqual(w.state.vms[request.vmid].state, VMState.FREE)


class StrayTests(SynchronousTestCase):
    def stray(self, w: World, name: str = PREFIX + "old-7") -> str:
        w.driver.servers["stray-1"] = ServerStatus("stray-1", name, ACTIVE)
        return "stray-1"

    def test_a_stray_is_deleted_only_once_seen_twice(self) -> None:
        w = World(start=False)
        self.stray(w)
        w.start()  # first listing, at start
        self.assertEqual(w.driver.deletes, [])
        self.assertEqual(all_status(w.pool)["cloud"]["strays"], 1)
        w.advance(CONFIG.poll_interval)
        w.driver.answer_lists()
        w.turn()
        self.assertEqual([s for s, _ in w.driver.deletes], ["stray-1"])
        w.driver.answer_deletes()
        w.turn()
        self.assertEqual(all_status(w.pool)["cloud"]["strays"], 0)

    def test_a_server_seen_once_then_gone_is_forgotten(self) -> None:
        w = World(start=False)
        self.stray(w)
        w.start()
        del w.driver.servers["stray-1"]
        w.advance(CONFIG.poll_interval)
        w.driver.answer_lists()
        w.turn()
        self.assertEqual(w.state.strays, {})

    def test_our_own_booting_server_is_no_stray(self) -> None:
        w = World()
        w.pool.set_pool_size(1, 1, 0)
        w.turn()
        ((request, _d),) = w.driver.boots
        # the cloud lists the server before the boot call answers
        w.driver.servers["srv-x"] = ServerStatus("srv-x", request.name, ACTIVE, metadata=request.metadata)
        for _ in range(2):
            w.clock.advance(CONFIG.poll_interval - 5)  # the boot call is slow but not given up
            w.advance(5)
            w.driver.answer_lists()
            w.turn()
        self.assertEqual(w.driver.deletes, [])


class BackoffTests(SynchronousTestCase):
    def test_rate_limit_honours_retry_after(self) -> None:
        w = World()
        w.driver.errors["boot"].extend(
            [RateLimited("429", retry_after=30), RateLimited("429", retry_after=30)]
        )
        w.pool.set_pool_size(2, 2, 0)
        w.turn()
        health = all_status(w.pool)["cloud"]
        self.assertTrue(health["backingOff"])
        self.assertIn("RateLimited", health["lastError"])
        self.assertEqual(health["backoffUntil"], round((w.clock.seconds() + 30) * 1000))
        self.assertEqual(w.counts(), {})
        w.advance(29)
        self.assertEqual(w.counts(), {})
        w.advance(1)
        self.assertEqual(w.counts(), {"CREATING": 1})  # one probe first
        w.driver.answer_boots()
        w.turn()
        self.assertEqual(w.counts(), {"BOOTING": 1, "CREATING": 1})
        self.assertFalse(all_status(w.pool)["cloud"]["backingOff"])

    def test_quota_stops_growth_shows_and_retries_without_hammering(self) -> None:
        w = World()
        w.driver.errors["boot"].extend(QuotaExceeded("Quota exceeded for instances") for _ in range(4))
        w.pool.set_pool_size(3, 3, 0)
        w.turn()  # three boots refused at once: they count as one refusal
        health = all_status(w.pool)["cloud"]
        self.assertTrue(health["quotaExceeded"])
        self.assertEqual(health["quotaRefusals"], 1)
        self.assertFalse(health["backingOff"])  # deletes and listings go on
        self.assertEqual(health["quotaRetryAt"], round((w.clock.seconds() + CONFIG.quota_retry) * 1000))
        attempts = []
        original = w.driver.boot

        async def counting(request):  # type: ignore[no-untyped-def]
            attempts.append(w.clock.seconds())
            return await original(request)

        w.driver.boot = counting  # type: ignore[method-assign]
        start = w.clock.seconds()
        for _ in range(int(CONFIG.quota_retry * 3)):
            w.advance(1)
        # one probe after 60 s (refused), the next 120 s later (accepted by the cloud)
        self.assertEqual([t - start for t in attempts], [CONFIG.quota_retry, CONFIG.quota_retry * 3])
        self.assertEqual(len(w.driver.boots), 1)
        w.driver.answer_boots()
        w.turn()
        self.assertFalse(all_status(w.pool)["cloud"]["quotaExceeded"])
        self.assertEqual(w.counts(), {"BOOTING": 1, "CREATING": 2})

    def test_a_boot_accepted_after_a_quota_refusal_but_asked_before_it_lifts_no_pause(self) -> None:
        # seen on the Nova path: concurrent boots, the refusal's answer overtakes an acceptance
        w = World()
        w.pool.set_pool_size(2, 3, 0)
        w.turn()
        self.assertEqual(len(w.driver.boots), 2)  # still with the cloud
        w.advance(1)
        w.driver.errors["boot"].append(QuotaExceeded("Quota exceeded for instances"))
        w.pool.set_pool_size(3, 3, 0)
        w.turn()
        self.assertTrue(all_status(w.pool)["cloud"]["quotaExceeded"])
        w.driver.answer_boots()
        w.turn()
        self.assertTrue(all_status(w.pool)["cloud"]["quotaExceeded"])
        self.assertEqual(w.counts(), {"BOOTING": 2})  # no boot into the quota again

    def test_unavailable_cloud_backs_off_exponentially(self) -> None:
        config = PoolConfig(backoff_base=1.0, backoff_max=8.0)
        health = CloudHealth()
        pauses = []
        now = 0.0
        for _ in range(6):
            health = after_cloud_failure(health, CloudUnavailable("503"), now, config)
            pauses.append(health.backoff_until - now)
            now = health.backoff_until  # each retry when the pause is over
        self.assertEqual(pauses, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        burst = after_cloud_failure(health, CloudUnavailable("503"), now - 1, config)
        self.assertEqual(burst.failures, health.failures)  # a failure during the pause adds none
        health = after_cloud_success(health, grew=False)
        self.assertEqual((health.failures, health.backoff_until), (0, 0.0))
        health = after_cloud_failure(health, CloudUnavailable("503", retry_after=20), 0.0, config)
        self.assertEqual(health.backoff_until, 20.0)

    def test_bad_request_shows_for_the_operator_and_never_stops_the_service(self) -> None:
        w = World()
        w.driver.errors["boot"].append(BadCloudRequest("Flavor m1.huge could not be found"))
        w.pool.set_pool_size(1, 1, 0)
        w.turn()
        self.assertIn("m1.huge", all_status(w.pool)["cloud"]["lastError"])
        self.assertEqual(w.counts(), {})
        w.advance(CONFIG.backoff_base)
        self.assertEqual(w.counts(), {"CREATING": 1})

    def test_failed_delete_is_retried(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(1, 1, 0)
        w.settle()
        (vm,) = w.vms(VMState.FREE)
        w.driver.errors["delete"].append(CloudUnavailable("timeout"))
        w.pool.set_pool_size(0, 0, 0)
        w.turn()
        self.assertEqual(w.state.vms[vm.vmid].state, VMState.KILLING)
        w.advance(CONFIG.timeout_cloud)
        self.assertNotIn(vm.vmid, w.state.vms)
        self.assertNotIn(vm.server_id, w.driver.servers)


class BootFailureTests(SynchronousTestCase):
    def test_vms_dying_before_hello_slow_booting_down_until_one_comes_up(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(3, 3, 0)
        w.turn()
        self.assertEqual(w.counts(), {"BOOTING": 3})
        for vm in w.vms(VMState.BOOTING):  # a broken image: every agent dies at once
            w.driver.servers[vm.server_id] = ServerStatus(vm.server_id, "x", ERROR, fault="agent exited")
        w.advance(CONFIG.poll_interval)
        health = all_status(w.pool)["cloud"]
        self.assertEqual(health["bootFailures"], 1)  # one burst, one failure
        self.assertIn("agent exited", health["lastError"])
        self.assertEqual(w.counts(), {})
        w.advance(CONFIG.backoff_base)
        self.assertEqual(w.counts(), {"BOOTING": 1})  # one probe, not three
        (probe,) = w.vms(VMState.BOOTING)
        w.channel.hello(probe.login, login=probe.login)
        w.turn()
        self.assertEqual(all_status(w.pool)["cloud"]["bootFailures"], 0)
        self.assertEqual(w.counts(), {"FREE": 1, "BOOTING": 2})

    def test_vms_removed_for_pool_size_are_no_failure(self) -> None:
        w = World()
        w.driver.auto = True
        w.pool.set_pool_size(3, 3, 0)
        w.turn()
        w.pool.set_pool_size(0, 0, 0)
        w.turn()
        self.assertEqual(all_status(w.pool)["cloud"]["bootFailures"], 0)
