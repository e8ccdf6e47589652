"""A real ``vmcloud`` daemon in a child process: the part the local-driver and Nova harnesses share.

This module holds no tests.  ``test_daemon_harness.py`` (the local driver, VMs in network
namespaces) and ``test_nova_harness.py`` (the Nova driver against the simulator) each subclass
:class:`VmcloudDaemon` with their own configuration and their own account of a failed wait; the
configuration file, the child's life (start on the same state directory, SIGTERM, ``kill -9``,
restart), its logs, HTTP and the waits are written once, here, so the two cannot drift apart.

The tests are plain synchronous code.  A pytest module may share one daemon between its tests (a
fixture of module scope), which a trial ``TestCase`` cannot do: its janitor kills a child process
that outlives one test.  So the daemon is a :class:`subprocess.Popen`, the tests talk to it with
:mod:`http.client`, and every wait polls a condition until a deadline, never sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from tests.integration.conftest import free_port

T = TypeVar("T")

PYTHON = sys.executable

#: Upper bound of any one wait.  Generous, as the machine is shared and may be loaded; every wait
#: polls and returns as soon as its condition holds, so only a failing test waits this long.
WAIT = 60.0

#: How often a wait looks again.
POLL = 0.2

#: What the access log writes for a request from the tests (their own polling, noise in a failure).
_ACCESS_LOG_LINE = '"127.0.0.1" - - ['


def wait_for(
    check: Callable[[], T | None], what: str, timeout: float = WAIT, explain: Callable[[], str] = str
) -> T:
    """Poll ``check`` until it returns something truthy; that value.

    After ``timeout`` seconds, fail with ``what`` and whatever ``explain()`` says about the state of
    things, so a failure shows why instead of only that.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n{explain()}")
        time.sleep(POLL)


