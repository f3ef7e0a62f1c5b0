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
