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

from ..interfaces import (IAcknowledgedPublish, IExactBroadcastCount, ILattice, ISubscription,
                          ISynchronousDispatch)
from ..message import BrokerMessage, MessagingError, NoResponders, NotConnected, RequestTimeout
from ..subjects import check_pattern, check_subject, is_wildcard, matches

_MAX_SYNC_DEPTH = 16
_CACHE_LIMIT = 10000


@implementer(ISubscription)
class LocalSubscription:
    __slots__ = ("pattern", "callback", "queue", "_lattice", "active", "first_wild", "__weakref__")

    def __init__(self, lattice, pattern, callback, queue):
        self._lattice = lattice
        self.pattern = pattern
        self.callback = callback
        self.queue = queue
        self.active = True
        self.first_wild = pattern.split(".", 1)[0] in ("*", ">")

    def unsubscribe(self):
        if self.active:
            self.active = False
            self._lattice._remove(self)
        return defer.succeed(None)


class _PendingRequest:
    __slots__ = ("deferred", "timer", "subject")

    def __init__(self, deferred, timer, subject):
        self.deferred = deferred
        self.timer = timer
        self.subject = subject


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
        self._exact: dict[str, list[LocalSubscription]] = {}
        self._wild: list[LocalSubscription] = []
        # "<literal prefix>.>" patterns (every session's "<address>.>"), by prefix, so that
        # matching costs a few dict lookups instead of a scan over all sessions.
        self._tails: dict[str, list[LocalSubscription]] = {}
        self._cache: dict[str, tuple] = {}
        self._inbox_prefix = f"{inbox_prefix}.{secrets.token_hex(8)}."
        self._inbox_ids = itertools.count(1)
        self._pending: dict[str, _PendingRequest] = {}
        self._depth = 0
        self._rr = itertools.count()
        self.connected = True

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        # on_status is never called: no responders is publish's failure here (ILattice).
        if not self.connected:
            return defer.fail(NotConnected("the lattice is shut down"))
        check_pattern(pattern)
        sub = LocalSubscription(self, pattern, callback, queue)
        if is_wildcard(pattern):
            prefix = _tail_prefix(pattern)
            if prefix is not None:
                self._tails.setdefault(prefix, []).append(sub)
            else:
                self._wild.append(sub)
        else:
            self._exact.setdefault(pattern, []).append(sub)
        self._cache.clear()
        return defer.succeed(sub)

    def _remove(self, sub):
        if is_wildcard(sub.pattern):
            prefix = _tail_prefix(sub.pattern)
            if prefix is not None:
                _discard(self._tails, prefix, sub)
            else:
                try:
                    self._wild.remove(sub)
                except ValueError:
                    pass
        else:
            _discard(self._exact, sub.pattern, sub)
        self._cache.clear()

    def _match(self, subject: str) -> tuple:
        found = self._cache.get(subject)
        if found is not None:
            return found
        result = list(self._exact.get(subject, ()))
        tails = self._tails
        if tails:
            i = subject.find(".")
            while i != -1:
                subs = tails.get(subject[:i])
                if subs:
                    result.extend(subs)
                i = subject.find(".", i + 1)
        if self._wild:
            private = subject[0] in "_$"
            for sub in self._wild:
                if private and sub.first_wild:
                    continue
                if matches(sub.pattern, subject):
                    result.append(sub)
        found = tuple(result)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[subject] = found
        return found

    def has_subscribers(self, subject: str) -> bool:
        return bool(self._match(subject)) or subject in self._pending

    # -- publishing -------------------------------------------------------------------

    def publish(self, msg: BrokerMessage):
        d = self.dispatch(msg)
        return defer.succeed(None) if d is None else d

    def dispatch(self, msg: BrokerMessage):
        """``publish`` for hot paths: None when every receiver took the message synchronously
        and without error (no Deferred is made), else the Deferred ``publish`` returns."""
        subject = msg.subject
        if not self.connected:
            return defer.fail(NotConnected("the lattice is shut down; the message was not sent"))
        if self._pending:
            pending = self._pending.pop(subject, None)
            if pending is not None:
                pending.timer.cancel()
                pending.deferred.callback(msg)
                return None
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
            if sub.active and sub.queue is None:  # the common case, without the general loop
                self._depth += 1
                try:
                    result = sub.callback(msg)
                except Exception:
                    return defer.fail(_as_messaging_error(Failure()))
                finally:
                    self._depth -= 1
                if isinstance(result, defer.Deferred):
                    if result.called and not result.paused and not isinstance(result.result, Failure):
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
                if isinstance(result, defer.Deferred):
                    waiting = (waiting or []) + [result]
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
        inbox = self.new_inbox()
        if not self._match(subject):
            return defer.fail(NoResponders(f"no responders for subject {subject!r}"))

        def cancel(d):
            p = self._pending.pop(inbox, None)
            if p is not None and p.timer.active():
                p.timer.cancel()

        d = defer.Deferred(cancel)

        def expire():
            if self._pending.pop(inbox, None) is not None:
                d.errback(RequestTimeout(f"request timed out after {timeout_ms}ms (subject {subject!r})"))

        timer = self._reactor.callLater(timeout_ms / 1000.0, expire)
        self._pending[inbox] = _PendingRequest(d, timer, subject)
        sent = self.publish(BrokerMessage(subject, body, inbox))

        def not_delivered(failure):
            p = self._pending.pop(inbox, None)
            if p is not None:
                p.timer.cancel()
                p.deferred.errback(failure)

        sent.addErrback(not_delivered)
        return d

    def fail_reply(self, reply_to: str, error: MessagingError) -> bool:
        """Fail the pending request waiting on ``reply_to`` (e.g. its responder left)."""
        p = self._pending.pop(reply_to, None)
        if p is None:
            return False
        p.timer.cancel()
        p.deferred.errback(error)
        return True

    def close(self):
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.timer.cancel()
            p.deferred.errback(NotConnected("the lattice was shut down before a reply arrived"))
        self.connected = False
        self._exact, self._wild, self._tails = {}, [], {}  # nothing is delivered after close
        self._cache.clear()
        return defer.succeed(None)


def _tail_prefix(pattern: str):
    """``"a.b"`` for ``"a.b.>"`` (a literal prefix and a final ``>``), else None."""
    if pattern.endswith(".>"):
        prefix = pattern[:-2]
        if not is_wildcard(prefix):
            return prefix
    return None


def _discard(index: dict, key: str, sub) -> None:
    subs = index.get(key)
    if subs is not None:
        try:
            subs.remove(sub)
        except ValueError:
            pass
        if not subs:
            del index[key]


def _none(_):
    return None


def _messaging_failure(failure):
    return Failure(_as_messaging_error(failure))


def _as_messaging_error(failure: Failure) -> MessagingError:
    if isinstance(failure.value, MessagingError):
        return failure.value
    return MessagingError(f"handler failed: {failure.getErrorMessage()}", code="handler_error")
