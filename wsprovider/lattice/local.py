"""The embedded lattice: an in-process subject router with NATS wildcard semantics.

Components are Python objects in the same reactor. Delivery is synchronous (a handler
runs inside ``publish``) because that is the cheapest path and keeps order; a nesting
guard moves delivery to the next reactor turn when handlers publish to each other in a
chain, so two handlers that answer each other cannot overflow the stack.

One rule differs from plain NATS, borrowed from MQTT (spec 4.7.2): a subscription whose
*first* token is a wildcard does not match subjects whose first token starts with ``_``
or ``$``. Session addresses (``_ws.session.<id>``) and request inboxes (``_INBOX.*``) are
therefore not seen by a handler subscribed to ``>``; a handler that wants them names the
first token (``_ws.>``).
"""

from __future__ import annotations

import itertools
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._defer import is_deferred, result_if_succeeded
from ..interfaces import (IAcknowledgedPublish, IExactBroadcastCount, ILattice, ISubscription,
                          ISynchronousDispatch)
from ..message import BrokerMessage, MessagingError, NoResponders, NotConnected, RequestTimeout
from ..replies import PendingReplies
from ..subjects import SubjectTrie, check_pattern, check_queue, check_subject

_MAX_SYNC_DEPTH = 16
_CACHE_LIMIT = 4096
_NOT_YET = object()


@implementer(ISubscription)
class LocalSubscription:
    __slots__ = ("pattern", "callback", "queue", "_lattice", "active", "__weakref__")

    def __init__(self, lattice, pattern, callback, queue):
        self._lattice = lattice
        self.pattern = pattern
        self.callback = callback
        self.queue = queue
        self.active = True

    def unsubscribe(self):
        if self.active:
            self.active = False
            self._lattice._remove(self)
        return defer.succeed(None)


