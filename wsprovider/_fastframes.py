"""A fast path for the common WebSocket frames, in front of Autobahn's general code.

Autobahn parses every frame through a general state machine (a CFFI masker object per
frame, a UTF-8 validator reset per message, an event ``fire`` per message) and builds
its debug-log arguments (colourised with click) on every read and write even when debug
logging is off. For 100-byte messages that is most of the server's time. This mixin
handles the common case itself and hands everything else to Autobahn, unchanged.

Inbound, handled here: unfragmented (FIN), masked text or binary frames without RSV bits,
of any length within ``maxFramePayloadSize`` and ``maxMessagePayloadSize``, on an OPEN
connection without compression, outside a fragmented message, including frames that
arrive over several reads: such a frame is assembled part by part straight from each read
(unmasked and checked as it comes, joined once at the end), so a large frame's bytes are
not appended to a growing buffer and copied again. The same checks hold: a text frame must
be valid UTF-8, else the connection fails with 1007 through Autobahn's own
``_invalid_payload``; a text frame still arriving is checked as its bytes come in (stdlib
incremental decoder, only once a non-ASCII byte appears), so invalid UTF-8 fails at once,
not when the frame is complete (Autobahn TestSuite 6.4.x, fail fast), and no byte is
checked twice. ASCII is recognised while unmasking, in the same pass. Anything
larger than the limits, unmasked, fragmented, a control frame or a reserved opcode goes to
Autobahn, which applies its limits and close codes as before.

Outbound, handled here: one unfragmented frame of any length written straight to the transport when
the connection is OPEN, Autobahn's send queue is empty, and there is no compression,
auto-fragmentation or frame logging. Autobahn's ``trafficStats`` are not updated for
frames on these paths (wsprovider keeps its own counters in ``SessionStats``).
"""

from __future__ import annotations

import codecs
import collections

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.tcp import Connection as _TcpConnection
from twisted.logger import Logger

