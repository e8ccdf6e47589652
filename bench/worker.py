"""Benchmark of the worker's view through the controller (issue #10, acceptance 3).

Prints figures, asserts nothing, exits 0.  Run from the repository root (as root, or any user
who may run PulseAudio)::

    .venv/bin/python bench/worker.py [--runs 20]
    .venv/bin/python bench/worker.py --daemon [--runs 10] [--parts frames,keys,sound,viewers]

Real parts on loopback: a TigerVNC ``Xvnc`` (VncAuth) as the VM's VNC server, a PulseAudio with
the VM's null sink, the guest's audio server (``guest_agent.audio``: ffmpeg from the sink's
monitor), and the controller's console and audio proxies in a process of their own
(``bench/_console_server.py``), whose CPU time is read from /proc.  The clients are this process.

1. console first frame: WebSocket open + RFB handshake (VncAuth) + a whole 1280x800 raw frame,
   through the proxy and straight to Xvnc (the proxy's share is the difference);
2. a viewer's message -> the server's answer: an 8x8 FramebufferUpdateRequest until its update,
   through the proxy and direct: the relay's share of any key -> screen change (Xvnc draws no
   cursor for a raw client, and a bare X server has nothing that answers keys: ``--daemon`` measures
   key -> screen with a browser in the VM);
3. sound delay from the VM's speaker: this process writes beeps into the null sink with ``pacat``
   at known times; onset at a PCM WebSocket listener and at an ``.ogg`` HTTP listener decoded by
   ffmpeg as it arrives;
4. bandwidth of one Opus WebSocket listener;
5. controller CPU: per console viewer pulling frames as fast as it can, and per audio listener.

``--daemon`` (root: namespaces) measures with a real daemon on the local driver and real browser VMs
(Xvnc, PulseAudio, Chromium in each), the worker being Debian's headless Chromium driven over CDP
(``tests/console/headless.py``) on a page of another origin that locks through its backend and
attaches with ``vmcloud.js`` (``tests/integration/test_worker_view.py``'s parts):

6. lock -> first frame on the worker page with a warm pool (a READY VM waits): from the page's lock
   call to the first frame drawn on its canvas (noVNC's display hooked at each flip);
7. key -> screen change: a key pressed on the worker page until the canvas shows the VM's page
   flipping its colour, on the page's own clock;
8. sound: a VM page beeps; the VM's "speaker" is its null sink's monitor (``pacat``, 5 ms latency,
   on the host's clock); onsets at the page's AudioWorklet (``onLevel`` every 5 ms) and at an
   ``.ogg`` listener decoded by ffmpeg; Opus bandwidth; controller CPU per listener;
9. controller CPU per console viewer: noVNC pages (the controller's worker.html, view only) on a VM
   showing a moving box.  ``--parts frames,keys,sound,viewers`` picks some.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from guest_agent.audio import AudioServer
from tests.console.support import WsPipe, Xvnc, open_ws, read_frame, rfb_handshake, wait_until
from tests.integration.conftest import free_port

RATE = 48000
BEEP_HZ = 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def line(label: str, values: list[float], unit: str = "ms") -> None:
    if not values:
        print(f"  {label:<44} no sample")
        return
    print(
        f"  {label:<44} p50 {statistics.median(values):7.1f} {unit}   p90 {pct(values, 0.9):7.1f}   "
        f"min {min(values):7.1f}   max {max(values):7.1f}   (n={len(values)})"
    )


class TcpPipe(Protocol):
    """A raw TCP VNC client with WsPipe's read/sendMessage, for the direct figures."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        for waiter in list(self._waiting):
            if len(self.received) >= waiter[0]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)

    def sendMessage(self, data: bytes, isBinary: bool = True) -> None:  # noqa: N802, N803
        self.transport.write(data)

    async def read(self, count: int, timeout: float = 10) -> bytes:
        if len(self.received) < count:
            d: Deferred[None] = Deferred()
            self._waiting.append((count, d))
            d.addTimeout(timeout, reactor)
            await d
        data = bytes(self.received[:count])
        del self.received[:count]
        return data


