"""The Nova path end to end: a real ``twistd vmcloud`` on the Nova driver, a real simulator over TCP.

This module holds no tests; ``test_nova_*.py`` share it.  :class:`Cloud` runs ``python -m
vmcloud.novasim`` as a child process with ``--guest-command`` (a real ``vmcloud-guest`` started
from each ACTIVE server's user-data, stopped when the server is deleted) and ``--request-log`` (one
JSON line per request, so a test can check *when* the daemon called, not only how often).
:class:`Daemon` runs ``python -m twisted --log-format=json vmcloud`` on the ``[pool] driver =
nova`` path pointed at it, with a prefix of its own and shortened timeouts.  :class:`ApiWatch`
polls ``/all-status`` in a thread for the whole test and counts the answers that did not come.

Tests are synchronous: they talk HTTP with :mod:`http.client` and wait by polling (bounded, never
a fixed sleep).  Every process is stopped in the test's cleanup, even after a failure: the daemon,
the simulator and, should the simulator die without stopping them, its guest processes (known from
its log by pid).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.conftest import free_port

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

#: Upper bound of any one wait: the machine is shared; every wait polls and returns early.
WAIT = 45.0

IMAGE = "155d900f-4e14-4e4c-a73d-069cbf4541e6"
FLAVOR = "1"
NETWORK = "3cb9bc59-5699-4588-a4b1-b87f96708bc6"
STATIC_TOKEN = "nova-e2e-static-token"

LIST = ("GET", "/v2.1/servers/detail")
BOOT = ("POST", "/v2.1/servers")
_SERVER_PATH = re.compile(r"^/v2\.1/servers/(?!detail$)[^/]+$")

_serial = itertools.count()


def wait_for(
    check: Callable[[], T | None], what: str, timeout: float = WAIT, explain: Callable[[], str] = str
) -> T:
    """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n{explain()}")
        time.sleep(0.2)


