"""Destinations, subscriptions and delivery: the broker's routing core, free of sockets and time.

``/queue/...`` destinations deliver each message to one subscriber (round-robin) and store it
while nobody can take it; every other destination is a topic that fans out to its current
subscribers and stores nothing.  Queue subscriptions in ``client`` (cumulative) or
``client-individual`` mode hold their messages until ACK; NACK, UNSUBSCRIBE and a lost
connection put them back at the head of the queue, marked ``redelivered``.  Topic messages are
never redelivered: a topic subscription in a client mode gets ``ack`` headers, and its ACKs are
accepted and ignored.

Back-pressure: a publisher whose message lands on a congested consumer (its socket buffer is
full) or on a queue whose backlog is over the high-water mark is *blocked*: the realm asks its
connection to stop reading until every consumer and queue it waits on has drained.  In-process
peers are never blocked; hard caps (drop oldest, refuse when the broker is full, drop consumers
that lag too far) bound what they can pile up.

The wire protocol (:mod:`vmcloud.broker.protocol`) and in-process sessions
(:mod:`vmcloud.broker.local`) are the two kinds of :class:`IBrokerClient` the realm talks to.
"""

from __future__ import annotations

import enum
import itertools
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping

import attrs
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from vmcloud.broker.limits import DEFAULT_LIMITS, BrokerLimits

log = Logger()

QUEUE_PREFIX = "/queue/"

#: SEND headers the broker sets itself on MESSAGE frames (or that only mean something on SEND);
#: a publisher's values for them are not passed through.
RESERVED_HEADERS = frozenset(
    {
        "destination",
        "message-id",
        "subscription",
        "ack",
        "transaction",
        "receipt",
        "content-length",
        "redelivered",
    }
)

#: Rough per-message bookkeeping cost, added to body and headers when accounting stored bytes.
_MESSAGE_OVERHEAD = 200


class AckMode(enum.Enum):
    """How a subscriber acknowledges, as the SUBSCRIBE ``ack`` header spells it."""

    AUTO = "auto"
    CLIENT = "client"
    CLIENT_INDIVIDUAL = "client-individual"


class RealmError(Exception):
    """A request the realm refuses; the message is safe to show to the peer in an ERROR frame."""


class StoreFullError(RealmError):
    """The broker-wide store is full; the SEND cannot be accepted."""


class Message:
    """One published message; shared, never copied, by every subscriber it goes to.

    A plain slotted class rather than an attrs record: one is built per SEND on the broker's
    hottest path.  Treat it as immutable; :meth:`redelivery` makes the redelivered copy.
    """

    __slots__ = ("body", "destination", "headers", "message_id", "redelivered", "size")

    def __init__(
        self,
        message_id: str,
        destination: str,
        headers: Mapping[str, str],
        body: bytes,
        size: int,
        redelivered: bool = False,
    ) -> None:
        self.message_id = message_id
        self.destination = destination
        #: user headers only (RESERVED_HEADERS removed)
        self.headers = headers
        self.body = body
        #: accounting size in bytes
        self.size = size
        self.redelivered = redelivered

    def redelivery(self) -> Message:
        """The same message, marked ``redelivered``."""
        return Message(self.message_id, self.destination, self.headers, self.body, self.size, True)

    def __repr__(self) -> str:
        return f"Message({self.message_id!r}, {self.destination!r}, redelivered={self.redelivered})"


class IBrokerClient(Interface):
    """A connection (or in-process session) as the realm sees it."""

    local = Attribute("True for in-process sessions: never congested, never paused.")
    name = Attribute("Who this is, for log lines.")

    def deliver(subscription: Subscription, message: Message) -> int:  # noqa: N805
        """Hand a message to the peer for ``subscription``; return the bytes written."""

    def pause_reading() -> None:
        """Stop reading from the peer: a consumer it publishes to has fallen behind."""

    def resume_reading() -> None:
        """Read from the peer again."""

    def kill(reason: str) -> None:  # noqa: N805
        """Close the peer's connection with an ERROR saying ``reason``."""


# Peers, subscriptions and queues live as long as the guests behind them, one or two each, and
# most of them never hold a message, wait for anyone or owe an ACK: their containers are None
# until needed and dropped once empty again (an empty set is 216 bytes, an empty deque 760).


