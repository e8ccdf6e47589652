"""The one thread seam (issue #12, point 5): the daemon's pools and the stand-in tests use."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from vmcloud.threads import SynchronousThreads, synchronous_dispatch


class SynchronousDispatchTests(SynchronousTestCase):
    def test_work_runs_on_the_spot(self) -> None:
        self.assertEqual(self.successResultOf(synchronous_dispatch(lambda: 42)), 42)
        self.assertEqual(self.successResultOf(SynchronousThreads("t").dispatch(lambda: "x")), "x")

    def test_an_exception_is_a_failed_deferred(self) -> None:
        def broken() -> None:
            raise OSError("disk full")

        self.failureResultOf(synchronous_dispatch(broken), OSError)
