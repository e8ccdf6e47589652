"""The daemon's whole service tree, built and run in memory (issue #12, point 2).

``build_controller`` gets a ``MemoryReactorClock`` and thread pools that run work when the test
says so: nothing listens for real, no thread starts, nothing is patched.  What an operator relies
on: the listeners the configuration names (and no other), and a stop that closes the API first,
lets the pool drain its last checkpoint while the broker and the threads still work, and stops the
thread pools last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from vmcloud.api.site import ApiSite
from vmcloud.broker.protocol import StompServerFactory
from vmcloud.compose import Deployment, build_controller, check_deployment
from vmcloud.config import MIN_LISTEN_BACKLOG, parse_config
from vmcloud.tap import Options
from vmcloud.threads import Threads

#: Start order of the local-driver daemon with an embedded broker.
START_ORDER = [
    "vmcloud-cloud",
    "vmcloud-checkpoint",
    "broker-listener",
    "guest-channel",
    "local-driver",
    "pool",
    "api-listener",
]


class HeldThreads(Threads):
    """A thread pool that runs nothing until the test says so, and notes what still ran when it stopped."""

    def __init__(self, name: str, root: Callable[[], MultiService]) -> None:
        self.setName(name)
        self._root = root
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.running_at_stop: list[str] | None = None

    def dispatch(self, work: Callable[[], Any], /) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((work, d))
        return d

    def run_all(self) -> None:
        while self.queue:
            work, d = self.queue.pop(0)
            try:
                d.callback(work())
            except Exception:
                d.errback(Failure())

    def stopService(self) -> None:
        super().stopService()
        self.running_at_stop = [s.name for s in self._root() if s.running]


class ServiceTreeTests(SynchronousTestCase):
    def build(self, **sections: str) -> tuple[MemoryReactorClock, MultiService, dict[str, HeldThreads]]:
        """The daemon's tree for a test configuration (plus ``sections``: INI text per section)."""
        text = {
            "api": "listen = tcp:18080:interface=127.0.0.1\naccess_log = none\n",
            "broker": "listen = tcp:16613:interface=127.0.0.1\n",
            "pool": f"state_dir = {self.mktemp()}\n",
            "local": "netns = no\nbrowser = none\n",
        }
        text.update(sections)
        config = parse_config("".join(f"[{name}]\n{body}" for name, body in text.items()))
        return self.build_from(check_deployment(config, {"PATH": "/usr/bin", "OS_PASSWORD": "secret"}))

    def build_from(
        self, deployment: Deployment
    ) -> tuple[MemoryReactorClock, MultiService, dict[str, HeldThreads]]:
        reactor = MemoryReactorClock()
        threads: dict[str, HeldThreads] = {}

        def make_threads(name: str, size: int) -> Threads:
            threads[name] = HeldThreads(name, lambda: root)
            return threads[name]

        root = build_controller(reactor, deployment, threads=make_threads)
        assert isinstance(root, MultiService)
        self.addCleanup(self.stop, root, threads)
        return reactor, root, threads

    def stop(self, root: MultiService, threads: dict[str, HeldThreads]) -> None:
        """Stop the tree; the pool's last checkpoint is written, no cloud call is made."""
        if root.running:
            d = root.stopService()
            threads["vmcloud-checkpoint"].run_all()
            self.successResultOf(d)

    def test_a_port_held_by_another_process_ends_the_start_with_one_line(self) -> None:
        reactor, root, _threads = self.build()

        def refused(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

        reactor.listenTCP = refused  # type: ignore[method-assign]
        with capturedLogs() as logged, self.assertRaises(SystemExit) as stopped:
            root.privilegedStartService()
        self.assertEqual(stopped.exception.code, 1)
        [line] = [e for e in logged if e.get("event") == "listen-failed"]
        self.assertEqual((line["interface"], line["port"]), ("127.0.0.1", 16613))
        self.assertIn("Address already in use", formatEvent(line))

    def test_start_order(self) -> None:
        _reactor, root, _threads = self.build()
        self.assertEqual([s.name for s in root], START_ORDER)

    def test_the_broker_and_the_api_listen_where_configured(self) -> None:
        reactor, root, _threads = self.build()
        root.startService()
        listeners = [
            (port, type(factory), backlog, host) for port, factory, backlog, host in reactor.tcpServers
        ]
        self.assertEqual(
            listeners,
            [
                (16613, StompServerFactory, MIN_LISTEN_BACKLOG, "127.0.0.1"),
                (18080, ApiSite, MIN_LISTEN_BACKLOG, "127.0.0.1"),
            ],
        )
        self.assertEqual(reactor.unixServers, [])
        self.assertEqual(reactor.tcpClients, [])

    def test_an_api_on_a_unix_socket(self) -> None:
        path = self.mktemp()
        reactor, root, _threads = self.build(api=f"listen = unix:{path}\naccess_log = none\n")
        root.startService()
        [(address, site, backlog, _mode, _pid)] = reactor.unixServers
        self.assertEqual((address, type(site), backlog), (path, ApiSite, MIN_LISTEN_BACKLOG))
        self.assertEqual([type(factory) for _, factory, _, _ in reactor.tcpServers], [StompServerFactory])

    def test_an_external_broker_is_dialled_not_listened(self) -> None:
        reactor, root, _threads = self.build(
            broker="external = tcp:127.0.0.1:16614\nguest_login = guest\nguest_passcode = pw\n"
        )
        self.assertNotIn("broker-listener", [s.name for s in root])
        root.startService()
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("127.0.0.1", 16614)])
        self.assertEqual([type(factory) for _, factory, _, _ in reactor.tcpServers], [ApiSite])

    def test_stop_closes_the_api_then_drains_the_pool_then_the_rest(self) -> None:
        _reactor, root, threads = self.build()
        root.startService()
        checkpoint = threads["vmcloud-checkpoint"]
        checkpoint.run_all()  # the start-up writes and trims

        stopped = root.stopService()
        # the pool's last checkpoint waits for its thread: the API is closed, the rest still runs
        self.assertNoResult(stopped)
        running = [s.name for s in root if s.running]
        self.assertEqual(running, START_ORDER[: START_ORDER.index("pool")])
        self.assertTrue(checkpoint.queue)

        checkpoint.run_all()
        self.successResultOf(stopped)
        self.assertEqual([s.name for s in root if s.running], [])
        # the thread pools stop last, checkpoint writes before cloud calls (reverse start order)
        self.assertEqual(checkpoint.running_at_stop, ["vmcloud-cloud"])
        self.assertEqual(threads["vmcloud-cloud"].running_at_stop, [])

    def test_the_nova_driver_calls_the_cloud_on_its_own_threads(self) -> None:
        """No local-driver step; the pool's first listing waits for a cloud thread, not the reactor."""
        nova = "image = img-1\nflavor = 1\ntoken = t0k\nendpoint_override = http://127.0.0.1:1/v2.1\n"
        reactor, root, threads = self.build(pool=f"state_dir = {self.mktemp()}\ndriver = nova\n", nova=nova)
        self.assertEqual([s.name for s in root], [n for n in START_ORDER if n != "local-driver"])
        root.startService()
        self.assertTrue(threads["vmcloud-cloud"].queue)
        self.assertEqual(
            [type(factory) for _, factory, _, _ in reactor.tcpServers], [StompServerFactory, ApiSite]
        )

    def test_nothing_listens_before_start(self) -> None:
        reactor, root, _threads = self.build()
        self.assertFalse(IService(root).running)
        self.assertEqual((reactor.tcpServers, reactor.unixServers), ([], []))


