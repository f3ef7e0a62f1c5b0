"""Read the wRPC wire captures in tests/wasmcloud1_captures/ (copied from the project's
shared specs: NATS traffic recorded from the bytecodealliance/wrpc Go library and a provider
on wasmCloud's Go provider SDK). Each line is one NATS message; long payloads are shown
truncated, so a line gives the full length and the first bytes.
"""

import os
import re

import attr

CAPTURE_DIR = os.path.join(os.path.dirname(__file__), "wasmcloud1_captures")

_LINE = re.compile(
    r"^\s*\|?\s*(?P<ms>[0-9.]+)ms (?P<subject>\S+)(?: reply=(?P<reply>\S+))?(?: hdr\{(?P<hdr>[^}]*)\})? "
    r"\[(?P<length>\d+)\] ?(?P<hex>.*)$")


@attr.s(frozen=True)
class WireMessage:
    ms: str = attr.ib()
    subject: str = attr.ib()
    reply: str | None = attr.ib()
    headers: dict = attr.ib()
    length: int = attr.ib()
    shown: bytes = attr.ib()

    @property
    def complete(self) -> bool:
        return len(self.shown) == self.length


def load(name: str) -> list:
    messages = []
    with open(os.path.join(CAPTURE_DIR, name), encoding="utf-8") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            tokens = m.group("hex").replace("...", "").split()
            tokens = [t for t in tokens if len(t) == 2]  # a line cut mid-byte drops the half byte
            headers = {}
            if m.group("hdr"):
                for item in m.group("hdr").split(";"):
                    name_, _, value = item.strip().partition(": ")
                    headers[name_] = value
            messages.append(WireMessage(m.group("ms"), m.group("subject"), m.group("reply"), headers,
                                        int(m.group("length")), bytes(int(t, 16) for t in tokens)))
    return messages


def at(name: str, ms: str, index: int = 0) -> WireMessage:
    """The ``index``-th message recorded at time ``ms`` (as printed, e.g. "1.260")."""
    found = [message for message in load(name) if message.ms == ms]
    if len(found) > index:
        return found[index]
    raise KeyError(f"no message at {ms}ms in {name}")
