"""Benchmark of the embedded STOMP broker next to CoilMQ and RabbitMQ (issue #2, acceptance 6).

Prints figures, asserts nothing, exits 0.  Run from the repository root::

    .venv/bin/python bench/broker.py --start-ours --start-coilmq \\
        --target rabbitmq=guest:guest@127.0.0.1:61614 [--quick]

``--target [label=][login:passcode@]host:port`` is repeatable; the broker behind a target is
found by its listening socket (psutil) to read its RSS and CPU.  ``--start-ours`` runs
``vmcloud.broker.Broker`` in a subprocess (anonymous guests, a fresh process for every phase);
``--start-coilmq`` runs CoilMQ from PyPI likewise.  Per target it measures:

1. fan-in: N guest connections send STILL_ALIVE beacons to one controller queue as fast as the
   broker takes them (a window of 16 beacons per connection, a receipt on every 8th), one
   consumer; beacons/s delivered, and the loss after draining;
2. round trip: CMD_RUN to a guest's queue, CMD_RESULTS back; p50/p99 with 1 and 16 in flight;
3. idle memory: broker RSS per connected+subscribed idle guest at 1,000 and 5,000 connections;
4. flood: publishers write as fast as the sockets take for 10 s to a queue whose consumer reads
   1,000 messages/s and acks each; broker RSS every 0.5 s, deliveries every second, stalls.

The load generator is this process: raw asyncio sockets, frames encoded once with our codec, the
fan-in consumer counts frames by their NUL terminator instead of parsing them.  The brokers run
in other processes; on a 2-core machine the generator and the broker each get about a core.
CPU figures (% of one core, broker and generator) are printed with every measurement.

Frames are what CoilMQ can parse (STOMP 1.1 CONNECT, bare NUL ends, no heart-beats); CoilMQ still
loses connections whenever a 4 KB read cuts a header line (round trip with 16 in flight, flood):
those runs are reported as failed/stalled, with the tracebacks from its log.  On RabbitMQ every
/queue/ frame carries ``x-expires`` so that the queues of a run disappear after it, and no more
connections are opened than 60 % of the broker's RLIMIT_NOFILE: a RabbitMQ out of descriptors
loses its memory monitor and refuses every queue declaration until it is restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import os
import pstats
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from vmcloud.stomp.codec import Decoder, ProtocolError, encode
from vmcloud.stomp.frame import Frame
from vmcloud.words.commands import CmdResults, CmdRun
from vmcloud.words.contexts import CommandOutcome
from vmcloud.words.destinations import CONTROLLER, guest_destination
from vmcloud.words.presence import StillAlive

CONTROLLER_LOGIN = "bench-controller"
CONTROLLER_PASSCODE = "bench-secret"
NOFILE = 65536
CONNECT_TIMEOUT = 30.0
#: Fan-in flow control: beacons in flight per connection, and a receipt every BATCH beacons.
#: 16 beacons stay under the 4 KB read that CoilMQ's frame buffer can parse.
WINDOW = 16
BATCH = 8


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run does."""

    fanin_connections: tuple[int, ...] = (100, 1000)
    fanin_seconds: float = 5.0
    rtt_count: int = 2000
    rtt_inflight: tuple[int, ...] = (1, 16)
    idle_connections: tuple[int, ...] = (1000, 5000)
    #: CONNECT ``heart-beat`` of the idle guests; the agent offers ``10000,10000`` (``0,0`` here
    #: keeps the figure comparable with CoilMQ, which cannot parse heart-beats)
    idle_heart_beat: str = "0,0"
    flood_seconds: float = 10.0
    flood_publishers: int = 8
    flood_consume_rate: int = 1000
    flood_body: int = 1024


FULL = Sizes()
QUICK = Sizes(
    fanin_connections=(50, 200),
    fanin_seconds=1.0,
    rtt_count=500,
    idle_connections=(200, 500),
    flood_seconds=2.0,
    flood_publishers=4,
)


# -- processes


