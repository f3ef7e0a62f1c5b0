"""Loop signals (``wsprovider.loopguard``): reply depth, the answer rate guard, echo recognition,
and the echo filter for OUTBOUND_SUBJECTS. Sans-IO: ``task.Clock`` only."""

from twisted.internet import task
from twisted.trial import unittest

from wsprovider.loopguard import EchoFilter, LoopDetected, LoopGuard
from wsprovider.message import BrokerMessage

MSG = BrokerMessage("message", b"x")


class LoopGuardTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()

    def test_depth_limit(self):
        guard = LoopGuard(self.clock, "link", max_hops=3, max_answers_per_sec=0)
        self.assertIsNone(guard.check(MSG, 3, True))
        error = guard.check(MSG, 4, True)
        self.assertIsInstance(error, LoopDetected)
        self.assertIn("MAX_REPLY_HOPS=3", str(error))
        self.assertEqual(guard.cut, 1)

    def test_zero_means_no_limit(self):
        guard = LoopGuard(self.clock, "link", max_hops=0, max_answers_per_sec=0)
        self.assertIsNone(guard.check(MSG, 10_000, True))

    def test_rate_guard_counts_answers_only_and_refills(self):
        guard = LoopGuard(self.clock, "link", max_hops=0, max_answers_per_sec=10)
        self.assertEqual(sum(guard.check(MSG, 1, True) is None for _ in range(30)), 10)
        self.assertIsNone(guard.check(MSG, 0, False))     # not an answer: not limited
        self.clock.advance(0.5)
        self.assertEqual(sum(guard.check(MSG, 1, True) is None for _ in range(30)), 5)

    def test_one_warning_per_period(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        guard = LoopGuard(self.clock, "link", max_hops=1, max_answers_per_sec=0)
        for _ in range(5):
            guard.check(MSG, 2, True)
        self.clock.advance(10)
        guard.check(MSG, 2, True)
        warnings = [e for e in events if "loop cut" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(guard.cut, 6)

    def test_echo_recognition(self):
        guard = LoopGuard(self.clock, "link", max_hops=8, max_answers_per_sec=0)
        guard.sent_answer(b"hello", 3)
        self.assertEqual(guard.depth_of_echo(b"other"), 0)
        self.assertEqual(guard.depth_of_echo(b"hello"), 3)
        self.assertEqual(guard.depth_of_echo(b"hello"), 0)   # one echo per answer

    def test_echo_recognition_is_bounded(self):
        guard = LoopGuard(self.clock, "link", max_hops=8, max_answers_per_sec=0)
        for i in range(1000):
            guard.sent_answer(str(i).encode(), 1)
        self.assertEqual(guard.depth_of_echo(b"0"), 0)
        self.assertEqual(guard.depth_of_echo(b"999"), 1)


class EchoFilterTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.filter = EchoFilter(self.clock, ttl=10.0, max_entries=3)

    def test_by_content_not_object(self):
        self.filter.expect(BrokerMessage("out.a", b"1", "r"), 2)
        self.assertFalse(self.filter.is_echo(BrokerMessage("out.a", b"1")))       # reply_to differs
        self.assertTrue(self.filter.is_echo(BrokerMessage("out.a", b"1", "r")))
        self.assertTrue(self.filter.is_echo(BrokerMessage("out.a", b"1", "r")))
        self.assertFalse(self.filter.is_echo(BrokerMessage("out.a", b"1", "r")))  # copies spent

    def test_expires(self):
        self.filter.expect(BrokerMessage("out.a", b"1"), 1)
        self.clock.advance(11)
        self.assertFalse(self.filter.is_echo(BrokerMessage("out.a", b"1")))

    def test_bounded(self):
        for i in range(10):
            self.filter.expect(BrokerMessage("out.a", str(i).encode()), 1)
        self.assertEqual(len(self.filter), 3)
        self.assertTrue(self.filter.is_echo(BrokerMessage("out.a", b"9")))
        self.assertFalse(self.filter.is_echo(BrokerMessage("out.a", b"0")))
