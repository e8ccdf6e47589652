"""The Nova path end to end: a real ``vmcloud`` daemon on the Nova driver, a real simulator over TCP.

This module holds no tests; ``test_nova_*.py`` share it.  :class:`Cloud` runs ``python -m
vmcloud.novasim`` as a child process with ``--guest-command`` (a real ``vmcloud-guest`` started
from each ACTIVE server's user-data, stopped when the server is deleted) and ``--request-log`` (one
JSON line per request, so a test can check *when* the daemon called, not only how often).
:class:`Daemon` is the shared :class:`~tests.integration.vmcloud_daemon.VmcloudDaemon` run as
``python -m twisted --log-format=json vmcloud`` on the ``[pool] driver = nova`` path pointed at
the simulator, with a prefix of its own and shortened timeouts.  :class:`ApiWatch` polls
``/all-status`` in a thread for the whole test and counts the answers that did not come.

Tests are synchronous: they talk HTTP with :mod:`http.client` and wait by polling (bounded, never
a fixed sleep).  Every process is stopped in the test's cleanup, even after a failure: the daemon,
the simulator and, should the simulator die without stopping them, its guest processes (known from
its log by pid).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.conftest import free_port
from tests.integration.vmcloud_daemon import (
    PYTHON,
    WAIT,
    Answer,
    VmcloudDaemon,
    child_env,
    http_call,
    stop_process,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]

IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
FLAVOR = "1"
NETWORK = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"
STATIC_TOKEN = "nova-e2e-static-token"

LIST = ("GET", "/v2.1/servers/detail")
BOOT = ("POST", "/v2.1/servers")
_SERVER_PATH = re.compile(r"^/v2\.1/servers/(?!detail$)[^/]+$")

_serial = itertools.count()


def json_call(
    port: int, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> Answer:
    """A request with ``body`` (if any) sent as JSON, as the simulator's APIs take it."""
    if body is None:
        return http_call(port, method, path, None, headers, timeout=10)
    all_headers = {**(headers or {}), "Content-Type": "application/json"}
    return http_call(port, method, path, json.dumps(body).encode(), all_headers, timeout=10)


@attrs.frozen
class Request:
    """One request the simulator took (``--request-log``)."""

    t: float
    method: str
    path: str
    query: str
    status: int
    dropped: bool = False

    def is_(self, route: tuple[str, str]) -> bool:
        return (self.method, self.path) == route

    @property
    def listing(self) -> bool:
        """The first page of a server listing (novaclient's ``limit=-1`` then asks for the next
        page with ``marker=`` until a page comes back empty)."""
        return self.is_(LIST) and "marker=" not in self.query

    @property
    def per_server_get(self) -> bool:
        return self.method == "GET" and bool(_SERVER_PATH.match(self.path))


