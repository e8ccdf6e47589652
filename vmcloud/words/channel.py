"""The controller's end of the guest channel: the registry of guests, and calls that await answers.

:class:`GuestChannel` implements :class:`~vmcloud.pool.interfaces.IGuestChannel` over any
:class:`~vmcloud.stomp.session.IStompSession` (the embedded broker attached in-process, or a client
connection to RabbitMQ).  It listens on the CONTROLLER destination, hears what guests say through
the interpreter, keeps who is there (HELLO, STILL_ALIVE, BYE, silence past ``beacon_timeout`` on
the injected clock), tells its listeners, and correlates every answer with the request that asked
for it by ``cmd-id``.  Guests are not trusted: anything malformed is logged with its reason and
answered with AINT_A_WORD, and the channel lives on.
"""

from __future__ import annotations

import typing
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vmcloud.pool.interfaces import (
    GuestCallFailed,
    GuestCredentials,
    GuestInfo,
    IGuestChannel,
    IGuestCredentialsRestore,
    IGuestListener,
)
from vmcloud.stomp.frame import Frame
from vmcloud.stomp.session import IStompSession
from vmcloud.words.contexts import Announcement, Answer, IControllerContext
from vmcloud.words.destinations import CONTROLLER, guest_destination, identity_from_mac
from vmcloud.words.grammar import MalformedWord, Said, sender_of
from vmcloud.words.interpreter import Interpreter
from vmcloud.words.vocabulary import ANSWERS, REQUESTS, controller_words

log = Logger()

_T = typing.TypeVar("_T")


def _same(value: str | None, known: str | None) -> str | None:
    """``value``, as the very object ``known`` when they are equal strings."""
    return known if known is not None and known == value else value


class CredentialSource(Protocol):
    """Where per-VM broker credentials come from: the embedded broker, or a fixed shared login."""

    def mint(self, vmid: str) -> tuple[str, str]:
        """A (login, passcode) for the VM, valid until :meth:`revoke`."""
        ...

    def revoke(self, vmid: str) -> None:
        """Invalidate the VM's credentials (and drop its connection, if the broker can)."""
        ...

    def restore(self, vmid: str, login: str, passcode: str) -> None:
        """Accept again credentials minted before a controller restart."""
        ...


class SharedGuestLogin:
    """A :class:`CredentialSource` for external brokers, where every guest uses one configured account."""

    def __init__(self, login: str, passcode: str) -> None:
        self._login = login
        self._passcode = passcode

    def mint(self, vmid: str) -> tuple[str, str]:
        return self._login, self._passcode

    def revoke(self, vmid: str) -> None:
        pass

    def restore(self, vmid: str, login: str, passcode: str) -> None:
        pass  # the shared account never stopped being valid


@attrs.define
class _PendingCall:
    identity: str
    word: str
    answer_word: str
    result: Deferred[Mapping[str, Any]]


