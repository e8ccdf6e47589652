"""Prometheus text derived from /all-status: what a dashboard scrapes."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vmcloud.api.metrics import VM_STATES, render_metrics


def samples(text: bytes) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.decode().splitlines()
        if line and not line.startswith("#")
    }


class MetricsTests(SynchronousTestCase):
    def test_every_state_is_always_present(self) -> None:
        """Series never vanish: an empty pool still reports 0 for each state."""
        found = samples(render_metrics({"vms": []}))
        self.assertLessEqual({f'vmcloud_vms{{state="{s}"}}' for s in VM_STATES}, set(found))
        self.assertEqual(sum(v for k, v in found.items() if k.startswith("vmcloud_vms")), 0)

    def test_counts_and_cloud_health(self) -> None:
        status = {
            "poolSize": {"min": 1, "max": 5, "linger": 30000},
            "vms": [{"state": "OCCUPIED"}, {"state": "OCCUPIED"}, {"state": "MYSTERY"}],
            "batches": [{}, {}],
            "preps": [{}],
            "handles": [{}, {}, {}],
            "pendingLocks": [{}],
            "cloud": {"failures": 3, "backingOff": True, "lastError": "HTTP 503", "quotaUntil": 12.5},
        }
        found = samples(render_metrics(status))
        self.assertEqual(found['vmcloud_vms{state="OCCUPIED"}'], 2)
        self.assertEqual(found['vmcloud_vms{state="MYSTERY"}'], 1, "an unknown state is still counted")
        self.assertEqual(found["vmcloud_pool_size_linger"], 30000)
        self.assertEqual(
            [
                found[k]
                for k in (
                    "vmcloud_batches",
                    "vmcloud_preparations",
                    "vmcloud_handles",
                    "vmcloud_pending_locks",
                )
            ],
            [2, 1, 3, 1],
        )
        self.assertEqual(found["vmcloud_cloud_failures"], 3)
        self.assertEqual(found["vmcloud_cloud_backing_off"], 1)
        self.assertEqual(found["vmcloud_cloud_quota_until"], 12.5)
        self.assertNotIn("vmcloud_cloud_last_error", found, "text fields are not numbers")

    def test_odd_shapes_do_not_break_a_scrape(self) -> None:
        text = render_metrics({"vms": "nope", "batches": None, "cloud": [], "poolSize": 3})
        self.assertIn(b"vmcloud_batches 0", text)

    def test_label_values_are_escaped(self) -> None:
        text = render_metrics({"vms": [{"state": 'a"b\\c\nd'}]})
        self.assertIn(b'vmcloud_vms{state="a\\"b\\\\c\\nd"} 1', text)
