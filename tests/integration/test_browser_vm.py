"""The browser VM end to end (issue #9): a real daemon, real Chromium in a namespace, a VNC client not ours.

Through the REST API on the local driver: a batch whose home page this test serves on the bridge
(the VMs' only way out), with two cookies.  The page must see exactly those cookies, the handle's
events show the home page with its title, and ``vncdo`` (vncdotool) logs in with the handle's
``vncPassword`` and captures the page's colour.  Then the worker browses through VNC only (a click
on a link, a typed URL, a popup, an SPA route, a late title), each giving exactly one event; a kill
-9 of Chromium while OCCUPIED is repaired; release and lock again gives a worker who sees nothing
of the previous one, while the old VNC password no longer works.

Needs root (namespaces) and the Debian packages; skips without them, except under ``CI`` where a
missing stack fails (as RabbitMQ's tests do).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from guest_agent.stack import find_stack
from tests.integration.test_daemon_harness import IP, NEEDS_NETNS, Daemon, netns_available, running_daemon

VNCDO = str(Path(sys.executable).with_name("vncdo"))


def _missing() -> str | None:
    programs, missing = find_stack()
    if programs is None:
        return "the browser stack is not installed: " + ", ".join(missing)
    if not os.path.exists(VNCDO):
        return "vncdotool is not installed (pip install -e .[test])"
    if not netns_available():
        return NEEDS_NETNS
    return None


_why = _missing()
if _why is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser VM tests: {_why}")
    pytestmark = pytest.mark.skip(reason=_why)

GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
PAGES = {
    "/index.html": """<html><head><title>Home page</title></head>
<body style="margin:0;background:#00ff00">
<a id="next" href="/page2.html" style="display:block;width:300px;height:120px;font-size:40px">next</a>
<script>
fetch('/report?cookie=' + encodeURIComponent(document.cookie) + '&ls=' + localStorage.getItem('seen')
      + '&history=' + history.length);
localStorage.setItem('seen', 'yes'); document.cookie = 'mine=1; path=/';
</script></body></html>""",
    "/page2.html": """<html><head></head><body style="margin:0;background:#0000ff">
<script>setTimeout(() => { document.title = 'Second page'; }, 300);
setTimeout(() => { history.pushState({}, '', '/spa/route'); document.title = 'SPA route'; }, 2500);</script>
</body></html>""",
    "/typed.html": """<html><head><title>Typed page</title></head><body style="margin:0">
