"""The user-data a guest agent starts from: one ``[agent]`` INI document, the same for both drivers.

A Nova server gets it as its user-data; a local VM as ``user-data.ini`` in its directory.  The
guest reads it with ``guest_agent/config.py``, whose parser strips inline ``;``/``#`` comments
and surrounding white space, so a value is refused here unless it comes back from that parser
unchanged; the broker address and the credentials must moreover be plain tokens (no white
space, ``;`` or ``#`` at all).
"""

from __future__ import annotations

import configparser
import io
import re

from vmcloud.pool.interfaces import BadCloudRequest, GuestCredentials

#: What the guest's parser would cut or change in a value (besides surrounding white space).
_NOT_A_TOKEN = re.compile(r"[\s;#\x00-\x1f\x7f]")


def render_user_data(
    credentials: GuestCredentials,
    *,
    broker: str | None = None,
    workdir: str | None = None,
    browser: str = "auto",
) -> str:
    """The ``[agent]`` document for a guest with ``credentials``.

    ``broker`` replaces the credentials' broker address (a local VM reaches the broker where its
    namespace does); ``workdir`` is the agent's directory for files and commands (local VMs share
    one filesystem); ``browser`` is written when it is not the agent's default (``auto``).
    Raises :class:`BadCloudRequest` naming the key that cannot travel.
    """
    values = {
        "broker": credentials.broker if broker is None else broker,
        "login": credentials.login,
        "passcode": credentials.passcode,
    }
    for key, value in values.items():
        if not value or _NOT_A_TOKEN.search(value):
            raise BadCloudRequest(
                f"guest {key} cannot travel in user-data (empty, or whitespace/';'/'#' in it)"
            )
    if workdir is not None:
        values["workdir"] = workdir
    if credentials.beacon_interval is not None:
        values["beacon_interval"] = f"{credentials.beacon_interval:g}"
    if browser != "auto":
        values["browser"] = browser
    ini = configparser.ConfigParser(interpolation=None)
    ini["agent"] = values
    text = io.StringIO()
    ini.write(text)
    _check_round_trip(text.getvalue(), values)
    return text.getvalue()


def _check_round_trip(text: str, values: dict[str, str]) -> None:
    """Refuse a document from which the guest's parser would read other values than were written."""
    guest = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        guest.read_string(text)
        read = dict(guest["agent"])
    except (configparser.Error, KeyError):
        read = {}
    for key, value in values.items():
        if read.get(key) != value:
            raise BadCloudRequest(
                f"guest {key} cannot travel in user-data: {value!r} would be read differently"
            )
