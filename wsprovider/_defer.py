"""Small Deferred helpers shared by the modules."""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure


def mirror(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred with ``d``'s result, leaving ``d``'s own result untouched.

    For a "ready" Deferred that many callers may wait on, each with its own callbacks.
    """
    out = defer.Deferred()

    def relay(result):
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    d.addBoth(relay)
    return out


_NOT_YET = object()
_Deferred = defer.Deferred


def is_deferred(value) -> bool:
    """``isinstance(value, Deferred)``, with the exact type tested first: Deferred is
    generic over ``Awaitable``, so ``isinstance`` goes through ``ABCMeta`` (1% of a
    small-message echo, asked once per handler result)."""
    return type(value) is _Deferred or isinstance(value, _Deferred)


def result_if_succeeded(d: defer.Deferred, default=_NOT_YET):
    """``d``'s result if it has already fired with success, else ``default``.

    The one place that peeks at ``Deferred.result``: a hot path (a synchronous local
    delivery, an already-live subscription) may skip a callback round trip when the
    answer is already there. A failure is left in ``d`` for its errbacks; a paused or
    chained Deferred counts as not fired.
    """
    if d.called and not d.paused and not isinstance(d.result, Failure):
        return d.result
    return default if default is not _NOT_YET else None


def failure_if_failed(d: defer.Deferred):
    """The ``Failure`` ``d`` has already fired with, or None (see ``result_if_succeeded``)."""
    if d.called and not d.paused and isinstance(d.result, Failure):
        return d.result
    return None


class Outcome:
    """The result of a Deferred, to be read any number of times.

    ``observe()`` returns a new Deferred with the result (now, or when it comes). The
    source's failure is taken over (each observer gets it), so a start-up failure that
    several parties wait for is reported by them, not as "Unhandled error in Deferred".
    """

    def __init__(self, d: defer.Deferred):
        self._result = _NOT_YET
        self._waiters = []
        d.addBoth(self._fired)

    @property
    def done(self) -> bool:
        return self._result is not _NOT_YET

    @property
    def succeeded(self) -> bool:
        return self.done and not isinstance(self._result, Failure)

    def _fired(self, result):
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)
        return None

    def _fire(self, waiter):
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def observe(self) -> defer.Deferred:
        waiter = defer.Deferred()
        if self._result is _NOT_YET:
            self._waiters.append(waiter)
        else:
            self._fire(waiter)
        return waiter
