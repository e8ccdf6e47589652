"""``scripts/guest-image.sh`` turns a stock Debian 12 root into a vmcloud guest (issue #11).

A Debian 12 chroot (``debootstrap --variant=minbase``, the host's apt cache) goes through the script,
then the result is checked from inside: the agent starts (``--help``) and imports every guest module
with only the guest's libraries, ``systemd-analyze verify`` passes on the guest's units and on the
controller's ``etc/vmcloud.service``, the firewall rules refuse the browser's uids the metadata
service (in a network namespace of the test), and user-data rendered by the Nova
driver's own ``render_user_data`` is read by the agent's own option parsing exactly as the installed
unit runs it (its ``ExecStart`` arguments, the drop-in's ``VMCLOUD_USER_DATA``).

Speed: the finished chroot is kept in ``/var/cache/vmcloud-test`` (``$VMCLOUD_TEST_CACHE``), keyed by
a hash of the script (which holds the package list) and the debootstrap call, so only the first run
on a machine pays for debootstrap and the packages (about 2-3 min); later runs run the script again
on the kept root (idempotence, and this checkout's agent) in seconds.  Root and deb.debian.org are
needed; without them the tests skip and say why.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcloud.broker.auth import Credentials
from vmcloud.drivers.nova import render_user_data
from vmcloud.pool.interfaces import GuestCredentials

pytestmark = pytest.mark.timeout(1500)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "guest-image.sh"
CACHE = Path(os.environ.get("VMCLOUD_TEST_CACHE", "/var/cache/vmcloud-test"))
APT_ARCHIVES = "/var/cache/apt/archives"
MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", f"--cache-dir={APT_ARCHIVES}", "bookworm"]
VENV = "/opt/vmcloud/.venv"
UNITS = "/etc/systemd/system"
DONE = ".vmcloud-test-complete"


def run(argv: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload,no-any-return]


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts)"
    try:
        request = urllib.request.Request(MIRROR + "/dists/bookworm/Release", method="HEAD")
        urllib.request.urlopen(request, timeout=10).close()
    except OSError as e:
        return f"no network to deb.debian.org ({e})"
    return None


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def unmount_under(path: Path) -> None:
    """Whatever a killed run left mounted inside ``path``, deepest first."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, timeout=60)
    left = mounts_under(path)
    assert not left, f"still mounted inside {path}: {left}"


def remove_root(path: Path) -> None:
    unmount_under(path)  # never delete through a bind mount of /dev
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=600)


def cache_key() -> str:
    digest = hashlib.sha256(SCRIPT.read_bytes())
    digest.update(" ".join([*DEBOOTSTRAP, MIRROR]).encode())
    return digest.hexdigest()[:16]


