"""The cookie a worker's browser is given: a value type the controller and the guest share.

The API reads it from a batch request, the pool keeps it in :class:`~vmcloud.pool.interfaces.BatchOptions`
and its checkpoint, the PREPARE word carries it, and the guest's browser checks it and sets it.  It
lives here, beside the words, so that the guest agent needs nothing of the controller but
``vmcloud.words``; this module imports nothing of vmcloud, so anyone may depend on it.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Cookie:
    name: str
    value: str
    domain: str | None = None
    path: str = "/"
    secure: bool = False
    http_only: bool = False
    expires: float | None = None  # seconds since the epoch