class Cloud:
    """``python -m vmcloud.novasim`` in a child process, with real guest agents for ACTIVE servers.

    ``guest``: ``"agent"`` (the real ``vmcloud-guest`` reading the server's user-data),
    ``"mac"`` (``nova_mac_guest.py``: anonymous, announces the server's MAC from the simulator),
    or ``None`` (no guest processes).
    """

    def __init__(self, base: Path, *args: str, guest: str | None = "agent") -> None:
        self.base = base
        self.args = args
        self.guest = guest
        self.request_log = base / "novasim-requests.jsonl"
        self.out_path = base / "novasim.out"
        self.err_path = base / "novasim.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def guest_command(self) -> str:
        guests = self.base / "guests"
        if self.guest == "agent":
            # These tests are about the cloud path: the agent runs without the browser stack (the
            # local driver's tests drive the real browser), so that half a dozen VMs do not start
            # half a dozen Chromiums on a 2-core machine.
            guests.mkdir(parents=True, exist_ok=True)
            config = guests / "agent.conf"
            config.write_text("[agent]\nbrowser = none\n")
            return (
                f"{PYTHON} -m twisted vmcloud-guest --config {config} --user-data {{user_data}}"
                f" --workdir {guests}/{{id}} --beacon-interval 1"
            )
        if self.guest == "mac":
            script = Path(__file__).with_name("nova_mac_guest.py")
            return f"{PYTHON} {script} {{user_data}} {{mac}} {{ip}}"
        raise ValueError(self.guest)

    def start(self) -> None:
        port = free_port()
        argv = [
            PYTHON,
            "-m",
            "vmcloud.novasim",
            "--port",
            str(port),
            "--build-seconds",
            "0.5",
            "--delete-seconds",
            "0.5",
            "--static-token",
            STATIC_TOKEN,
            "--request-log",
            str(self.request_log),
            *self.args,
        ]
        if self.guest is not None:
            argv += ["--guest-command", self.guest_command()]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env=child_env())
        wait_for(self._listening, "the simulator's banner", 30, self.log_tail)
        self.port = port

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the simulator exited with {self.process.returncode}\n{self.log_tail()}")
        return "control API:" in self.out_path.read_text("utf-8", "replace")

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/identity/v3"

    def stop(self) -> None:
        """SIGTERM (it stops its guests first), SIGKILL if it lingers; then any guest left over."""
        if self.process is not None:
            stop_process(self.process, 20)
        for pid in self.guest_pids():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(self.base).encode() in cmdline or b"nova_mac_guest" in cmdline:
                    os.kill(pid, signal.SIGKILL)

    def guest_pids(self) -> list[int]:
        text = self.err_path.read_text("utf-8", "replace") if self.err_path.exists() else ""
        return [int(pid) for pid in re.findall(r"started guest process for \S+ \(pid (\d+)\)", text)]

    def log_tail(self, lines: int = 40) -> str:
        text = self.err_path.read_text("utf-8", "replace") if self.err_path.exists() else ""
        kept = [line for line in text.splitlines() if "[twisted.python.log#info]" not in line]
        return f"--- {self.err_path}\n" + "\n".join(kept[-lines:])

    # ------------------------------------------------------------------ control API

    def control(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        answer = json_call(self.port, method, "/_sim/" + path, body)
        assert answer.status == expect, f"{method} /_sim/{path}: {answer.status} {answer.text}"
        return answer.json() if answer.body else None

    def servers(self) -> list[dict[str, Any]]:
        return self.control("GET", "servers")["servers"]  # type: ignore[no-any-return]

    def live_servers(self) -> dict[str, str]:
        """Servers not being deleted: id -> name."""
        return {s["id"]: s["name"] for s in self.servers() if s.get("task_state") != "deleting"}

    def counters(self) -> dict[str, int]:
        return self.control("GET", "counters")["counters"]  # type: ignore[no-any-return]

    def configure(self, **settings: Any) -> None:
        self.control("POST", "settings", settings)

    def add_fault(self, **rule: Any) -> None:
        self.control("POST", "faults", rule)

    def clear_faults(self) -> None:
        self.control("DELETE", "faults", expect=204)

    def requests(self) -> list[Request]:
        if not self.request_log.exists():
            return []
        found = []
        for line in self.request_log.read_text("utf-8").splitlines():
            if line.strip():
                found.append(Request(**json.loads(line)))
        return found

    def create_server(self, name: str, metadata: Mapping[str, str] | None = None) -> str:
        """A server made behind the pool's back, through the Nova API (as another tool would)."""
        body = {
            "server": {
                "name": name,
                "imageRef": IMAGE,
                "flavorRef": FLAVOR,
                "networks": [{"uuid": NETWORK}],
                "metadata": dict(metadata or {}),
            }
        }
        answer = json_call(self.port, "POST", "/v2.1/servers", body, {"X-Auth-Token": STATIC_TOKEN})
        assert answer.status == 202, answer.text
        return str(answer.json()["server"]["id"])


class Daemon(VmcloudDaemon):
    """The daemon on the Nova driver, configured for ``cloud``, logging JSON events."""

    def __init__(self, base: Path, cloud: Cloud, **settings: Any) -> None:
        """``settings`` override keys as ``section_key=value`` (``pool_timeout_update=10``)."""
        self.cloud = cloud
        self.prefix = f"nv{os.getpid() % 10000}x{next(_serial)}-"
        sections: dict[str, dict[str, Any]] = {
            "pool": {
                "driver": "nova",
                "prefix": self.prefix,
                "controller_name": "nova-e2e",
                "max_pool_size": 8,
                "beacon_interval": 1,
                "timeout_boot": 30,
                "timeout_update": 5,
                "timeout_operation": 10,
                "timeout_cloud": 5,
                "poll_interval": 1,
            },
            "api": {"long_poll_default": 1},
            "nova": {
                "auth_url": cloud.auth_url,
                "username": "demo",
                "password": "secret",
                "project_name": "demo",
                "user_domain_name": "Default",
                "project_domain_name": "Default",
                "region_name": "RegionOne",
                "image": IMAGE,
                "flavor": FLAVOR,
                "network": NETWORK,
                "key_name": "vmcloud",
                "security_groups": "default",
                "timeout": 5,
            },
        }
        super().__init__(base, sections, settings, json_log=True)

    def explain(self) -> str:
        """The pool with its cloud health, the simulator's servers, and both logs."""
        try:
            status = self.status()
            pool = json.dumps(
                {
                    "vms": [(v["vmid"], v["state"], v.get("reason")) for v in status["vms"]],
                    "cloud": status["cloud"],
                },
                indent=1,
            )
        except Exception as e:  # the daemon may be down: its log says why
            pool = f"(no /all-status: {e})"
        try:
            servers = json.dumps(
                [(s["name"], s["status"], s.get("task_state")) for s in self.cloud.servers()]
            )
        except Exception as e:
            servers = f"(no simulator: {e})"
        return f"/all-status: {pool}\nsimulator: {servers}\n{self.log_tail(60)}\n{self.cloud.log_tail(15)}"

    def wait_no_leak(self, timeout: float = WAIT) -> dict[str, str]:
        """Until the simulator's servers are exactly the pool's VMs' servers; those servers."""

        def same() -> list[dict[str, str]] | None:
            pool = {vm["serverId"] for vm in self.status()["vms"]}
            servers = self.cloud.live_servers()
            every = {s["id"] for s in self.cloud.servers()}
            return [servers] if set(servers) == pool and every == pool else None

        return self.wait_for(same, "the simulator's servers equal the pool's VMs", timeout)[0]


class ApiWatch:
    """Polls ``GET /all-status`` every ``interval`` seconds in a thread; counts what did not answer 200."""

    def __init__(self, daemon: Daemon, interval: float = 0.5, timeout: float = 5.0) -> None:
        self.daemon = daemon
        self.interval = interval
        self.timeout = timeout
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-watch", daemon=True)

    def start(self) -> ApiWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = self.daemon.call("GET", "/all-status", timeout=self.timeout)
                if answer.status == 200 and "vms" in answer.json():
                    self.answered += 1
                else:
                    self.failures.append(f"{answer.status} {answer.text[:200]}")
            except (OSError, ValueError) as e:
                self.failures.append(repr(e))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


class NovaTestCase(SynchronousTestCase):
    """Builds a simulator and a daemon per test; every process goes in cleanup, failure or not."""

    def make(self, *cloud_args: str, guest: str | None = "agent", **settings: Any) -> tuple[Cloud, Daemon]:
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        cloud = Cloud(base, *cloud_args, guest=guest)
        self.addCleanup(cloud.stop)
        cloud.start()
        daemon = Daemon(base, cloud, **settings)
        self.addCleanup(daemon.stop)
        daemon.start()
        return cloud, daemon

    def watch(self, daemon: Daemon) -> ApiWatch:
        """Start polling the API; the test asserts :meth:`assert_answered` at its end."""
        watch = ApiWatch(daemon).start()
        self.addCleanup(watch.stop)
        return watch

    def assert_answered(self, watch: ApiWatch) -> None:
        watch.stop()
        self.assertEqual(watch.failures, [], "the API must answer throughout")
        self.assertGreater(watch.answered, 0)