def guest_image(root: Path) -> subprocess.CompletedProcess[str]:
    caches = ["--apt-cache", APT_ARCHIVES, "--pip-cache", str(CACHE / "pip")]
    argv = ["bash", str(SCRIPT), "--root", str(root), *caches]
    result = run(argv, timeout=1200, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert not mounts_under(root), f"guest-image.sh left mounts: {mounts_under(root)}"
    return result


@pytest.fixture(scope="module")
def guest() -> Iterator[tuple[Path, str]]:
    """The guest root and the output of the script's last run on it (a run over a finished root)."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    for tool in ("debootstrap", "chroot", "systemd-analyze"):
        assert shutil.which(tool), f"{tool} is missing (scripts/install.sh installs it)"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "guest-image.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time on this machine
        root = CACHE / f"debian12-{cache_key()}"
        try:
            if not (root / DONE).exists():
                for old in CACHE.glob("debian12-*"):
                    remove_root(old)  # roots of older scripts, or a partial one
                made = run([*DEBOOTSTRAP, str(root), MIRROR], timeout=900, stdin=subprocess.DEVNULL)
                assert made.returncode == 0, (made.stdout + made.stderr)[-4000:]
                unmount_under(root)
                guest_image(root)
                (root / DONE).write_text("debootstrap and guest-image.sh finished\n")
            # Again over the finished root: it must change nothing but the agent (this checkout's).
            yield root, guest_image(root).stdout
        finally:
            unmount_under(root)


def in_root(root: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["chroot", str(root), *argv], timeout=timeout)


def test_guest_requirements_are_those_of_setup_py() -> None:
    """The guest's short list of libraries is spelled as in setup.py, so they move together."""
    listed = re.search(r"^GUEST_REQUIREMENTS=\((.*?)^\)", SCRIPT.read_text(), re.MULTILINE | re.DOTALL)
    assert listed
    guest = re.findall(r'"([^"]+)"', listed.group(1))
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    declared = {ast.literal_eval(e) for e in requires.elts}  # type: ignore[attr-defined]
    assert guest and set(guest) <= declared, set(guest) - declared


def test_shellcheck_is_clean() -> None:
    if shutil.which("shellcheck") is None and os.geteuid() == 0:
        run(["apt-get", "install", "-y", "-qq", "shellcheck"], timeout=300, stdin=subprocess.DEVNULL)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed and apt could not install it")
    result = run(["shellcheck", str(SCRIPT)], timeout=60)
    assert result.returncode == 0, result.stdout


def test_the_agent_starts(guest: tuple[Path, str]) -> None:
    root, _ = guest
    result = in_root(root, f"{VENV}/bin/twistd", "vmcloud-guest", "--help")
    assert result.returncode == 0, result.stderr
    assert "--user-data" in result.stdout


def test_the_venv_holds_the_guest_and_not_the_controller(guest: tuple[Path, str]) -> None:
    """Every guest module imports with the guest's libraries alone; the controller's are absent."""
    root, _ = guest
    check = (
        "import importlib, importlib.util, pkgutil, guest_agent\n"
        "for m in pkgutil.iter_modules(guest_agent.__path__):\n"
        "    importlib.import_module('guest_agent.' + m.name)\n"
        "print([n for n in ('novaclient', 'klein', 'prometheus_client') if importlib.util.find_spec(n)])\n"
    )
    result = in_root(root, f"{VENV}/bin/python", "-c", check)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_units_verify(guest: tuple[Path, str]) -> None:
    """The guest's units (with the drop-in) and the controller's etc/vmcloud.service."""
    root, _ = guest
    units = [f"{UNITS}/vmcloud-guest.service", f"{UNITS}/vmcloud-guest-firewall.service"]
    for unit in units:
        assert (root / unit.lstrip("/")).is_file(), unit
        assert (root / f"etc/systemd/system/multi-user.target.wants/{Path(unit).name}").is_symlink()
    controller = root / "tmp" / "vmcloud-test-units"
    controller.mkdir(exist_ok=True)
    shutil.copy(ROOT / "etc" / "vmcloud.service", controller)
    try:
        # the controller's ExecStart names /opt/vmcloud/.venv/bin/twistd too, which exists in there
        result = in_root(root, "systemd-analyze", "verify", *units, "/tmp/vmcloud-test-units/vmcloud.service")
    finally:
        shutil.rmtree(controller)
    assert result.returncode == 0, result.stdout + result.stderr
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "vmcloud" in line]
    assert ours == [], ours


def test_the_firewall_rules_parse(guest: tuple[Path, str]) -> None:
    root, _ = guest
    result = in_root(root, "nft", "-c", "-f", "/etc/vmcloud/guest-firewall.nft")
    assert result.returncode == 0, result.stderr