async def read_update(pipe: Any) -> int:
    """One FramebufferUpdate (raw rects and pseudo-encodings without data); the bytes of pixels."""
    kind = (await pipe.read(1))[0]
    assert kind == 0, kind
    (rects,) = struct.unpack("!xH", await pipe.read(3))
    size = 0
    for _ in range(rects):
        _, _, w, h, encoding = struct.unpack("!HHHHi", await pipe.read(12))
        if encoding == 0:
            await pipe.read(w * h * 4)
            size += w * h * 4
    return size


async def connect_direct(port: int) -> TcpPipe:
    pipe = TcpPipe()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), pipe)
    return pipe


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        if b"ready" in data and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        sys.stderr.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended.callback(None)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Speaker(ProcessProtocol):
    """pacat into the null sink, fed in real time (10 ms of silence every 10 ms), and a 100 ms beep
    when asked (PulseAudio grows its buffer after an underrun, so the stream never pauses)."""

    def __init__(self) -> None:
        self.beeps: list[float] = []
        self._beep_left = 0
        self._phase = 0

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.start(0.01)

    def beep(self) -> None:
        self._beep_left = RATE // 10
        self.beeps.append(time.monotonic())

    def _tick(self) -> None:
        samples = []
        for _ in range(RATE // 100):
            if self._beep_left:
                self._beep_left -= 1
                self._phase += 1
                samples.append(int(12000 * math.sin(2 * math.pi * BEEP_HZ * self._phase / RATE)))
            else:
                samples.append(0)
        self.transport.write(struct.pack(f"<{len(samples)}h", *samples))

    def stop(self) -> None:
        self._loop.stop()
        self.transport.signalProcess("TERM")


class _Detected(Protocol):
    """A PCM HTTP body straight from the guest (no controller), for the guest's own share."""

    def __init__(self) -> None:
        self.detector = OnsetDetector()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.detector.feed(data, time.monotonic())


class OnsetDetector:
    """Finds beep onsets in PCM (s16le mono) arriving in chunks; an onset's time is its chunk's arrival
    (when the listener has the sound: at most one chunk, 20 ms for the PCM socket, late)."""

    def __init__(self) -> None:
        self.onsets: list[float] = []
        self._quiet = 0

    def feed(self, data: bytes, arrived: float) -> None:
        samples = struct.unpack(f"<{len(data) // 2}h", data[: len(data) // 2 * 2])
        for i in range(0, len(samples) - 47, 48):  # 1 ms windows
            window = samples[i : i + 48]
            loud = sum(s * s for s in window) / 48 > 2000**2
            if loud and self._quiet > 300:
                self.onsets.append(arrived)
            self._quiet = 0 if loud else self._quiet + 1


def latencies(beeps: list[float], onsets: list[float]) -> list[float]:
    found = []
    for beep in beeps:
        after = [o - beep for o in onsets if 0 <= o - beep < 0.9]
        if after:
            found.append(min(after) * 1000)
    return found


class PcmSocket(WsPipe):
    def __init__(self) -> None:
        super().__init__()
        self.detector = OnsetDetector()
        self.bytes = 0
        self.messages = 0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.bytes += len(payload)
        self.messages += 1
        if isBinary:
            self.detector.feed(payload, time.monotonic())


class Decoder(ProcessProtocol):
    """ffmpeg decoding the live Ogg stream as it comes; onsets in what it prints (on ``clock``)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.detector = OnsetDetector()
        self.clock = clock

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.detector.feed(data, self.clock())


class OggBody(Protocol):
    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.decoder.transport.write(data)


async def console_figures(proxy: int, xvnc: Xvnc, runs: int, child: int) -> None:
    print("console (1280x800, raw encoding, loopback)")
    first: dict[str, list[float]] = {"proxy": [], "direct": []}
    change: dict[str, list[float]] = {"proxy": [], "direct": []}
    for _ in range(runs):
        for way in ("proxy", "direct"):
            started = time.monotonic()
            pipe: Any = await (
                open_ws(reactor, proxy, "/console/H") if way == "proxy" else connect_direct(xvnc.port)
            )
            size = await rfb_handshake(pipe, xvnc.password)
            await read_frame(pipe, *size)
            first[way].append((time.monotonic() - started) * 1000)
            for i in range(5):
                started = time.monotonic()
                pipe.sendMessage(struct.pack("!BBHHHH", 3, 0, 10 * i, 300, 8, 8), isBinary=True)
                await read_update(pipe)
                change[way].append((time.monotonic() - started) * 1000)
            pipe.transport.loseConnection()
    line("first frame through the proxy", first["proxy"])
    line("first frame straight to Xvnc", first["direct"])
    line("8x8 update request -> answer, through the proxy", change["proxy"])
    line("8x8 update request -> answer, straight to Xvnc", change["direct"])
    for viewers in (1, 4):
        pipes = [await open_ws(reactor, proxy, "/console/H") for _ in range(viewers)]
        for pipe in pipes:
            await rfb_handshake(pipe, xvnc.password)
        relayed = [0]
        stop = time.monotonic() + 4

        async def pull(pipe: WsPipe, n: int, stop: float, relayed: list[int]) -> None:
            i = 0
            while time.monotonic() < stop:
                i += 1
                pipe.sendMessage(
                    struct.pack("!BBHH", 5, 0, 50 + (i * 13 + n * 5) % 1000, 200 + n), isBinary=True
                )
                pipe.sendMessage(struct.pack("!BBHHHH", 3, 0, 0, 0, 1280, 800), isBinary=True)
                relayed[0] += await read_update(pipe)

        before, wall = cpu_seconds(child), time.monotonic()
        await ensureDeferred(_gather([pull(p, n, stop, relayed) for n, p in enumerate(pipes)]))
        cpu = (cpu_seconds(child) - before) / (time.monotonic() - wall) * 100
        rate = relayed[0] / (time.monotonic() - wall) / 1e6
        print(
            f"  {viewers} viewer(s) pulling whole frames: controller CPU {cpu:5.1f} % of a core for "
            f"{rate:6.1f} MB/s relayed ({cpu / max(rate, 1e-9):.2f} % per MB/s)"
        )
        for pipe in pipes:
            pipe.transport.loseConnection()


async def _gather(coroutines: list[Any]) -> None:
    from twisted.internet.defer import gatherResults

    await gatherResults([ensureDeferred(c) for c in coroutines], consumeErrors=True)


async def sound_figures(proxy: int, speaker: Speaker, child: int, guest_port: int, password: str) -> None:
    print("sound (PulseAudio null sink -> guest ffmpeg -> controller -> listener)")
    pcm: Any = await open_ws(reactor, proxy, "/audio/H?format=pcm", pipe=PcmSocket)
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None
    decoder = Decoder()
    reactor.spawnProcess(
        decoder,
        ffmpeg,
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-fflags", "nobuffer", "-flags", "low_delay",
         "-probesize", "32", "-analyzeduration", "0", "-f", "ogg", "-i", "pipe:0",
         "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-flush_packets", "1", "pipe:1"],
        env=dict(os.environ),
    )  # fmt: skip
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await agent.request(b"GET", f"http://127.0.0.1:{proxy}/audio/H.ogg".encode())
    response.deliverBody(OggBody(decoder))
    opus: Any = await open_ws(reactor, proxy, "/audio/H", pipe=PcmSocket)
    direct = _Detected()  # a capture of the same monitor, straight from the guest
    headers = Headers({b"authorization": [b"Bearer " + password.encode()]})
    answer = await agent.request(b"GET", f"http://127.0.0.1:{guest_port}/audio.pcm".encode(), headers)
    answer.deliverBody(direct)
    await task.deferLater(reactor, 2.0, lambda: None)  # captures started, decoders settled
    speaker.beeps.clear()
    for _ in range(10):
        speaker.beep()
        await task.deferLater(reactor, 1.0, lambda: None)
    guest = latencies(speaker.beeps, direct.detector.onsets)
    via_pcm = latencies(speaker.beeps, pcm.detector.onsets)
    line("speaker -> guest's capture (PulseAudio, ffmpeg)", guest)
    line("speaker -> PCM WebSocket listener", via_pcm)
    line("speaker -> .ogg listener (ffmpeg decode)", latencies(speaker.beeps, decoder.detector.onsets))
    if guest and via_pcm:
        print(
            "  the controller's share (PCM socket p50 - guest p50): "
            f"{statistics.median(via_pcm) - statistics.median(guest):.1f} ms"
        )
    start_bytes, start_messages, started = opus.bytes, opus.messages, time.monotonic()
    await task.deferLater(reactor, 3.0, lambda: None)
    seconds = time.monotonic() - started
    payload = (opus.bytes - start_bytes) * 8 / seconds / 1000
    framing = (opus.messages - start_messages) * 2 * 8 / seconds / 1000  # 2-byte frame head (< 126 bytes)
    print(f"  Opus WebSocket listener: {payload:.1f} kbit/s payload + {framing:.1f} kbit/s WebSocket framing")
    extra = [await open_ws(reactor, proxy, "/audio/H", pipe=PcmSocket) for _ in range(15)]
    await task.deferLater(reactor, 1.0, lambda: None)
    before, wall = cpu_seconds(child), time.monotonic()
    await task.deferLater(reactor, 4.0, lambda: None)
    cpu = (cpu_seconds(child) - before) / (time.monotonic() - wall) * 100
    print(
        f"  controller CPU with 3 captures and 18 listeners: {cpu:.1f} % of a core "
        f"({cpu / 18:.2f} % per listener)"
    )
    for pipe in [pcm, opus, *extra]:
        pipe.transport.loseConnection()
    direct.transport.stopProducing()
    decoder.transport.signalProcess("KILL")


async def main(reactor_: Any, runs: int) -> None:
    workdir = tempfile.mkdtemp(prefix="vmcloud-bench-worker-")
    xvnc = Xvnc(reactor, os.path.join(workdir, "xvnc"), free_port())
    await xvnc.start(geometry="1280x800")
    pulse_dir = os.path.join(workdir, "pulse")
    os.makedirs(pulse_dir)
    env = dict(os.environ, HOME=pulse_dir, XDG_RUNTIME_DIR=pulse_dir, PULSE_RUNTIME_PATH=pulse_dir)
    pulse = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
         "--load=module-null-sink sink_name=vmsink rate=48000",
         f"--load=module-native-protocol-unix socket={pulse_dir}/native auth-anonymous=1",
         "--load=module-always-sink"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    socket = os.path.join(pulse_dir, "native")
    await wait_until(reactor, lambda: os.path.exists(socket), 10, "PulseAudio's socket")
    guest_env = dict(os.environ, PULSE_SERVER=f"unix:{socket}")
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None
    guest = AudioServer(reactor, ffmpeg, password=lambda: xvnc.password, environ=guest_env)
    guest_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(guest))
    speaker = Speaker()
    pacat = shutil.which("pacat")
    assert pacat is not None
    reactor.spawnProcess(
        speaker,
        pacat,
        [pacat, "--playback", "-d", "vmsink", "--format=s16le", f"--rate={RATE}", "--channels=1",
         "--latency-msec=10"],
        env=guest_env,
    )  # fmt: skip
    speaker.start()
    proxy = free_port()
    child = _Child()
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [sys.executable, "bench/_console_server.py", str(proxy), str(xvnc.port),
         str(guest_port.getHost().port), xvnc.password],
        env=dict(os.environ),
    )  # fmt: skip
    await child.ready
    try:
        await console_figures(proxy, xvnc, runs, process.pid)
        await sound_figures(proxy, speaker, process.pid, guest_port.getHost().port, xvnc.password)
    finally:
        speaker.stop()
        guest.close_all()
        process.signalProcess("TERM")
        await child.ended
        pulse.terminate()
        pulse.wait(10)
        await xvnc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- --daemon: real browser VMs

#: The VMs' pages for the daemon mode (served on the bridge): one colour, a colour that flips at
#: every key, beeps at known times (the integration test's), a moving box for the viewers' load.
DAEMON_PAGES = {
    "/keys.html": """<html><head><title>Keys</title></head><body style="margin:0;background:#ff0000">
<script>let on = false; document.addEventListener('keydown', () => {
  on = !on; document.body.style.background = on ? '#ffff00' : '#ff0000'; });</script></body></html>""",
    "/anim.html": """<html><head><title>Animation</title></head><body style="margin:0;background:#fff">
<div id="box" style="position:absolute;top:300px;width:200px;height:200px;background:#08f"></div>
<script>const box = document.getElementById('box');
(function move(t) { box.style.left = (t / 4) % 1000 + 'px'; requestAnimationFrame(move); })(0);
</script></body></html>""",
}

#: The application's page for the bench: locks through its backend and attaches (as the test's), with
#: marks on the page's own clock: lock, states, every change of the screen's centre pixel (noVNC's
#: display hooked at each flip, so a frame is seen the moment it is drawn), every key pressed.
BENCH_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>bench</title>
<style>html, body {{ margin: 0; background: #000; }} #screen {{ width: 1280px; height: 800px; }}</style>
<script src="{controller}/static/vmcloud.js"></script></head>
<body><div id="screen" tabindex="0"></div><script>
"use strict";
const query = new URLSearchParams(location.search);
window.b = {{ marks: {{}}, changes: [], keys: [], levels: [], error: null, state: null, handle: null }};
const mark = (name) => {{ if (!(name in b.marks)) b.marks[name] = performance.now(); }};
function pixel() {{
  const c = document.querySelector("#screen canvas");
  if (!c || !c.width) return null;
  const p = c.getContext("2d").getImageData(c.width >> 1, Math.floor(c.height * 0.6), 1, 1).data;
  return p[0] + "," + p[1] + "," + p[2];
}}
window.addEventListener("keydown", () => b.keys.push(performance.now()), true);
(async () => {{
  mark("start");
  b.handle = await vmcloud.admin(location.origin + "/backend").lock(query.get("batch"));
  mark("locked");
  const vm = vmcloud.handle("{controller}", b.handle);
  b.attachment = await vm.attach(document.getElementById("screen"), {{
    audio: query.get("audio") === "1", levelMs: 5,
    onState: (state) => {{ b.state = state; mark(state); }},
    onLevel: (report) => {{ b.levels.push([Date.now(), report.level, report.buffered, report.dropped]); }},
  }});
  const display = b.attachment.rfb._display, flip = display.flip.bind(display);
  let last = null;
  display.flip = (fromQueue) => {{
    flip(fromQueue);
    const now = pixel();
    if (now !== last) {{ last = now; b.changes.push([performance.now(), now]); }}
  }};
}})().catch((error) => {{ b.error = String(error); }});
</script></body></html>"""

GREEN_PIXEL = "0,255,0"
DAEMON_PARTS = {"frames", "keys", "sound", "viewers"}


class DaemonBench:
    """A real daemon on the local driver with browser VMs, the VMs' site, the application's site and
    the worker's headless Chromium (all of tests/integration/test_worker_view.py's parts)."""

    def __init__(self, daemon: Any, site: str, app: str, browser: Any) -> None:
        self.daemon = daemon
        self.site = site
        self.app = app
        self.browser = browser
        self.http = HTTPConnectionPool(reactor, persistent=False)

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        import treq

        response = await treq.request(
            method, self.daemon.url + path, json=body, headers={"Accept": "application/json"}, pool=self.http
        )
        text = await response.text()
        assert response.code < 300, (method, path, response.code, text)
        return json.loads(text) if text.startswith(("{", "[")) else text

    async def batch(self, page: str, audio: bool = False) -> str:
        answer = await self.api(
            "POST", f"/prepare-batch/1/{quote(self.site + page, safe='')}", {"audio": audio}
        )
        return str(answer["batch"])

    async def ready(self, batch: str) -> None:
        """Until a VM of the batch is READY: the pool is warm."""
        deadline = time.monotonic() + 60
        while True:
            status = await self.api("GET", "/all-status")
            if any(vm["state"] == "READY" and vm.get("batch") == batch for vm in status["vms"]):
                return
            assert time.monotonic() < deadline, "no READY VM within 60 s"
            await task.deferLater(reactor, 0.1, lambda: None)

    async def session(self, batch: str, audio: bool = False, colour: str | None = None) -> Any:
        """The bench page locked and attached; once its screen shows ``colour`` (or anything)."""
        tab = await self.browser.open(f"{self.app}/app.html?batch={batch}&audio={int(audio)}")
        wanted = f"c[1] === {json.dumps(colour)}" if colour else "c[1] !== null"
        await tab.until(
            f"window.b && b.changes.some((c) => {wanted})",
            "the first frame",
            60,
            "{state: b.state, error: b.error, changes: b.changes.slice(-3)}",
        )
        return tab

    async def end(self, tab: Any) -> None:
        await tab.js(f"vmcloud.handle({json.dumps(self.daemon.url)}, b.handle).release().then(() => true)")
        await self.browser.cdp.call("Target.closeTarget", {"targetId": tab.target})

    def cpu(self) -> float:
        return cpu_seconds(self.daemon.process.pid)

    async def controller_cpu(self, seconds: float = 5.0) -> float:
        """The daemon's CPU over ``seconds``, in % of one core."""
        before, wall = self.cpu(), time.monotonic()
        await task.deferLater(reactor, seconds, lambda: None)
        return (self.cpu() - before) / (time.monotonic() - wall) * 100


async def first_frames(bench: DaemonBench, runs: int) -> None:
    print("lock -> first frame on the worker page (warm pool: a READY VM waits; 1280x800)")
    batch = await bench.batch("/home.html")
    marks: dict[str, list[float]] = {"lock answered": [], "noVNC connected": [], "first frame": []}
    cold = None
    for run in range(runs + 1):
        await bench.ready(batch)
        tab = await bench.session(batch, colour=GREEN_PIXEL)
        page = json.loads(await tab.js("JSON.stringify({marks: b.marks, changes: b.changes})"))
        start = page["marks"]["start"]
        first = next(t for t, colour in page["changes"] if colour == GREEN_PIXEL) - start
        if run == 0:
            cold = first  # noVNC's modules fetched for the first time
        else:
            marks["lock answered"].append(page["marks"]["locked"] - start)
            marks["noVNC connected"].append(page["marks"]["connected"] - start)
            marks["first frame"].append(first)
        await bench.end(tab)
    for name, values in marks.items():
        line(f"{name} (from the lock call)", values)
    print(f"  the first run, noVNC's modules not yet in the browser's cache: {cold:.0f} ms")
    await bench.api("POST", f"/cancel-batch/{batch}")


async def key_to_screen(bench: DaemonBench, presses: int) -> None:
    print("key -> screen change (a key typed on the worker page; the VM's page flips its colour)")
    batch = await bench.batch("/keys.html")
    await bench.ready(batch)
    tab = await bench.session(batch, colour="255,0,0")
    await tab.js("b.attachment.rfb.focus(); true")
    delays = []
    for _ in range(presses):
        seen = await tab.js("b.changes.length")
        await tab.key("a")
        await tab.until(f"b.changes.length > {seen}", "the screen changed", 5)
        key, change = await tab.js("[b.keys[b.keys.length - 1], b.changes[b.changes.length - 1][0]]")
        delays.append(change - key)
        await task.deferLater(reactor, 0.15, lambda: None)
    line("keydown on the page -> the canvas shows the change", delays)
    await bench.end(tab)
    await bench.api("POST", f"/cancel-batch/{batch}")


async def sound_delays(bench: DaemonBench, seconds: float) -> None:
    print("sound: a VM page's beeps (1 kHz, 300 ms, one a second) -> the worker page and the .ogg stream")
    batch = await bench.batch("/beeps.html", audio=True)
    await bench.ready(batch)
    tab = await bench.session(batch, audio=True)
    assert await tab.js("b.attachment.startSound()") == "running"
    handle = await tab.js("b.handle")
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None
    decoder = Decoder(clock=time.time)
    reactor.spawnProcess(
        decoder,
        ffmpeg,
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-fflags", "nobuffer", "-flags", "low_delay",
         "-probesize", "32", "-analyzeduration", "0", "-f", "ogg", "-i", "pipe:0",
         "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-flush_packets", "1", "pipe:1"],
        env=dict(os.environ),
    )  # fmt: skip
    agent = Agent(reactor, pool=bench.http)
    response = await agent.request(b"GET", f"{bench.daemon.url}/audio/{handle}.ogg".encode())
    ogg = OggBody(decoder)
    response.deliverBody(ogg)
    opus: Any = await open_ws(reactor, bench.daemon.api_port, f"/audio/{handle}", pipe=PcmSocket)
    # the VM's speaker: its null sink's monitor, read with pacat's lowest latency (the bench is root)
    speaker = Decoder(clock=time.time)
    pacat = shutil.which("pacat")
    assert pacat is not None
    reactor.spawnProcess(
        speaker,
        pacat,
        [pacat, "--record", "-d", "vmsink.monitor", "--format=s16le", f"--rate={RATE}", "--channels=1",
         "--latency-msec=5"],
        env=dict(os.environ, PULSE_SERVER="unix:" + vm_pulse_socket(bench.daemon, handle)),
    )  # fmt: skip
    started, opus_start = time.monotonic(), opus.bytes
    await task.deferLater(reactor, seconds, lambda: None)
    elapsed = time.monotonic() - started
    levels = await tab.js("b.levels")
    page_onsets = [
        t / 1000
        for (t, level, *_), (_, before, *_) in zip(levels[1:], levels, strict=False)
        if level > 0.1 and before < 0.05
    ]
    beeps = speaker.detector.onsets
    print(f"  {len(beeps)} beeps heard at the VM's null sink (pacat on its monitor, 5 ms latency asked)")
    line("VM speaker -> the page's worklet plays it", latencies(beeps, page_onsets))
    line("  the page's jitter buffer meanwhile", [buffered for _, _, buffered, _ in levels])
    tenth = max(1, len(levels) // 10)
    trend = [
        statistics.median(b for _, _, b, _ in levels[i : i + tenth]) for i in range(0, len(levels), tenth)
    ]
    print("    its median by tenths of the time: " + " ".join(f"{b:.0f}" for b in trend) + " ms")
    print(f"    the worklet skipped {levels[-1][3] / RATE * 1000:.0f} ms of sound to keep it there")
    line("VM speaker -> .ogg listener (ffmpeg decode)", latencies(beeps, decoder.detector.onsets))
    speaker.transport.signalProcess("KILL")
    latency = await tab.js(
        "[b.attachment.sound.context.outputLatency, b.attachment.sound.context.baseLatency]"
    )
    output, base = (seconds * 1000 for seconds in latency)
    print(f"  (the worker page's own output latency on top: {output:.0f} + {base:.0f} ms)")
    print(f"  Opus WebSocket listener: {(opus.bytes - opus_start) * 8 / elapsed / 1000:.1f} kbit/s payload")
    extra = [
        await open_ws(reactor, bench.daemon.api_port, f"/audio/{handle}", pipe=PcmSocket) for _ in range(8)
    ]
    await task.deferLater(reactor, 1.0, lambda: None)
    with_listeners = await bench.controller_cpu()
    for pipe in extra:
        pipe.transport.loseConnection()
    await task.deferLater(reactor, 1.0, lambda: None)
    without = await bench.controller_cpu()
    print(
        f"  controller CPU: {without:.1f} % with 2 listeners, {with_listeners:.1f} % with 10: "
        f"{(with_listeners - without) / 8:.2f} % of a core per listener"
    )
    opus.transport.loseConnection()
    decoder.transport.signalProcess("KILL")
    await bench.end(tab)
    await bench.api("POST", f"/cancel-batch/{batch}")


async def viewer_cpu(bench: DaemonBench) -> None:
    print("controller CPU per console viewer (the VM shows a moving 200x200 box; viewers: noVNC pages)")
    batch = await bench.batch("/anim.html")
    await bench.ready(batch)
    handle = await bench.api("POST", f"/lock/{batch}")
    handle = handle["handle"] if isinstance(handle, dict) else handle
    tabs: list[Any] = []
    baseline = None
    for viewers in (0, 1, 2, 4):
        while len(tabs) < viewers:
            tab = await bench.browser.open(
                f"{bench.daemon.url}/static/worker.html?handle={handle}&view_only=1&audio=0"
            )
            await tab.until("window.worker && worker.state === 'connected'", "a viewer connects", 30)
            tabs.append(tab)
        await task.deferLater(reactor, 1.0, lambda: None)
        cpu = await bench.controller_cpu()
        if baseline is None:
            baseline = cpu
            print(f"  no viewer: {cpu:.1f} % of a core (the daemon's own work)")
        else:
            print(
                f"  {viewers} viewer(s): {cpu:.1f} %, {(cpu - baseline) / viewers:.2f} % of a core per viewer"
            )
    for tab in tabs:
        await bench.browser.cdp.call("Target.closeTarget", {"targetId": tab.target})
    await bench.api("POST", f"/release/{handle}")
    await bench.api("POST", f"/cancel-batch/{batch}")


def vm_pulse_socket(daemon: Any, handle: str) -> str:
    """The PulseAudio socket of the VM a handle holds (read from its pulseaudio's command line)."""
    import re
    import subprocess

    from tests.integration.test_daemon_harness import IP

    vmid = daemon.handle_status(handle)["vmid"]
    namespace = daemon.record(daemon.vm_of(vmid)["serverId"])["network"]["namespace"]
    pids = subprocess.run([IP, "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found = re.search(rb"module-native-protocol-unix socket=([^ \x00]+)", f.read())
        except OSError:
            continue
        if found:
            return found.group(1).decode()
    raise RuntimeError(f"no pulseaudio in {namespace}")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main_daemon(
    reactor_: Any, runs: int, parts: set[str] = DAEMON_PARTS, sound_seconds: float = 12.0
) -> None:
    import threading
    from http.server import ThreadingHTTPServer
    from pathlib import Path

    from tests.console.headless import WorkerBrowser
    from tests.integration.test_daemon_harness import Daemon
    from tests.integration.test_worker_view import PAGES, VmSite, app_server

    print(f"real daemon, local driver, browser VMs in namespaces; {load()} at the start")
    workdir = tempfile.mkdtemp(prefix="vmcloud-bench-worker-")
    app_port = free_port()
    daemon = Daemon(
        Path(workdir), "bench", pool_timeout_operation=60, api_cors_origins=f"http://127.0.0.1:{app_port}"
    )
    servers: list[Any] = []
    browser = None
    try:
        daemon.start()
        daemon.set_pool_size(2, 2)
        daemon.wait_vms(FREE=2, timeout=120)
        VmSite.pages = {**PAGES, **DAEMON_PAGES}
        site = ThreadingHTTPServer((daemon.layout.bridge_ip, 0), VmSite)
        app = app_server(daemon.api_port, app_port, BENCH_PAGE)
        for server in (site, app):
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        browser = WorkerBrowser(reactor, os.path.join(workdir, "chromium"))
        await browser.start()
        bench = DaemonBench(daemon, f"http://{daemon.layout.bridge_ip}:{site.server_address[1]}",
                            f"http://127.0.0.1:{app_port}", browser)  # fmt: skip
        if "frames" in parts:
            await first_frames(bench, runs)
        if "keys" in parts:
            await key_to_screen(bench, runs * 2)
        if "sound" in parts:
            await sound_delays(bench, sound_seconds)
        if "viewers" in parts:
            await viewer_cpu(bench)
    finally:
        print(f"{load()} at the end")
        if browser is not None:
            await browser.stop()
        for server in servers:
            server.shutdown()
        daemon.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="console connections measured each way")
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="a real daemon with browser VMs (root): lock -> first frame, key -> screen, sound delays",
    )
    parser.add_argument(
        "--parts",
        default=",".join(sorted(DAEMON_PARTS)),
        help="with --daemon, what to measure: frames, keys, sound, viewers (comma-separated)",
    )
    parser.add_argument("--sound-seconds", type=float, default=12.0, help="with --daemon: how long to listen")
    options = parser.parse_args()
    if options.daemon:
        parts = set(options.parts.split(","))
        task.react(lambda r: ensureDeferred(main_daemon(r, options.runs, parts, options.sound_seconds)))
    else:
        task.react(lambda r: ensureDeferred(main(r, options.runs)))