from ._accel import unmask, unmask_ascii, unmask_frame

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = (WebSocketProtocol.STATE_CONNECTING, WebSocketProtocol.STATE_PROXY_CONNECTING)
_from_bytes = int.from_bytes
_MAX_FAST = 1 << 62  # frames up to the limits the connection applies
_utf8_decoder = codecs.getincrementaldecoder("utf-8")
_log = Logger(namespace="wsprovider.frames")
_READ_SIZE = 1 << 16      # Twisted's read size (FileDescriptor.bufferSize)
_MAX_READ_SIZE = 1 << 18  # what reads grow to while the peer keeps the socket full
_MAX_PIECES = 512         # buffers per sendmsg (Linux takes up to 1024)
_SEPARATE_BODY = 2048     # from this size a frame's payload is not copied behind its header


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

    # Memory per idle session: Autobahn gives every connection an empty send queue (a deque,
    # 760 bytes) and a UTF-8 validator that only its own (fragmented-message) path uses.
    # Both are made on first use instead; the fast paths test ``_send_queue`` directly.
    _send_queue = None
    _utf8validator = None

    @property
    def send_queue(self):
        if self._send_queue is None:
            self._send_queue = collections.deque()
        return self._send_queue

    @send_queue.setter
    def send_queue(self, queue):
        self._send_queue = queue if queue else None

    @property
    def utf8validator(self):
        if self._utf8validator is None:
            self._utf8validator = Utf8Validator()
        return self._utf8validator

    @utf8validator.setter
    def utf8validator(self, validator):
        pass  # Autobahn's, made per connection: made when first needed instead

    def forget_handshake(self) -> None:
        """Free what only the opening handshake needed (the request and response text)."""
        self.http_request_data = self.http_response_data = self.http_status_line = None
        self._wskey = None

    # Frames written to any connection while one read is processed (the echo of a request,
    # the deliveries of a broadcast, pongs, errors) wait in that connection's batch until
    # the read is done; then each batch goes out in one send(2) (straight to the socket when
    # Twisted has nothing buffered for it) instead of one buffered write per frame, each
    # waiting for the reactor's next turn and costing two epoll_ctl.
    _batch = None

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's version formats debug-log arguments first, on every read.
        transport = self.transport
        read_size = getattr(transport, "bufferSize", 0)
        n = len(data)
        if n >= read_size > 0:
            # The read filled Twisted's buffer: more is waiting. Read in larger pieces (fewer
            # reads, and a large frame in one piece), up to _MAX_READ_SIZE; back to Twisted's
            # 64 KiB once reads come in small, since every read allocates its full size.
            if read_size < _MAX_READ_SIZE:
                transport.bufferSize = read_size * 2
        elif read_size > _READ_SIZE and n < _READ_SIZE // 8:
            transport.bufferSize = _READ_SIZE
        if _round.active:  # (never nested in practice: Twisted does not re-enter reads)
            self._dataReceived(data)
            return
        _round.active = True
        try:
            self._dataReceived(data)
        finally:
            _round.active = False
            _round.flush()

    def _send_batch(self, batch: list) -> None:
        transport = self.transport
        # Only Twisted's own plain TCP connection (not TLS, not a wrapper that forwards its
        # attributes) with nothing waiting in its buffers (FileDescriptor's dataBuffer and
        # _tempDataBuffer) may be written to directly.
        if (isinstance(transport, _TcpConnection) and transport.TLS is False and transport.connected
                and not transport.disconnecting and not transport.dataBuffer
                and not getattr(transport, "_tempDataBuffer", True)):
            # The pieces go out as they are (sendmsg gathers them): a large body is not
            # copied into one buffer first.
            try:
                if len(batch) == 1:
                    sent = transport.socket.send(batch[0])
                elif len(batch) <= _MAX_PIECES:
                    sent = transport.socket.sendmsg(batch)
                else:
                    sent = transport.socket.send(b"".join(batch))
            except OSError:
                sent = 0  # full, or failing: Twisted's write finds out and reports it
            if sent == sum(map(len, batch)):
                return
            data = b"".join(batch)[sent:] if sent else b"".join(batch)
        else:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
        transport.write(data)

    def _flush_batch(self) -> None:
        """Send what is batched now: something is about to write past the batch or close."""
        batch = self._batch
        if batch:
            self._batch = []  # still batching for the rest of this read (listed in _round)
            self._send_batch(batch)

    def _closeConnection(self, abort: bool = False) -> None:
        self._flush_batch()
        super()._closeConnection(abort)

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        if sync or chopsize or self._send_queue or self.logOctets:
            self._flush_batch()
            return super().sendData(data, sync, chopsize)
        batch = self._batch
        if batch is None:
            batch = _round.batch_for(self)
        if batch is not None:
            batch.append(data)
        else:
            self.transport.write(data)
        state = self.state
        if state == _OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif state in _CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def _fast_limit(self) -> int:
        limit = _MAX_FAST
        for v in (self.maxFramePayloadSize, self.maxMessagePayloadSize):
            if 0 < v < limit:
                limit = v
        return limit

    def _dataReceived(self, data: bytes) -> None:
        assembly = self._assembly
        if assembly is None:
            return super()._dataReceived(data)  # appends to self.data, then processData
        if self.state == _OPEN:
            self.trafficStats.incomingOctetsWireLevel += len(data)
        # The rest of a frame being assembled: taken from the read as it is (no copy of the
        # read into a buffer, none of the buffer when the frame ends), unmasked and checked.
        used = assembly.take(data)
        if assembly.bad is not None:
            # Invalid UTF-8 in this read's part: fail now (1007), drop the rest of the frame
            # as it arrives, and read what follows it (the peer's close) as frames.
            self._assembly = None
            self._skip = assembly.need
            self._bad_text(assembly.bad)
            if used < len(data):
                self.data = data[used:]
                self.consumeData()
            return
        if assembly.need:
            return
        self._assembly = None
        if self.state == _OPEN and not self.failedByMe:  # (Autobahn drops it otherwise too)
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self.onMessage(assembly.payload(), assembly.is_binary)
        if used == len(data):
            return
        if self._fast_eligible():
            if self._fast_frames(data, used):
                self.consumeData()
        else:
            self.data = data[used:]
            self.consumeData()

    def _fast_eligible(self) -> bool:
        return not (self.current_frame is not None or self.inside_message or self.state != _OPEN
                    or self._perMessageCompress is not None or self.logFrames or self.failedByMe
                    or not self.applyMask or not self.factory.isServer)

    def processData(self) -> bool:
        if self._skip:
            # The rest of a text frame already failed for invalid UTF-8 (1007 is out): drop
            # it as it arrives, so the peer's close frame after it is read as a frame.
            data = self.data
            k = min(self._skip, len(data))
            self._skip -= k
            self.data = data[k:]
            if self._skip or not self.data:
                return False
        if not self._fast_eligible():
            return super().processData()
        return self._fast_frames(self.data, 0)

    def _fast_frames(self, data: bytes, pos: int) -> bool:
        """The frames of ``data`` from ``pos`` on, as processData: True if more is to be done."""
        n = len(data)
        limit = self._fast_limit()
        validate = self.utf8validateIncoming
        while pos < n:
            b0 = data[pos]
            if b0 != 0x81 and b0 != 0x82:
                break  # fragment, control frame, RSV bits, reserved opcode: Autobahn's
            if pos + 2 > n:
                return self._wait_at(data, pos)
            b1 = data[pos + 1]
            if b1 < 0x80:
                break  # unmasked: Autobahn refuses it
            length = b1 & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                start = pos + 8
                if start > n:
                    return self._wait_at(data, pos)
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn refuses it
            else:
                start = pos + 14
                if start > n:
                    return self._wait_at(data, pos)
                length = _from_bytes(data[pos + 2:pos + 10], "big")
                if length < 65536 or length >> 63:
                    break  # not minimally encoded, or the top bit set: Autobahn refuses it
            if length > limit:
                break  # Autobahn closes with 1009
            if start > n:
                return self._wait_at(data, pos)
            end = start + length
            is_binary = b0 == 0x82
            if end > n:
                # Not all here yet: assembled from the reads that bring the rest. Text is
                # checked as it arrives, so invalid UTF-8 fails at once (1007), not once the
                # frame is complete (Autobahn TestSuite 6.4.x, "fail fast").
                self.data = b""
                assembly = self._assembly = _FrameAssembly(data[start - 4:start], length, is_binary,
                                                           validate and not is_binary)
                assembly.take(memoryview(data)[start:])
                if assembly.bad is not None:
                    self._assembly = None
                    self._skip = assembly.need
                    self._bad_text(assembly.bad)
                return False
            payload, is_ascii = unmask_frame(data, start, end)
            if not is_binary:
                if validate and not is_ascii:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError as e:
                        self.data = data[end:]
                        return self._bad_text(e.start)
            pos = end
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

    _skip = 0         # bytes of a failed text frame still to drop
    _assembly = None  # the _FrameAssembly of a frame that is still arriving

    def _wait_at(self, data: bytes, pos: int) -> bool:
        """Keep the frame at ``pos`` (its header not all here yet) at the head of the buffer; wait."""
        self.data = data[pos:] if pos else data
        return False

    def _bad_text(self, index: int) -> bool:
        self._invalid_payload(f"encountered invalid UTF-8 while processing text message "
                              f"at payload octet index {index}")
        return False

    def send_message_fast(self, payload: bytes, is_binary: bool) -> None:
        """``sendMessage(payload, is_binary)``, without Autobahn's general machinery when possible."""
        n = len(payload)
        if (self.state != _OPEN or self._send_queue or self._perMessageCompress is not None
                or self.logFrames or self.logOctets or self.trackedTimings
                or 0 < self.autoFragmentSize < n or 0 < self.maxMessagePayloadSize < n):
            return self.sendMessage(payload, is_binary)
        opcode = 0x82 if is_binary else 0x81
        if n < 126:
            header = bytes((opcode, n))
        elif n < 65536:
            header = bytes((opcode, 126, n >> 8, n & 0xFF))
        else:
            header = bytes((opcode, 127)) + n.to_bytes(8, "big")
        batch = self._batch
        if batch is None:
            batch = _round.batch_for(self)
        if batch is None:
            self.transport.write(header + payload)
        elif n < _SEPARATE_BODY:
            batch.append(header + payload)
        else:
            batch.append(header)
            batch.append(payload)  # not copied: sendmsg gathers it