@attrs.frozen
class Answer:
    """One HTTP answer, read whole (the tests look at status, headers and body together)."""

    status: int
    headers: Mapping[str, str]  # names in lower case
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
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request to ``127.0.0.1:port`` on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def child_env() -> dict[str, str]:
    """This process's environment without what would configure a child behind the test's back.

    ``VMCLOUD_*`` and ``OS_*`` are read by the daemon (``OS_*`` is where Nova credentials come
    from) and ``NOVASIM_*`` by the simulator; a developer's shell may well have them set.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith(("VMCLOUD_", "OS_", "NOVASIM_"))}


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM (a clean stop), SIGKILL if it lingers past ``timeout`` seconds; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def config_text(sections: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Any]) -> str:
    """The INI file of ``sections``, with ``overrides`` given as ``section_key=value``.

    A test names only the keys it is about (``pool_quota_retry=15`` sets ``[pool] quota_retry``:
    the section is what comes before the first underscore); the harness's defaults give the rest.
    """
    merged = {name: dict(keys) for name, keys in sections.items()}
    for name, value in overrides.items():
        section, _, key = name.partition("_")
        merged.setdefault(section, {})[key] = value
    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
        for section, keys in merged.items()
    )


def _shown(line: str) -> str | None:
    """A log line as a failure message shows it (a JSON event formatted); None for the access log.

    ``str.splitlines`` also splits at the record separator that starts each JSON record, which
    leaves empty lines: they are not shown either.
    """
    if not line.strip():
        return None
    if line.startswith(("\x1e{", "{")):
        with contextlib.suppress(ValueError):
            event = json.loads(line.strip("\x1e \r"))
            if "log_io" in event:  # the access log
                return None
            return f"  {event.get('log_namespace')}: {_format(event)}"
    return None if _ACCESS_LOG_LINE in line else line


def _format(event: Mapping[str, Any]) -> str:
    from twisted.logger import formatEvent

    try:
        return formatEvent(dict(event))
    except Exception:
        return str(event.get("log_format"))


class VmcloudDaemon:
    """One ``vmcloud`` daemon with a test's own configuration; start, stop, ``kill -9``, restart.

    A subclass gives the configuration and overrides :meth:`explain` to say what a failed wait
    should show.  Every run has a log file of its own (``daemon-1.log``, ``daemon-2.log`` ...), so a
    test of a restart can tell what each run said.
    """

    def __init__(
        self,
        base: Path,
        sections: Mapping[str, Mapping[str, Any]],
        overrides: Mapping[str, Any],
        *,
        json_log: bool = False,
    ) -> None:
        """``sections``: the harness's configuration; ``overrides``: the test's, ``section_key=value``.

        ``json_log``: run ``python -m twisted --log-format=json vmcloud``, whose log a test can
        match on fields (:meth:`logged`); otherwise ``twistd --nodaemon vmcloud``, the command the
        README gives operators, with its text log.
        """
        self.base = base
        self.json_log = json_log
        self.state_dir = base / "state"
        self.api_port = free_port()
        self.stomp_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.config = base / "vmcloud.conf"
        self.config.write_text(config_text(sections, overrides))
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = base / "daemon-0.log"

    # ------------------------------------------------------------------ life

    def argv(self) -> list[str]:
        if self.json_log:
            launcher = [PYTHON, "-m", "twisted", "--log-format=json"]
        else:
            launcher = [str(Path(PYTHON).with_name("twistd")), "--nodaemon", "--pidfile="]
        return [
            *launcher,
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

    def start(self) -> None:
        """Start the daemon (on the same state directory as any run before) and wait for its API."""
        assert self.process is None or self.process.poll() is not None, "the daemon is running"
        self.runs += 1
        self.log_path = self.base / f"daemon-{self.runs}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.base, stdout=log, stderr=subprocess.STDOUT, env=child_env()
            )
        wait_for(self._answers, "the API answers", WAIT, self.log_tail)

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            return self.get("/all-status", timeout=5).status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (twistd's clean stop), SIGKILL if it lingers; the exit status (None: never run)."""
        return None if self.process is None else stop_process(self.process, timeout)

    def kill9(self) -> None:
        """``kill -9`` of the daemon alone, as a crash would: its VMs live on."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    # ------------------------------------------------------------------ logs

    def _run_logs(self, runs: Iterable[int] | None) -> Iterable[Path]:
        for n in runs or range(1, self.runs + 1):
            path = self.base / f"daemon-{n}.log"
            if path.exists():
                yield path

    def all_logs(self) -> str:
        """The text of every run's log, in order."""
        return "".join(path.read_text("utf-8", "replace") for path in self._run_logs(None))

    def traceback_lines(self) -> list[str]:
        return [line for line in self.all_logs().splitlines() if "Traceback" in line]

    def events(self, runs: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Every JSON log event of the given runs (default: all), in order (``json_log`` only)."""
        found = []
        for path in self._run_logs(runs):
            for line in path.read_text("utf-8", "replace").splitlines():
                line = line.strip("\x1e \r")
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        found.append(json.loads(line))
        return found

    def logged(self, **fields: Any) -> list[dict[str, Any]]:
        """The log events whose fields include ``fields`` (``event="stray"``)."""
        return [e for e in self.events() if all(e.get(k) == v for k, v in fields.items())]

    def log_tail(self, lines: int = 80) -> str:
        """The end of the current run's log, without the access log (the tests' own polling)."""
        text = self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
        kept = [shown for shown in map(_shown, text.splitlines()) if shown is not None]
        return f"--- {self.log_path} (last {lines} lines, no access log)\n" + "\n".join(kept[-lines:])

    # ------------------------------------------------------------------ HTTP

    def call(self, method: str, path: str, **kwargs: Any) -> Answer:
        """:func:`http_call` to the daemon's API (``body=``, ``headers=``, ``timeout=``)."""
        return http_call(self.api_port, method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.call("POST", path, **kwargs)

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Answer:
        """A request that must answer ``status``."""
        answer = self.call(method, path, **kwargs)
        assert answer.status == status, f"{method} {path}: {answer.status} {answer.text}\n{self.log_tail()}"
        return answer

    def status(self) -> dict[str, Any]:
        return self.ok("GET", "/all-status").json()  # type: ignore[no-any-return]

    def set_pool_size(self, minimum: int, maximum: int, linger_ms: int = 600_000) -> None:
        self.ok("POST", f"/set-pool-size/{minimum}/{maximum}/{linger_ms}", 204)

    def prepare_batch(self, size: int, homepage: str = "https%3A%2F%2Fexample.com%2F") -> str:
        return self.ok("POST", f"/prepare-batch/{size}/{homepage}").text

    def lock(self, batch: str) -> str:
        return self.ok("POST", f"/lock/{batch}").text

    def handle_status(self, handle: str) -> dict[str, Any]:
        return self.ok("GET", f"/handle-status/{handle}").json()  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ waiting

    def explain(self) -> str:
        """What a failed wait shows: the pool as ``/all-status`` has it, and the daemon's log."""
        try:
            pool = json.dumps({k: v for k, v in self.status().items() if k != "cloud"}, indent=1)
        except Exception as e:  # the daemon may be down; the log says why
            pool = f"(no /all-status: {e})"
        return f"/all-status: {pool}\n{self.log_tail()}"

    def wait_for(self, check: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
        """Poll ``check`` until it returns something truthy; fail with :meth:`explain`."""
        return wait_for(check, what, timeout, self.explain)

    def wait_pool(self, check: Callable[[dict[str, Any]], T | None], what: str, timeout: float = WAIT) -> T:
        """Poll ``/all-status`` until ``check(status)`` is truthy; its value."""
        return self.wait_for(lambda: check(self.status()), what, timeout)

    def wait_assigned(self, handle: str, timeout: float = WAIT) -> dict[str, Any]:
        """Until the handle is assigned a VM; its handle-status."""

        def assigned() -> dict[str, Any] | None:
            status = self.handle_status(handle)
            return status if status["assigned"] else None

        return self.wait_for(assigned, f"handle {handle[:6]}... assigned", timeout)

    def wait_vms(self, timeout: float = WAIT, **counts: int) -> dict[str, Any]:
        """Until the pool holds exactly ``counts`` VMs per state (``FREE=2``) and nothing else."""

        def check(status: dict[str, Any]) -> dict[str, Any] | None:
            seen: dict[str, int] = {}
            for vm in status["vms"]:
                seen[vm["state"]] = seen.get(vm["state"], 0) + 1
            return status if seen == counts else None

        return self.wait_pool(check, f"VMs {counts}", timeout)
