"""Small ready-made handlers, usable as ``twistd wsprovider --handler wsprovider.handlers:echo``."""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IMessageHandler
from .message import BrokerMessage


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


@implementer(IMessageHandler)
class LogHandler:
    """Logs every message it receives (subject, size, reply_to)."""

    log = Logger()

    def handle_message(self, msg):
        self.log.info("message on {subject}: {size} bytes, reply_to={reply_to}",
                      subject=msg.subject, size=len(msg.body), reply_to=msg.reply_to)


log = LogHandler()
