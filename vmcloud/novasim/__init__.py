"""A Keystone v3 + Nova (+ Glance image list) simulator that real python-novaclient 18 accepts.

For tests and for trying vmcloud's Nova path without a cloud: servers go through Nova's life
cycle on an injectable clock, with quota, capacity, boot outcomes, error injection and request
counters.  In-process use goes through :class:`~vmcloud.novasim.simulator.Simulator`; the command
``python -m vmcloud.novasim --port 8774`` runs one on its own (see ``__main__``).  Shapes and
messages follow captures of the real nova-api and python-novaclient, replayed and kept honest by
``tests/novasim/test_contract.py``.
"""

from vmcloud.novasim.faults import FaultRule
from vmcloud.novasim.identity import Identity
from vmcloud.novasim.model import BootRule, CloudSettings, ServerView
from vmcloud.novasim.simulator import Simulator

__all__ = ["BootRule", "CloudSettings", "FaultRule", "Identity", "ServerView", "Simulator"]
