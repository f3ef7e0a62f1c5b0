"""The raw wire mode of client links: plain WebSocket frames, no envelope. Pure functions.

For ordinary WebSocket servers that know nothing of ``wsprovider.v1.json``, as the seed
does it: a text frame from the server is a message on subject ``message``, a binary
frame one on ``binary.message``; a published body goes out as a text frame when it is
valid UTF-8 and as a binary frame otherwise. Subjects and reply subjects do not travel:
the frame is the body.
"""

from __future__ import annotations

from .envelope import PLAIN_BINARY_SUBJECT, PLAIN_TEXT_SUBJECT
from .message import BrokerMessage


def encode(msg: BrokerMessage) -> tuple[bytes, bool]:
    """Return ``(payload, is_binary)`` for ``msg``'s body."""
    body = msg.body
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return body, True
    return body, False


def decode(payload: bytes, is_binary: bool, reply_to: str | None = None) -> BrokerMessage:
    """A frame from the server as a ``BrokerMessage``."""
    return BrokerMessage(PLAIN_BINARY_SUBJECT if is_binary else PLAIN_TEXT_SUBJECT, payload, reply_to)
