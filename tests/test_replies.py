"""wsprovider.replies: the request/reply primitive, driven by a task.Clock (no sockets)."""

from twisted.internet import defer, task
from twisted.trial import unittest

from wsprovider.message import NotConnected, RequestTimeout
from wsprovider.replies import OwedReplies, PendingReplies, TooManyRequests


class PendingRepliesTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.table = PendingReplies(self.clock, max_pending=3, max_per_owner=2)

    def test_resolve_fires_once_and_cancels_timer(self):
        d = self.table.add("r1", 1.0, owner="a", label="echo.q")
        self.assertTrue(self.table.resolve("r1", "answer"))
        self.assertEqual(self.successResultOf(d), "answer")
        self.assertFalse(self.table.resolve("r1", "again"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.owned_by("a"), 0)

    def test_timeout_fails_with_label(self):
        d = self.table.add("r1", 1.5, label="echo.q")
        self.clock.advance(1.4)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, RequestTimeout).value
        self.assertIn("1500ms", str(err))
        self.assertIn("echo.q", str(err))
        self.assertEqual(self.table.timed_out, 1)
        self.assertNotIn("r1", self.table)

    def test_cancel_removes_entry(self):
        d = self.table.add("r1", 1.0, owner="a")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.owned_by("a"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_per_owner_cap(self):
        self.table.add("r1", 1.0, owner="a")
        self.table.add("r2", 1.0, owner="a")
        with self.assertRaises(TooManyRequests) as caught:
            self.table.add("r3", 1.0, owner="a")
        self.assertEqual(caught.exception.code, "too_many_requests")
        self.table.add("r3", 1.0, owner="b")  # another owner still may
        self.assertEqual(self.table.refused, 1)

    def test_total_cap(self):
        for i in range(3):
            self.table.add(i, 1.0, owner=i)
        self.assertIsInstance(self.table.refusal("z"), TooManyRequests)
        self.assertRaises(TooManyRequests, self.table.add, "x", 1.0)

    def test_release_owner_fails_only_its_entries(self):
        a1 = self.table.add("r1", 10.0, owner="a")
        a2 = self.table.add("r2", 10.0, owner="a")
        b1 = self.table.add("r3", 10.0, owner="b")
        self.assertEqual(self.table.release("a", NotConnected("gone")), 2)
        self.failureResultOf(a1, NotConnected)
        self.failureResultOf(a2, NotConnected)
        self.assertNoResult(b1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.table.release("a"), 0)

    def test_close_fails_everything(self):
        ds = [self.table.add(i, 10.0) for i in range(3)]
        self.assertEqual(self.table.close(), 3)
        for d in ds:
            self.failureResultOf(d, NotConnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_take_leaves_deferred_to_caller(self):
        d = self.table.add("r1", 1.0, data={"ack": True})
        entry = self.table.take("r1")
        self.assertEqual(entry.data, {"ack": True})
        self.assertNoResult(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        entry.deferred.callback(None)

    def test_duplicate_key_refused(self):
        self.table.add("r1", 1.0)
        self.assertRaises(ValueError, self.table.add, "r1", 1.0)


class OwedRepliesTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.dropped = []
        self.owed = OwedReplies(self.clock, max_entries=2, ttl=5.0, on_drop=self.dropped.append)

    def test_one_answer_per_grant(self):
        self.assertTrue(self.owed.grant("_INBOX.1"))
        self.assertTrue(self.owed.use("_INBOX.1"))
        self.assertFalse(self.owed.use("_INBOX.1"))
        self.assertEqual(self.dropped, ["_INBOX.1"])

    def test_grants_add_up(self):
        self.owed.grant("s")
        self.assertFalse(self.owed.grant("s"))
        self.assertTrue(self.owed.use("s"))
        self.assertTrue(self.owed.use("s"))
        self.assertFalse(self.owed.use("s"))

    def test_expiry(self):
        self.owed.grant("s")
        self.clock.advance(5.1)
        self.assertNotIn("s", self.owed)
        self.assertFalse(self.owed.use("s"))
        self.assertEqual(self.dropped, ["s"])

    def test_oldest_evicted_past_cap(self):
        self.owed.grant("a")
        self.owed.grant("b")
        self.owed.grant("c")
        self.assertEqual(self.owed.subjects(), ["b", "c"])
        self.assertEqual(self.dropped, ["a"])

    def test_clear(self):
        self.owed.grant("a")
        self.owed.grant("b")
        self.assertEqual(self.owed.clear(), ["a", "b"])
        self.assertEqual(len(self.owed), 0)
        self.assertEqual(self.dropped, ["a", "b"])
