"""A guest is who its credentials say and nothing else (issue #8, point 1).

The attack these tests replay: a guest that reaches the broker logs in under a name of its own and
says HELLO naming another VM's MAC (or IP).  Before the fix the victim VM was rebound to it, and the
next prepare-batch sent the batch's cookies and the session's VNC password to the attacker.
"""

from __future__ import annotations

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.pool.fakes import two_listed_vms
from vmcloud.pool.interfaces import BatchOptions, Cookie

MAC_A, IP_A = "fa:16:3e:00:00:01", "10.0.0.5"
MAC_B, IP_B = "fa:16:3e:00:00:02", "10.0.0.6"


class GuestIdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged: list[dict] = []  # type: ignore[type-arg]
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def refusals(self) -> list[str]:
        refused = [e for e in self.logged if e.get("event") == "guest-refused"]
        return [e["reason"] for e in refused if e["log_level"] is LogLevel.warn]

    def bound_pool(self) -> tuple:  # type: ignore[type-arg]
        """Two VMs, each bound to its own guest by the login minted for it."""
        w, req_a, req_b = two_listed_vms(((MAC_A,), (IP_A,)), ((MAC_B,), (IP_B,)))
        for request, mac, ip in ((req_a, MAC_A, IP_A), (req_b, MAC_B, IP_B)):
            login = request.credentials.login
            w.channel.hello(login, login=login, mac=mac, ip=ip)
        w.turn()
        self.assertEqual(w.counts(), {"FREE": 2})
        return w, w.state.vms[req_a.vmid], w.state.vms[req_b.vmid]

    def test_a_hello_naming_a_bound_vms_mac_is_refused(self) -> None:
        w, victim, _other = self.bound_pool()
        w.channel.hello("evilguest", login="evilguest", mac=MAC_A)
        w.turn()
        self.assertEqual(w.state.vms[victim.vmid].identity, victim.login)
        self.assertNotIn("evilguest", w.state.unmatched)  # refused, not parked for a later match
        (reason,) = self.refusals()
        self.assertIn(victim.vmid, reason)
        self.assertIn(f"mac {MAC_A}", reason)

    def test_a_hello_naming_a_bound_vms_ip_is_refused(self) -> None:
        w, victim, _other = self.bound_pool()
        w.channel.hello("evilguest", login="evilguest", ip=IP_A)
        w.turn()
        self.assertEqual(w.state.vms[victim.vmid].identity, victim.login)
        self.assertEqual(len(self.refusals()), 1)

    def test_the_victims_prepare_reaches_only_the_victim(self) -> None:
        w, victim, other = self.bound_pool()
        w.channel.hello("evilguest", login="evilguest", mac=MAC_A, ip=IP_A)
        w.channel.hello("evilguest2", mac=MAC_B)  # no login at all: still not a bound VM's guest
        w.turn()
        cookie = Cookie(name="session", value="worker-secret", domain="example.org")
        w.pool.prepare_batch(2, "http://example.org/", BatchOptions(cookies=(cookie,)))
        w.turn()
        told = {call.identity for call in w.channel.calls}
        self.assertEqual(told, {victim.login, other.login})
        w.channel.answer_calls(answer={"vncPassword": "abcdefgh"})
        w.turn()
        self.assertEqual(w.counts(), {"READY": 2})
        self.assertEqual(len(self.refusals()), 2)

    def test_the_guest_with_a_vms_credentials_takes_it_back_from_a_claimer(self) -> None:
        """A guest without minted credentials (one that identifies by its MAC) may claim a VM nobody
        is bound to yet; the guest that logs in with the VM's own credentials still gets it, and
        from then on the claimer is refused."""
        w, req_a, _req_b = two_listed_vms(((MAC_A,), (IP_A,)), ((MAC_B,), (IP_B,)))
        w.channel.hello("fa-16-3e-00-00-01", login="fa-16-3e-00-00-01", mac=MAC_A)
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].identity, "fa-16-3e-00-00-01")
        login = req_a.credentials.login
        w.channel.hello(login, login=login, mac=MAC_A)
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].identity, login)
        w.channel.hello("fa-16-3e-00-00-01", login="fa-16-3e-00-00-01", mac=MAC_A)
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].identity, login)
        self.assertEqual(len(self.refusals()), 1)

    def test_a_vm_bound_to_a_guest_without_login_is_not_rebound_either(self) -> None:
        """External brokers pass no login: the first guest to claim an unbound VM keeps it."""
        w, req_a, _req_b = two_listed_vms(((MAC_A,), (IP_A,)), ((MAC_B,), (IP_B,)))
        w.channel.hello("fa-16-3e-00-00-01", mac=MAC_A)
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].identity, "fa-16-3e-00-00-01")
        w.channel.hello("impostor", ip=IP_A)
        w.turn()
        self.assertEqual(w.state.vms[req_a.vmid].identity, "fa-16-3e-00-00-01")
        self.assertEqual(len(self.refusals()), 1)
