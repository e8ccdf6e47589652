"""Which VM a guest is: the directory that matches a guest's HELLO to its VM, and refuses false claims.

A guest is who its credentials say and nothing else.  :class:`GuestDirectory` indexes the VMs by
what identifies a guest (the login minted for the VM, the identity a guest gave once bound, the
MACs and IPs the cloud reports) and applies the rules of :meth:`GuestDirectory.match`.  It also
parks the guests that said HELLO before the cloud told us their addresses, and keeps one copy of
each set of capabilities that thousands of guests say alike.  It holds vmids, never records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vmcloud.pool.indexes import reindex
from vmcloud.pool.interfaces import GuestInfo
from vmcloud.pool.model import VM

#: Distinct capability sets kept shared; past that, odd guests get their own copy.
_SHARED_CAPABILITIES = 64


class GuestRefused(Exception):
    """A guest claimed a VM that is bound to someone else; the message says which and why."""


def normalize_mac(mac: str) -> str:
    """One spelling for a MAC, whether a cloud or a guest (or an identity) wrote it."""
    return mac.strip().lower().replace("-", ":")


def _login(vm: VM) -> tuple[str | None]:
    return (vm.login,)


def _identity(vm: VM) -> tuple[str | None]:
    return (vm.identity,)


def _macs(vm: VM) -> tuple[str, ...]:
    return tuple(normalize_mac(m) for m in vm.macs)


def _ips(vm: VM) -> tuple[str, ...]:
    return vm.ips


class GuestDirectory:
    """VMs by login, identity, MAC and IP; the guests waiting for a match; shared capability sets."""

    __slots__ = ("_by_identity", "_by_ip", "_by_login", "_by_mac", "_capabilities", "unmatched")

    def __init__(self) -> None:
        self._by_login: dict[str, str] = {}
        self._by_identity: dict[str, str] = {}
        self._by_mac: dict[str, str] = {}
        self._by_ip: dict[str, str] = {}
        #: Guests that said HELLO but matched no VM yet, with the time they did.
        self.unmatched: dict[str, tuple[GuestInfo, float]] = {}
        #: One tuple per distinct set of guest capabilities, shared by every VM saying it.
        self._capabilities: dict[tuple[str, ...], tuple[str, ...]] = {}

    def move(self, old: VM | None, new: VM | None) -> None:
        """A VM's record changed from ``old`` (None: new) to ``new`` (None: forgotten).

        Cheap to call when none of login, identity, MACs and IPs changed, and never needed then.
        """
        reindex(self._by_login, old, new, _login)
        reindex(self._by_identity, old, new, _identity)
        reindex(self._by_mac, old, new, _macs)
        reindex(self._by_ip, old, new, _ips)

    def vmid_of(self, identity: str) -> str | None:
        """The VM bound to the guest of this identity, if any."""
        return self._by_identity.get(identity)

    def match(self, guest: GuestInfo, vms: Mapping[str, VM]) -> str | None:
        """The VM a guest belongs to, or None while none is known for it yet.

        A guest is who its credentials say and nothing else: a VM bound to a login or identity
        goes to that guest only, and the guest logging in with the credentials minted for a VM
        always gets that VM (even from a guest that claimed it first).  What a guest merely claims
        (a MAC or IP in its HELLO) picks only among VMs nobody is bound to yet; a claim on a bound
        VM raises :class:`GuestRefused`, so that a guest that reaches the broker cannot take over a
        VM (and with it the next worker's cookies and VNC password).  Claims come only from guests
        without minted credentials: anonymous ones, which the broker takes from its own host only,
        and those an external broker passes on; a VM's own guest is matched by its login first.
        """
        if guest.login is not None and guest.login in self._by_login:
            return self._by_login[guest.login]
        if guest.identity in self._by_identity:
            return self._by_identity[guest.identity]
        vmid = None
        if guest.mac and normalize_mac(guest.mac) in self._by_mac:
            vmid, claim = self._by_mac[normalize_mac(guest.mac)], f"mac {guest.mac}"
        elif guest.ip and guest.ip in self._by_ip:
            vmid, claim = self._by_ip[guest.ip], f"ip {guest.ip}"
        if vmid is None:
            return None
        vm = vms[vmid]
        if vm.identity is not None:
            raise GuestRefused(f"its {claim} names VM {vmid}, already bound to guest {vm.identity}")
        return vmid

    def shared_capabilities(self, capabilities: Iterable[str]) -> tuple[str, ...]:
        """``capabilities`` as the one tuple every guest saying the same shares (a bounded cache)."""
        key = tuple(capabilities)
        if len(self._capabilities) >= _SHARED_CAPABILITIES and key not in self._capabilities:
            return key  # odd guests cannot grow it without end
        return self._capabilities.setdefault(key, key)