class Peer:
    """The realm's bookkeeping for one client; created by :meth:`Realm.attach`."""

    __slots__ = (
        "attached",
        "blockers",
        "client",
        "congested",
        "lag_bytes",
        "subscriptions",
        "unacked",
        "waiters",
    )

    def __init__(self, client: IBrokerClient) -> None:
        self.client = client
        self.attached = True
        #: in SUBSCRIBE order; a list, not a dict by id: a guest has two, and a dict of two is
        #: 180 bytes (see :meth:`subscription`)
        self.subscriptions: list[Subscription] = []
        #: message-id -> the client-mode queue subscription holding it un-acked
        self.unacked: dict[str, Subscription] | None = None
        #: publishers paused until this peer's socket buffer drains
        self.waiters: set[Peer] | None = None
        #: queues and consumers this peer (as a publisher) is paused for
        self.blockers: set[Peer | Queue] | None = None
        self.congested = False
        self.lag_bytes = 0

    @property
    def name(self) -> str:
        """Who this is, for log lines."""
        return str(self.client.name)

    def subscription(self, sub_id: str) -> Subscription | None:
        """The subscription with id ``sub_id``, if any (at most ``max_subscriptions`` to look at)."""
        for subscription in self.subscriptions:
            if subscription.id == sub_id:
                return subscription
        return None


class Subscription:
    """One SUBSCRIBE of one peer."""

    __slots__ = ("ack", "destination", "id", "peer", "pending")

    def __init__(self, peer: Peer, sub_id: str, destination: str, ack: AckMode) -> None:
        self.peer = peer
        self.id = sub_id
        self.destination = destination
        self.ack = ack
        #: client-mode queue subscriptions: message-id -> message, in delivery order
        self.pending: OrderedDict[str, Message] | None = None


