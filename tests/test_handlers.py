"""The ready-made handlers (``wsprovider.handlers``)."""

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from wsprovider.handlers import EchoHandler, LogHandler, preview
from wsprovider.message import BrokerMessage


class PreviewTests(unittest.TestCase):

    def test_text_is_shown_as_text(self):
        self.assertEqual(preview("héllo wörld".encode()), '"héllo wörld"')

    def test_control_characters_quotes_and_bytes_are_escaped(self):
        self.assertEqual(preview(b'a\n\x1b[31m"q"\\'), '"a\\n\\x1b[31m\\"q\\"\\\\"')
        self.assertEqual(preview(b"\xff\x00ok"), '"\\xff\\x00ok"')

    def test_bounded(self):
        shown = preview(b"x" * 10_000, limit=20)
        self.assertEqual(shown, '"' + "x" * 20 + '"... (10000 bytes)')


class LogHandlerTests(unittest.TestCase):

    def test_logs_subject_reply_to_size_and_preview(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        LogHandler().handle_message(BrokerMessage("news.today", b"extra!\n", "_ws.session.x"))
        [text] = [formatEvent(e) for e in events if e.get("log_namespace") == "wsprovider.handlers.LogHandler"]
        self.assertEqual(text, 'message on news.today (reply_to=_ws.session.x, 7 bytes): "extra!\\n"')


class EchoHandlerTests(unittest.TestCase):

    def test_answers_reply_to_only(self):
        sent = []

        class Consumer:
            def publish(self, msg):
                sent.append(msg)
                return defer.succeed(None)

        handler = EchoHandler(Consumer())
        handler.handle_message(BrokerMessage("a", b"1", "back"))
        handler.handle_message(BrokerMessage("a", b"2"))
        self.assertEqual(sent, [BrokerMessage("back", b"1")])
