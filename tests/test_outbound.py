"""The outbound buffer (``wsprovider.outbound``): bounded in bytes, ordered, flushed on demand."""

from twisted.trial import unittest

from wsprovider.message import BrokerMessage
from wsprovider.outbound import OutboundBuffer, Outgoing


def item(body=b"x" * 9, subject="s", reply_to=None):
    return Outgoing(BrokerMessage(subject, body, reply_to))


class OutboundBufferTests(unittest.TestCase):

    def test_size_counts_body_subject_and_reply_to(self):
        self.assertEqual(item(b"abc", "sub", "rep").size, 9)

    def test_bounded_in_bytes_and_refuses_without_dropping(self):
        buf = OutboundBuffer(30)
        self.assertTrue(all(buf.add(item()) for _ in range(3)))   # 10 bytes each
        self.assertFalse(buf.add(item()))
        self.assertEqual((len(buf), buf.bytes), (3, 30))

    def test_zero_limit_buffers_nothing(self):
        self.assertFalse(OutboundBuffer(0).add(item()))

    def test_flush_in_order_while_writable(self):
        buf = OutboundBuffer(1000)
        items = [item(bytes([i])) for i in range(5)]
        for i in items:
            buf.add(i)
        written = []
        budget = iter([True, True, False])
        self.assertEqual(buf.flush(lambda: next(budget), written.append), 2)
        self.assertEqual(written, items[:2])
        self.assertEqual(buf.flush(lambda: True, written.append), 3)
        self.assertEqual(written, items)
        self.assertEqual((len(buf), buf.bytes), (0, 0))

    def test_remove_and_clear(self):
        buf = OutboundBuffer(1000)
        a, b = item(), item()
        buf.add(a)
        buf.add(b)
        self.assertTrue(buf.remove(a))
        self.assertFalse(buf.remove(a))
        self.assertEqual(buf.bytes, b.size)
        self.assertEqual(buf.clear(), [b])
        self.assertEqual((len(buf), buf.bytes, bool(buf)), (0, 0, False))
