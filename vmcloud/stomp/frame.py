"""A STOMP frame as plain data, shared by the broker, the controller and the guest agent."""

from __future__ import annotations

from collections.abc import Mapping

import attrs


def _header_dict(headers: Mapping[str, str]) -> dict[str, str]:
    """A private copy of the headers, so a frame never changes behind its holder's back."""
    return dict(headers)


@attrs.frozen
class Frame:
    """One STOMP frame.

    Headers are decoded text (escapes already undone); when a header is repeated on the wire only
    the first occurrence is kept, as the spec says.  The body is bytes end to end, never text, so
    binary payloads (FILE_PUT) and NUL bytes survive.
    """

    command: str
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_header_dict)
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    @classmethod
    def adopting(cls, command: str, headers: dict[str, str], body: bytes = b"") -> Frame:
        """A frame that takes ``headers`` as its own instead of copying it.

        For hot paths (the decoder, the broker) that build a fresh dict and never touch it again;
        the frame is the same as ``Frame(command, headers, body)``.
        """
        frame = object.__new__(cls)
        object.__setattr__(frame, "command", command)
        object.__setattr__(frame, "headers", headers)
        object.__setattr__(frame, "body", body)
        return frame