class OptionsTests(SynchronousTestCase):
    """``twistd vmcloud``'s options read the file and the environment they are given, once."""

    def test_the_deployment_comes_from_the_given_environment(self) -> None:
        options = Options(environ={"OS_AUTH_URL": "http://keystone:5000/v3", "OS_TOKEN": "t0k"})
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[pool]\ndriver = nova\n[nova]\nimage = i\nflavor = f\n")
        options.parseOptions(["--config", path, "--state-dir", self.mktemp()])
        nova = options.deployment.nova
        assert nova is not None
        self.assertEqual((nova.auth_url, nova.auth_method), ("http://keystone:5000/v3", "token"))

    def test_a_configuration_that_cannot_work_is_a_usage_error(self) -> None:
        with self.assertRaisesRegex(UsageError, r"\[nova\] image: required"):
            Options(environ={}).parseOptions(["--driver", "nova"])


class DeploymentTests(SynchronousTestCase):
    def test_the_guest_broker_is_derived_once(self) -> None:
        deployment = check_deployment(parse_config("[broker]\nlisten = tcp:16613:interface=127.0.0.1\n"), {})
        self.assertEqual(deployment.guest_broker, "tcp:127.0.0.1:16613")
        self.assertIsNone(deployment.nova)

    def test_the_nova_section_is_completed_from_the_environment(self) -> None:
        config = parse_config("[pool]\ndriver = nova\n[nova]\nimage = i\nflavor = f\n")
        environ = {"OS_AUTH_URL": "http://keystone:5000/v3", "OS_USERNAME": "u", "OS_PASSWORD": "p"}
        deployment = check_deployment(config, {**environ, "OS_PROJECT_NAME": "demo"})
        assert deployment.nova is not None
        self.assertEqual(
            (deployment.nova.auth_url, deployment.nova.project_name), (environ["OS_AUTH_URL"], "demo")
        )

    def test_an_open_api_without_a_token_is_refused(self) -> None:
        with self.assertRaisesRegex(ValueError, r"\[api\] listen = tcp:8080 is reachable"):
            check_deployment(parse_config("[api]\nlisten = tcp:8080\n"), {})
