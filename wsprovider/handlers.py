"""Small ready-made handlers, usable as ``twistd wsprovider --handler wsprovider.handlers:log``.

``log`` shows what arrives (the one to start with); ``echo`` answers every message that has
a ``reply_to`` with the same body. Against a server that itself echoes, ``echo`` makes a
loop: each answer comes back as a new message, which ``echo`` answers again. Client links
cut such loops (docs/client-mode.rst, "Loops"), but ``log`` is the handler to explore a
server with.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IMessageHandler
from .message import BrokerMessage

PREVIEW_BYTES = 200


@implementer(IMessageHandler)
class EchoHandler:
    """Replies to every message that has a ``reply_to`` with the same body."""

    def __init__(self, consumer):
        self._consumer = consumer

    def handle_message(self, msg):
        if msg.reply_to is not None:
            return self._consumer.publish(BrokerMessage(msg.reply_to, msg.body))
        return None


def echo(consumer) -> EchoHandler:
    return EchoHandler(consumer)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def preview(body: bytes, limit: int = PREVIEW_BYTES) -> str:
    """A printable, bounded, escaped view of ``body``, in double quotes: UTF-8 text as text,
    control characters and bytes that are not UTF-8 escaped (``\\n``, ``\\x1b``, ``\\xff``);
    a body longer than ``limit`` bytes is cut and ends in ``... (N bytes)``."""
    text = body[:limit].decode("utf-8", errors="surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:            # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    shown = '"' + "".join(out) + '"'
    return f"{shown}... ({len(body)} bytes)" if len(body) > limit else shown


@implementer(IMessageHandler)
class LogHandler:
    """Logs every message it receives: subject, reply_to, size and a preview of the body."""

    log = Logger()

    def __init__(self, limit: int = PREVIEW_BYTES):
        self.limit = limit

    def handle_message(self, msg):
        self.log.info("message on {subject} (reply_to={reply_to}, {size} bytes): {preview}",
                      subject=msg.subject, reply_to=msg.reply_to, size=len(msg.body),
                      preview=preview(msg.body, self.limit))


log = LogHandler()