class _FrameAssembly:
    """A frame whose payload arrives over several reads: each part is unmasked (and, for
    text, checked) as it comes; the parts are joined once, when the last one is in."""

    __slots__ = ("mask", "need", "got", "parts", "is_binary", "validate", "decoder", "bad")

    def __init__(self, mask: bytes, length: int, is_binary: bool, validate: bool):
        self.mask = mask
        self.need = length       # payload bytes still to come
        self.got = 0             # payload bytes taken
        self.parts = []
        self.is_binary = is_binary
        self.validate = validate
        self.decoder = None      # an incremental UTF-8 decoder, from the first non-ASCII part
        self.bad = None          # the payload index of invalid UTF-8, once found

    def take(self, data) -> int:
        """Take what belongs to the frame from the start of ``data``; returns how much."""
        k = min(self.need, len(data))
        part = memoryview(data)[:k] if k < len(data) else data
        got = self.got
        if not self.validate:
            plain = unmask(self.mask, part, got)
        else:
            plain, is_ascii = unmask_ascii(self.mask, part, got)
            if not is_ascii or self.decoder is not None:
                # (once a decoder holds the start of a character, every part goes through it)
                if self.decoder is None:
                    self.decoder = _utf8_decoder()
                try:
                    self.decoder.decode(plain, k == self.need)
                except UnicodeDecodeError as e:
                    self.bad = got + e.start
        self.parts.append(plain)
        self.got = got + k
        self.need -= k
        if self.bad is not None:
            self.parts = []
        return k

    def payload(self) -> bytes:
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _WriteRound:
    """The connections written to during the read being processed (one reactor thread)."""

    def __init__(self):
        self.active = False
        self.pending = []

    def batch_for(self, protocol):
        """A new batch for ``protocol`` if a read is being processed, else None."""
        if not self.active:
            return None
        protocol._batch = batch = []
        self.pending.append(protocol)
        return batch

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for protocol in pending:
            batch, protocol._batch = protocol._batch, None
            if batch:
                try:
                    protocol._send_batch(batch)
                except Exception:
                    _log.failure("could not send {count} frames to {peer}", count=len(batch),
                                 peer=getattr(protocol, "peer", "?"))


_round = _WriteRound()
