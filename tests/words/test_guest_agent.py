"""The guest agent's side of the words, on a Clock and a recording session; and its command line."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from guest_agent.agent import GuestAgent
from guest_agent.browser import NoBrowser
from guest_agent.commands import CommandResult
from guest_agent.files import FileStore
from guest_agent.tap import Options
from tests.words.support import RecordingSession
from vmcloud.words.browser import Cleanup, Prepare
from vmcloud.words.commands import CmdRun
from vmcloud.words.contexts import IAgentContext
from vmcloud.words.destinations import BROADCAST, CONTROLLER, guest_destination
from vmcloud.words.files import FileGet, FilePut
from vmcloud.words.grammar import split_body


class FakeRunner:
    def __init__(self) -> None:
        self.runs: list[tuple[str, tuple[str, ...], Mapping[str, str], str | None, float | None]] = []
        self.killed = 0

    async def run(
        self, cmd: str, args: Sequence[str], env: Mapping[str, str], path: str | None, timeout: float | None
    ) -> CommandResult:
        self.runs.append((cmd, tuple(args), env, path, timeout))
        return CommandResult(
            out="hi\n",
            err="",
            finished=True,
            exit_code_or_signal=3,
            resources={"ru_maxrss": 1234},
            duration=0.01,
        )

    def kill_all(self) -> None:
        self.killed += 1


class ConnectedSession(RecordingSession):
    is_connected = True


class AgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.session = ConnectedSession()
        self.runner = FakeRunner()
        self.workdir = FilePath(self.mktemp())
        self.files = FileStore(self.workdir, max_size=1024 * 1024)
        self.agent = GuestAgent(
            self.clock,
            self.session,
            identity="test-1",
            ip="10.0.0.5",
            mac="fa:16:3e:00:00:01",
            agent_version="1.2.3",
            runner=self.runner,  # type: ignore[arg-type]
            files=self.files,
            browser=NoBrowser(self.clock),
            workdir=self.files.root,
            beacon_interval=5,
        )
        self.agent.startService()

    def said(self) -> list[tuple[str | None, str, dict[str, str], bytes]]:
        out = []
        for destination, body, headers in self.session.sent:
            word, payload = split_body(body)
            out.append((word, destination, headers, payload))
        self.session.sent.clear()
        return out

    def test_is_an_agent_context(self) -> None:
        verifyObject(IAgentContext, self.agent)

    def test_listens_on_its_destination_and_broadcast(self) -> None:
        destinations = sorted(d for d, _ in self.session.subscriptions.values())
        self.assertEqual(destinations, sorted([guest_destination("test-1"), BROADCAST]))

    def test_says_hello_on_every_connect(self) -> None:
        self.agent.connected()
        ((word, destination, headers, _),) = self.said()
        self.assertEqual((word, destination), ("HELLO", CONTROLLER))
        self.assertEqual(headers["identity"], "test-1")
        self.assertEqual(
            (headers["ip"], headers["mac"], headers["agent-version"]),
            ("10.0.0.5", "fa:16:3e:00:00:01", "1.2.3"),
        )
        self.assertEqual(headers["capabilities"], "cmd,file,no-browser")

    def test_beacons_while_connected(self) -> None:
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual([w for w, *_ in self.said()], ["STILL_ALIVE", "STILL_ALIVE"])
        self.session.is_connected = False
        self.clock.advance(5)
        self.assertEqual(self.said(), [])

    def test_stop_says_bye_and_kills_commands(self) -> None:
        self.agent.stopService()
        self.assertEqual([w for w, *_ in self.said()], ["BYE"])
        self.assertEqual(self.runner.killed, 1)
        self.assertEqual(self.session.subscriptions, {})
        self.clock.advance(60)
        self.assertEqual(self.said(), [])

    def test_cmd_run(self) -> None:
        self.session.deliver_said(
            CmdRun.how_to_say(to="test-1", cmd_id="c1", cmd="sh", args=["-c", "exit 3"], path="sub")
        )
        self.assertEqual(
            self.runner.runs, [("sh", ("-c", "exit 3"), {}, os.path.join(self.files.root, "sub"), None)]
        )
        ((word, destination, headers, payload),) = self.said()
        self.assertEqual((word, destination, headers["cmd-id"]), ("CMD_RESULTS", CONTROLLER, "c1"))
        results = json.loads(payload)
        self.assertEqual(
            (results["out"], results["exitCodeOrSignal"], results["resources"]),
            ("hi\n", 3, {"ru_maxrss": 1234}),
        )

    def test_broadcast_cmd_run(self) -> None:
        self.session.deliver_said(CmdRun.how_to_say(to="*", cmd_id="c1", cmd="true"))
        self.assertEqual(self.runner.runs[0][3], self.files.root)

    def test_files_land_in_the_workdir(self) -> None:
        content = os.urandom(4096) + b"\x00"
        self.session.deliver_said(
            FilePut.how_to_say(to="test-1", cmd_id="f1", path="in/data.bin", content=content)
        )
        self.assertEqual(self.workdir.descendant(["in", "data.bin"]).getContent(), content)
        self.assertEqual(self.said()[0][2]["status"], "ok")
        self.session.deliver_said(FileGet.how_to_say(to="test-1", cmd_id="f2", path="in/data.bin"))
        ((word, _, headers, payload),) = self.said()
        self.assertEqual((word, headers["status"], payload), ("FILE_RESULTS", "ok", content))

    def test_files_outside_the_workdir_are_refused(self) -> None:
        self.session.deliver_said(FileGet.how_to_say(to="test-1", cmd_id="f1", path="../../etc/passwd"))
        ((word, _, headers, payload),) = self.said()
        self.assertEqual((word, headers["status"]), ("FILE_RESULTS", "error"))
        self.assertIn("'..' is not allowed", headers["message"])
        self.assertEqual(payload, b"")

    def test_prepare_then_page_load_then_cleanup(self) -> None:
        self.session.deliver_said(
            Prepare.how_to_say(to="test-1", cmd_id="p1", homepage="https://example.org/")
        )
        ((word, _, headers, payload),) = self.said()
        self.assertEqual((word, headers["status"]), ("PREPARE_RESULTS", "ok"))
        self.assertEqual(json.loads(payload)["homepage"], "https://example.org/")
        self.clock.advance(0)
        ((word, _, headers, payload),) = self.said()
        self.assertEqual(word, "PAGE_LOAD")
        self.assertEqual(
            json.loads(payload), {"action": "page-load", "url": "https://example.org/", "title": ""}
        )
        self.session.deliver_said(Cleanup.how_to_say(to="test-1", cmd_id="k1"))
        self.assertEqual(self.said()[0][0], "CLEANUP_RESULTS")

    def test_browser_refusal_is_an_error_answer(self) -> None:
        self.session.deliver_said(
            Prepare.how_to_say(
                to="test-1",
                cmd_id="p1",
                homepage="https://example.org/",
                cookies=[{"name": "a b", "value": "v"}],
            )
        )
        ((word, _, headers, _),) = self.said()
        self.assertEqual((word, headers["status"], headers["cmd-id"]), ("PREPARE_RESULTS", "error", "p1"))
        self.assertIn("cookie", headers["message"])


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_flags_beat_the_file_and_the_file_beats_user_data(self) -> None:
        config_file = FilePath(self.mktemp())
        config_file.setContent(
            b"[agent]\nidentity = from-file\nbeacon_interval = 7\nbroker = tcp:10.1.1.1:61613\n"
        )
        user_data = FilePath(self.mktemp())
        user_data.setContent(b"[agent]\nbroker = tcp:10.9.9.9:61613\nlogin = vm-9\npasscode = pw\n")
        workdir = self.mktemp()
        options = self.parse(
            "--config",
            config_file.path,
            "--user-data",
            user_data.path,
            "--identity",
            "from-flag",
            "--workdir",
            workdir,
        )
        config = options.config
        self.assertEqual(
            (config.identity, config.beacon_interval, config.broker), ("from-flag", 7.0, "tcp:10.1.1.1:61613")
        )
        self.assertEqual((config.login, config.passcode), ("vm-9", "pw"))
        self.assertTrue(os.path.isdir(workdir))

    def test_bad_input_is_a_usage_error(self) -> None:
        workdir = ["--workdir", os.path.abspath(self.mktemp())]
        self.assertRaises(
            usage.UsageError, self.parse, "--config", "/nonexistent/vmcloud-guest.conf", *workdir
        )
        self.assertRaises(usage.UsageError, self.parse, "--beacon-interval", "soon", *workdir)
        self.assertRaises(usage.UsageError, self.parse, "--identity", "no/slashes", *workdir)
        self.assertRaises(usage.UsageError, self.parse, "--login", "only-login", *workdir)
