"""NATS subject rules: validation, wildcard matching, and allow/deny permissions.

A subject is dot-separated tokens, no whitespace, no empty token. In a pattern ``*``
matches exactly one token and ``>`` (last token only) one or more tokens. The same
semantics serve the in-process lattice and the peer permissions, so a pattern means the
same thing whether the bus is local or NATS.
"""

from __future__ import annotations

import re
from typing import Iterable

_BAD_CHARS = re.compile(r"[\s]")

MAX_SUBJECT_LENGTH = 1024


class SubjectError(ValueError):
    """A subject or pattern is malformed."""


def check_subject(subject: str, *, what: str = "subject") -> str:
    """Return ``subject`` if it is a valid literal subject (no wildcards), else raise."""
    _check(subject, what)
    for token in subject.split("."):
        if token in ("*", ">"):
            raise SubjectError(f"{what} {subject!r} contains a wildcard; wildcards are only allowed in subscriptions")
    return subject


def check_pattern(pattern: str, *, what: str = "subject pattern") -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise."""
    _check(pattern, what)
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i != len(tokens) - 1:
            raise SubjectError(f"{what} {pattern!r}: '>' may only be the last token")
        if len(token) > 1 and ("*" in token or ">" in token):
            raise SubjectError(f"{what} {pattern!r}: a wildcard must be a whole token (like 'a.*.c')")
    return pattern


def _check(subject: str, what: str) -> None:
    if not isinstance(subject, str) or not subject:
        raise SubjectError(f"{what} must be a non-empty string")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise SubjectError(f"{what} is longer than {MAX_SUBJECT_LENGTH} characters")
    if not subject.isascii():
        try:
            subject.encode("utf-8")
        except UnicodeEncodeError:
            raise SubjectError(f"{what} {subject.encode('utf-8', 'backslashreplace').decode('ascii')!r} "
                               "holds a lone surrogate, which is not UTF-8 text") from None
    if _BAD_CHARS.search(subject):
        raise SubjectError(f"{what} {subject!r} contains whitespace")
    if subject.startswith(".") or subject.endswith(".") or ".." in subject:
        raise SubjectError(f"{what} {subject!r} has an empty token")


def check_queue(queue: str, *, what: str = "queue") -> str:
    """Return ``queue`` if it is a valid queue group name (a literal subject, as NATS requires)."""
    return check_subject(queue, what=what)


def is_wildcard(pattern: str) -> bool:
    return "*" in pattern or ">" in pattern


def matches(pattern: str, subject: str) -> bool:
    """True if literal ``subject`` matches ``pattern``."""
    if pattern == subject:
        return True
    ptoks = pattern.split(".")
    stoks = subject.split(".")
    for i, p in enumerate(ptoks):
        if p == ">":
            return len(stoks) > i
        if i >= len(stoks):
            return False
        if p != "*" and p != stoks[i]:
            return False
    return len(ptoks) == len(stoks)


def pattern_covers(outer: str, inner: str) -> bool:
    """True if every subject matched by pattern ``inner`` is matched by ``outer``."""
    otoks = outer.split(".")
    itoks = inner.split(".")
    for i, o in enumerate(otoks):
        if o == ">":
            return len(itoks) > i
        if i >= len(itoks):
            return False
        t = itoks[i]
        if t == ">":
            return False
        if o == "*":
            continue
        if t == "*" or o != t:
            return False
    return len(otoks) == len(itoks)


def patterns_overlap(a: str, b: str) -> bool:
    """True if some literal subject matches both patterns."""
    at = a.split(".")
    bt = b.split(".")
    for i in range(max(len(at), len(bt))):
        x = at[i] if i < len(at) else None
        y = bt[i] if i < len(bt) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != "*" and y != "*" and x != y:
            return False
    return True


class Permissions:
    """NATS-style allow/deny lists for one direction (publish or subscribe).

    A subject is permitted when it matches some ``allow`` pattern and no ``deny``
    pattern. For subscriptions, a pattern is permitted when an ``allow`` pattern covers
    it and no ``deny`` pattern overlaps it (so ``>`` cannot be used to sneak past a deny).
    Decisions on literal subjects are cached: peers reuse a handful of subjects.
    """

    __slots__ = ("allow", "deny", "_cache")

    _CACHE_LIMIT = 4096

    def __init__(self, allow: Iterable[str] = (">",), deny: Iterable[str] = ()):
        self.allow = tuple(check_pattern(p, what="allow pattern") for p in allow)
        self.deny = tuple(check_pattern(p, what="deny pattern") for p in deny)
        self._cache: dict[str, str | None] = {}

    def check_publish(self, subject: str) -> str | None:
        """Return None if publishing to literal ``subject`` is allowed, else the rule that refuses it."""
        try:
            return self._cache[subject]
        except KeyError:
            pass
        verdict = self._decide(subject)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[subject] = verdict
        return verdict

    def _decide(self, subject: str) -> str | None:
        for d in self.deny:
            if matches(d, subject):
                return f"deny {d}"
        for a in self.allow:
            if matches(a, subject):
                return None
        return "not in allow list (" + ", ".join(self.allow) + ")" if self.allow else "allow list is empty"

    def check_subscribe(self, pattern: str) -> str | None:
        """Return None if subscribing to ``pattern`` is allowed, else the rule that refuses it."""
        for d in self.deny:
            if patterns_overlap(d, pattern):
                return f"deny {d}"
        for a in self.allow:
            if pattern_covers(a, pattern):
                return None
        return "not in allow list (" + ", ".join(self.allow) + ")" if self.allow else "allow list is empty"

    def narrowed(self, allow: Iterable[str] | None = None, deny: Iterable[str] = ()) -> "Permissions":
        """A stricter copy: ``allow`` replaces ours only where ours covers it; ``deny`` adds."""
        if allow is None:
            new_allow = self.allow
        else:
            new_allow = tuple(p for p in allow if any(pattern_covers(a, p) for a in self.allow))
        return Permissions(new_allow, self.deny + tuple(deny))


class _Node:
    __slots__ = ("literal", "star", "tail", "here", "version")

    def __init__(self):
        self.literal: dict = {}   # token -> _Node
        self.star = None          # the "*" child
        self.tail = []            # entries of patterns ending in ">" at this level
        self.here = []            # entries of patterns ending exactly here
        self.version = 0          # bumped when what a match through this node finds changes

    def empty(self) -> bool:
        return not (self.literal or self.star or self.tail or self.here)


class SubjectTrie:
    """Subscriptions by pattern, matched against literal subjects (nats-server's sublist).

    Matching walks one path per wildcard branch that the subject's tokens actually meet,
    so its cost does not grow with patterns that cannot match. Results are cached per
    subject in a bounded cache (``cache_size`` entries, the oldest dropped first).

    A change never flushes the cache and never scans it: it bumps the version of the one
    trie node through which every affected match passes (the node holding the entry, or
    where a new ``*`` branch leaves the existing trie). A cached result remembers the nodes
    its match visited and the literal tokens it looked up and missed, and is recomputed
    only when one of those changed, so a
    subscribe costs the length of its pattern whatever is cached, and a cached subject
    the change cannot concern stays cached.

    ``private_first``: a pattern whose *first* token is a wildcard does not match a
    subject whose first token starts with one of these characters (MQTT 4.7.2; the
    embedded lattice keeps ``_INBOX`` and session addresses out of ``>``).

    Entries are returned in the order they were added.
    """

    def __init__(self, cache_size: int = 1024, private_first: str = ""):
        self._root = _Node()
        self._cache: dict = {}    # subject -> [generation, result, ((node, version), ...), ((literal, token), ...)]
        self.cache_size = cache_size
        self._private = tuple(private_first)
        self._seq = 0
        self._order: dict = {}    # id(entry) -> sequence number (insertion order)
        self._count = 0
        self._generation = 0      # any change at all: cached entries of an older one are checked

    def __len__(self) -> int:
        return self._count

    def cached(self, subject: str) -> bool:
        """True if ``subject``'s cached result is still valid (for tests and metrics)."""
        entry = self._cache.get(subject)
        return entry is not None and self._valid(entry)

    def insert(self, pattern: str, entry) -> None:
        node = self._root
        changed = None            # the first existing node that gets a new child ...
        by_literal = False        # ... and whether that child is a literal token
        tokens = pattern.split(".")
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            if token == ">" and i == last:
                node.tail.append(entry)
                break
            if token == "*":
                child = node.star
                if child is None:
                    child = node.star = _Node()
                    if changed is None:
                        changed = node
            else:
                child = node.literal.get(token)
                if child is None:
                    child = node.literal[token] = _Node()
                    if changed is None:
                        changed, by_literal = node, True
            node = child
        else:
            node.here.append(entry)
        if changed is None:
            node.version += 1     # a new entry where matches already pass
        elif not by_literal:
            changed.version += 1  # a new "*" branch: every match through ``changed`` may use it
        # (a new literal branch concerns only the subjects whose match looked that token up
        # and missed: their cached entries remember the miss)
        self._generation += 1
        self._seq += 1
        self._order[id(entry)] = self._seq
        self._count += 1

    def remove(self, pattern: str, entry) -> bool:
        tokens = pattern.split(".")
        path = []
        node = self._root
        last = len(tokens) - 1
        target = None
        for i, token in enumerate(tokens):
            if token == ">" and i == last:
                target = node.tail
                break
            nxt = node.star if token == "*" else node.literal.get(token)
            if nxt is None:
                return False
            path.append((node, token))
            node = nxt
        else:
            target = node.here
        for k, e in enumerate(target):
            if e is entry:
                del target[k]
                break
        else:
            return False
        node.version += 1
        self._generation += 1
        self._order.pop(id(entry), None)
        self._count -= 1
        # prune empty branches (nothing cached can hold an entry below them any more)
        for parent, token in reversed(path):
            child = parent.star if token == "*" else parent.literal.get(token)
            if child is None or not child.empty():
                break
            if token == "*":
                parent.star = None
            else:
                del parent.literal[token]
        return True

    def _valid(self, entry) -> bool:
        if entry[0] == self._generation:
            return True
        for node, version in entry[2]:
            if node.version != version:
                return False
        for literal, token in entry[3]:
            if token in literal:
                return False
        entry[0] = self._generation
        return True

    def match(self, subject: str) -> tuple:
        cache = self._cache
        entry = cache.get(subject)
        if entry is not None and (entry[0] == self._generation or self._valid(entry)):
            return entry[1]
        tokens = subject.split(".")
        out = []
        visited = []
        misses = []
        n = len(tokens)
        private = bool(self._private) and subject.startswith(self._private)
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            visited.append((node, node.version))
            if i == n:
                if node.here:
                    out.extend(node.here)
                continue
            if node.tail and not (private and i == 0):
                out.extend(node.tail)
            literal = node.literal
            child = literal.get(tokens[i])
            if child is not None:
                stack.append((child, i + 1))
            else:
                misses.append((literal, tokens[i]))
            if node.star is not None and not (private and i == 0):
                stack.append((node.star, i + 1))
        if len(out) > 1:
            order = self._order
            out.sort(key=lambda e: order.get(id(e), 0))
        found = tuple(out)
        if entry is None and len(cache) >= self.cache_size:
            del cache[next(iter(cache))]  # the oldest entry
        cache[subject] = [self._generation, found, tuple(visited), tuple(misses)]
        return found
