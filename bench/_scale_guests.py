"""Simulated guests of ``bench/scale.py``: one asyncio process, one real STOMP connection per server.

Run by ``bench/scale.py`` (not by hand)::

    .venv/bin/python bench/_scale_guests.py --feed 127.0.0.1:PORT --beacon-interval 5

It reads the simulator's feed (``bench/_scale_sim.py``): for every server that becomes ACTIVE it
does what ``twistd vmcloud-guest`` does on a VM, with the credentials of the server's user-data
(the ``[agent]`` INI: broker, login, passcode) and the server's MAC and IP:

* connects over TCP to the broker, CONNECT with ``accept-version: 1.1,1.2``, the login, the
  passcode and ``heart-beat: 10000,10000`` (the agent's session), waits for CONNECTED;
* subscribes to its command destination (``/queue/vmcloud.guest.<login>``) and the broadcast topic;
* says HELLO, then STILL_ALIVE every beacon interval (an EOL heart-beat when nothing else went
  out for the heart-beat period);
* answers PREPARE and CLEANUP with ``ok`` (what the agent's stand-in browser ``NoBrowser``
  answers), using :mod:`vmcloud.words` to build every frame, so the bench speaks what the agent
  speaks;
* reconnects (at most ``--max-reconnects`` times) when the broker drops it while the server is
  still ACTIVE, and disconnects when the server is deleted.

Every second it prints one JSON line of counters on stdout.  Stops on SIGTERM/SIGINT or when the
feed closes.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import json
import random
import resource
import signal
import sys
import time
from typing import Any

from vmcloud.stomp.codec import HEARTBEAT, Decoder, ProtocolError, encode
from vmcloud.stomp.frame import Frame
from vmcloud.words.browser import CleanupResults, Prepare, PrepareResults
from vmcloud.words.destinations import BROADCAST, guest_destination
from vmcloud.words.grammar import TO, MalformedWord, Said, cmd_id_of, split_body
from vmcloud.words.presence import Hello, StillAlive

AGENT_VERSION = "bench-scale"
CAPABILITIES = ("cmd", "file", "no-browser")
HEARTBEAT_MS = 10_000
CONNECT_TIMEOUT = 30.0


class Counters:
    """What every guest adds to; printed once a second."""

    def __init__(self) -> None:
        self.known = 0  # ACTIVE servers heard of on the feed, not deleted since
        self.connected = 0
        self.hellos = 0
        self.beacons = 0
        self.prepares = 0
        self.cleanups = 0
        self.other_words = 0
        self.broadcasts = 0
        self.connect_failures = 0
        self.drops = 0  # connections the broker closed while the server was ACTIVE
        self.errors = 0  # ERROR frames
        self.malformed = 0
        self.deleted = 0
        self.given_up = 0
        self.last_error = ""
        self.connect_ms: list[float] = []

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "connect_ms"}
        samples = sorted(self.connect_ms)
        if samples:
            data["connect_p50_ms"] = round(samples[len(samples) // 2], 2)
            data["connect_p99_ms"] = round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2)
        data["time"] = time.monotonic()
        return data


def send_frame(said: Said) -> Frame:
    """The SEND frame the agent's session writes for ``said`` (``vmcloud.stomp.client.send``)."""
    return Frame("SEND", {**said.headers, "destination": said.destination}, said.body)


