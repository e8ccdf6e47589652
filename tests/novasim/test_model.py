"""The simulated cloud's behaviour on a Clock: life cycle, outcomes, capacity, quota, paging."""

from __future__ import annotations

import base64
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.novasim.model import (
    NO_VALID_HOST,
    ApiFault,
    BootRule,
    CloudSettings,
    CreateSpec,
    ListFilter,
    NovaCloud,
    ServerView,
)

IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
NET = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"


def spec(name: str, **kw: object) -> CreateSpec:
    fields: dict[str, object] = {"networks": (NET,), **kw}
    return CreateSpec(name=name, image_ref=IMAGE, flavor_ref="1", **fields)  # type: ignore[arg-type]


class CloudTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.active: list[ServerView] = []
        self.deleted: list[ServerView] = []
        self.cloud = NovaCloud(
            self.clock,
            settings=CloudSettings(build_seconds=2, delete_seconds=1),
            rng=random.Random(7),
            on_active=self.active.append,
            on_deleted=self.deleted.append,
        )

    def create(self, name: str, **kw: object) -> str:
        [server] = self.cloud.create(spec(name, **kw), project_id="p", user_id="u")
        return server.id


class LifeCycleTests(CloudTestCase):
    def test_build_then_active_with_addresses_and_hook(self) -> None:
        user_data = base64.b64encode(b"[agent]\nbroker = tcp:10.0.0.1:61613\n").decode()
        sid = self.create("pool-1", user_data=user_data, metadata={"k": "v"})
        server = self.cloud.get(sid)
        self.assertEqual((server.status, server.task_state), ("BUILD", "scheduling"))
        self.assertEqual(server.addresses, {})
        self.clock.advance(1)
        self.assertEqual((server.status, server.task_state), ("BUILD", "spawning"))
        self.assertEqual(server.addresses["private"][0]["OS-EXT-IPS-MAC:mac_addr"], "fa:16:3e:00:00:01")
        self.assertEqual(self.active, [])
        self.clock.advance(1)
        self.assertEqual((server.status, server.vm_state, server.task_state), ("ACTIVE", "active", None))
        [view] = self.active
        self.assertEqual(view.id, sid)
        self.assertEqual(view.user_data, b"[agent]\nbroker = tcp:10.0.0.1:61613\n")
        self.assertEqual((view.mac, view.ip, view.network), ("fa:16:3e:00:00:01", "10.0.0.2", "private"))
        self.assertEqual(view.metadata, {"k": "v"})

    def test_addresses_are_deterministic_and_distinct(self) -> None:
        self.cloud.configure(quota_instances=300, quota_cores=300, quota_ram=300 * 512)
        for n in range(300):
            self.create(f"pool-{n}")
        self.clock.advance(2)
        macs = {v.mac for v in self.active}
        ips = {v.ip for v in self.active}
        self.assertEqual((len(macs), len(ips)), (300, 300))
        self.assertIn("fa:16:3e:00:01:2c", macs)  # the 300th server
        self.assertIn("10.0.1.45", ips)

    def test_delete_shows_deleting_then_gone(self) -> None:
        sid = self.create("pool-1")
        self.clock.advance(2)
        self.cloud.delete(sid)
        self.assertEqual(self.cloud.get(sid).task_state, "deleting")
        self.assertEqual([v.id for v in self.deleted], [sid])
        self.cloud.delete(sid)  # a second DELETE while deleting is accepted and changes nothing
        self.assertEqual(len(self.deleted), 1)
        self.clock.advance(1)
        with self.assertRaises(ApiFault) as caught:
            self.cloud.get(sid)
        self.assertEqual(
            (caught.exception.status, caught.exception.message), (404, f"Instance {sid} could not be found.")
        )
        self.assertEqual(self.cloud.used_instances, 0)

    def test_delete_during_build_never_becomes_active(self) -> None:
        sid = self.create("pool-1")
        self.cloud.delete(sid)
        self.clock.advance(10)
        self.assertEqual(self.active, [])
        self.assertEqual(self.deleted, [])  # on_deleted only follows on_active
        self.assertEqual(len(self.cloud), 0)

    def test_hook_failure_is_logged_and_the_server_stays_active(self) -> None:
        def broken(view: ServerView) -> None:
            raise RuntimeError("guest failed to start")

        self.cloud.on_active = broken
        sid = self.create("pool-1")
        self.clock.advance(2)
        self.assertEqual(self.cloud.get(sid).status, "ACTIVE")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class OutcomeTests(CloudTestCase):
    def test_error_rule_by_name(self) -> None:
        self.cloud.configure(boot_rules=(BootRule(pattern="^bad-", outcome="error", message="disk full"),))
        bad = self.create("bad-1")
        good = self.create("good-1")
        self.clock.advance(2)
        server = self.cloud.get(bad)
        self.assertEqual(server.status, "ERROR")
        assert server.fault is not None
        self.assertEqual(server.fault.message, f"Build of instance {bad} aborted: disk full")
        self.assertEqual(server.addresses, {})
        self.assertEqual(self.cloud.get(good).status, "ACTIVE")
        self.assertEqual([v.id for v in self.active], [good])

    def test_error_rate_fails_some(self) -> None:
        self.cloud.configure(boot_rules=(BootRule(outcome="error", rate=0.5),))
        ids = [self.create(f"pool-{n}") for n in range(40)]
        self.clock.advance(2)
        statuses = [self.cloud.get(sid).status for sid in ids]
        self.assertTrue(5 < statuses.count("ERROR") < 35, statuses)
        self.assertEqual(statuses.count("ERROR") + statuses.count("ACTIVE"), 40)

    def test_stuck_in_build(self) -> None:
        self.cloud.configure(boot_rules=(BootRule(pattern="stuck", outcome="stuck"),))
        sid = self.create("pool-stuck")
        self.clock.advance(3600)
        self.assertEqual(self.cloud.get(sid).status, "BUILD")

    def test_capacity_gives_no_valid_host(self) -> None:
        self.cloud.configure(capacity=2)
        ids = [self.create(f"pool-{n}") for n in range(3)]
        self.clock.advance(2)
        self.assertEqual([self.cloud.get(s).status for s in ids], ["ACTIVE", "ACTIVE", "ERROR"])
        failed = self.cloud.get(ids[2])
        assert failed.fault is not None
        self.assertEqual((failed.fault.code, failed.fault.message), (500, NO_VALID_HOST))
        self.cloud.delete(ids[0])
        self.clock.advance(1)
        again = self.create("pool-again")
        self.clock.advance(2)
        self.assertEqual(self.cloud.get(again).status, "ACTIVE")