@implementer(ILattice, ISynchronousDispatch, IExactBroadcastCount, IAcknowledgedPublish)
class LocalLattice:
    """In-process subject bus.

    :param strict: when True (the default), publishing to a subject nobody subscribes
        to fails with ``NoResponders`` instead of vanishing, so a WebSocket peer learns
        that its message reached no one.
    """

    log = Logger()
    name = "local"

    def __init__(self, reactor=None, strict: bool = True, inbox_prefix: str = "_INBOX"):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.strict = strict
        self._subs = SubjectTrie(_CACHE_LIMIT, private_first="_$")
        self._inbox_prefix = f"{inbox_prefix}.{secrets.token_hex(8)}."
        self._inbox_ids = itertools.count(1)
        self._pending = PendingReplies(reactor, timeout_error=_timeout_error)
        self._depth = 0
        self._rr = itertools.count()
        self.connected = True

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        """``ILattice.subscribe``. The embedded lattice reports no responders through
        ``publish``'s failure, so ``on_status`` is never called."""
        if not self.connected:
            return defer.fail(NotConnected("the lattice is shut down"))
        check_pattern(pattern)
        if queue is not None:
            check_queue(queue)
        sub = LocalSubscription(self, pattern, callback, queue)
        self._subs.insert(pattern, sub)
        return defer.succeed(sub)

    def _remove(self, sub):
        self._subs.remove(sub.pattern, sub)

    def _match(self, subject: str) -> tuple:
        return self._subs.match(subject)

    def has_subscribers(self, subject: str) -> bool:
        return bool(self._match(subject)) or subject in self._pending

    # -- publishing -------------------------------------------------------------------

    def publish(self, msg: BrokerMessage):
        d = self.dispatch(msg)
        return defer.succeed(None) if d is None else d

    def dispatch(self, msg: BrokerMessage, subs=None):
        """``publish`` for hot paths: None when every receiver took the message synchronously
        and without error (no Deferred is made), else the Deferred ``publish`` returns.

        ``subs``: what ``_match(msg.subject)`` gave a caller that matched the subject just
        before (the local-first lattice does, to decide), so it is not matched twice."""
        subject = msg.subject
        if not self.connected:
            return defer.fail(NotConnected("the lattice is shut down; the message was not sent"))
        pending = self._pending
        if len(pending) and pending.resolve(subject, msg):
            return None
        if subs is None:
            subs = self._match(subject)
        if not subs:
            if self.strict:
                return defer.fail(NoResponders(f"no subscriber for subject {subject!r}: the message was not delivered"))
            return None
        if self._depth >= _MAX_SYNC_DEPTH:
            d = defer.Deferred()
            self._reactor.callLater(0, lambda: self._deliver_deferred(msg, subs).chainDeferred(d))
            return d
        if len(subs) == 1:
            sub = subs[0]
            if sub.active:  # the common case (one receiver, in a queue group or not), without the loop
                self._depth += 1
                try:
                    result = sub.callback(msg)
                except Exception:
                    return defer.fail(_as_messaging_error(Failure()))
                finally:
                    self._depth -= 1
                if result is not None and is_deferred(result):
                    if result_if_succeeded(result, _NOT_YET) is not _NOT_YET:
                        return None  # already done
                    return result.addCallbacks(_none, _messaging_failure)
                return None
        return self._deliver(msg, subs)

    def _deliver_deferred(self, msg, subs):
        d = self._deliver(msg, subs)
        return defer.succeed(None) if d is None else d

    def _deliver(self, msg, subs):
        self._depth += 1
        try:
            waiting = None
            errors = None
            for sub in self._receivers(subs):
                try:
                    result = sub.callback(msg)
                except Exception:
                    errors = (errors or []) + [Failure()]
                    continue
                if result is not None and is_deferred(result) and result_if_succeeded(result, _NOT_YET) is _NOT_YET:
                    waiting = (waiting or []) + [result]  # (one already done needs no waiting)
        finally:
            self._depth -= 1
        if errors:
            for f in errors[1:]:
                self._log_handler_failure(msg, f)
            if waiting:
                for d in waiting:
                    d.addErrback(self._log_handler_failure_cb, msg)
            return defer.fail(_as_messaging_error(errors[0]))
        if waiting:
            if len(waiting) == 1:
                return waiting[0].addCallbacks(_none, _messaging_failure)
            return defer.gatherResults(waiting, consumeErrors=True).addCallbacks(
                _none, lambda f: Failure(_as_messaging_error(f.value.subFailure)))
        return None

    def _receivers(self, subs):
        """The active subscriptions that get this message: all plain ones, one per queue group."""
        groups = None
        for sub in subs:
            if not sub.active:
                continue
            if sub.queue is None:
                yield sub
            else:
                if groups is None:
                    groups = {}
                groups.setdefault(sub.queue, []).append(sub)
        if groups:
            for members in groups.values():
                yield members[next(self._rr) % len(members)]

    def _log_handler_failure_cb(self, failure, msg):
        self._log_handler_failure(msg, failure)

    def _log_handler_failure(self, msg, failure):
        self.log.warn("messaging handler returned an error for {subject}: {error}",
                      subject=msg.subject, error=failure.getErrorMessage())

    # -- request/reply ----------------------------------------------------------------

    def new_inbox(self) -> str:
        return self._inbox_prefix + str(next(self._inbox_ids))

    def request(self, subject, body, timeout_ms):
        check_subject(subject)
        if not self.connected:
            return defer.fail(NotConnected("the lattice is shut down; the request was not sent"))
        if not self._match(subject):
            return defer.fail(NoResponders(f"no responders for subject {subject!r}"))
        inbox = self.new_inbox()
        d = self._pending.add(inbox, timeout_ms / 1000.0, label=subject)
        sent = self.publish(BrokerMessage(subject, body, inbox))
        sent.addErrback(lambda failure: self._pending.fail(inbox, failure) and None)
        return d

    def fail_reply(self, reply_to: str, error: MessagingError) -> bool:
        """Fail the pending request waiting on ``reply_to`` (e.g. its responder left)."""
        return self._pending.fail(reply_to, error)

    def close(self):
        self._pending.close(NotConnected("the lattice was shut down before a reply arrived"))
        self.connected = False
        self._subs = SubjectTrie(_CACHE_LIMIT, private_first="_$")  # nothing is delivered after close
        return defer.succeed(None)


def _timeout_error(entry, timeout):
    return RequestTimeout(f"request timed out after {round(timeout * 1000)}ms (subject {entry.label!r})")


def _none(_):
    return None


def _messaging_failure(failure):
    return Failure(_as_messaging_error(failure))


def _as_messaging_error(failure: Failure) -> MessagingError:
    if isinstance(failure.value, MessagingError):
        return failure.value
    return MessagingError(f"handler failed: {failure.getErrorMessage()}", code="handler_error")
