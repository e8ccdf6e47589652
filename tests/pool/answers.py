"""The pool's answers as the REST API puts them on the wire, for the pool tests' assertions.

The pool answers with records (:mod:`vmcloud.pool.views`); what an application or the monitor
reads is their JSON (:mod:`vmcloud.api.shapes`).  The pool tests assert on that JSON, so they keep
pinning the wire shape that the records and the shaping make together.
"""

from __future__ import annotations

from typing import Any

from vmcloud.api.shapes import all_status_json, events_json, handle_status_json
from vmcloud.pool.service import PoolService
from vmcloud.pool.views import EventPage


def all_status(pool: PoolService) -> dict[str, Any]:
    """``GET /all-status``."""
    return all_status_json(pool.all_status())


def handle_status(pool: PoolService, handle: str) -> dict[str, Any]:
    """``GET /handle-status/{handle}``."""
    return handle_status_json(pool.handle_status(handle))


def page_json(page: EventPage) -> dict[str, Any]:
    """``GET /fetch-events/...`` of what fetch_events answered."""
    return events_json(page)