class QuotaTests(CloudTestCase):
    def test_instances_quota_refuses_with_novas_message(self) -> None:
        self.cloud.configure(quota_instances=2)
        first = self.create("pool-1")
        self.create("pool-2")
        with self.assertRaises(ApiFault) as caught:
            self.create("pool-3")
        self.assertEqual(caught.exception.status, 403)
        self.assertEqual(
            caught.exception.message,
            "Quota exceeded for instances: Requested 1, but already used 2 of 2 instances",
        )
        self.cloud.delete(first)
        with self.assertRaises(ApiFault):  # a deleting server still counts
            self.create("pool-3")
        self.clock.advance(1)
        self.create("pool-3")

    def test_several_resources_listed_like_nova(self) -> None:
        with self.assertRaises(ApiFault) as caught:
            self.cloud.create(spec("q", min_count=500, max_count=500), project_id="p", user_id="u")
        self.assertEqual(
            caught.exception.message,
            "Quota exceeded for cores, instances, ram: Requested 500, 500, 256000, but already used 0, 0, 0"
            " of 100, 50, 102400 cores, instances, ram",
        )

    def test_max_count_is_cut_to_what_fits(self) -> None:
        self.cloud.configure(quota_instances=3)
        servers = self.cloud.create(spec("many", min_count=1, max_count=10), project_id="p", user_id="u")
        self.assertEqual([s.name for s in servers], ["many-1", "many-2", "many-3"])

    def test_unknown_references_are_refused(self) -> None:
        cases = [
            (CreateSpec(name="x", image_ref=IMAGE, flavor_ref="999"), "Flavor 999 could not be found."),
            (
                CreateSpec(name="x", image_ref="00000000-0000-4000-8000-000000000009", flavor_ref="1"),
                "Can not find requested image",
            ),
            (
                spec("x", networks=("00000000-0000-4000-8000-000000000009",)),
                "Network 00000000-0000-4000-8000-000000000009 could not be found.",
            ),
            (spec("x", key_name="nope"), "Invalid key_name provided."),
        ]
        for bad, message in cases:
            with self.assertRaises(ApiFault) as caught:
                self.cloud.create(bad, project_id="p", user_id="u")
            self.assertEqual((caught.exception.status, caught.exception.message), (400, message))


