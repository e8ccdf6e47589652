"""The STOMP destinations of the guest channel, shared by the controller, the broker's ACL and the agent.

Names are valid on the embedded broker and on RabbitMQ's STOMP plugin alike (which requires the
``/queue/`` and ``/topic/`` prefixes).
"""

from __future__ import annotations

import re

#: Where guests send everything they say (HELLO, STILL_ALIVE, answers, events).
CONTROLLER = "/queue/vmcloud.controller"
#: Every guest subscribes here; the controller says things meant for all guests.
BROADCAST = "/topic/vmcloud.broadcast"
#: Prefix of a guest's own command destination; the guest's identity follows it.
GUEST_PREFIX = "/queue/vmcloud.guest."

#: What an identity may look like: it becomes part of a destination name and a STOMP login.
IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def guest_destination(identity: str) -> str:
    """The command destination of the guest called ``identity``."""
    if not IDENTITY_RE.match(identity):
        raise ValueError(f"not a valid guest identity: {identity!r}")
    return GUEST_PREFIX + identity


def identity_from_mac(mac: str) -> str:
    """A MAC address as an identity: lower case, dashes instead of colons (``fa-16-3e-00-00-01``)."""
    return mac.strip().lower().replace(":", "-")


#: Header the embedded broker stamps on every message a guest sends, with the STOMP login the guest
#: authenticated with (replacing any value the guest wrote).  The controller trusts it over the
#: ``identity`` a guest claims.  Not ``user-id``: RabbitMQ fills that with the shared account's name,
#: which says nothing about which guest spoke; where a broker does not stamp this header (external
#: brokers, shared accounts) the guest's claim is all there is.
LOGIN_HEADER = "vmcloud-login"
