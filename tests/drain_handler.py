"""A handler for the twistd drain test: it answers requests only once shutdown has begun."""

from twisted.internet import reactor
from twisted.logger import Logger
from zope.interface import implementer

from wsprovider import BrokerMessage, IMessageHandler

log = Logger()


@implementer(IMessageHandler)
class AnswerDuringShutdown:
    def __init__(self, consumer):
        self.consumer = consumer

    def handle_message(self, msg):
        if msg.reply_to is None:
            return
        log.info("holding a request on {subject} until shutdown", subject=msg.subject)
        reactor.addSystemEventTrigger("before", "shutdown", self._answer_soon, msg)

    def _answer_soon(self, msg):
        # Half a second into the drain: the service must still be waiting for us.
        reactor.callLater(0.5, self._answer, msg)

    def _answer(self, msg):
        log.info("answering the held request")
        self.consumer.publish(BrokerMessage(msg.reply_to, b"answered during drain"))


def hold(consumer):
    return AnswerDuringShutdown(consumer)
