"""A minimal guest that the simulator starts for each ACTIVE server: ``nova_mac_guest.py USER_DATA MAC IP``.

The real agent announces the host's MAC and signs in with the per-VM login from its user-data, so
on the Nova path the controller matches it by login.  This one does what a guest in a real VM
whose user-data carried no credentials would: it takes only the broker address from the user-data,
connects anonymously (login = its MAC as an identity, no passcode: allowed while the broker
listens on loopback only) and says HELLO with the MAC and IP the cloud gave its server.  The
controller can then only match it by MAC -- which is what ``test_nova_identity.py`` checks.
It beacons every second until SIGTERM.
"""

from __future__ import annotations

import configparser
import signal
import sys
import threading

import stomp

CONTROLLER = "/queue/vmcloud.controller"


def main(user_data: str, mac: str, ip: str) -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(user_data)
    _, host, port = ini["agent"]["broker"].split(":")
    identity = mac.lower().replace(":", "-")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    connection = stomp.Connection12([(host, int(port))])
    connection.connect(username=identity, wait=True)
    headers = {
        "identity": identity,
        "mac": mac,
        "ip": ip,
        "agent-version": "mac-guest",
        "capabilities": "cmd",
    }
    connection.send(CONTROLLER, "HELLO", headers=headers)
    while not stopping.wait(1.0):
        connection.send(CONTROLLER, "STILL_ALIVE", headers=headers)
    connection.send(CONTROLLER, "BYE", headers=headers)
    connection.disconnect()


if __name__ == "__main__":
    main(*sys.argv[1:4])