class Queue:
    """A ``/queue/`` destination: subscribers in round-robin order and the stored backlog."""

    __slots__ = ("backlog", "backlog_bytes", "cursor", "dropping", "name", "subscribers", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscribers: list[Subscription] = []
        self.cursor = 0
        self.backlog: deque[Message] | None = None
        self.backlog_bytes = 0
        #: publishers paused until the backlog falls below low water
        self.waiters: set[Peer] | None = None
        self.dropping = False


def is_queue(destination: str) -> bool:
    """Whether ``destination`` names a queue (one consumer per message, stored) or a topic."""
    return destination.startswith(QUEUE_PREFIX)


@attrs.frozen
class BrokerStats:
    """What /all-status and the metrics show about the broker."""

    connections: int
    subscriptions: int
    queues: int
    queued_messages: int
    queued_bytes: int
    unacked_messages: int
    paused_publishers: int
    dropped_messages: int
    delivered_messages: int
    published_messages: int
    #: connections accepted since the start, and those refused for the connection limit
    opened_connections: int = 0
    refused_connections: int = 0


class Realm:
    """Routes messages from publishers to subscribers within the bounds of :class:`BrokerLimits`."""

    def __init__(self, limits: BrokerLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._topics: dict[str, list[Subscription]] = {}
        self._queues: dict[str, Queue] = {}
        self._ids = itertools.count(1)
        self._stored_messages = 0
        self._stored_bytes = 0
        self._blocked = 0
        self._dropped = 0
        self._delivered = 0
        self._published = 0
        self._subscriptions = 0
        self._unacked = 0

    # -- peers

    def attach(self, client: IBrokerClient) -> Peer:
        """Register a client; everything it does goes through the returned :class:`Peer`."""
        return Peer(client)

    def detach(self, peer: Peer) -> None:
        """The client is gone: drop its subscriptions, redeliver what it had not acked, and
        resume the publishers that were waiting for it."""
        if not peer.attached:
            return
        peer.attached = False
        for subscription in list(peer.subscriptions):
            self._remove_subscription(subscription)
        blockers = peer.blockers
        if blockers:
            for blocker in blockers:
                if blocker.waiters is not None:
                    blocker.waiters.discard(peer)
            self._blocked -= 1
        peer.blockers = None
        waiters, peer.waiters = peer.waiters, None
        if waiters:
            self._release(waiters, peer)

    def consumer_congested(self, peer: Peer) -> None:
        """The peer's socket buffer is full: deliver nothing more from queues, pause publishers
        that keep sending to it on topics."""
        peer.congested = True
        peer.lag_bytes = 0

    def consumer_drained(self, peer: Peer) -> None:
        """The peer's socket buffer is empty again."""
        peer.congested = False
        peer.lag_bytes = 0
        waiters, peer.waiters = peer.waiters, None
        if waiters:
            self._release(waiters, peer)
        for subscription in list(peer.subscriptions):
            queue = self._queues.get(subscription.destination)
            if queue is not None:
                self._drain(queue)

    # -- subscriptions

    def subscribe(self, peer: Peer, sub_id: str, destination: str, ack: AckMode) -> Subscription:
        """Add a subscription; raises :class:`RealmError` for a duplicate id or too many."""
        if peer.subscription(sub_id) is not None:
            raise RealmError(f"subscription id {sub_id!r} is already in use on this connection")
        if len(peer.subscriptions) >= self.limits.max_subscriptions:
            raise RealmError(f"more than {self.limits.max_subscriptions} subscriptions")
        # Every guest subscribes with the same ids to the same broadcast topic: one string each
        # for all of them, not one per guest.
        sub_id = sys.intern(sub_id)
        if is_queue(destination):
            queue = self._queue(destination)
            subscription = Subscription(peer, sub_id, queue.name, ack)
            peer.subscriptions.append(subscription)
            self._subscriptions += 1
            queue.subscribers.append(subscription)
            self._drain(queue)
        else:
            subscribers = self._topics.get(destination)
            if subscribers is None:
                subscribers = self._topics[destination] = []
            elif subscribers:
                destination = subscribers[0].destination
            subscription = Subscription(peer, sub_id, destination, ack)
            peer.subscriptions.append(subscription)
            self._subscriptions += 1
            subscribers.append(subscription)
        return subscription

    def unsubscribe(self, peer: Peer, sub_id: str) -> bool:
        """Remove a subscription (its un-acked messages are redelivered); False if unknown."""
        subscription = peer.subscription(sub_id)
        if subscription is None:
            return False
        self._remove_subscription(subscription)
        return True

    def _remove_subscription(self, subscription: Subscription) -> None:
        peer = subscription.peer
        peer.subscriptions.remove(subscription)
        self._subscriptions -= 1
        destination = subscription.destination
        queue = self._queues.get(destination)
        if queue is None:
            subscribers = self._topics[destination]
            subscribers.remove(subscription)
            if not subscribers:
                del self._topics[destination]
            return
        index = queue.subscribers.index(subscription)
        del queue.subscribers[index]
        if index < queue.cursor:
            queue.cursor -= 1
        pending = subscription.pending
        if pending:
            unacked_ids = peer.unacked
            if unacked_ids is not None:
                for message_id in pending:
                    unacked_ids.pop(message_id, None)
                if not unacked_ids:
                    peer.unacked = None
            self._unacked -= len(pending)
            subscription.pending = None
            self._requeue(queue, list(pending.values()))
        self._drain(queue)

    # -- publishing

    def send(
        self,
        publisher: Peer,
        destination: str,
        headers: Mapping[str, str],
        body: bytes,
        stamp: Mapping[str, str] | None = None,
    ) -> None:
        """Publish; raises :class:`StoreFullError` when a queue message cannot be stored.

        ``stamp``: headers the broker sets over the publisher's (who the publisher is), as if
        ``{**headers, **stamp}`` had been sent.
        """
        user = dict(headers)
        for name in RESERVED_HEADERS.intersection(headers):
            del user[name]
        if stamp:
            user.update(stamp)
        size = len(body) + _MESSAGE_OVERHEAD + sum(map(len, user)) + sum(map(len, user.values()))
        message = Message(f"m-{next(self._ids)}", destination, user, body, size)
        self._published += 1
        if is_queue(destination):
            self._enqueue(publisher, message)
        else:
            self._fan_out(publisher, message)

    def _fan_out(self, publisher: Peer, message: Message) -> None:
        subscribers = self._topics.get(message.destination)
        if not subscribers:
            return
        for subscription in tuple(subscribers):
            peer = subscription.peer
            if subscription not in peer.subscriptions:
                continue  # removed by an earlier delivery's side effect
            self._deliver(subscription, message)
            if peer.congested:
                self._block(publisher, peer)

    def _enqueue(self, publisher: Peer, message: Message) -> None:
        queue = self._queues.get(message.destination)
        if queue is not None and not queue.backlog:
            subscription = self._next_ready(queue)
            if subscription is not None:
                self._hand_over(subscription, message)
                return
        limits = self.limits
        if (
            self._stored_messages >= limits.max_stored_messages
            or self._stored_bytes + message.size > limits.max_stored_bytes
        ):
            self._dropped += 1
            raise StoreFullError("the broker's message store is full")
        if queue is None:
            queue = self._queue(message.destination)
        backlog = queue.backlog
        if backlog is None:
            backlog = queue.backlog = deque()
        backlog.append(message)
        queue.backlog_bytes += message.size
        self._stored_messages += 1
        self._stored_bytes += message.size
        if len(backlog) > limits.queue_max_messages or queue.backlog_bytes > limits.queue_max_bytes:
            self._drop_oldest(queue)
        if (
            len(backlog) >= limits.queue_high_water_messages
            or queue.backlog_bytes >= limits.queue_high_water_bytes
        ) and all(s.peer is not publisher for s in queue.subscribers):
            self._block(publisher, queue)

    def _drop_oldest(self, queue: Queue) -> None:
        limits = self.limits
        dropped = 0
        backlog = queue.backlog
        assert backlog is not None
        while backlog and (
            len(backlog) > limits.queue_max_messages or queue.backlog_bytes > limits.queue_max_bytes
        ):
            self._unstore(queue, backlog.popleft())
            dropped += 1
        self._dropped += dropped
        if not queue.dropping:
            queue.dropping = True
            log.warn(
                "Queue {destination} is over its cap; dropping its oldest messages",
                destination=queue.name,
                event="broker-queue-dropping",
            )

    def _unstore(self, queue: Queue, message: Message) -> None:
        queue.backlog_bytes -= message.size
        self._stored_messages -= 1
        self._stored_bytes -= message.size

    def _requeue(self, queue: Queue, messages: Iterable[Message]) -> None:
        again = [m.redelivery() for m in messages]
        if queue.backlog is None:
            queue.backlog = deque()
        queue.backlog.extendleft(reversed(again))
        for message in again:
            queue.backlog_bytes += message.size
            self._stored_messages += 1
            self._stored_bytes += message.size

    def _drain(self, queue: Queue) -> None:
        """Hand stored messages to ready subscribers; resume publishers below low water."""
        backlog = queue.backlog
        while backlog:
            subscription = self._next_ready(queue)
            if subscription is None:
                break
            message = backlog.popleft()
            self._unstore(queue, message)
            self._hand_over(subscription, message)
        if not backlog and queue.backlog is backlog:
            queue.backlog = None
        backlog = queue.backlog  # a delivery may have put messages back meanwhile
        limits = self.limits
        if (
            (len(backlog) if backlog else 0) <= limits.queue_high_water_messages // 2
            and queue.backlog_bytes <= limits.queue_high_water_bytes // 2
        ):
            queue.dropping = False
            if queue.waiters:
                waiters, queue.waiters = queue.waiters, None
                self._release(waiters, queue)
        if not queue.backlog and not queue.subscribers and self._queues.get(queue.name) is queue:
            del self._queues[queue.name]

    def _next_ready(self, queue: Queue) -> Subscription | None:
        subscribers = queue.subscribers
        count = len(subscribers)
        max_unacked = self.limits.max_unacked
        for step in range(count):
            index = (queue.cursor + step) % count
            subscription = subscribers[index]
            if not subscription.peer.congested and (
                subscription.ack is AckMode.AUTO or len(subscription.pending or ()) < max_unacked
            ):
                queue.cursor = (index + 1) % count
                return subscription
        return None

    def _hand_over(self, subscription: Subscription, message: Message) -> None:
        if subscription.ack is not AckMode.AUTO:
            pending = subscription.pending
            if pending is None:
                pending = subscription.pending = OrderedDict()
            pending[message.message_id] = message
            peer = subscription.peer
            unacked = peer.unacked
            if unacked is None:
                unacked = peer.unacked = {}
            unacked[message.message_id] = subscription
            self._unacked += 1
        self._deliver(subscription, message)

    def _deliver(self, subscription: Subscription, message: Message) -> None:
        peer = subscription.peer
        was_congested = peer.congested
        written = peer.client.deliver(subscription, message)
        self._delivered += 1
        if was_congested:
            peer.lag_bytes += written
            if peer.lag_bytes > self.limits.max_consumer_lag_bytes:
                log.warn(
                    "Dropping {peer}: {lag} bytes behind with a full socket buffer",
                    peer=peer.name,
                    lag=peer.lag_bytes,
                    event="broker-slow-consumer",
                )
                peer.lag_bytes = 0
                peer.client.kill("slow consumer: too far behind")

    # -- acknowledgements

    def ack(self, peer: Peer, ack_id: str) -> bool:
        """Acknowledge (cumulatively in ``client`` mode); False if the id is not pending."""
        subscription = peer.unacked.get(ack_id) if peer.unacked else None
        if subscription is None:
            return False
        self._take(subscription, ack_id)
        queue = self._queues.get(subscription.destination)
        if queue is not None:
            self._drain(queue)
        return True

    def nack(self, peer: Peer, ack_id: str) -> bool:
        """Put the message (in ``client`` mode: and every earlier one) back at the queue's head."""
        subscription = peer.unacked.get(ack_id) if peer.unacked else None
        if subscription is None:
            return False
        taken = self._take(subscription, ack_id)
        queue = self._queues.get(subscription.destination)
        if queue is not None:
            self._requeue(queue, taken)
            self._drain(queue)
        return True

    def _take(self, subscription: Subscription, ack_id: str) -> list[Message]:
        """Take ``ack_id`` (in ``client`` mode: and every earlier one) off the un-acked."""
        peer = subscription.peer
        pending = subscription.pending
        unacked = peer.unacked
        assert pending is not None and unacked is not None
        if subscription.ack is AckMode.CLIENT:
            taken = []
            while pending:
                message_id, message = pending.popitem(last=False)
                unacked.pop(message_id, None)
                taken.append(message)
                if message_id == ack_id:
                    break
        else:
            del unacked[ack_id]
            taken = [pending.pop(ack_id)]
        self._unacked -= len(taken)
        if not pending:
            subscription.pending = None
        if not unacked:
            peer.unacked = None
        return taken

    # -- administration

    def purge(self, destination: str) -> int:
        """Forget a queue's stored messages (a revoked guest's commands); return how many."""
        queue = self._queues.get(destination)
        if queue is None:
            return 0
        backlog = queue.backlog
        if not backlog:
            return 0
        count = len(backlog)
        while backlog:
            self._unstore(queue, backlog.popleft())
        self._drain(queue)
        return count

    def stats(self, connections: int, opened: int = 0, refused: int = 0) -> BrokerStats:
        """Figures for /all-status and metrics; the connection counts come from the listener."""
        return BrokerStats(
            connections=connections,
            subscriptions=self._subscriptions,
            queues=len(self._queues),
            queued_messages=self._stored_messages,
            queued_bytes=self._stored_bytes,
            unacked_messages=self._unacked,
            paused_publishers=self._blocked,
            dropped_messages=self._dropped,
            delivered_messages=self._delivered,
            published_messages=self._published,
            opened_connections=opened,
            refused_connections=refused,
        )

    # -- back-pressure

    def _block(self, publisher: Peer, blocker: Peer | Queue) -> None:
        blockers = publisher.blockers
        if publisher.client.local or not publisher.attached or (blockers is not None and blocker in blockers):
            return
        if not blockers:
            blockers = publisher.blockers = set()
            self._blocked += 1
            publisher.client.pause_reading()
        blockers.add(blocker)
        if blocker.waiters is None:
            blocker.waiters = set()
        blocker.waiters.add(publisher)

    def _release(self, waiters: Iterable[Peer], blocker: Peer | Queue) -> None:
        for publisher in waiters:
            blockers = publisher.blockers
            if blockers is None:
                continue
            blockers.discard(blocker)
            if not blockers:
                publisher.blockers = None
                self._blocked -= 1
                publisher.client.resume_reading()

    def _queue(self, destination: str) -> Queue:
        queue = self._queues.get(destination)
        if queue is None:
            queue = self._queues[destination] = Queue(destination)
        return queue