def raise_nofile(want: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; return the soft limit now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((want, max(hard, want)), (min(want, hard), hard)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker process exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1/any:port (needs root for others' sockets)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def nofile_of(pid: int | None) -> int | None:
    """The soft RLIMIT_NOFILE of ``pid`` (from /proc: prlimit needs CAP_SYS_RESOURCE for others)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def log_problems(path: Path) -> str:
    """How many tracebacks a broker's log holds, and the last exception line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    count = sum(1 for line in lines if line.lstrip().startswith("Traceback"))
    if not count:
        return ""
    last = next(
        (ln.strip() for ln in reversed(lines) if re.match(r"\s*[\w.]+(Error|Exception|Terminated)\b", ln)), ""
    )
    return f"{count} tracebacks in its log (last: {last[:100]})"


def kind_of(pid: int | None) -> str:
    if pid is None:
        return "?"
    try:
        process = psutil.Process(pid)
        name, cmdline = process.name(), " ".join(process.cmdline())
    except psutil.Error:
        return "?"
    if "beam" in name:
        return "rabbitmq"
    if "coilmq" in cmdline:
        return "coilmq"
    if "--serve-ours" in cmdline or "vmcloud" in cmdline:
        return "ours"
    return name


@dataclass
class Target:
    """One broker to measure."""

    label: str
    host: str
    port: int
    login: str | None = None
    passcode: str | None = None
    #: ``ours`` / ``coilmq`` when this run starts the broker (fresh for every phase).
    start: str | None = None
    anonymous_guests: bool = False
    profile_dir: Path | None = None
    log_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    pid: int | None = None
    kind: str = "?"
    #: Connections this run may hold open to a broker it did not start: a broker out of file
    #: descriptors can break for everybody (RabbitMQ's memory monitor dies of emfile).
    connection_cap: int | None = None
    cap_noted: bool = False
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        # CoilMQ rejects a 1.2 CONNECT unless host equals its FQDN; 1.1 frames are the same here.
        return "1.1" if self.kind == "coilmq" else "1.2"

    def guest_credentials(self, identity: str) -> tuple[str | None, str | None]:
        if self.anonymous_guests:
            return identity, None
        return self.login, self.passcode

    def guests_send_to(self, run: str, phase: str) -> str:
        """Where a phase's guests send: on vmcloud's broker the controller's queue itself, the one
        destination its guests may send to (the broker is fresh for every phase); elsewhere a
        queue of the run's own, as a shared broker keeps queues from one run to the next."""
        return CONTROLLER if self.kind == "ours" else f"{CONTROLLER}.{run}-{phase}"

    def queue_headers(self) -> dict[str, str]:
        """RabbitMQ keeps /queue/ destinations (durable) for ever: let them expire 10 s after their
        last use.  Every SEND and SUBSCRIBE carries the same argument, or RabbitMQ refuses the
        re-declaration (``auto-delete``/``durable:false`` queues end in RESOURCE_LOCKED)."""
        return {"x-expires": "10000"} if self.kind == "rabbitmq" else {}

    def begin_phase(self, phase: str) -> None:
        if self.start is not None:
            self.end_phase()
            self.port = free_port()
            self.process = self._spawn(phase)
            wait_listening(self.port, self.process)
            self.pid = self.process.pid
        else:
            self.pid = listener_pid(self.port)
        self.kind = kind_of(self.pid) if self.start != "ours" else "ours"
        nofile = nofile_of(self.pid)
        self.connection_cap = int(nofile * 0.6) if nofile and self.start is None else None

    def end_phase(self) -> None:
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None
        problems = log_problems(self.log_path) if self.log_path else ""
        if problems:
            say(f"    ({self.kind}: {problems})")

    def _spawn(self, phase: str) -> subprocess.Popen[bytes]:
        assert self.log_dir is not None
        self.log_path = self.log_dir / f"{self.start}-{phase}.log"
        if self.start == "ours":
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--serve-ours",
                str(self.port),
                "--log-file",
                str(self.log_path),
            ]
            if self.profile_dir is not None:
                command += ["--profile", str(self.profile_dir / f"ours-{phase}.prof")]
        else:
            coilmq = Path(sys.executable).with_name("coilmq")
            command = [str(coilmq if coilmq.exists() else shutil.which("coilmq") or "coilmq")]
            command += ["-b", "127.0.0.1", "-p", str(self.port), "-l", str(self.log_path)]
        # Own session: Ctrl-C reaches only us, and we stop the broker in order (profile dumps).
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=raise_nofile,  # no threads run in this process yet
            )

    def broker(self) -> psutil.Process | None:
        try:
            return psutil.Process(self.pid) if self.pid else None
        except psutil.Error:
            return None


def parse_target(text: str) -> Target:
    label, _, rest = text.rpartition("=")
    creds, _, address = rest.rpartition("@")
    host, _, port = address.rpartition(":")
    login, _, passcode = creds.partition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not [label=][login:passcode@]host:port: {text!r}")
    return Target(label or address, host, int(port), login or None, passcode or None)


class Meter:
    """CPU used by the broker and by this generator over one measured interval."""

    def __init__(self, broker: psutil.Process | None) -> None:
        self.broker = broker
        self.me = psutil.Process()
        self.start = time.monotonic()
        self.b0 = self._cpu(broker)
        self.g0 = self._cpu(self.me)

    @staticmethod
    def _cpu(process: psutil.Process | None) -> float:
        if process is None:
            return 0.0
        try:
            times = process.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def text(self) -> str:
        wall = max(time.monotonic() - self.start, 1e-6)
        broker = (self._cpu(self.broker) - self.b0) / wall * 100
        generator = (self._cpu(self.me) - self.g0) / wall * 100
        return f"cpu broker {broker:.0f}% generator {generator:.0f}%"


def rss(process: psutil.Process | None) -> int:
    if process is None:
        return 0
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return 0


# -- the load generator's STOMP connection


class Conn(asyncio.Protocol):
    """A raw STOMP client connection: decoded frames, or just a count of frames (NULs)."""

    def __init__(self, on_close: Callable[[Conn], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder()
        self.counting = False
        self.frames = 0
        self.on_frame: Callable[[Conn, Frame], None] | None = None
        self.on_count: Callable[[Conn, int], None] | None = None
        self.on_raw: Callable[[Conn, bytes], None] | None = None
        self._raw = bytearray()
        self.connected: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.receipts: dict[str, asyncio.Future[None]] = {}
        self.errors: list[str] = []
        self.lost = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.last_at = 0.0  # when the last frame was counted
        self.outstanding = 0  # fan-in: beacons not yet confirmed by a receipt
        self.batch = b""
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()
        problem = ConnectionError(self.errors[0] if self.errors else "connection lost")
        for future in [self.connected, *self.receipts.values()]:
            if not future.done():
                future.set_exception(problem)
        self._on_close(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def count_frames(self, on_count: Callable[[Conn, int], None] | None = None) -> None:
        """From now on only count frames: every STOMP frame ends in exactly one NUL."""
        self.counting = True
        self.frames = 0
        self.on_count = on_count

    def split_frames(self, on_raw: Callable[[Conn, bytes], None]) -> None:
        """From now on hand over each frame's raw bytes (our bodies never hold a NUL)."""
        self.on_raw = on_raw

    def data_received(self, data: bytes) -> None:
        if self.on_raw is not None:
            buf = self._raw
            buf += data
            start = 0
            while (nul := buf.find(b"\x00", start)) >= 0:
                frame = bytes(buf[start:nul]).lstrip(b"\r\n")
                start = nul + 1
                self.frames += 1
                if frame.startswith(b"ERROR"):
                    found = re.search(rb"\nmessage:([^\n]*)", frame)
                    self.errors.append(found.group(1).decode("utf-8", "replace") if found else "ERROR")
                else:
                    self.on_raw(self, frame)
            del buf[:start]
            return
        if self.counting:
            n = data.count(b"\x00")
            if b"ERROR\n" in data:
                found = re.search(rb"ERROR\n(?:[^\n]*\n)*?message:([^\n]*)", data)
                self.errors.append(found.group(1).decode("utf-8", "replace") if found else "ERROR")
            self.frames += n
            if n:
                self.last_at = time.monotonic()
            if self.on_count is not None and n:
                self.on_count(self, n)
            return
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            self.errors.append(f"bad frame from broker: {e.message}")
            self.close()
            return
        for frame in frames:
            self.frames += 1
            command = frame.command
            if command == "MESSAGE" and self.on_frame is not None:
                self.on_frame(self, frame)
            elif command == "RECEIPT":
                future = self.receipts.pop(frame.get("receipt-id", ""), None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif command == "CONNECTED":
                self.decoder.version = frame.get("version", "1.0") or "1.0"
                if not self.connected.done():
                    self.connected.set_result(frame)
            elif command == "ERROR":
                self.errors.append(frame.get("message") or frame.body.decode("utf-8", "replace")[:200])

    def request(self, frame: Frame, version: str) -> asyncio.Future[None]:
        """Write ``frame`` with a receipt header; the future fires on the RECEIPT."""
        receipt = f"r{len(self.receipts)}-{id(frame)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.receipts[receipt] = future
        self.write(encode(Frame(frame.command, {**frame.headers, "receipt": receipt}, frame.body), version))
        return future


class Generator:
    """Opens and tracks every connection of a phase, so that all of them get closed."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conns: set[Conn] = set()
        self.failures: list[str] = []
        self.lost = 0
        self.lost_errors: list[str] = []

    def _closed(self, conn: Conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.lost += 1
            self.lost_errors += conn.errors

    async def connect(
        self,
        login: str | None,
        passcode: str | None,
        timeout: float = CONNECT_TIMEOUT,
        heart_beat: str = "0,0",
    ) -> Conn:
        t = self.target
        loop = asyncio.get_running_loop()
        conn_box: list[Conn] = []

        def factory() -> Conn:
            conn = Conn(self._closed)
            conn_box.append(conn)
            return conn

        try:
            await asyncio.wait_for(loop.create_connection(factory, t.host, t.port), timeout)
            conn = conn_box[0]
            self.conns.add(conn)
            headers = {"accept-version": t.version, "host": "/", "heart-beat": heart_beat}
            if login:
                headers["login"] = login
            if passcode:
                headers["passcode"] = passcode
            conn.write(encode(Frame("CONNECT", headers), t.version))
            await asyncio.wait_for(conn.connected, timeout)
            return conn
        except BaseException:
            for conn in conn_box:
                self.conns.discard(conn)
                conn.close()
            raise

    async def subscribe(self, conn: Conn, destination: str, sub_id: str = "s1", ack: str = "auto") -> None:
        headers = {"destination": destination, "id": sub_id, "ack": ack, **self.target.queue_headers()}
        await asyncio.wait_for(
            conn.request(Frame("SUBSCRIBE", headers), self.target.version), CONNECT_TIMEOUT
        )

    async def controller(self) -> Conn:
        return await self.connect(
            self.target.login or CONTROLLER_LOGIN, self.target.passcode or CONTROLLER_PASSCODE
        )

    async def guest(
        self,
        identity: str,
        subscribe: str | None = None,
        timeout: float = CONNECT_TIMEOUT,
        heart_beat: str = "0,0",
    ) -> Conn:
        conn = await self.connect(
            *self.target.guest_credentials(identity), timeout=timeout, heart_beat=heart_beat
        )
        if subscribe is not None:
            await self.subscribe(conn, subscribe)
        return conn

    async def many(
        self, n: int, make: Callable[[int], Awaitable[Conn]], concurrency: int = 32, give_up: int = 8
    ) -> list[Conn]:
        """Open ``n`` connections, ``concurrency`` at a time; failures are counted, not raised,
        and after ``give_up`` failures no more are attempted (the broker is at a limit)."""
        cap = self.target.connection_cap
        if cap is not None and len(self.conns) + n > cap:
            if not self.target.cap_noted:
                self.target.cap_noted = True
                say(
                    f"    (capping at {cap} connections in all: the broker's RLIMIT_NOFILE is "
                    f"{nofile_of(self.target.pid)}, and running it out of descriptors breaks it)"
                )
            n = max(0, cap - len(self.conns))
        gate = asyncio.Semaphore(concurrency)
        done: list[Conn] = []
        failed_before = len(self.failures)

        async def one(i: int) -> None:
            async with gate:
                if len(self.failures) - failed_before >= give_up:
                    return
                try:
                    done.append(await make(i))
                except (OSError, TimeoutError, ConnectionError) as e:
                    self.failures.append(f"{type(e).__name__}: {e}")

        await asyncio.gather(*(one(i) for i in range(n)))
        return done

    def close_all(self) -> None:
        for conn in list(self.conns):
            self.conns.discard(conn)
            conn.close()

    def problems(self) -> str:
        parts = []
        if self.failures:
            parts.append(f"{len(self.failures)} connects failed ({self.failures[0]})")
        errors = self.lost_errors + [e for c in self.conns for e in c.errors]
        if errors:
            parts.append(f"{len(errors)} ERROR frames ({errors[0]})")
        if self.lost:
            parts.append(f"{self.lost} connections lost")
        return "; ".join(parts)


async def wait_until(
    condition: Callable[[], bool],
    seconds: float,
    *,
    stall: float | None = None,
    progress: Callable[[], int] | None = None,
) -> bool:
    """Poll ``condition`` for at most ``seconds``; give up early after ``stall`` s without progress."""
    deadline = time.monotonic() + seconds
    last, last_change = (progress() if progress else 0), time.monotonic()
    while not condition():
        now = time.monotonic()
        if now > deadline:
            return False
        if progress is not None and stall is not None:
            value = progress()
            if value != last:
                last, last_change = value, now
            elif now - last_change > stall:
                return False
        await asyncio.sleep(0.02)
    return True


def say(text: str) -> None:
    print(text, flush=True)


# -- phases


def beacon(
    destination: str, identity: str, i: int, version: str, extra: dict[str, str], receipt: bool
) -> bytes:
    said = StillAlive.how_to_say(
        identity=identity,
        ip=f"10.0.{i // 250 % 250}.{i % 250 + 2}",
        mac=f"fa:16:3e:00:{i // 256 % 256:02x}:{i % 256:02x}",
        agent_version="1.0",
        capabilities=("cmd", "file"),
    )
    headers = {"destination": destination, **said.headers, **extra}
    if receipt:
        headers["receipt"] = "b"
    return encode(Frame("SEND", headers, said.body), version)


async def fanin(target: Target, run: str, n: int, seconds: float) -> dict[str, Any]:
    gen = Generator(target)
    destination = target.guests_send_to(run, "fanin")
    extra = target.queue_headers()
    try:
        consumer = await gen.controller()
        await gen.subscribe(consumer, destination, "c1")
        consumer.count_frames()
        senders = await gen.many(n, lambda i: gen.guest(f"{run}-f{i}"))
        running = True
        sent = 0

        def confirmed(conn: Conn, receipts: int) -> None:
            nonlocal sent
            conn.outstanding -= receipts * BATCH
            while running and conn.outstanding + BATCH <= WINDOW and not conn.lost:
                conn.write(conn.batch)
                conn.outstanding += BATCH
                sent += BATCH

        for i, conn in enumerate(senders):
            plain = beacon(destination, f"{run}-f{i}", i, target.version, extra, False)
            conn.batch = plain * (BATCH - 1) + beacon(
                destination, f"{run}-f{i}", i, target.version, extra, True
            )
            conn.count_frames(confirmed)
        meter = Meter(target.broker())
        t0, d0 = time.monotonic(), consumer.frames
        for conn in senders:
            confirmed(conn, 0)
        await asyncio.sleep(seconds)
        running = False
        t1, d1 = time.monotonic(), consumer.frames
        cpu = meter.text()
        await wait_until(lambda: all(c.outstanding <= 0 or c.lost for c in senders), 10.0)
        drained = await wait_until(
            lambda: consumer.frames >= sent, 20.0, stall=3.0, progress=lambda: consumer.frames
        )
        drain_s = max(0.0, consumer.last_at - t1)
        rate = (d1 - d0) / (t1 - t0)
        overall = (consumer.frames - d0) / max(consumer.last_at - t0, t1 - t0)
        loss = sent - consumer.frames
        say(
            f"  fan-in {len(senders):5d} conns {t1 - t0:4.1f} s: {rate:7.0f} delivered/s while loaded "
            f"({overall:.0f}/s counting the drain), sent {sent} ({sent / (t1 - t0):.0f}/s), "
            f"delivered {consumer.frames}, loss {loss}{'' if drained else ' (drain gave up)'}, "
            f"last delivery {drain_s:.1f} s after stop; {cpu}"
            + (f"; {gen.problems()}" if gen.problems() else "")
        )
        return {
            "rate": rate,
            "overall": overall,
            "loss": loss,
            "connections": len(senders),
            "problems": gen.problems(),
        }
    finally:
        gen.close_all()


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


CMD_ID_TEMPLATE = "cmd-00000000"
_CMD_ID = re.compile(rb"\ncmd-id:([^\n]*)")


async def round_trip(target: Target, run: str, inflight: int, count: int) -> dict[str, Any]:
    """CMD_RUN to a guest, CMD_RESULTS back; both ends answer from pre-encoded templates in which
    only the fixed-width cmd-id changes, and find the cmd-id with a regex instead of decoding."""
    gen = Generator(target)
    identity = f"{run}-g1"
    replies = target.guests_send_to(run, "rtt")
    version = target.version
    extra = target.queue_headers()
    outcome = CommandOutcome(
        out="hi\n",
        err="",
        finished=True,
        exit_code_or_signal=0,
        resources={"utime": 0.001, "stime": 0.002, "maxrss": 3072.0},
        duration=0.004,
    )
    said = CmdRun.how_to_say(
        to=identity, cmd_id=CMD_ID_TEMPLATE, cmd="sh", args=["-c", "echo hi"], timeout=60.0
    )
    request = encode(
        Frame("SEND", {"destination": said.destination, **said.headers, **extra}, said.body), version
    )
    said = CmdResults.how_to_say(cmd_id=CMD_ID_TEMPLATE, identity=identity, outcome=outcome)
    answer = encode(Frame("SEND", {**said.headers, **extra, "destination": replies}, said.body), version)
    placeholder = CMD_ID_TEMPLATE.encode()
    try:
        controller = await gen.controller()
        await gen.subscribe(controller, replies, "c1")
        guest = await gen.guest(identity, subscribe=guest_destination(identity))

        def answer_it(conn: Conn, frame: bytes) -> None:
            found = _CMD_ID.search(frame)
            if found is not None and frame.startswith(b"MESSAGE"):
                conn.write(answer.replace(placeholder, found.group(1)))

        guest.split_frames(answer_it)
        warmup = max(20, count // 10)
        total = warmup + count
        issued = 0
        completed = 0
        started: dict[bytes, float] = {}
        times: list[float] = []
        finished = asyncio.get_running_loop().create_future()

        def ask() -> None:
            nonlocal issued
            cmd_id = f"cmd-{issued:08d}".encode()
            issued += 1
            started[cmd_id] = time.perf_counter()
            controller.write(request.replace(placeholder, cmd_id))

        def heard(conn: Conn, frame: bytes) -> None:
            nonlocal completed
            found = _CMD_ID.search(frame)
            sent_at = started.pop(found.group(1), None) if found is not None else None
            if sent_at is None:
                return
            completed += 1
            if completed > warmup:
                times.append(time.perf_counter() - sent_at)
            if issued < total:
                ask()
            elif not started and not finished.done():
                finished.set_result(None)

        controller.split_frames(heard)
        meter = Meter(target.broker())
        t0 = time.monotonic()
        for _ in range(inflight):
            ask()
        await wait_until(lambda: finished.done() or controller.lost or guest.lost, max(30.0, count * 0.05))
        wall = time.monotonic() - t0
        if len(times) < count:
            say(
                f"  round trip, {inflight:2d} in flight: FAILED, {completed} of {total} answered; "
                f"{gen.problems() or 'timed out'}"
            )
            return {"p50": float("nan"), "p99": float("nan"), "failed": True}
        p50, p99 = percentile(times, 50) * 1e3, percentile(times, 99) * 1e3
        say(
            f"  round trip, {inflight:2d} in flight: p50 {p50:6.2f} ms, p99 {p99:6.2f} ms, "
            f"max {max(times) * 1e3:6.2f} ms "
            f"over {len(times)} (+{warmup} warm-up), {completed / wall:6.0f} round trips/s; {meter.text()}"
            + (f"; {gen.problems()}" if gen.problems() else "")
        )
        return {"p50": p50, "p99": p99, "count": len(times)}
    finally:
        gen.close_all()


async def settled_rss(process: psutil.Process | None, seconds: float = 2.0, step: float = 0.25) -> int:
    """RSS once it stopped moving by more than 64 KB per ``step`` s, or after ``seconds``."""
    last = rss(process)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(step)
        now = rss(process)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


async def idle(target: Target, run: str, levels: Sequence[int], heart_beat: str = "0,0") -> dict[str, Any]:
    gen = Generator(target)
    broker = target.broker()
    concurrency = 8 if target.kind == "coilmq" else 32  # CoilMQ listens with a backlog of 5
    figures: dict[str, Any] = {}
    try:
        # An external broker may still be giving back memory from an earlier run (RabbitMQ after
        # a flood): wait for a quiet second, for up to 20 s.
        base = await settled_rss(broker, 3.0) if target.start else await settled_rss(broker, 20.0, 1.0)
        limit = nofile_of(target.pid)
        say(f"  idle: broker RSS before {base / 2**20:.1f} MiB, its RLIMIT_NOFILE {limit}")
        conns: list[Conn] = []
        for level in levels:
            t0 = time.monotonic()
            start = len(conns) + len(gen.failures)

            def idle_guest(i: int, start: int = start) -> Awaitable[Conn]:
                identity = f"{run}-i{start + i}"
                return gen.guest(
                    identity, subscribe=guest_destination(identity), timeout=5.0, heart_beat=heart_beat
                )

            more = await gen.many(level - start, idle_guest, concurrency)
            conns += more
            if not more:
                break
            setup = time.monotonic() - t0
            await asyncio.sleep(1.0)
            after = await settled_rss(broker)
            alive = sum(1 for c in conns if not c.lost)
            per = (after - base) / max(alive, 1)
            figures[str(level)] = per / 1024
            figures[f"n{level}"] = alive
            say(
                f"  idle {alive:5d} guests connected+subscribed (opened in {setup:.1f} s): "
                f"RSS {after / 2**20:.1f} MiB, {per / 1024:.1f} KB per connection"
                + (f" (heart-beat {heart_beat})" if heart_beat != "0,0" else "")
                + (f"; {gen.problems()}" if gen.problems() else "")
            )
        return figures
    finally:
        gen.close_all()


async def flood(target: Target, run: str, sizes: Sizes) -> dict[str, Any]:
    gen = Generator(target)
    broker = target.broker()
    destination = target.guests_send_to(run, "flood")
    version = target.version
    extra = target.queue_headers()
    rate = sizes.flood_consume_rate
    tick = 0.1
    try:
        consumer = await gen.controller()
        await gen.subscribe(consumer, destination, "c1", ack="client-individual")
        delivered = 0
        budget = rate * tick
        paused = False

        def consume(conn: Conn, frame: Frame) -> None:
            nonlocal delivered, budget, paused
            delivered += 1
            budget -= 1
            ack = frame.get("ack") or frame.get("message-id") or ""
            conn.write(
                encode(
                    Frame(
                        "ACK", {"id": ack, "message-id": frame.get("message-id") or "", "subscription": "c1"}
                    ),
                    version,
                )
            )
            if budget <= 0 and not paused and conn.transport is not None:
                paused = True
                conn.transport.pause_reading()

        consumer.on_frame = consume
        publishers = await gen.many(sizes.flood_publishers, lambda i: gen.guest(f"{run}-p{i}"))
        filler = b"x" * max(0, sizes.flood_body - 100)
        said = CmdResults.how_to_say(
            cmd_id="c0",
            identity=f"{run}-p",
            outcome=CommandOutcome(out=filler.decode(), err="", finished=True, exit_code_or_signal=0),
        )
        one = encode(Frame("SEND", {**said.headers, **extra, "destination": destination}, said.body), version)
        chunk = one * 32
        written = 0
        end = time.monotonic() + sizes.flood_seconds

        async def publish(conn: Conn) -> None:
            nonlocal written
            while time.monotonic() < end and not conn.lost:
                if not conn.writable.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.writable.wait(), max(0.01, end - time.monotonic()))
                    continue
                conn.write(chunk)
                written += 32
                await asyncio.sleep(0)

        def accepted() -> int:
            buffered = sum(
                c.transport.get_write_buffer_size()
                for c in publishers
                if c.transport is not None and not c.lost
            )
            return written - buffered // len(one)

        meter = Meter(broker)
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(publish(c)) for c in publishers]
        samples: list[int] = []
        per_second: list[tuple[int, int]] = []  # (deliveries in that second, pending at its end)
        last_second, last_delivered = t0, 0
        while time.monotonic() < end + 1.0:
            for _ in range(int(0.5 / tick)):
                await asyncio.sleep(tick)
                budget = min(budget + rate * tick, rate * tick)
                if paused and budget > 0 and consumer.transport is not None:
                    paused = False
                    consumer.transport.resume_reading()
            samples.append(rss(broker))
            now = time.monotonic()
            if now - last_second >= 0.999 and now <= end + 0.1:
                per_second.append((delivered - last_delivered, accepted() - delivered))
                last_second, last_delivered = now, delivered
        cpu = meter.text()
        sent = accepted()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stalls = sum(1 for count, pending in per_second if count == 0 and pending > 0)
        rates = [count for count, _ in per_second]
        max_rss = max(samples) if samples else 0
        say(
            f"  flood {sizes.flood_seconds:.0f} s, {len(publishers)} publishers of {len(one)} B frames, "
            f"consumer reading {rate}/s with client-individual acks: accepted {sent}, "
            f"delivered {delivered}, pending {sent - delivered}; "
            f"RSS max {max_rss / 2**20:.1f} MiB (start {samples[0] / 2**20:.1f}, "
            f"end {samples[-1] / 2**20:.1f}); deliveries/s {rates}; stalled seconds {stalls}; {cpu}"
            + (f"; {gen.problems()}" if gen.problems() else "")
        )
        return {
            "max_rss": max_rss,
            "stalls": stalls,
            "min_rate": min(rates) if rates else 0,
            "accepted": sent,
            "problems": gen.problems(),
        }
    finally:
        gen.close_all()


# -- the run


async def measure(target: Target, sizes: Sizes, phases: Sequence[str], repeat: int) -> None:
    run = "b" + uuid.uuid4().hex[:6]
    began = time.monotonic()
    say(f"\n== {target.label} ==")
    announced: list[str] = []

    async def phase(name: str, body: Callable[[], Awaitable[Any]]) -> Any:
        target.begin_phase(name)
        if not announced:
            announced.append(name)
            say(f"  [{target.kind} on {target.host}:{target.port}, pid {target.pid}]")
        try:
            return await body()
        except (OSError, RuntimeError, ConnectionError, TimeoutError) as e:
            say(f"  {name} failed: {type(e).__name__}: {e}")
            return {}
        finally:
            target.end_phase()
            await asyncio.sleep(0.2 if target.start else 1.0)  # let an external broker settle

    if "idle" in phases:
        target.results["idle"] = await phase(
            "idle", lambda: idle(target, run, sizes.idle_connections, sizes.idle_heart_beat)
        )
    if "rtt" in phases:
        for inflight in sizes.rtt_inflight:
            runs = [
                await phase(f"rtt{inflight}", lambda k=inflight: round_trip(target, run, k, sizes.rtt_count))
                for _ in range(repeat)
            ]
            target.results[f"rtt{inflight}"] = min(
                runs, key=lambda r: r.get("p99", 1e9) if r.get("p99") == r.get("p99") else 1e9
            )
    if "fanin" in phases:
        for n in sizes.fanin_connections:
            runs = [
                await phase(f"fanin{n}", lambda k=n: fanin(target, run, k, sizes.fanin_seconds))
                for _ in range(repeat)
            ]
            best = dict(max(runs, key=lambda r: r.get("rate", 0)))
            if best:
                best["loss"] = max(r.get("loss", 0) for r in runs)
            target.results[f"fanin{n}"] = best
    if "flood" in phases:
        target.results["flood"] = await phase("flood", lambda: flood(target, run, sizes))
    say(f"  ({target.label}: {time.monotonic() - began:.0f} s)")


def table(targets: Sequence[Target], sizes: Sizes) -> None:
    a, b = sizes.fanin_connections[0], sizes.fanin_connections[-1]
    i1, i2 = sizes.idle_connections[0], sizes.idle_connections[-1]
    head = (
        f"{'broker':<22}{'fan-in/s@' + str(a):>13}{'@' + str(b):>15}{'loss':>6}"
        f"{'rtt p50/p99 ms @1':>19}{'@16':>13}{'KB/idle@' + str(i1):>14}{'@' + str(i2):>13}"
        f"{'flood MiB':>11}{'stall s':>8}"
    )
    say("\n" + head)
    say("-" * len(head))

    def rtt(r: dict[str, Any]) -> str:
        if r.get("failed"):
            return "failed"
        return g(r, "p50", ".2f") + "/" + g(r, "p99", ".2f")

    def g(r: dict[str, Any], key: str, fmt: str) -> str:
        value = r.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    def idle_kb(r: dict[str, Any], level: int) -> str:
        kb, n = r.get(str(level)), r.get(f"n{level}")
        if kb is None:
            return "-"
        return f"{kb:.1f}" if n == level else f"{kb:.1f} (@{n})"

    for t in targets:
        r = t.results
        fa, fb = r.get(f"fanin{a}", {}), r.get(f"fanin{b}", {})

        def rate(f: dict[str, Any], n: int) -> str:
            if "rate" not in f:
                return "-"
            return f"{f['rate']:.0f}" + ("" if f.get("connections") == n else f" (@{f.get('connections')})")

        loss = max((x.get("loss", 0) for x in (fa, fb)), default=0) if (fa or fb) else "-"
        r1, r16 = r.get("rtt1", {}), r.get("rtt16", {})
        idle_r, fl = r.get("idle", {}), r.get("flood", {})
        say(
            f"{t.label[:21]:<22}{rate(fa, a):>13}{rate(fb, b):>15}{loss!s:>6}"
            f"{rtt(r1):>19}{rtt(r16):>13}"
            f"{idle_kb(idle_r, i1):>14}{idle_kb(idle_r, i2):>13}"
            f"{(format(fl['max_rss'] / 2**20, '.0f') if fl else '-'):>11}{g(fl, 'stalls', 'd'):>8}"
        )


def verdicts(targets: Sequence[Target], sizes: Sizes) -> None:
    ours = [t for t in targets if t.kind == "ours"]
    if not ours:
        return
    o = ours[0].results
    say(f"\nTargets for {ours[0].label}:")

    def line(ok: bool | None, text: str) -> None:
        say(f"  [{'ok' if ok else '--' if ok is None else 'MISS'}] {text}")

    for n in sizes.fanin_connections:
        mine = o.get(f"fanin{n}", {}).get("rate")
        for other in (t for t in targets if t.kind in ("coilmq", "rabbitmq")):
            theirs = other.results.get(f"fanin{n}", {}).get("rate")
            if mine is None or not theirs:
                line(None, f"fan-in @{n} >= 2x {other.label}: not measured")
                continue
            mine_all = o.get(f"fanin{n}", {}).get("overall") or mine
            theirs_all = other.results.get(f"fanin{n}", {}).get("overall") or theirs
            line(
                mine >= 2 * theirs,
                f"fan-in @{n} >= 2x {other.label}: {mine:.0f} vs {theirs:.0f} = {mine / theirs:.2f}x "
                f"(counting the drain: {mine_all:.0f} vs {theirs_all:.0f} = {mine_all / theirs_all:.2f}x)",
            )
        loss = o.get(f"fanin{n}", {}).get("loss")
        line(None if loss is None else loss == 0, f"fan-in @{n} without loss: loss {loss}")
    for level in sizes.idle_connections:
        kb = o.get("idle", {}).get(str(level))
        line(
            None if kb is None else kb <= 20,
            f"<= 20 KB RSS per idle connection @{level}: {kb and round(kb, 1)} KB",
        )
    p99 = o.get("rtt16", {}).get("p99")
    line(None if p99 is None else p99 <= 2.0, f"p99 <= 2 ms with 16 in flight: {p99 and round(p99, 2)} ms")
    fl = o.get("flood", {})
    if fl:
        line(fl["max_rss"] < 300 * 2**20, f"flood RSS < 300 MB: max {fl['max_rss'] / 2**20:.0f} MiB")
        line(
            fl["stalls"] == 0,
            f"flood delivery never stalls: {fl['stalls']} stalled seconds, "
            f"slowest second {fl['min_rate']} deliveries",
        )


def serve_ours(port: int, log_file: str | None, profile: str | None) -> None:
    """The ``--serve-ours`` subprocess: our broker alone on the reactor, as ``twistd vmcloud`` runs it."""
    raise_nofile()
    from twisted.application import strports
    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

    from vmcloud.broker import Broker

    out = open(log_file or os.devnull, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(out, formatEventAsClassicLogText)], redirectStandardIO=False
    )
    broker = Broker(
        reactor,
        controller_login=CONTROLLER_LOGIN,
        controller_passcode=CONTROLLER_PASSCODE,
        anonymous_guests=True,
    )
    service = strports.service(f"tcp:{port}:interface=127.0.0.1", broker.factory())
    service.startService()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    reactor.run()  # type: ignore[attr-defined]
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)


def show_profiles(directory: Path) -> None:
    for path in sorted(directory.glob("*.prof")):
        say(f"\n-- cProfile of our broker, phase {path.stem} (top 20 by own time) --")
        stats = pstats.Stats(str(path), stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        action="append",
        type=parse_target,
        default=[],
        help="[label=][login:passcode@]host:port of a running STOMP broker (repeatable)",
    )
    parser.add_argument("--start-ours", action="store_true", help="measure vmcloud.broker in a subprocess")
    parser.add_argument("--start-coilmq", action="store_true", help="measure CoilMQ (PyPI) in a subprocess")
    parser.add_argument(
        "--anonymous-guests",
        action="store_true",
        help="guests of --target brokers log in as their identity without passcode",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--phases", default="idle,rtt,fanin,flood", help="comma list of idle,rtt,fanin,flood")
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs of fan-in and round trip, the best is kept (default 2, 1 with --quick)",
    )
    parser.add_argument("--profile-ours", metavar="DIR", help="run our broker under cProfile, dumps in DIR")
    parser.add_argument(
        "--idle-heart-beat",
        default="0,0",
        metavar="CX,CY",
        help="heart-beat header of the idle phase's guests (the agent offers 10000,10000; default 0,0)",
    )
    parser.add_argument("--serve-ours", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--log-file", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_ours is not None:
        serve_ours(args.serve_ours, args.log_file, args.profile)
        return 0

    sizes = dataclasses.replace(QUICK if args.quick else FULL, idle_heart_beat=args.idle_heart_beat)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    profile_dir = Path(args.profile_ours) if args.profile_ours else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    if args.start_ours:
        targets.append(
            Target(
                "ours (vmcloud.broker)",
                "127.0.0.1",
                0,
                start="ours",
                anonymous_guests=True,
                profile_dir=profile_dir,
                log_dir=work,
            )
        )
    if args.start_coilmq:
        targets.append(Target("coilmq 1.1.0", "127.0.0.1", 0, start="coilmq", log_dir=work))
    for t in args.target:
        t.anonymous_guests = args.anonymous_guests
        targets.append(t)
    if not targets:
        parser.error("nothing to measure: give --start-ours, --start-coilmq or --target")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    nofile = raise_nofile()
    say(
        f"bench/broker.py {'--quick ' if args.quick else ''}{time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"generator RLIMIT_NOFILE {nofile}"
    )
    say(
        "Load: this process, one asyncio loop, raw sockets, frames pre-encoded with vmcloud.stomp.codec; "
        "brokers in their own processes (ours and CoilMQ restarted fresh for every phase). "
        f"Fan-in and round trip run {args.repeat}x, the best run is kept; CPU figures are % of one core."
    )
    started = time.monotonic()
    try:
        for t in targets:
            try:
                asyncio.run(measure(t, sizes, phases, args.repeat))
            except (OSError, RuntimeError, ConnectionError, TimeoutError) as e:
                say(f"  {t.label}: measurement failed: {type(e).__name__}: {e}")
            finally:
                t.end_phase()
        table(targets, sizes)
        verdicts(targets, sizes)
        say(
            f"\nTotal {time.monotonic() - started:.0f} s; load average now "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        if profile_dir is not None:
            show_profiles(profile_dir)
    except KeyboardInterrupt:
        say("\ninterrupted; stopping brokers")
    finally:
        for t in targets:
            t.end_phase()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