class PagingTests(CloudTestCase):
    def walk(self, limit: int, filters: ListFilter | None = None) -> list[str]:
        filters = filters or ListFilter()
        seen: list[str] = []
        marker = None
        for _ in range(1000):
            page = self.cloud.page(filters, marker, limit)
            if not page:
                return seen
            seen.extend(s.name for s in page)
            marker = page[-1].id
        self.fail("paging did not end")

    def test_marker_walks_every_server_once_newest_first(self) -> None:
        for n in range(25):
            self.create(f"pool-{n:02}")
            self.clock.advance(0.1)
        names = self.walk(limit=10)
        self.assertEqual(names, [f"pool-{n:02}" for n in reversed(range(25))])

    def test_same_creation_time_orders_by_id_and_still_pages_exactly(self) -> None:
        ids = [self.create(f"pool-{n}") for n in range(30)]
        seen = self.walk(limit=7)
        self.assertEqual(len(seen), 30)
        self.assertEqual(len(set(seen)), 30)
        first_page = self.cloud.page(ListFilter(), None, 7)
        self.assertEqual([s.id for s in first_page], sorted(ids, reverse=True)[:7])

    def test_name_filter_is_an_unanchored_regex(self) -> None:
        import re

        for name in ("pool-1", "pool-2", "other-pool-3", "x"):
            self.create(name)
        self.assertEqual(sorted(self.walk(2, ListFilter(name=re.compile("^pool-")))), ["pool-1", "pool-2"])
        self.assertEqual(len(self.walk(2, ListFilter(name=re.compile("pool-")))), 3)

    def test_unknown_marker_is_400_but_a_deleted_one_still_works(self) -> None:
        ids = [self.create(f"pool-{n}") for n in range(5)]
        self.clock.advance(0)
        with self.assertRaises(ApiFault) as caught:
            self.cloud.page(ListFilter(), "00000000-0000-4000-8000-000000000000", 10)
        self.assertEqual(caught.exception.message, "marker [00000000-0000-4000-8000-000000000000] not found")
        page = self.cloud.page(ListFilter(), None, 2)
        self.cloud.delete(page[-1].id)
        self.clock.advance(1)
        rest = self.cloud.page(ListFilter(), page[-1].id, 10)
        self.assertEqual(len(rest), 3)
        self.assertEqual(len(ids), 5)

    def test_five_thousand_servers_list_fast(self) -> None:
        import time

        self.cloud.configure(quota_instances=10000, quota_cores=10000, quota_ram=10_000_000)
        for n in range(5000):
            self.create(f"pool-{n}")
        self.clock.advance(2)
        started = time.perf_counter()
        names = self.walk(1000)
        elapsed = time.perf_counter() - started
        self.assertEqual(len(names), 5000)
        self.assertLess(elapsed, 1.0)