def test_the_browser_cannot_reach_the_metadata_service(guest: tuple[Path, str]) -> None:
    """The image's rules, loaded in a namespace of this test where 169.254.169.254 answers HTTP: the
    browser's uids are refused, root (the agent, cloud-init) and other users are not."""
    root, _ = guest
    namespace = f"vmcimg-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=30)
    server = None
    try:
        netns = ["ip", "netns", "exec", namespace]
        for step in (["link", "set", "lo", "up"], ["addr", "add", "169.254.169.254/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", namespace, *step], check=True, timeout=30)
        rules = run([*netns, "chroot", str(root), "nft", "-f", "/etc/vmcloud/guest-firewall.nft"], 60)
        assert rules.returncode == 0, rules.stderr
        server = subprocess.Popen(
            [*netns, "chroot", str(root), "python3", "-m", "http.server", "80", "--bind", "169.254.169.254"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        fetch = (
            "import sys, time, urllib.request\n"
            "for _ in range(int(sys.argv[1])):\n"
            "    try:\n"
            "        print(urllib.request.urlopen('http://169.254.169.254/', timeout=3).status); break\n"
            "    except OSError as e:\n"
            "        if not isinstance(getattr(e, 'reason', e), ConnectionRefusedError): raise\n"
            "        time.sleep(0.1)\n"
            "else:\n"
            "    print('refused')\n"
        )

        def as_user(uid: int, tries: int = 1) -> str:
            who = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            python = ["python3", "-c", fetch, str(tries)]
            result = run([*netns, "chroot", str(root), "setpriv", *who, *python], 60)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert as_user(0, tries=50) == "200"  # the server is up: a refusal below is the rule's
        assert as_user(2000000001) == "refused"  # the browser of run slot 1
        assert as_user(1000) == "200"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=30)


def test_user_data_from_the_controller_reaches_the_agent(guest: tuple[Path, str]) -> None:
    """The Nova driver's user-data, where the drop-in points the agent, read by the agent's own options
    with the installed unit's ExecStart arguments: broker, login, passcode and beacon come through."""
    root, _ = guest
    login, passcode = Credentials().mint("4f2a")
    credentials = GuestCredentials(
        broker="tcp:10.0.0.1:61613", login=login, passcode=passcode, beacon_interval=2.0
    )
    dropin = (root / "etc/systemd/system/vmcloud-guest.service.d/cloud-init.conf").read_text()
    found = re.search(r"^Environment=VMCLOUD_USER_DATA=(\S+)$", dropin, re.MULTILINE)
    assert found, dropin
    path = found.group(1)
    assert path == "/var/lib/cloud/instance/user-data.txt"  # where cloud-init keeps it
    unit = (root / "etc/systemd/system/vmcloud-guest.service").read_text()
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert exec_start[0] == f"{VENV}/bin/twistd", exec_start
    args = exec_start[exec_start.index("vmcloud-guest") + 1 :]
    parse = (
        "import json, sys, attrs\n"
        "from guest_agent.tap import Options\n"
        "options = Options()\n"
        "options.parseOptions(sys.argv[1:])\n"
        "print(json.dumps(attrs.asdict(options.config)))\n"
    )
    made = root / "var/lib/cloud"
    assert not made.exists()  # cloud-init never ran in here
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True)
    try:
        target.write_text(render_user_data(credentials))
        target.chmod(0o600)  # as cloud-init writes it
        result = in_root(root, "env", f"VMCLOUD_USER_DATA={path}", f"{VENV}/bin/python", "-c", parse, *args)
    finally:
        shutil.rmtree(made)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["broker"] == "tcp:10.0.0.1:61613"
    assert (config["login"], config["passcode"]) == (login, passcode)
    assert config["beacon_interval"] == 2.0


def test_a_second_run_changes_nothing_but_the_agent(guest: tuple[Path, str]) -> None:
    root, output = guest
    assert "guest-image: packages: all there" in output, output
    assert "wrote /etc/vmcloud/vmcloud-guest.conf" not in output  # an operator's edits stay
    assert not (root / "usr/sbin/policy-rc.d").exists()  # the build's own, taken away again
    assert not list((root / "tmp").glob("*.whl")) and not (root / "tmp/vmcloud-build-ca.crt").exists()
    assert (root / "etc/resolv.conf").exists()
