"""Packaging for vmcloud: the controller daemon, the guest agent and their twistd plugins."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def shared_tree(folder: str) -> list[tuple[str, list[str]]]:
    """Every file under ``folder`` as data files in ``share/vmcloud/<folder>/...``, where the daemon
    looks for them when it is installed rather than run from a checkout (``vmcloud/tap.py``)."""
    groups: dict[str, list[str]] = {}
    for path in sorted((HERE / folder).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            relative = path.relative_to(HERE)
            groups.setdefault(str(Path("share/vmcloud") / relative.parent), []).append(str(relative))
    return sorted(groups.items())


setup(
    name="vmcloud",
    version="0.1.0",
    description="A pool of browser VMs for crowd work, run by a Twisted daemon",
    long_description=Path(__file__).with_name("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=[*find_packages(exclude=["tests*", "bench*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["vmcloud_plugins.py"]},
    data_files=shared_tree("etc") + shared_tree("static"),
    install_requires=[
        "twisted[tls]>=25.5",  # Site(parsePOSTFormSubmission=False); [tls]: an ssl: listener for HTTPS/WSS
        "klein>=24.8",
        "werkzeug>=2",  # Klein's router: the API maps its exceptions to JSON errors
        "prometheus_client>=0.20",
        "python-novaclient>=18",
        "keystoneauth1>=5",
        "netifaces-plus>=0.12",
        "txaio>=23",
        "autobahn[twisted]>=24",
        "attrs>=23",
        "zope.interface>=6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "stomper>=0.4.3",  # the replayed stomper conversations in tests/broker
            "psutil>=5.9",  # tests and benches measure processes with it
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "schemathesis>=4.0",  # the REST attack suite draws requests from /openapi.json
            "stomp.py>=8.1",
            "treq>=24",
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0.5",
            "coilmq>=1.1",
            "vncdotool>=1.2",  # a VNC client that is not ours, for the browser VM tests
        ],
    },
)
