"""``python -m vmcloud.novasim``: the documented command starts a cloud that novaclient can use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmcloud.novasim", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_banner(process: subprocess.Popen[str], timeout: float = 20.0) -> dict[str, str]:
    """The ``export`` lines and the control URL; the process is killed if they do not come in time."""
    assert process.stdout is not None
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    found: dict[str, str] = {}
    try:
        for line in process.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                found[key] = value
            if "control API:" in line:
                found["control"] = line.split("control API:")[1].strip()
                return found
    finally:
        watchdog.cancel()
    raise AssertionError(f"no banner; stderr: {process.stderr.read() if process.stderr else ''}")


class CommandTests(SynchronousTestCase):
    def test_serves_novaclient_and_the_control_api(self) -> None:
        from keystoneauth1 import session
        from keystoneauth1.identity import v3
        from novaclient import client

        process = start("--port", "0", "--build-seconds", "0", "--quota-instances", "3", "--seed", "1")
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        env = read_banner(process)
        auth = v3.Password(
            auth_url=env["OS_AUTH_URL"],
            username=env["OS_USERNAME"],
            password=env["OS_PASSWORD"],
            project_name=env["OS_PROJECT_NAME"],
            user_domain_name=env["OS_USER_DOMAIN_NAME"],
            project_domain_name=env["OS_PROJECT_DOMAIN_NAME"],
        )
        nova = client.Client("2.1", session=session.Session(auth=auth, timeout=10))
        nova.servers.create("cli-1", "155d900f-4e14-4e4c-a73d-069cbf4541e6", "1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [server] = nova.servers.list(search_opts={"name": "^cli-"}, limit=-1)
            if server.status == "ACTIVE":
                break
            time.sleep(0.05)
        self.assertEqual(server.status, "ACTIVE")
        with urllib.request.urlopen(env["control"] + "settings", timeout=10) as answer:
            self.assertEqual(json.load(answer)["quota_instances"], 3)
        with urllib.request.urlopen(env["control"] + "servers", timeout=10) as answer:
            self.assertEqual([s["name"] for s in json.load(answer)["servers"]], ["cli-1"])
        process.terminate()
        self.assertEqual(process.wait(10), 0)

    def test_bad_option_is_a_usage_error(self) -> None:
        process = start("--port", "99999")
        _, err = process.communicate(timeout=20)
        self.assertEqual(process.returncode, 2)
        self.assertIn("--port must be 0..65535", err)
        self.assertNotIn("Traceback", err)


class ImageOptionTests(SynchronousTestCase):
    def test_more_images_beside_the_default_one(self) -> None:
        from twisted.python import usage

        from vmcloud.novasim.__main__ import Options
        from vmcloud.novasim.model import DEFAULT_IMAGES, Image

        options = Options()
        options.parseOptions(["--image", "7a4d3b0e-95c4-4d0b-9a57-3c2f1e0d9b11=vmcloud-guest-2"])
        self.assertEqual(
            options.images,
            [*DEFAULT_IMAGES, Image("7a4d3b0e-95c4-4d0b-9a57-3c2f1e0d9b11", "vmcloud-guest-2")],
        )
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--image", "not-a-uuid"])
