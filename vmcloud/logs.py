"""JSON log output for log shippers: ``twistd --logger vmcloud.logs.json_observer -n vmcloud``."""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """One JSON object per event on standard output, with every named field (``event=`` included)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