@attrs.frozen
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    data = None
    all_headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        return Answer(response.status, response.read())
    finally:
        connection.close()


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
            return (
                f"{PYTHON} -m twisted vmcloud-guest --user-data {{user_data}}"
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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VMCLOUD_", "OS_", "NOVASIM_"))}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env=env)
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
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
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
        answer = http_call(self.port, method, "/_sim/" + path, body)
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
        answer = http_call(self.port, "POST", "/v2.1/servers", body, {"X-Auth-Token": STATIC_TOKEN})
        assert answer.status == 202, answer.text
        return str(answer.json()["server"]["id"])


class Daemon:
    """``twistd vmcloud`` on the Nova driver, configured for ``cloud``; start, stop, kill -9, restart."""

    def __init__(self, base: Path, cloud: Cloud, **settings: Any) -> None:
        """``settings`` override keys as ``section_key=value`` (``pool_timeout_update=10``)."""
        self.base = base
        self.cloud = cloud
        self.prefix = f"nv{os.getpid() % 10000}x{next(_serial)}-"
        self.state_dir = base / "state"
        self.api_port = free_port()
        self.stomp_port = free_port()
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
        for name, value in settings.items():
            section, _, key = name.partition("_")
            sections[section][key] = value
        self.config = base / "vmcloud.conf"
        self.config.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                for section, keys in sections.items()
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = base / "daemon-0.log"

    def start(self) -> None:
        """Start (on the same state directory as any run before) and wait until the API answers."""
        assert self.process is None or self.process.poll() is not None
        self.runs += 1
        self.log_path = self.base / f"daemon-{self.runs}.log"
        argv = [
            PYTHON,
            "-m",
            "twisted",
            "--log-format=json",
            "vmcloud",
            "--config",
            str(self.config),
            "--api",
            f"tcp:{self.api_port}:interface=127.0.0.1",
            "--stomp",
            f"tcp:{self.stomp_port}:interface=127.0.0.1",
            "--state-dir",
            str(self.state_dir),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VMCLOUD_", "OS_"))}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        wait_for(self._answers, "the API answers", 30, self.log_tail)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            return self.call("GET", "/all-status", timeout=5).status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def kill9(self) -> None:
        """``kill -9``: the daemon alone dies; its servers and their guests live on."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    # ------------------------------------------------------------------ log

    def events(self, runs: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Every JSON log event of the given runs (default: all), in order."""
        found = []
        for n in runs or range(1, self.runs + 1):
            path = self.base / f"daemon-{n}.log"
            if not path.exists():
                continue
            for line in path.read_text("utf-8", "replace").splitlines():
                line = line.strip("\x1e \r")
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        found.append(json.loads(line))
        return found

    def logged(self, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if all(e.get(k) == v for k, v in fields.items())]

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
        kept = []
        for line in text.splitlines():
            try:
                event = json.loads(line.strip("\x1e "))
            except ValueError:
                kept.append("  " + line)
                continue
            if "log_io" not in event:  # not the access log
                kept.append(f"  {event.get('log_namespace')}: {_format(event)}")
        return f"--- {self.log_path}\n" + "\n".join(kept[-lines:])

    # ------------------------------------------------------------------ HTTP

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Answer:
        return http_call(self.api_port, method, path, body, timeout=timeout)

    def ok(self, method: str, path: str, status: int = 200) -> Answer:
        answer = self.call(method, path)
        assert answer.status == status, f"{method} {path}: {answer.status} {answer.text}\n{self.log_tail()}"
        return answer

    def status(self) -> dict[str, Any]:
        return self.ok("GET", "/all-status").json()  # type: ignore[no-any-return]

    def set_pool_size(self, minimum: int, maximum: int, linger_ms: int = 600_000) -> None:
        self.ok("POST", f"/set-pool-size/{minimum}/{maximum}/{linger_ms}", 204)

    def explain(self) -> str:
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
        return f"/all-status: {pool}\nsimulator: {servers}\n{self.log_tail()}\n{self.cloud.log_tail(15)}"

    def wait_pool(self, check: Callable[[dict[str, Any]], T | None], what: str, timeout: float = WAIT) -> T:
        return wait_for(lambda: check(self.status()), what, timeout, self.explain)

    def wait_for_handle(self, handle: str, timeout: float = WAIT) -> dict[str, Any]:
        """Until the handle is assigned a VM; its handle-status."""

        def assigned() -> dict[str, Any] | None:
            status = self.ok("GET", f"/handle-status/{handle}").json()
            return status if status["assigned"] else None

        return wait_for(assigned, f"handle {handle[:6]}... assigned", timeout, self.explain)

    def wait_states(self, timeout: float = WAIT, **counts: int) -> dict[str, Any]:
        """Until the pool holds exactly ``counts`` VMs per state (``FREE=2``) and nothing else."""

        def check(status: dict[str, Any]) -> dict[str, Any] | None:
            seen: dict[str, int] = {}
            for vm in status["vms"]:
                seen[vm["state"]] = seen.get(vm["state"], 0) + 1
            return status if seen == counts else None

        return self.wait_pool(check, f"VMs {counts}", timeout)

    def wait_no_leak(self, timeout: float = WAIT) -> dict[str, str]:
        """Until the simulator's servers are exactly the pool's VMs' servers; those servers."""

        def same() -> list[dict[str, str]] | None:
            pool = {vm["serverId"] for vm in self.status()["vms"]}
            servers = self.cloud.live_servers()
            every = {s["id"] for s in self.cloud.servers()}
            return [servers] if set(servers) == pool and every == pool else None

        return wait_for(same, "the simulator's servers equal the pool's VMs", timeout, self.explain)[0]


def _format(event: Mapping[str, Any]) -> str:
    from twisted.logger import formatEvent

    try:
        return formatEvent(dict(event))
    except Exception:
        return str(event.get("log_format"))


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
