"""The one request/reply primitive: requests waiting for a reply, and replies owed.

Every place that sends a request and waits (server sessions, the lattices, the NATS
client, client links) keeps the same bookkeeping: a table from reply key to a Deferred,
a timer per entry, cancellation, a cap, and "the owner is gone, fail what it waits
for". ``PendingReplies`` is that table, written once; ``OwedReplies`` is the other side:
the bounded, expiring, one-time permissions to answer a reply subject (NATS
``allow_responses``).

Sans-IO: the only outside thing either touches is an ``IReactorTime`` (a
``task.Clock`` in tests).
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterator

from twisted.internet import defer

from .message import MessagingError, NotConnected, RequestTimeout


class TooManyRequests(MessagingError):
    """A cap on requests waiting for a reply is reached: the request was not sent."""

    code = "too_many_requests"


class Pending:
    """One request waiting: its Deferred, its timer, who made it, and caller data."""

    __slots__ = ("key", "deferred", "timer", "owner", "label", "data")

    def __init__(self, key, deferred, timer, owner, label, data):
        self.key = key
        self.deferred = deferred
        self.timer = timer
        self.owner = owner
        self.label = label
        self.data = data


def _default_timeout_error(entry: Pending, timeout: float) -> MessagingError:
    return RequestTimeout(f"request timed out after {round(timeout * 1000)}ms "
                          f"(subject {entry.label!r}); is the responder running and fast enough?")


class PendingReplies:
    """Requests waiting for a reply, by key (a reply subject, a token, a frame id).

    :param clock: an ``IReactorTime``.
    :param max_pending: cap on entries in the whole table (0 or None: no cap).
    :param max_per_owner: cap on entries of one owner (0 or None: no cap).
    :param timeout_error: ``f(entry, timeout_seconds) -> Exception`` for expired entries.

    An entry leaves the table exactly once: resolved, failed, timed out, cancelled (the
    Deferred's ``cancel()``), released with its owner, or closed with the table. Its
    timer is cancelled whichever way it leaves.
    """

    def __init__(self, clock, max_pending: int | None = None, max_per_owner: int | None = None,
                 timeout_error: Callable[[Pending, float], Exception] = _default_timeout_error):
        self._clock = clock
        self.max_pending = max_pending or 0
        self.max_per_owner = max_per_owner or 0
        self._timeout_error = timeout_error
        self._entries: dict[Hashable, Pending] = {}
        self._per_owner: dict[Hashable, set] = {}
        self.timed_out = 0     # counters, read by metrics
        self.refused = 0

    # -- queries ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._entries.values()))

    def get(self, key) -> Pending | None:
        return self._entries.get(key)

    def owned_by(self, owner) -> int:
        keys = self._per_owner.get(owner)
        return len(keys) if keys else 0

    def refusal(self, owner=None) -> TooManyRequests | None:
        """The error ``add`` would raise for ``owner`` right now, or None."""
        if self.max_pending and len(self._entries) >= self.max_pending:
            return TooManyRequests(f"{len(self._entries)} requests are already waiting for a reply "
                                   f"here (limit {self.max_pending}); retry when some have finished")
        if owner is not None and self.max_per_owner and self.owned_by(owner) >= self.max_per_owner:
            return TooManyRequests(f"{self.owned_by(owner)} of your requests are already waiting for "
                                   f"a reply (limit {self.max_per_owner}); wait for one to finish")
        return None

    # -- changes ---------------------------------------------------------------------

    def add(self, key, timeout: float, owner=None, label: str | None = None, data=None) -> defer.Deferred:
        """Wait for the reply to ``key`` for up to ``timeout`` seconds.

        :raises TooManyRequests: a cap is reached (nothing is added).
        :raises ValueError: ``key`` is already waiting (keys must be unique).
        :return: a Deferred firing with what ``resolve`` is given; cancelling it removes
            the entry.
        """
        refusal = self.refusal(owner)
        if refusal is not None:
            self.refused += 1
            raise refusal
        if key in self._entries:
            raise ValueError(f"a request is already waiting on {key!r}")
        d = defer.Deferred(lambda _: self._remove(key))
        entry = Pending(key, d, None, owner, label if label is not None else str(key), data)
        entry.timer = self._clock.callLater(timeout, self._expire, key, timeout)
        self._entries[key] = entry
        if owner is not None:
            self._per_owner.setdefault(owner, set()).add(key)
        return d

    def take(self, key) -> Pending | None:
        """Remove and return the entry for ``key`` (timer cancelled) without firing it."""
        return self._remove(key)

    def resolve(self, key, value) -> bool:
        entry = self._remove(key)
        if entry is None:
            return False
        entry.deferred.callback(value)
        return True

    def fail(self, key, error: Exception) -> bool:
        entry = self._remove(key)
        if entry is None:
            return False
        entry.deferred.errback(error)
        return True

    def release(self, owner, error: Exception | None = None) -> int:
        """Fail every entry of ``owner`` (it is gone); returns how many there were."""
        keys = self._per_owner.pop(owner, None)
        if not keys:
            return 0
        count = 0
        for key in list(keys):
            entry = self._entries.pop(key, None)
            if entry is None:
                continue
            self._stop_timer(entry)
            count += 1
            entry.deferred.errback(error if error is not None else
                                   NotConnected(f"the requester ({owner}) went away"))
        return count

    def close(self, error: Exception | None = None) -> int:
        """Fail every entry (the owner of the whole table shuts down)."""
        entries, self._entries = self._entries, {}
        self._per_owner = {}
        for entry in entries.values():
            self._stop_timer(entry)
            entry.deferred.errback(error if error is not None else
                                   NotConnected("shut down before a reply arrived"))
        return len(entries)

    # -- internals -------------------------------------------------------------------

    def _remove(self, key) -> Pending | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._stop_timer(entry)
        if entry.owner is not None:
            keys = self._per_owner.get(entry.owner)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._per_owner[entry.owner]
        return entry

    @staticmethod
    def _stop_timer(entry: Pending) -> None:
        timer = entry.timer
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, key, timeout):
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.timer = None  # it is running now
        self._remove(key)
        self.timed_out += 1
        entry.deferred.errback(self._timeout_error(entry, timeout))


class OwedReplies:
    """One-time permissions to answer reply subjects, bounded in number and in time.

    A session that receives a message with a ``reply_to`` outside what it may publish to
    may still answer it, once, within ``ttl`` seconds (NATS ``allow_responses``).
    Granting the same subject again adds one more answer. Past ``max_entries`` the
    oldest grant is dropped. ``on_drop(subject)`` is called whenever a subject's last
    permission goes (used, expired, evicted or cleared), e.g. to release a subscription.
    """

    def __init__(self, clock, max_entries: int, ttl: float,
                 on_drop: Callable[[str], None] | None = None):
        self._clock = clock
        self.max_entries = max_entries
        self.ttl = ttl
        self._on_drop = on_drop
        self._owed: dict[str, list] = {}   # subject -> [count, deadline]; insertion order = age

    def __len__(self) -> int:
        return len(self._owed)

    def __contains__(self, subject) -> bool:
        entry = self._owed.get(subject)
        if entry is None:
            return False
        if entry[1] < self._clock.seconds():
            self._drop(subject)
            return False
        return True

    def subjects(self) -> list:
        return list(self._owed)

    def grant(self, subject: str) -> bool:
        """Allow one more answer to ``subject``; True if the subject is new."""
        deadline = self._clock.seconds() + self.ttl
        entry = self._owed.get(subject)
        if entry is not None:
            entry[0] += 1
            entry[1] = deadline
            return False
        if len(self._owed) >= self.max_entries:
            self._evict()
        self._owed[subject] = [1, deadline]
        return True

    def use(self, subject: str) -> bool:
        """Spend one permission for ``subject``; False when there is none (left)."""
        if subject not in self:
            return False
        entry = self._owed[subject]
        entry[0] -= 1
        if entry[0] <= 0:
            self._drop(subject)
        return True

    def clear(self) -> list:
        """Drop every permission; returns the subjects that were owed."""
        subjects = list(self._owed)
        for subject in subjects:
            self._drop(subject)
        return subjects

    def _evict(self) -> None:
        now = self._clock.seconds()
        for subject in [s for s, (_, deadline) in self._owed.items() if deadline < now]:
            self._drop(subject)
        while len(self._owed) >= self.max_entries:
            self._drop(next(iter(self._owed)))

    def _drop(self, subject: str) -> None:
        if self._owed.pop(subject, None) is not None and self._on_drop is not None:
            self._on_drop(subject)
