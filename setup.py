"""Packaging for vmcloud: the controller daemon, the guest agent and their twistd plugins."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vmcloud",
    version="0.1.0",
    description="A pool of browser VMs for crowd work, run by a Twisted daemon",
    long_description=Path(__file__).with_name("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=[*find_packages(exclude=["tests*", "bench*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["vmcloud_plugins.py"]},
    data_files=[
        ("share/vmcloud/etc", ["etc/vmcloud.conf", "etc/vmcloud-guest.conf"]),
    ],
    install_requires=[
        "twisted>=24.3",
        "klein>=24.8",
        "prometheus_client>=0.20",
        "stomper>=0.4.3",
        "python-novaclient>=18",
        "keystoneauth1>=5",
        "netifaces-plus>=0.12",
        "txaio>=23",
        "autobahn[twisted]>=24",
        "attrs>=23",
        "zope.interface>=6",
        "psutil>=5.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "stomp.py>=8.1",
            "treq>=24",
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0.5",
            "coilmq>=1.1",
        ],
    },
)
