"""How the simulated Nova renders its records, microversion by microversion, as the real one does.

Shapes follow the captures in ``nova-golden.jsonl`` (nova-api 34): which keys appear in which
state (no ``security_groups`` before the network is allocated, no ``progress`` in ERROR, ``fault``
only in ERROR), the embedded flavor from 2.47, and the fields added up to 2.96.
"""

from __future__ import annotations

import datetime
import re

import attrs
from twisted.internet.interfaces import IReactorTime

from vmcloud.novasim.model import Flavor, Image, SimServer

MIN_VERSION = (2, 1)
#: What the simulator implements (python-novaclient 18 knows up to 2.96 as well).
MAX_VERSION = (2, 96)

Version = tuple[int, int]


def version_text(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


@attrs.frozen
class Calendar:
    """Turns the simulator's clock into wall-clock timestamps.

    With a test :class:`~twisted.internet.task.Clock` (which starts at 0) ``offset`` keeps dates
    near today, so keystoneauth does not think a fresh token expired in 1970.
    """

    clock: IReactorTime
    offset: float = 0.0

    def now(self) -> float:
        return self.clock.seconds()

    def _utc(self, t: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(t + self.offset, tz=datetime.UTC)

    def iso(self, t: float) -> str:
        """Nova's ``created``/``updated`` form: ``2026-11-21T12:44:23Z``."""
        return self._utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")

    def iso_micro(self, t: float) -> str:
        """Nova's ``launched_at`` form: ``2026-11-21T12:44:23.939299`` (no zone)."""
        return self._utc(t).strftime("%Y-%m-%dT%H:%M:%S.%f")

    def keystone(self, t: float) -> str:
        """Keystone's ``expires_at`` form: ``2026-11-21T13:44:23.000000Z``."""
        return self._utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def parse(self, text: str) -> float:
        """An ISO 8601 time (``changes-since``) on the simulator's clock."""
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        return parsed.timestamp() - self.offset


def links(base_url: str, collection: str, item_id: str) -> list[dict[str, str]]:
    return [
        {"rel": "self", "href": f"{base_url}/v2.1/{collection}/{item_id}"},
        {"rel": "bookmark", "href": f"{base_url}/{collection}/{item_id}"},
    ]


def bookmark(base_url: str, collection: str, item_id: str) -> list[dict[str, str]]:
    return [{"rel": "bookmark", "href": f"{base_url}/{collection}/{item_id}"}]


def hostname(name: str) -> str:
    """Nova's sanitized hostname (``g-2.96`` -> ``g-2-96``)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "server"


_SHOWS_PROGRESS = frozenset({"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING"})


def server_detail(
    server: SimServer, version: Version, base_url: str, cal: Calendar, *, listed: bool
) -> dict[str, object]:
    """One server as ``GET /servers/{id}`` (``listed=False``) or ``/servers/detail`` shows it."""
    flavor: dict[str, object]
    if version >= (2, 47):
        flavor = {
            "vcpus": server.flavor.vcpus,
            "ram": server.flavor.ram,
            "disk": server.flavor.disk,
            "ephemeral": server.flavor.ephemeral,
            "swap": server.flavor.swap,
            "original_name": server.flavor.name,
            "extra_specs": dict(server.flavor.extra_specs),
        }
    else:
        flavor = {"id": server.flavor.id, "links": bookmark(base_url, "flavors", server.flavor.id)}
    body: dict[str, object] = {
        "accessIPv4": "",
        "accessIPv6": "",
        "addresses": server.addresses,
        "created": cal.iso(server.created),
        "flavor": flavor,
        "hostId": server.host_id,
        "id": server.id,
        "image": {"id": server.image.id, "links": bookmark(base_url, "images", server.image.id)},
        "links": links(base_url, "servers", server.id),
        "metadata": dict(server.metadata),
        "name": server.name,
        "status": server.status,
        "tenant_id": server.project_id,
        "user_id": server.user_id,
        "updated": cal.iso(server.updated),
        "OS-DCF:diskConfig": "MANUAL",
    }
    if server.status in _SHOWS_PROGRESS:
        body["progress"] = 0
    if server.fault is not None:
        body["fault"] = {
            "code": server.fault.code,
            "created": cal.iso(server.fault.created),
            "message": server.fault.message,
        }
    body.update(
        {
            "OS-EXT-AZ:availability_zone": "nova" if server.host else "",
            "config_drive": "",
            "key_name": server.key_name,
            "OS-SRV-USG:launched_at": None
            if server.launched_at is None
            else cal.iso_micro(server.launched_at),
            "OS-SRV-USG:terminated_at": None,
        }
    )
    if server.networked:
        body["security_groups"] = [{"name": group} for group in server.security_groups]
    body.update(
        {
            "OS-EXT-STS:task_state": server.task_state,
            "OS-EXT-STS:vm_state": server.vm_state,
            "OS-EXT-STS:power_state": server.power_state,
            "os-extended-volumes:volumes_attached": [],
        }
    )
    if version >= (2, 9):
        body["locked"] = False
    if version >= (2, 19):
        body["description"] = None
    if version >= (2, 26):
        body["tags"] = []
    if version >= (2, 63):
        body["trusted_image_certificates"] = None
    if version >= (2, 71) and not listed:
        body["server_groups"] = []
    if version >= (2, 73):
        body["locked_reason"] = None
    if version >= (2, 90):
        body["OS-EXT-SRV-ATTR:hostname"] = hostname(server.name)
    if version >= (2, 96):
        body["pinned_availability_zone"] = None
    return body


def server_brief(server: SimServer, base_url: str) -> dict[str, object]:
    return {"id": server.id, "name": server.name, "links": links(base_url, "servers", server.id)}


def server_created(server: SimServer, base_url: str, admin_pass: str) -> dict[str, object]:
    """The 202 body of ``POST /servers``: little more than the id (novaclient loads the rest lazily)."""
    return {
        "server": {
            "id": server.id,
            "links": links(base_url, "servers", server.id),
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": group} for group in server.security_groups],
            "adminPass": admin_pass,
        }
    }


def flavor_brief(flavor: Flavor, base_url: str, version: Version) -> dict[str, object]:
    body: dict[str, object] = {
        "id": flavor.id,
        "name": flavor.name,
        "links": links(base_url, "flavors", flavor.id),
    }
    if version >= (2, 55):
        body["description"] = None
    return body


def flavor_detail(flavor: Flavor, base_url: str, version: Version) -> dict[str, object]:
    body: dict[str, object] = {
        "id": flavor.id,
        "name": flavor.name,
        "ram": flavor.ram,
        "disk": flavor.disk,
        "swap": flavor.swap if version >= (2, 75) else (flavor.swap or ""),
        "OS-FLV-EXT-DATA:ephemeral": flavor.ephemeral,
        "OS-FLV-DISABLED:disabled": False,
        "vcpus": flavor.vcpus,
        "os-flavor-access:is_public": True,
        "rxtx_factor": 1.0,
        "links": links(base_url, "flavors", flavor.id),
    }
    if version >= (2, 55):
        body["description"] = None
    if version >= (2, 61):
        body["extra_specs"] = dict(flavor.extra_specs)
    return body


def image_detail(image: Image, base_url: str) -> dict[str, object]:
    """A Glance v2 image (what ``novaclient``'s ``glance.find_image`` reads)."""
    return {
        "id": image.id,
        "name": image.name,
        "status": "active",
        "visibility": "public",
        "disk_format": "qcow2",
        "container_format": "bare",
        "size": image.size,
        "min_disk": 0,
        "min_ram": 0,
        "protected": False,
        "tags": [],
        "created_at": "2026-11-21T12:00:00Z",
        "updated_at": "2026-11-21T12:00:00Z",
        "self": f"/v2/images/{image.id}",
        "file": f"/v2/images/{image.id}/file",
        "schema": "/v2/schemas/image",
    }


def fault_body(status: int, kind: str, message: str) -> dict[str, object]:
    """Nova's error body: one key naming the kind, holding code and message."""
    return {kind: {"code": status, "message": message}}


def versions_document(base_url: str) -> dict[str, object]:
    """``GET /`` of the compute endpoint (not versioned, no microversion headers)."""
    return {
        "versions": [
            {
                "id": "v2.0",
                "status": "DEPRECATED",
                "version": "",
                "min_version": "",
                "updated": "2025-07-04T12:00:00Z",
                "links": [{"rel": "self", "href": f"{base_url}/v2/"}],
            },
            {
                "id": "v2.1",
                "status": "CURRENT",
                "version": version_text(MAX_VERSION),
                "min_version": version_text(MIN_VERSION),
                "updated": "2013-07-23T11:33:21Z",
                "links": [{"rel": "self", "href": f"{base_url}/v2.1/"}],
            },
        ]
    }


def version_document(base_url: str) -> dict[str, object]:
    """``GET /v2.1``: what ``novaclient``'s version discovery reads."""
    return {
        "version": {
            "id": "v2.1",
            "status": "CURRENT",
            "version": version_text(MAX_VERSION),
            "min_version": version_text(MIN_VERSION),
            "updated": "2013-07-23T11:33:21Z",
            "links": [
                {"rel": "self", "href": f"{base_url}/v2.1/"},
                {"rel": "describedby", "type": "text/html", "href": "http://docs.openstack.org/"},
            ],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}
            ],
        }
    }
