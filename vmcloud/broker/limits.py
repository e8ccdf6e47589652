"""The bounds that keep the embedded broker's memory finite whatever its peers do.

One record, given to :class:`vmcloud.broker.broker.Broker` at construction.  Every figure here is
a ceiling a misbehaving or slow peer runs into; the defaults suit a controller serving a few
thousand guests on one host.
"""

from __future__ import annotations

import attrs

from vmcloud.stomp.codec import Limits

MiB = 1024 * 1024


@attrs.frozen
class BrokerLimits:
    """Per-connection, per-destination and broker-wide bounds, plus heart-beat and timing policy.

    Memory bound, roughly: connections x (one read + one unfinished frame + open transactions)
    + stored messages (``max_stored_bytes``) + what slow topic consumers may hold
    (``max_consumer_lag_bytes`` each, plus ``full_access_buffer_bytes`` for the few
    full-access connections).
    """

    #: Frame limits of the codec (header count, header line length, body size).
    frame: Limits = attrs.field(factory=Limits)
    #: Open connections at once; one more gets an ERROR frame and is closed.
    max_connections: int = 10_000
    #: Subscriptions one connection may hold.
    max_subscriptions: int = 64
    #: Transactions one connection may have open, and frames/bytes held per transaction.
    max_transactions: int = 16
    max_transaction_frames: int = 1_000
    max_transaction_bytes: int = 16 * MiB
    #: Messages a ``client``/``client-individual`` queue subscriber may hold un-acked (prefetch);
    #: further messages wait in the queue until it acks.
    max_unacked: int = 1_000
    #: A queue's stored backlog above which its publishers are paused; they resume once it falls
    #: below half of it.
    queue_high_water_messages: int = 1_000
    queue_high_water_bytes: int = 8 * MiB
    #: Hard cap of one queue's backlog: beyond it the oldest messages are dropped (and counted).
    #: Only publishers that cannot be paused (in-process sessions) ever reach it.
    queue_max_messages: int = 10_000
    queue_max_bytes: int = 64 * MiB
    #: Broker-wide cap of stored messages; a SEND that would exceed it is refused with ERROR.
    max_stored_bytes: int = 256 * MiB
    max_stored_messages: int = 100_000
    #: Bytes written to a consumer after its socket buffer filled up, before it is dropped as too
    #: slow; must exceed the largest body.  Publishers are paused long before, so only in-process
    #: publishers (the controller's broadcasts) or many publishers at once ever reach it.
    max_consumer_lag_bytes: int = 32 * MiB
    #: Transport buffer of a full-access connection (the controller, operators): how much may wait
    #: unsent before it counts as a congested consumer, and the most read from it at once.  Guests
    #: keep Twisted's 64 KiB.  One reactor turn of fan-in from a thousand guests is a few MB
    #: written to the controller's connection, which the kernel takes in one go; at 64 KiB that
    #: counted as congestion and paused and resumed every guest in turn.
    full_access_buffer_bytes: int = 4 * MiB
    #: The shortest heart-beat interval the broker agrees to, ms, either way.  A client is
    #: given what it asks for (``heart-beat:cx,cy``: beats from the broker every ``cy`` ms, its
    #: own every ``cx`` ms), but never more often than this: below it the beats would cost
    #: more than the liveness they buy (each is a wake-up of the broker's one schedule).
    heartbeat_floor_ms: int = 100
    #: A client is dropped after this many negotiated intervals without a byte from it.
    heartbeat_grace: float = 2.5
    #: Seconds a new connection has to send CONNECT.
    connect_timeout: float = 10.0
    #: Seconds an ERROR-ed connection may take to read its ERROR before it is aborted.
    close_timeout: float = 5.0


#: The defaults, shared so that signatures can name them.
DEFAULT_LIMITS = BrokerLimits()
