"""A link's outbound buffer: bounded in bytes, ordered, flushed when the link can write.

While a client link is down, or connected to a server that reads more slowly than
components write (the link is the transport's push producer), what components send waits
here, up to ``OFFLINE_BUFFER_BYTES``; past that, sending fails with ``BufferFull`` and
nothing already accepted is dropped. Sans-IO: the buffer only holds ``Outgoing`` items;
the link writes them.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator


class Outgoing:
    """One message waiting to go out: the message, its reply depth, and the request it
    belongs to (a ``PendingReplies`` key), if any."""

    __slots__ = ("msg", "hops", "request", "size")

    def __init__(self, msg, hops: int = 0, request=None):
        self.msg = msg
        self.hops = hops
        self.request = request
        self.size = len(msg.body) + len(msg.subject) + (len(msg.reply_to) if msg.reply_to else 0)


class OutboundBuffer:
    """FIFO of ``Outgoing`` items, at most ``limit`` bytes (body + subject + reply_to)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self._items: collections.deque[Outgoing] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Outgoing]:
        return iter(list(self._items))

    def fits(self, item: Outgoing) -> bool:
        return self.bytes + item.size <= self.limit

    def add(self, item: Outgoing) -> bool:
        """Keep ``item``; False (and nothing kept) when it does not fit."""
        if not self.fits(item):
            return False
        self._items.append(item)
        self.bytes += item.size
        return True

    def remove(self, item: Outgoing) -> bool:
        try:
            self._items.remove(item)
        except ValueError:
            return False
        self.bytes -= item.size
        return True

    def flush(self, writable: Callable[[], bool], write: Callable[[Outgoing], None]) -> int:
        """Write items in order while ``writable()``; returns how many were written."""
        items = self._items
        written = 0
        while items and writable():
            item = items.popleft()
            self.bytes -= item.size
            write(item)
            written += 1
        return written

    def clear(self) -> list:
        """Empty the buffer; returns what was in it, oldest first."""
        items, self._items = list(self._items), collections.deque()
        self.bytes = 0
        return items
