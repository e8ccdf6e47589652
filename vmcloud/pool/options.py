"""What an application asks of a batch's browsers besides their home page.

A seam record (the API builds it, the pool keeps it, the PREPARE word carries it) that the pool's
model holds too; it lives in a module of its own so that the model needs nothing of
:mod:`vmcloud.pool.interfaces`, which names the model's records in the pool's answers to the API
(and re-exports this one).
"""

from __future__ import annotations

import attrs

from vmcloud.words.cookies import Cookie


@attrs.frozen
class BatchOptions:
    """What a batch's browsers get on top of their home page."""

    cookies: tuple[Cookie, ...] = ()
    window_width: int = 1280
    window_height: int = 800
    audio: bool = False
