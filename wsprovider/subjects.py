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
    if _BAD_CHARS.search(subject):
        raise SubjectError(f"{what} {subject!r} contains whitespace")
    if subject.startswith(".") or subject.endswith(".") or ".." in subject:
        raise SubjectError(f"{what} {subject!r} has an empty token")


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