@implementer(IGuestChannel, IGuestCredentialsRestore, IControllerContext)
class GuestChannel(Service):
    """Keeps the registry of guests and lets the controller say words to them and await answers."""

    name = "guest-channel"

    def __init__(
        self,
        clock: IReactorTime,
        session: IStompSession,
        *,
        credentials: CredentialSource,
        guest_broker: str,
        beacon_timeout: float,
    ) -> None:
        if beacon_timeout <= 0:
            raise ValueError("beacon_timeout must be positive")
        self._clock = clock
        self._session = session
        self._credentials = credentials
        self._guest_broker = guest_broker
        self.beacon_timeout = beacon_timeout
        self._interpreter: Interpreter[IControllerContext] = Interpreter(controller_words(), self)
        self._listeners: list[IGuestListener] = []
        #: guests by identity, in the order they were last heard: the first is the next to fall
        #: silent, so one timed call (for it) watches them all (see :meth:`_watch_silence`)
        self._guests: dict[str, GuestInfo] = {}
        self._silence: IDelayedCall | None = None
        #: what guests say alike (agent versions, capability lists): one copy for all of them
        self._alike: dict[object, Any] = {}
        self._pending: dict[str, _PendingCall] = {}
        self._logins: dict[str, str] = {}  # vmid -> login minted for it
        self._login_users: Counter[str] = Counter()  # login -> VMs holding it (shared on external brokers)
        self._subscription: str | None = None

    # ------------------------------------------------------------------ service

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._subscription = self._session.subscribe(CONTROLLER, self._on_message)
        log.info("Guest channel listening on {destination}", destination=CONTROLLER)

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        super().stopService()
        if self._subscription is not None:
            try:
                self._session.unsubscribe(self._subscription)
            except Exception:
                log.failure("Could not unsubscribe from {destination}", destination=CONTROLLER)
            self._subscription = None
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None
        for cmd_id in list(self._pending):
            self._fail(cmd_id, "the controller is stopping")

    def _on_message(self, frame: Frame) -> None:
        self._interpreter.hear(frame)

    # ------------------------------------------------------------------ IGuestChannel

    def add_listener(self, listener: IGuestListener) -> None:
        self._listeners.append(listener)

    def guests(self) -> Mapping[str, GuestInfo]:
        return dict(self._guests)

    def mint_credentials(self, vmid: str) -> GuestCredentials:
        login, passcode = self._credentials.mint(vmid)
        self._hold_login(vmid, login)
        return GuestCredentials(broker=self._guest_broker, login=login, passcode=passcode)

    def restore_credentials(self, vmid: str, credentials: GuestCredentials) -> None:
        """A VM recovered from the checkpoint logs in again with the credentials it was booted with."""
        try:
            self._credentials.restore(vmid, credentials.login, credentials.passcode)
        except ValueError as e:
            log.warn("Cannot restore the credentials of VM {vmid}: {reason}", vmid=vmid, reason=str(e))
            return
        self._hold_login(vmid, credentials.login)

    def revoke_credentials(self, vmid: str) -> None:
        login = self._release_login(vmid)
        self._credentials.revoke(vmid)
        if login is None or login in self._login_users:
            return  # never minted here, or a login shared with other VMs (external broker)
        # A guest that authenticated with a login goes by it (see _identify): no scan of every guest,
        # which made a shutdown of 5,000 VMs quadratic.
        guest = self._guests.get(login)
        if guest is not None and guest.login == login:
            log.info("Forgetting guest {identity}: its credentials were revoked", identity=login)
            self._forget(login, "its credentials were revoked")

    def _hold_login(self, vmid: str, login: str) -> None:
        self._release_login(vmid)
        self._logins[vmid] = login
        self._login_users[login] += 1

    def _release_login(self, vmid: str) -> str | None:
        login = self._logins.pop(vmid, None)
        if login is not None:
            self._login_users[login] -= 1
            if self._login_users[login] <= 0:
                del self._login_users[login]
        return login

    async def call(
        self, identity: str, word: str, params: Mapping[str, Any], timeout: float
    ) -> Mapping[str, Any]:
        request = REQUESTS.get(word)
        if request is None:
            raise ValueError(f"{word} is not a request word (known: {', '.join(sorted(REQUESTS))})")
        try:
            guest_destination(identity)
        except ValueError as e:
            raise GuestCallFailed(str(e)) from None
        cmd_id = uuid.uuid4().hex
        try:
            said = request.from_params(identity, cmd_id, params)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"bad parameters for {word}: {e}") from e
        result: Deferred[Mapping[str, Any]] = Deferred()
        self._pending[cmd_id] = _PendingCall(identity, word, ANSWERS[word], result)
        result.addTimeout(timeout, self._clock)
        try:
            self.say(said)
        except Exception as e:
            self._pending.pop(cmd_id, None)
            result.cancel()
            result.addErrback(lambda _: None)
            log.failure("Could not say {word} to {identity}", word=word, identity=identity)
            raise GuestCallFailed(f"could not say {word} to {identity}: {e}") from e
        log.debug("Said {word} {cmd_id} to {identity}", word=word, cmd_id=cmd_id, identity=identity)
        try:
            return await result
        except DeferredTimeout:
            raise GuestCallFailed(f"no answer from {identity} to {word} within {timeout:g} s") from None
        finally:
            self._pending.pop(cmd_id, None)

    # ------------------------------------------------------------------ IControllerContext

    def say(self, said: Said) -> None:
        self._session.send(said.destination, said.body, said.headers)

    def speaker(self) -> str | None:
        return None

    def answer_destination(self, frame: Frame) -> str | None:
        try:
            sender = sender_of(frame)
        except MalformedWord:
            return None
        return guest_destination(sender) if sender is not None else None

    def heard_hello(self, announcement: Announcement) -> None:
        guest = self._register(announcement)
        log.info(
            "Guest {identity} registered: ip {ip}, mac {mac}, agent {version}, capabilities {capabilities}",
            identity=guest.identity,
            ip=guest.ip,
            mac=guest.mac,
            version=guest.agent_version,
            capabilities=",".join(guest.capabilities),
            event="guest-hello",
        )
        self._tell("guest_hello", guest)

    def heard_beacon(self, announcement: Announcement) -> None:
        identity, _ = self._identify(announcement)
        if identity not in self._guests:
            # The controller restarted while the guest stayed connected (external broker): the
            # beacon says everything HELLO would.
            log.info("Beacon from unknown guest {identity}: registering it", identity=identity)
            self.heard_hello(announcement)
            return
        self._register(announcement)

    def heard_bye(self, announcement: Announcement) -> None:
        identity, _ = self._identify(announcement)
        if identity not in self._guests:
            log.info("BYE from unknown guest {identity}", identity=identity)
            return
        log.info("Guest {identity} said BYE", identity=identity, event="guest-bye")
        self._forget(identity, "said BYE")
        self._tell("guest_gone", identity, "said BYE")

    def heard_answer(self, answer: Answer) -> None:
        pending = self._pending.get(answer.cmd_id)
        if pending is None:
            log.info(
                "Ignoring {word} {cmd_id} from {sender}: no call waits for it (late or unknown)",
                word=answer.word,
                cmd_id=answer.cmd_id,
                sender=answer.sender,
                event="stale-answer",
            )
            return
        if answer.sender != pending.identity:
            log.warn(
                "Ignoring {word} {cmd_id} from {sender}: the call went to {identity}",
                word=answer.word,
                cmd_id=answer.cmd_id,
                sender=answer.sender,
                identity=pending.identity,
                event="misdirected-answer",
            )
            return
        if answer.error is not None:
            self._fail(answer.cmd_id, f"{pending.identity} could not do {pending.word}: {answer.error}")
        elif answer.word != pending.answer_word:
            self._fail(answer.cmd_id, f"{pending.identity} answered {pending.word} with {answer.word}")
        else:
            del self._pending[answer.cmd_id]
            pending.result.callback(answer.value)

    def heard_not_understood(self, cmd_id: str | None, word: str, reason: str, sender: str | None) -> None:
        pending = self._pending.get(cmd_id) if cmd_id is not None else None
        if pending is not None and pending.identity == sender:
            self._fail(cmd_id or "", f"{sender} did not understand {word}: {reason}")
            return
        log.warn(
            "{sender} did not understand {word} (cmd-id {cmd_id}): {reason}",
            sender=sender or "a guest",
            word=word,
            cmd_id=cmd_id,
            reason=reason,
        )

    def heard_event(self, sender: str | None, event: Mapping[str, Any]) -> None:
        if sender is None:
            log.warn(
                "Ignoring event {action} from a guest that names no identity", action=event.get("action")
            )
            return
        self._tell("guest_event", sender, event)

    # ------------------------------------------------------------------ registry

    def _identify(self, announcement: Announcement) -> tuple[str, str | None]:
        """The identity a guest goes by, and the login it authenticated with (if known)."""
        login = announcement.login
        if login is None and announcement.identity in self._login_users:
            login = announcement.identity
        if login is not None and announcement.identity not in (None, login):
            log.warn(
                "Guest logged in as {login} claims identity {claimed}; it is {login}",
                login=login,
                claimed=announcement.identity,
            )
        identity = login or announcement.identity
        if identity is None:
            assert announcement.mac is not None  # read_announcement guarantees one of the three
            identity = identity_from_mac(announcement.mac)
        return identity, login

    def _register(self, announcement: Announcement) -> GuestInfo:
        """Record what the guest says of itself, heard now.

        A beacon says what the last one said: the record keeps the strings it already holds
        rather than the beacon's equal copies, and every guest shares one copy of what all of
        them say alike.  At 5,000 guests that is most of what the registry would otherwise hold.
        """
        identity, login = self._identify(announcement)
        guests = self._guests
        old = guests.pop(identity, None)  # re-inserted last: the order is the order heard
        # the operator's view is said in HELLO only: a beacon keeps what the HELLO said
        view: Announcement | GuestInfo | None = announcement if announcement.view_password else old
        guest = GuestInfo(
            identity=old.identity if old is not None else identity,
            login=_same(login, old.login if old else None),
            ip=_same(announcement.ip, old.ip if old else None),
            mac=_same(announcement.mac, old.mac if old else None),
            agent_version=self._shared(announcement.agent_version),
            capabilities=self._shared(announcement.capabilities),
            last_beacon=self._clock.seconds(),
            vnc_port=view.vnc_port if view is not None else None,
            view_password=view.view_password if view is not None else None,
        )
        guests[guest.identity] = guest
        if self._silence is None:
            self._watch_silence()
        return guest

    def _shared(self, value: _T) -> _T:
        """``value``, as the one copy every guest saying it holds (a bounded cache: odd guests
        cannot grow it without end)."""
        alike = self._alike
        shared = alike.get(value)
        if shared is None:
            if len(alike) >= 256:
                return value
            shared = alike[value] = value
        return typing.cast(_T, shared)

    def _watch_silence(self) -> None:
        """Forget every guest silent for ``beacon_timeout``, and come back when the next one
        would be: one timed call for all the guests instead of one each (half a kilobyte)."""
        self._silence = None
        guests = self._guests
        now = self._clock.seconds()
        while guests:
            identity, guest = next(iter(guests.items()))
            due = guest.last_beacon + self.beacon_timeout
            if due > now:
                self._silence = self._clock.callLater(due - now, self._watch_silence)
                return
            self._silent(identity)
            if self._silence is not None:
                return  # a listener registered a guest meanwhile, which went on watching

    def _silent(self, identity: str) -> None:
        reason = f"silent for more than {self.beacon_timeout:g} s"
        log.warn("Guest {identity} is gone: {reason}", identity=identity, reason=reason, event="guest-silent")
        self._forget(identity, reason)
        self._tell("guest_gone", identity, reason)

    def _forget(self, identity: str, reason: str) -> None:
        self._guests.pop(identity, None)
        for cmd_id, pending in list(self._pending.items()):
            if pending.identity == identity:
                self._fail(cmd_id, f"{identity} is gone ({reason}) before answering {pending.word}")

    def _fail(self, cmd_id: str, reason: str) -> None:
        pending = self._pending.pop(cmd_id, None)
        if pending is not None and not pending.result.called:
            pending.result.errback(GuestCallFailed(reason))

    def _tell(self, method: str, *args: Any) -> None:
        for listener in list(self._listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:
                log.failure(
                    "Guest listener {listener!r} failed in {method}", listener=listener, method=method
                )
