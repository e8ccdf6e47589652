"""twistd plugins: ``twistd vmcloud`` (the controller) and ``twistd vmcloud-guest`` (the guest agent).

Kept free of imports from vmcloud itself so that plugin discovery stays cheap and never fails
because of a problem in the application code.
"""

from twisted.application.service import ServiceMaker

vmcloud = ServiceMaker(
    "vmcloud",
    "vmcloud.tap",
    "A pool of browser VMs for crowd work: REST API, pool reconciler, embedded STOMP broker",
    "vmcloud",
)

vmcloud_guest = ServiceMaker(
    "vmcloud-guest",
    "guest_agent.tap",
    "The vmcloud guest agent: says HELLO to the controller, runs its words, drives the browser",
    "vmcloud-guest",
)