def parse_user_data(text: str) -> tuple[str, int, str, str]:
    """(host, port, login, passcode) from the ``[agent]`` INI the controller put in user-data."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    agent = ini["agent"]
    broker = agent["broker"]
    parts = broker.split(":")
    if parts[0] == "tcp":
        parts = parts[1:]
    host, port = parts[0], int(parts[1])
    return host, port, agent["login"], agent["passcode"]


class Guest:
    """One simulated VM's agent."""

    def __init__(self, server: dict[str, Any], counters: Counters, args: argparse.Namespace) -> None:
        self.server_id = server["id"]
        self.host, self.port, self.login, self.passcode = parse_user_data(server["user_data"])
        self.identity = self.login
        self.ip = server.get("ip")
        self.mac = server.get("mac")
        self.counters = counters
        self.args = args
        self.deleted = False
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        presence = {
            "identity": self.identity,
            "ip": self.ip,
            "mac": self.mac,
            "agent_version": AGENT_VERSION,
            "capabilities": CAPABILITIES,
        }
        self.hello = encode(send_frame(Hello.how_to_say(**presence)))
        self.beacon = encode(send_frame(StillAlive.how_to_say(**presence)))
        self.last_sent = 0.0

    async def run(self, gate: asyncio.Semaphore) -> None:
        attempts = 0
        while not self.deleted and attempts <= self.args.max_reconnects:
            attempts += 1
            try:
                await self.session(gate)
            except (TimeoutError, OSError, ProtocolError, ConnectionError) as e:
                self.counters.connect_failures += 1
                self.counters.last_error = f"{type(e).__name__}: {e}"[:200]
            if self.deleted:
                return
            await asyncio.sleep(min(10.0, 0.5 * 2**attempts) * random.uniform(0.5, 1.0))
        if not self.deleted:
            self.counters.given_up += 1

    async def session(self, gate: asyncio.Semaphore) -> None:
        decoder = Decoder()
        writer: asyncio.StreamWriter | None = None
        up = False
        beat: asyncio.Task[None] | None = None
        try:
            async with gate:
                started = time.perf_counter()
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
                )
                self.writer = writer
                connect = Frame(
                    "CONNECT",
                    {
                        "accept-version": "1.1,1.2",
                        "host": "/",
                        "login": self.login,
                        "passcode": self.passcode,
                        "heart-beat": f"{HEARTBEAT_MS},{HEARTBEAT_MS}",
                    },
                )
                writer.write(encode(connect))
                frames: list[Frame] = []
                deadline = time.monotonic() + CONNECT_TIMEOUT
                while not frames:
                    data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
                    if not data:
                        raise ConnectionError("closed before CONNECTED")
                    frames = decoder.feed(data)
                first = frames.pop(0)
                if first.command != "CONNECTED":
                    self.counters.errors += 1
                    raise ConnectionError(f"{first.command}: {first.get('message')}")
                decoder.version = first.get("version") or "1.2"
                self.counters.connect_ms.append((time.perf_counter() - started) * 1000)
            up = True
            self.counters.connected += 1
            mine = guest_destination(self.identity)
            writer.write(encode(Frame("SUBSCRIBE", {"destination": mine, "id": "s-1", "ack": "auto"})))
            writer.write(encode(Frame("SUBSCRIBE", {"destination": BROADCAST, "id": "s-2", "ack": "auto"})))
            self.write(self.hello)
            self.counters.hellos += 1
            beat = asyncio.create_task(self.beacons())
            for frame in frames:
                self.heard(frame)
            while True:
                data = await reader.read(65536)
                if not data:
                    if not self.deleted:
                        self.counters.drops += 1
                    return
                for frame in decoder.feed(data):
                    self.heard(frame)
        finally:
            if up:
                self.counters.connected -= 1
            if beat is not None:
                beat.cancel()
            self.writer = None
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 5)

    def write(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)
            self.last_sent = time.monotonic()

    async def beacons(self) -> None:
        interval = self.args.beacon_interval
        tick = min(interval, HEARTBEAT_MS / 1000 / 2)
        next_beacon = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, min(next_beacon, self.last_sent + tick) - time.monotonic()))
            now = time.monotonic()
            if now >= next_beacon:
                self.write(self.beacon)
                self.counters.beacons += 1
                next_beacon += interval
                if next_beacon < now:
                    next_beacon = now + interval
            elif now - self.last_sent >= tick:
                self.write(HEARTBEAT)

    def heard(self, frame: Frame) -> None:
        if frame.command == "ERROR":
            self.counters.errors += 1
            self.counters.last_error = f"ERROR {frame.get('message')}"[:200]
            return
        if frame.command != "MESSAGE":
            return
        if frame.get("subscription") == "s-2":
            self.counters.broadcasts += 1
        word, _ = split_body(frame.body)
        to = frame.get(TO)
        if to not in (None, "*", self.identity):
            return
        try:
            if word == Prepare.name:
                request = Prepare.read(frame)
                value = {
                    "browser": "none",
                    "capabilities": ["no-browser"],
                    "homepage": request.homepage,
                    "cookies": len(request.cookies),
                    "window": {"width": request.window_width, "height": request.window_height},
                    "audio": False,
                    "vnc": None,
                    "replaced": False,
                }
                said = PrepareResults.how_to_say(cmd_id=request.cmd_id, identity=self.identity, value=value)
                self.counters.prepares += 1
            elif word == "CLEANUP":
                cmd_id = cmd_id_of(frame)
                said = CleanupResults.how_to_say(
                    cmd_id=cmd_id, identity=self.identity, value={"browser": "none", "wasPrepared": True}
                )
                self.counters.cleanups += 1
            else:
                self.counters.other_words += 1
                return
        except MalformedWord as e:
            self.counters.malformed += 1
            self.counters.last_error = f"malformed {word}: {e.reason}"[:200]
            return
        self.write(encode(send_frame(said)))

    def stop(self) -> None:
        self.deleted = True
        if self.task is not None:
            self.task.cancel()


async def amain(args: argparse.Namespace) -> None:
    counters = Counters()
    guests: dict[str, Guest] = {}
    gate = asyncio.Semaphore(args.connect_concurrency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = args.feed.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=16 * 1024 * 1024)

    async def report() -> None:
        while True:
            counters.known = len(guests)
            sys.stdout.write(json.dumps(counters.as_json()) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(1.0)

    async def read_feed() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            event = json.loads(line)
            if event["ev"] == "active":
                if event["id"] in guests:
                    continue
                try:
                    guest = Guest(event, counters, args)
                except (KeyError, ValueError, configparser.Error) as e:
                    counters.malformed += 1
                    counters.last_error = f"user-data of {event.get('name')}: {e}"[:200]
                    continue
                guests[event["id"]] = guest
                guest.task = asyncio.create_task(guest.run(gate))
            elif event["ev"] == "deleted":
                gone = guests.pop(event["id"], None)
                if gone is not None:
                    counters.deleted += 1
                    gone.stop()

    reporter = asyncio.create_task(report())
    feed = asyncio.create_task(read_feed())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([feed, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in (feed, stopper, reporter):
        task.cancel()
    for guest in guests.values():
        guest.stop()
    tasks = [g.task for g in guests.values() if g.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    writer.close()
    counters.known = len(guests)
    sys.stdout.write(json.dumps(counters.as_json()) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--feed", required=True, help="host:port of the simulator's feed")
    parser.add_argument("--beacon-interval", type=float, default=5.0)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--max-reconnects", type=int, default=5)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
