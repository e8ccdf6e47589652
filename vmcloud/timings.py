"""How long things took, told to whoever keeps the figures: the seam between the rooms and ``/metrics``.

The pool (a VM's phases, a handle's wait), the reconciler (its passes), the Nova driver (its calls)
and the checkpoint store (its writes) measure durations and say each one to an :class:`ITimings`
with :meth:`~ITimings.observe`.  The composition root hands them all the one implementation that
``/metrics`` exposes (:class:`vmcloud.api.metrics.Metrics`, histograms of ``prometheus_client``);
without it they get :data:`NO_TIMINGS`, which forgets everything.  So no room but the API imports
the metrics library, and neither a test nor a caller has to pass anything.

The names below are the whole vocabulary: each is one histogram, with the labels it lists.
"""

from __future__ import annotations

from zope.interface import Interface, implementer

#: A handle's wait from /lock until a VM was assigned to it (0 when a READY VM was there).
LOCK_ASSIGNED = "lock_assigned"
#: A VM's PREPARE, WAIT to READY; label ``outcome``: ``ok``, or ``failed`` when the VM went to ERROR
#: or was terminated instead (a timeout, a shutdown).
PREPARE = "prepare"
#: A VM's CLEANUP, WAIT to FREE; label ``outcome`` as for :data:`PREPARE`.
CLEANUP = "cleanup"
#: A VM's boot, from asking the cloud for its server until its guest's HELLO made it FREE;
#: label ``outcome`` as for :data:`PREPARE` (``failed``: no HELLO in time, for one).
BOOT = "boot"
#: One reconcile pass (plan, apply, start effects), wall time.
RECONCILE_PASS = "reconcile_pass"
#: One Nova call; labels ``call`` (``boot``, ``delete``, ``list``) and ``outcome`` (see
#: :data:`CLOUD_OUTCOMES`).
NOVA_CALL = "nova_call"
#: One checkpoint write that reached the disk (encoding and file operations, on its thread).
CHECKPOINT_WRITE = "checkpoint_write"

#: The ``outcome`` of a VM phase.
OK = "ok"
FAILED = "failed"
#: The ``outcome`` of a cloud call: answered, refused for quota, rate limited, the cloud unreachable
#: or failing (5xx, timeout), the request refused (4xx, authentication), an unforeseen exception.
CLOUD_OUTCOMES = (OK, "quota", "ratelimit", "unavailable", "refused", "error")


class ITimings(Interface):
    """Takes durations; whoever implements it decides what to keep."""

    def observe(name: str, seconds: float, **labels: str) -> None:  # noqa: N805
        """``seconds`` of the thing called ``name`` (one of this module's names), with its labels.

        Called on the reactor thread; returns at once and never raises into what was timed.
        """


@implementer(ITimings)
class NoTimings:
    """Forgets every duration: what a component uses when nobody asked for its figures."""

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        pass


NO_TIMINGS = NoTimings()