<button onclick="window.open('/popup.html')" style="width:100%;height:600px;font-size:40px">popup</button>
</body></html>""",
    "/popup.html": "<html><head><title>Popup page</title></head><body>popup</body></html>",
}


class Site(BaseHTTPRequestHandler):
    reports: list[dict[str, str]] = []
    cookies: list[str] = []

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/report":
            self.reports.append({k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()})
            body = b"ok"
        elif path in PAGES or path == "/spa/route":
            if path == "/index.html":
                self.cookies.append(self.headers.get("Cookie", ""))
            body = PAGES.get(path, PAGES["/page2.html"]).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("browser"), "b", pool_timeout_operation=60) as d:
        yield d


@pytest.fixture(scope="module")
def site(daemon: Daemon) -> Iterator[str]:
    daemon.set_pool_size(1, 1)
    daemon.wait_vms(FREE=1, timeout=90)  # the bridge exists once a VM booted
    server = ThreadingHTTPServer((daemon.layout.bridge_ip, 0), Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{daemon.layout.bridge_ip}:{server.server_address[1]}"
    server.shutdown()


def vncdo(address: str, password: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VNCDO, "-s", address, "-p", password, *args], capture_output=True, text=True, timeout=timeout
    )


def capture(address: str, password: str, path: Path) -> tuple[int, int, int]:
    from PIL import Image

    run = vncdo(address, password, "capture", str(path))
    assert run.returncode == 0, run.stderr[-500:]
    image = Image.open(path).convert("RGB")
    return image.getpixel((640, 500))  # type: ignore[return-value]


def page_events(daemon: Daemon, handle: str) -> list[dict[str, Any]]:
    events = daemon.ok("GET", f"/fetch-events/{handle}/0?wait=0").json()["newEvents"]
    return [e["data"] for e in events if e["data"]["action"] != "vm-assigned"]


def wait_events(
    daemon: Daemon, handle: str, count: int, what: str, timeout: float = 30
) -> list[dict[str, Any]]:
    return daemon.wait_for(
        lambda: (lambda e: e if len(e) >= count else None)(page_events(daemon, handle)), what, timeout
    )


def browser_pids(daemon: Daemon, vm: dict[str, Any]) -> list[int]:
    namespace = daemon.record(vm["serverId"])["network"]["namespace"]
    out = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv[0].endswith(b"chromium") and not any(a.startswith(b"--type=") for a in argv):
            pids.append(pid)
    return pids


def lock_ready(daemon: Daemon, batch: str) -> tuple[str, dict[str, Any]]:
    handle = daemon.lock(batch)
    status = daemon.wait_assigned(handle, timeout=60)
    return handle, status


def test_a_worker_sees_and_drives_a_real_browser(daemon: Daemon, site: str, tmp_path: Path) -> None:
    vm = daemon.status()["vms"][0]
    assert {"cdp", "vnc"} <= set(vm.get("capabilities", [])), vm
    home = f"{site}/index.html"
    body = json.dumps({"cookies": [{"name": "task", "value": "t-7"}, {"name": "worker", "value": "w-42"}]})
    batch = daemon.ok(
        "POST",
        f"/prepare-batch/1/{quote(home, safe='')}",
        body=body.encode(),
        headers={"Content-Type": "application/json"},
    ).text
    handle, status = lock_ready(daemon, batch)
    password = status["vm"]["vncPassword"]
    ip = daemon.record(daemon.vm_of(status["vmid"])["serverId"])["network"]["ip"]
    address = f"{ip}::5900"

    # (1) the page saw exactly the batch's cookies; the handle heard its home page, with its title
    events = wait_events(daemon, handle, 1, "the home page's event")
    assert events[0] == {"action": "page-load", "url": home, "title": "Home page", "tab": 1}
    assert Site.cookies[-1] == "task=t-7; worker=w-42"
    assert Site.reports[-1]["cookie"] == "task=t-7; worker=w-42"
    assert capture(address, password, tmp_path / "home.png") == GREEN
    assert vncdo(address, "wrong-pw", "capture", str(tmp_path / "x.png")).returncode != 0

    # (2) browsing through VNC only: a click on the link (late title, then an SPA route)
    assert vncdo(address, password, "move", "100", "140", "click", "1").returncode == 0
    events = wait_events(daemon, handle, 3, "the link's page and its SPA route")
    assert events[1] == {"action": "page-load", "url": f"{site}/page2.html", "title": "Second page", "tab": 1}
    assert events[2] == {"action": "page-load", "url": f"{site}/spa/route", "title": "SPA route", "tab": 1}
    assert capture(address, password, tmp_path / "page2.png") == BLUE
    # a typed URL, then a popup opened by a click
    typed = vncdo(
        address, password, "key", "ctrl-l", "pause", "0.3", "type", f"{site}/typed.html", "key", "enter"
    )
    assert typed.returncode == 0, typed.stderr[-300:]
    events = wait_events(daemon, handle, 4, "the typed URL's page")
    assert events[3] == {"action": "page-load", "url": f"{site}/typed.html", "title": "Typed page", "tab": 1}
    assert vncdo(address, password, "move", "640", "400", "click", "1").returncode == 0
    events = wait_events(daemon, handle, 5, "the popup")
    assert events[4] == {"action": "page-load", "url": f"{site}/popup.html", "title": "Popup page", "tab": 2}
    time.sleep(2)
    assert len(page_events(daemon, handle)) == 5, page_events(daemon, handle)  # each exactly once

    # (3) kill -9 of Chromium while OCCUPIED: repaired on the home page, the handle told
    vm = daemon.vm_of(status["vmid"])
    [pid] = browser_pids(daemon, vm)
    os.kill(pid, signal.SIGKILL)
    events = daemon.wait_for(
        lambda: (
            lambda e: (
                e if any(x["action"] == "browser-restarted" for x in e) and e[-1]["url"] == home else None
            )
        )(page_events(daemon, handle)),
        "the browser restarted on the home page",
        60,
    )
    assert len(browser_pids(daemon, daemon.vm_of(status["vmid"]))) == 1
    assert daemon.vm_of(status["vmid"])["state"] == "OCCUPIED"
    assert capture(address, password, tmp_path / "again.png") == GREEN

    # release, lock again: nothing of the previous worker, and the old password is dead
    viewer = subprocess.Popen([VNCDO, "-s", address, "-p", password, "pause", "60"], stderr=subprocess.PIPE)
    time.sleep(1)
    daemon.ok("POST", f"/release/{handle}", 204)
    handle2, status2 = lock_ready(daemon, batch)
    try:
        viewer.wait(timeout=15)  # closed by CLEANUP, long before its 60 s
    finally:
        viewer.kill()
    assert status2["vmid"] == status["vmid"]
    password2 = status2["vm"]["vncPassword"]
    assert password2 != password
    wait_events(daemon, handle2, 1, "the second worker's home page")
    report = Site.reports[-1]
    assert report["cookie"] == "task=t-7; worker=w-42" and report["ls"] == "null", report
    assert report["history"] == Site.reports[0]["history"], Site.reports
    assert vncdo(address, password, "capture", str(tmp_path / "old.png")).returncode != 0
    assert capture(address, password2, tmp_path / "new.png") == GREEN
    daemon.ok("POST", f"/release/{handle2}", 204)


def test_chromium_killed_while_ready_is_repaired(daemon: Daemon, site: str) -> None:
    batch = daemon.prepare_batch(1, quote(f"{site}/index.html", safe=""))
    vm = daemon.wait_pool(
        lambda s: next((v for v in s["vms"] if v["state"] == "READY"), None), "a READY VM", 60
    )
    [pid] = browser_pids(daemon, vm)
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for(
        lambda: (
            len(browser_pids(daemon, daemon.vm_of(vm["vmid"]))) == 1
            and pid not in browser_pids(daemon, daemon.vm_of(vm["vmid"]))
        ),
        "a new Chromium",
        30,
    )
    handle, status = lock_ready(daemon, batch)
    assert status["vmid"] == vm["vmid"]
    events = wait_events(daemon, handle, 1, "the home page")
    assert events[-1]["url"] == f"{site}/index.html"
    daemon.ok("POST", f"/release/{handle}", 204)
    daemon.ok("POST", f"/cancel-batch/{batch}", 204)
    daemon.assert_no_orphans(daemon.status())


def test_a_browser_beyond_repair_ends_its_occupied_vm_which_is_replaced(daemon: Daemon, site: str) -> None:
    """Chromium killed again and again (more than 3 restarts in 120 s): the agent gives up and says
    BYE; the controller tells the handle ``vm-died``, forgets the VM and boots a replacement."""
    batch = daemon.prepare_batch(1, quote(f"{site}/index.html", safe=""))
    handle, status = lock_ready(daemon, batch)
    vmid = status["vmid"]
    killed: set[int] = set()

    def died() -> bool:
        return any(e["action"] == "vm-died" for e in page_events(daemon, handle))

    def to_kill() -> list[int | str] | None:
        if died():
            return ["died"]
        if all(v["vmid"] != vmid for v in daemon.status()["vms"]):
            return None
        return [p for p in browser_pids(daemon, daemon.vm_of(vmid)) if p not in killed] or None

    for _ in range(8):  # earlier tests' restarts may still count within the 120 s window
        found = daemon.wait_for(to_kill, "a Chromium to kill, or vm-died", 30)
        if found == ["died"]:
            break
        for pid in found:
            assert isinstance(pid, int)
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
    daemon.wait_for(died, "vm-died on the handle", 30)
    [event] = [e for e in page_events(daemon, handle) if e["action"] == "vm-died"]
    assert event["vmid"] == vmid
    assert not daemon.handle_status(handle)["assigned"]
    status = daemon.wait_pool(
        lambda s: (
            s
            if all(v["vmid"] != vmid for v in s["vms"])
            and any(v["state"] in ("FREE", "READY") for v in s["vms"])
            else None
        ),
        "a replacement VM",
        90,
    )
    daemon.ok("POST", f"/release/{handle}", 204)
    daemon.ok("POST", f"/cancel-batch/{batch}", 204)
    daemon.assert_no_orphans(daemon.status())
