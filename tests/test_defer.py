"""wsprovider._defer: the small Deferred helpers the hot paths lean on."""

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from wsprovider._defer import is_deferred, result_if_succeeded


class IsDeferredTests(unittest.TestCase):
    def test_deferreds_and_their_subclasses(self):
        self.assertTrue(is_deferred(defer.Deferred()))
        self.assertTrue(is_deferred(defer.succeed(None)))
        self.assertTrue(is_deferred(defer.DeferredList([])))

    def test_other_values(self):
        for value in (None, 0, b"", "d", object(), Failure(ValueError("x")), defer.Deferred):
            self.assertFalse(is_deferred(value), value)


class ResultIfSucceededTests(unittest.TestCase):
    def test_fired_with_success(self):
        self.assertEqual(result_if_succeeded(defer.succeed(3), "no"), 3)

    def test_not_fired_paused_or_failed_give_the_default(self):
        self.assertEqual(result_if_succeeded(defer.Deferred(), "no"), "no")
        paused = defer.succeed(1)
        paused.pause()
        self.assertEqual(result_if_succeeded(paused, "no"), "no")
        failed = defer.fail(ValueError("x"))
        self.assertEqual(result_if_succeeded(failed, "no"), "no")
        self.failureResultOf(failed, ValueError)  # the failure is left for its errbacks
