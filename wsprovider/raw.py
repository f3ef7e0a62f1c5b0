"""The raw wire of client links: plain WebSocket frames, no envelope. Pure functions.

For ordinary WebSocket servers that know nothing of ``wsprovider.v1.json``, as the seed
does it: a text frame from the server is a message on subject ``message``, a binary
frame one on ``binary.message``; a published body goes out as a text frame when it is
valid UTF-8 and as a binary frame otherwise. Subjects, reply subjects, frame ids and
``hops`` do not travel: the frame is the body.

``RawCodec`` is this wire behind the same ``IFrameCodec`` as the envelope codecs; it does
not provide ``IEnvelopeWire``, which is how a link knows what it cannot rely on.
"""

from __future__ import annotations

from zope.interface import implementer

from .envelope import PLAIN_BINARY_SUBJECT, PLAIN_TEXT_SUBJECT, FrameError, IFrameCodec, Message
from .message import BrokerMessage

NAME = "raw"


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


@implementer(IFrameCodec)
class RawCodec:
    name = NAME

    def encode(self, frame):
        if frame.message is None:
            raise FrameError(f"the raw wire carries only message bodies, not {frame.kind!r} frames")
        return encode(frame.message)

    def decode_from_server(self, payload: bytes, is_binary: bool) -> Message:
        return Message(decode(payload, is_binary))


RAW_CODEC = RawCodec()
