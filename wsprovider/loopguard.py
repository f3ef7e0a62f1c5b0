"""Loop protection for client links: reply depth, an answer rate guard, echo recognition.

A link's handlers may answer what the remote server sends, and the server may answer (or
just echo) that, and so on: ``wsprovider.handlers:echo`` against an echo server bounces
one message forever at line rate. Three signals cut such loops (docs/client-mode.rst,
"Loops"):

* **reply depth** (``hops``): a message the link delivers carries the depth it had on the
  wire (envelope frames carry ``hops``; absent means 0); what a handler sends in answer to
  it carries one more. Past ``MAX_REPLY_HOPS`` the answer is not sent: ``LoopDetected``.
* **echo recognition** (raw wire, which has no ``hops``): the link remembers the bodies of
  its recent answers; a frame from the server with the same body is taken as the echo of
  that answer and inherits its depth.
* **answer rate guard**, for whatever the two above miss (a server that transforms what it
  echoes): at most ``MAX_ANSWERS_PER_SEC`` answers per second per link (a token bucket with
  one second of burst); past it, answers fail with ``LoopDetected``.

Every cut is logged as a warning that says why and which setting to change (at most one
warning per ``WARN_EVERY_SEC`` per link), and counted (``loops_cut`` in list_sessions()).

``EchoFilter`` is the other direction's guard: a message the link just published on the
lattice from the server must not go back to it through ``OUTBOUND_SUBJECTS``. It works by
message identity (subject, reply_to, body), not object identity, so it also holds when the
lattice hands back a copy (NATS).

Sans-IO: the only outside thing touched is an ``IReactorTime``.
"""

from __future__ import annotations

import collections

from twisted.logger import Logger

from .message import MessagingError
from .ratelimit import TokenBucket

WARN_EVERY_SEC = 10.0
_RECENT_ANSWERS = 64


class LoopDetected(MessagingError):
    """A message was not sent because it would keep a loop with the remote server going."""

    code = "loop_detected"


def fingerprint(msg) -> tuple:
    return (msg.subject, msg.reply_to, len(msg.body), hash(msg.body))


class LoopGuard:
    """One link's loop signals. ``check`` before sending; ``sent_answer`` / ``depth_of_echo``
    for the raw wire's echo recognition."""

    def __init__(self, clock, name: str, max_hops: int, max_answers_per_sec: float, log: Logger | None = None):
        self.log = log if log is not None else Logger()
        self._clock = clock
        self._name = name
        self.max_hops = max_hops
        self.max_answers_per_sec = max_answers_per_sec
        self._bucket = (TokenBucket(max_answers_per_sec, max_answers_per_sec, clock.seconds())
                        if max_answers_per_sec else None)
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._warned_at = None
        self.cut = 0

    def check(self, msg, hops: int, answer: bool) -> LoopDetected | None:
        """None if ``msg`` (at reply depth ``hops``; ``answer``: it answers the server) may go."""
        if self.max_hops and hops > self.max_hops:
            return self._refuse(
                f"{self._name}: not sending to {msg.subject!r}: it would be answer number {hops} "
                f"in a chain of answers with the remote server (MAX_REPLY_HOPS={self.max_hops}). This is "
                "usually a loop between a handler that answers every message (such as wsprovider.handlers:echo) "
                "and a server that echoes; watch the traffic with wsprovider.handlers:log, or raise MAX_REPLY_HOPS")
        if answer and self._bucket is not None and not self._bucket.take(1, self._clock.seconds()):
            return self._refuse(
                f"{self._name}: not sending to {msg.subject!r}: handlers answer the remote server "
                f"more than MAX_ANSWERS_PER_SEC={self.max_answers_per_sec:g} times a second. This is usually a "
                "loop between a handler that answers every message (such as wsprovider.handlers:echo) and a "
                "server that answers or echoes it (the raw wire carries no reply depth to tell); watch the "
                "traffic with wsprovider.handlers:log, or raise MAX_ANSWERS_PER_SEC (0: no limit)")
        return None

    def _refuse(self, text: str) -> LoopDetected:
        self.cut += 1
        now = self._clock.seconds()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_SEC:
            self._warned_at = now
            self.log.warn("{text} (loop cut; {n} message(s) not sent on this link so far)", text=text, n=self.cut)
        return LoopDetected(text)

    # raw wire: recognise the server's echo of our own answers

    def sent_answer(self, body: bytes, hops: int) -> None:
        recent = self._recent
        key = (len(body), hash(body))
        recent[key] = hops
        recent.move_to_end(key)
        while len(recent) > _RECENT_ANSWERS:
            recent.popitem(last=False)

    def depth_of_echo(self, body: bytes) -> int:
        """The reply depth of a raw frame: that of our answer it echoes, else 0."""
        return self._recent.pop((len(body), hash(body)), 0) if self._recent else 0


class EchoFilter:
    """Messages the link published on the lattice that may come back to it (bounded, expiring)."""

    def __init__(self, clock, ttl: float = 10.0, max_entries: int = 4096):
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._seen: collections.OrderedDict = collections.OrderedDict()   # fingerprint -> [copies, deadline]

    def __len__(self):
        return len(self._seen)

    def expect(self, msg, copies: int) -> None:
        """``msg`` was published and may come back ``copies`` times."""
        if copies <= 0:
            return
        key = fingerprint(msg)
        deadline = self._clock.seconds() + self._ttl
        entry = self._seen.get(key)
        if entry is not None:
            entry[0] += copies
            entry[1] = deadline
            self._seen.move_to_end(key)
            return
        self._seen[key] = [copies, deadline]
        if len(self._seen) > self._max:
            self._expire()
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)

    def is_echo(self, msg) -> bool:
        """True (and one expected copy spent) if ``msg`` is one of those coming back."""
        if not self._seen:
            return False
        key = fingerprint(msg)
        entry = self._seen.get(key)
        if entry is None:
            return False
        if entry[1] < self._clock.seconds():
            del self._seen[key]
            return False
        entry[0] -= 1
        if entry[0] <= 0:
            del self._seen[key]
        return True

    def _expire(self):
        now = self._clock.seconds()
        for key in [k for k, (_, deadline) in self._seen.items() if deadline < now]:
            del self._seen[key]
