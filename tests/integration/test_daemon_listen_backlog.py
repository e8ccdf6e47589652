"""Issue #8, point 6, on a real daemon: the kernel queues of its listeners hold a pool's reconnects.

``ss -ltn`` shows a listening socket's backlog as its Send-Q.  Every listener the daemon opens --
the API, the broker, and in namespace mode the broker's second address on the bridge -- had
Twisted's 50.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.test_daemon_harness import Daemon, netns_available, running_daemon
from vmcloud.config import MIN_LISTEN_BACKLOG

SS = shutil.which("ss")

pytestmark = pytest.mark.skipif(SS is None, reason="needs ss (iproute2) to read listen backlogs")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    netns = "auto" if netns_available() else "no"
    with running_daemon(tmp_path_factory.mktemp("backlog"), "b", netns=netns, pool_max_pool_size=2) as d:
        yield d


def backlogs(port: int) -> dict[str, int]:
    """Local address -> backlog of every TCP socket listening on ``port``."""
    assert SS is not None
    out = subprocess.run([SS, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=20).stdout
    found = {}
    for line in out.splitlines():
        _state, _recv_q, send_q, local, *_ = line.split()
        found[local.rsplit(":", 1)[0]] = int(send_q)
    return found


def test_every_listener_queues_a_pools_reconnects(daemon: Daemon) -> None:
    expected_broker = {"127.0.0.1"}
    if netns_available():
        expected_broker.add(daemon.layout.bridge_ip)

    def broker_listening() -> dict[str, int] | None:
        found = backlogs(daemon.stomp_port)
        return found if set(found) == expected_broker else None

    broker = daemon.wait_for(broker_listening, f"the broker listens on {sorted(expected_broker)}")
    api = backlogs(daemon.api_port)
    assert set(api) == {"127.0.0.1"}, api
    for listener, backlog in [*broker.items(), *api.items()]:
        assert backlog >= MIN_LISTEN_BACKLOG, (listener, backlog)
