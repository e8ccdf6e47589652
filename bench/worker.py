"""Benchmark of the worker's view through the controller (issue #10, acceptance 3).

Prints figures, asserts nothing, exits 0.  Run from the repository root (as root, or any user
who may run PulseAudio)::

    .venv/bin/python bench/worker.py [--runs 20]

Real parts on loopback: a TigerVNC ``Xvnc`` (VncAuth) as the VM's VNC server, a PulseAudio with
the VM's null sink, the guest's audio server (``guest_agent.audio``: ffmpeg from the sink's
monitor), and the controller's console and audio proxies in a process of their own
(``bench/_console_server.py``), whose CPU time is read from /proc.  The clients are this process.

1. console first frame: WebSocket open + RFB handshake (VncAuth) + a whole 1280x800 raw frame,
   through the proxy and straight to Xvnc (the proxy's share is the difference);
2. a viewer's message -> the server's answer: an 8x8 FramebufferUpdateRequest until its update,
   through the proxy and direct: the relay's share of any key -> screen change (Xvnc draws no
   cursor for a raw client, and a bare X server has nothing that answers keys; the key -> screen
   figure with a browser in the VM needs issue #9's VMs);
3. sound delay from the VM's speaker: this process writes beeps into the null sink with ``pacat``
   at known times; onset at a PCM WebSocket listener and at an ``.ogg`` HTTP listener decoded by
   ffmpeg as it arrives;
4. bandwidth of one Opus WebSocket listener;
5. controller CPU: per console viewer pulling frames as fast as it can, and per audio listener.

What it does not measure: lock -> first frame on the worker page with a warm pool of real browser
VMs (that needs the daemon with issue #9's VMs; ``tests/console/test_worker_page.py`` shows the
page's path works in a headless Chromium).
"""

from __future__ import annotations

import argparse
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
    """ffmpeg decoding the live Ogg stream as it comes; onsets in what it prints."""

    def __init__(self) -> None:
        self.detector = OnsetDetector()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.detector.feed(data, time.monotonic())


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
         "-ac", "1", "-ar", str(RATE), "-f", "s16le", "pipe:1"],
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="console connections measured each way")
    options = parser.parse_args()
    task.react(lambda r: ensureDeferred(main(r, options.runs)))
