"""A fast path for the common WebSocket frames, in front of Autobahn's general code.

Autobahn parses every frame through a general state machine (a CFFI masker object per
frame, a UTF-8 validator reset per message, an event ``fire`` per message) and builds
its debug-log arguments (colourised with click) on every read and write even when debug
logging is off. For 100-byte messages that is most of the server's time. This mixin
handles the common case itself and hands everything else to Autobahn, unchanged.

Inbound, handled here: a whole, unfragmented (FIN), masked text or binary frame without
RSV bits, at most 65535 bytes and within ``maxFramePayloadSize`` and
``maxMessagePayloadSize``, on an OPEN connection without compression, outside a
fragmented message. The same checks hold: a text frame must be valid UTF-8 (else the
connection fails with 1007 through Autobahn's own ``_invalid_payload``); a text frame not
wholly received yet goes to Autobahn, whose incremental validator fails it as soon as an
invalid byte arrives (Autobahn TestSuite 6.4.x, fail fast); anything larger,
unmasked, fragmented, a control frame or a reserved opcode goes to Autobahn, which
applies its limits and close codes as before.

Outbound, handled here: one unfragmented frame written straight to the transport when
the connection is OPEN, Autobahn's send queue is empty, and there is no compression,
auto-fragmentation or frame logging. Autobahn's ``trafficStats`` are not updated for
frames on these paths (wsprovider keeps its own counters in ``SessionStats``).
"""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = (WebSocketProtocol.STATE_CONNECTING, WebSocketProtocol.STATE_PROXY_CONNECTING)
_from_bytes = int.from_bytes
_BIG_UNMASK = 4096


def unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (RFC 6455 5.3)."""
    n = len(payload)
    if n > _BIG_UNMASK:
        return create_xor_masker(mask, n).process(payload)
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(key, "little")).to_bytes(n, "little")


class FastFramesMixin:
    """Mix in before Autobahn's ``WebSocket*Protocol`` (server side: peers mask their frames)."""

    def _connectionMade(self) -> None:
        # Autobahn copies the factory's options onto the connection and pretty-prints all
        # of them for a debug log, on every connection (a quarter of a connect's cost).
        # Copy them here the same way; Autobahn's loop then has nothing left to log.
        factory = self.factory
        for attr in self.CONFIG_ATTRS:
            if not hasattr(self, attr):
                setattr(self, attr, getattr(factory, attr))
        self.CONFIG_ATTRS = ()
        super()._connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's version formats debug-log arguments first, on every read.
        self._dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        if sync or chopsize or self.send_queue or self.logOctets:
            return super().sendData(data, sync, chopsize)
        self.transport.write(data)
        state = self.state
        if state == _OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state in _CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def _fast_limit(self) -> int:
        limit = 65535
        for v in (self.maxFramePayloadSize, self.maxMessagePayloadSize):
            if 0 < v < limit:
                limit = v
        return limit

    def processData(self) -> bool:
        if (self.current_frame is not None or self.inside_message or self.state != _OPEN
                or self._perMessageCompress is not None or self.logFrames or self.failedByMe
                or not self.applyMask or not self.factory.isServer):
            return super().processData()
        data = self.data
        n = len(data)
        pos = 0
        limit = self._fast_limit()
        validate = self.utf8validateIncoming
        while pos + 6 <= n:
            b0 = data[pos]
            if b0 != 0x81 and b0 != 0x82:
                break  # fragment, control frame, RSV bits, reserved opcode: Autobahn's
            b1 = data[pos + 1]
            if b1 < 0x80:
                break  # unmasked: Autobahn refuses it
            length = b1 & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                if pos + 8 > n:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn refuses it
                start = pos + 8
            else:
                break
            if length > limit:
                break  # Autobahn closes with 1009
            end = start + length
            if end > n:
                if validate and b0 == 0x81:
                    # Text still on its way: Autobahn's incremental validator checks it as the
                    # bytes arrive, so invalid UTF-8 fails at once (1007), not when complete.
                    break
                # A good header; the rest of the binary frame is still on its way.
                self.data = data[pos:] if pos else data
                return False
            payload = unmask(data[start - 4:start], data[start:end])
            pos = end
            is_binary = b0 == 0x82
            if validate and not is_binary:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.data = data[pos:]
                    self._invalid_payload(f"encountered invalid UTF-8 while processing text message "
                                          f"at payload octet index {e.start}")
                    return False
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.onMessage(payload, is_binary)
            if self.state != _OPEN or self.failedByMe:
                self.data = data[pos:]
                return len(self.data) > 0
        self.data = data[pos:] if pos else data
        if not self.data:
            return False
        return super().processData()

    def send_message_fast(self, payload: bytes, is_binary: bool) -> None:
        """``sendMessage(payload, is_binary)``, without Autobahn's general machinery when possible."""
        n = len(payload)
        if (n > 65535 or self.state != _OPEN or self.send_queue or self._perMessageCompress is not None
                or self.logFrames or self.logOctets or self.trackedTimings
                or 0 < self.autoFragmentSize < n or 0 < self.maxMessagePayloadSize < n):
            return self.sendMessage(payload, is_binary)
        opcode = 0x82 if is_binary else 0x81
        if n < 126:
            self.transport.write(bytes((opcode, n)) + payload)
        else:
            self.transport.write(bytes((opcode, 126, n >> 8, n & 0xFF)) + payload)
