"""The inbound/outbound frame fast path (wsprovider._fastframes) against hand-made frames.

A raw TCP peer writes frames byte by byte, pipelined, fragmented, unmasked or with bad
UTF-8, so that both the fast path and the hand-over to Autobahn are exercised.
"""

import base64
import json
import os
import struct

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.testing import StringTransport
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from wsprovider.handlers import echo

from .peers import start_provider


def frame(payload: bytes, opcode=1, fin=True, masked=True, rsv=0) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawPeer(protocol.Protocol):
    def __init__(self):
        self.buf = b""
        self.handshaken = False
        self.frames = []      # (opcode, payload)
        self.waiting = []
        self.closed = defer.Deferred()
        self.open = defer.Deferred()

    def connectionMade(self):
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                              f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())

    def dataReceived(self, data):
        self.buf += data
        if not self.handshaken:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            assert head.startswith(b"HTTP/1.1 101"), head
            self.handshaken = True
            self.buf = rest
            self.open.callback(None)
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, i = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, i = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, i = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < i + n:
                return
            self.frames.append((b0 & 0x0F, self.buf[i:i + n]))
            self.buf = self.buf[i + n:]
        self._wake()

    def _wake(self):
        waiting, self.waiting = self.waiting, []
        for count, d in waiting:
            if len(self.frames) >= count:
                d.callback(self.frames[:count])
            else:
                self.waiting.append((count, d))

    def wait_frames(self, count):
        d = defer.Deferred()
        self.waiting.append((count, d))
        self._wake()
        return d

    def connectionLost(self, reason):
        self.closed.callback(None)

    def close_code(self):
        for opcode, payload in self.frames:
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0]
        return None


class FastFrameTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])

    @defer.inlineCallbacks
    def connect(self):
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.provider.port), peer)
        yield peer.open
        (welcome,) = yield peer.wait_frames(1)
        self.assertEqual(json.loads(welcome[1])["type"], "welcome")
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
        return peer

    def _echo_bodies(self, frames):
        return [json.loads(p)["body"] for op, p in frames]

    @defer.inlineCallbacks
    def test_pipelined_frames_in_one_write(self):
        peer = yield self.connect()
        bodies = [f"m{i}-" + "é" * (i * 7) for i in range(40)]  # short and 126+ byte frames
        peer.transport.write(b"".join(frame(json.dumps({"subject": "echo.x", "body": b}).encode())
                                      for b in bodies))
        got = yield peer.wait_frames(41)
        self.assertEqual(self._echo_bodies(got[1:]), bodies)

    @defer.inlineCallbacks
    def test_frames_split_byte_by_byte(self):
        peer = yield self.connect()
        data = b"".join(frame(json.dumps({"subject": "echo.x", "body": f"b{i}" * (i * 30)}).encode())
                        for i in range(4))
        for i in range(len(data)):
            peer.transport.write(data[i:i + 1])
            if i % 50 == 0:
                yield deferLater()
        got = yield peer.wait_frames(5)
        self.assertEqual(self._echo_bodies(got[1:]), [f"b{i}" * (i * 30) for i in range(4)])

    @defer.inlineCallbacks
    def test_fragmented_message_and_ping_interleaved(self):
        peer = yield self.connect()
        text = json.dumps({"subject": "echo.x", "body": "fragmented"}).encode()
        peer.transport.write(frame(text[:10], opcode=1, fin=False) + frame(b"hi", opcode=9)
                             + frame(text[10:], opcode=0, fin=True)
                             + frame(json.dumps({"subject": "echo.x", "body": "after"}).encode()))
        got = yield peer.wait_frames(4)
        self.assertEqual(got[1], (10, b"hi"))  # pong
        self.assertEqual(self._echo_bodies(got[2:]), ["fragmented", "after"])

    @defer.inlineCallbacks
    def test_invalid_utf8_text_closes_1007(self):
        peer = yield self.connect()
        peer.transport.write(frame(b'{"subject":"echo.x","body":"\xff\xfe"}'))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1007)

    @defer.inlineCallbacks
    def test_encoded_surrogate_closes_1007(self):
        peer = yield self.connect()
        peer.transport.write(frame(b'{"subject":"echo.x","body":"\xed\xa0\x80"}'))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1007)

    @defer.inlineCallbacks
    def test_unmasked_frame_is_refused(self):
        peer = yield self.connect()
        peer.transport.write(frame(b'{"subject":"echo.x","body":"x"}', masked=False))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1002)

    @defer.inlineCallbacks
    def test_rsv_bits_are_refused(self):
        peer = yield self.connect()
        peer.transport.write(frame(b'{"subject":"echo.x","body":"x"}', rsv=4))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1002)

    @defer.inlineCallbacks
    def test_too_big_after_good_frames_closes_1009(self):
        peer = yield self.connect()
        good = frame(json.dumps({"subject": "echo.x", "body": "ok"}).encode())
        peer.transport.write(good + frame(b"x" * 65537))
        yield peer.closed
        self.assertEqual(self._echo_bodies(peer.frames[1:2]), ["ok"])
        self.assertEqual(peer.close_code(), 1009)

    @defer.inlineCallbacks
    def test_binary_frame_and_close(self):
        peer = yield self.connect()
        peer.transport.write(frame(b"\x00\x01binary", opcode=2) + frame(struct.pack("!H", 1000), opcode=8))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1000)

    @defer.inlineCallbacks
    def test_large_frame_over_several_reads(self):
        # A 16 KiB text frame written in three parts, split inside a UTF-8 sequence and
        # inside the mask's 4-byte cycle, then a small frame right behind it.
        peer = yield self.connect()
        body = ("é" * 5000) + ("x" * 6383)
        data = frame(json.dumps({"subject": "echo.x", "body": body}, ensure_ascii=False).encode())
        small = frame(json.dumps({"subject": "echo.x", "body": "after"}).encode())
        cut1, cut2 = 4001, 9003  # inside "é" (2 bytes each), at odd offsets
        peer.transport.write(data[:cut1])
        yield deferLater()
        peer.transport.write(data[cut1:cut2])
        yield deferLater()
        peer.transport.write(data[cut2:] + small)
        got = yield peer.wait_frames(3)
        self.assertEqual(self._echo_bodies(got[1:]), [body, "after"])

    @defer.inlineCallbacks
    def test_invalid_text_in_a_large_frame_fails_before_it_is_complete(self):
        # The bad byte is in the first part of a 20 KB frame: 1007 comes before the rest is
        # sent; the rest and the peer's close frame after it are then read properly.
        peer = yield self.connect()
        payload = b'{"subject":"echo.x","body":"' + b"x" * 100 + b"\xff" + b"y" * 20000 + b'"}'
        data = frame(payload)
        peer.transport.write(data[:2000])
        yield peer.wait_frames(2)  # welcome, then the close frame
        self.assertEqual(peer.close_code(), 1007)
        self.assertFalse(peer.closed.called)
        peer.transport.write(data[2000:] + frame(struct.pack("!H", 1000), opcode=8))
        yield peer.closed
        self.assertEqual([op for op, _ in peer.frames], [1, 8])

    @defer.inlineCallbacks
    def test_invalid_text_in_a_later_part_fails_before_the_frame_is_complete(self):
        # The first part is valid (ASCII); the bad byte comes in the second part, with more
        # of the frame still to come: 1007 at once, and the rest is still read as frames.
        peer = yield self.connect()
        payload = b'{"subject":"echo.x","body":"' + b"x" * 3000 + b"\xc3\x28" + b"y" * 20000 + b'"}'
        data = frame(payload)
        peer.transport.write(data[:2000])
        yield deferLater()
        self.assertEqual(len(peer.frames), 1)  # only the welcome: nothing failed yet
        peer.transport.write(data[2000:5000])
        yield peer.wait_frames(2)
        self.assertEqual(peer.close_code(), 1007)
        self.assertFalse(peer.closed.called)
        peer.transport.write(data[5000:] + frame(struct.pack("!H", 1000), opcode=8))
        yield peer.closed
        self.assertEqual([op for op, _ in peer.frames], [1, 8])

    @defer.inlineCallbacks
    def test_invalid_text_in_the_last_part_with_the_close_behind_it(self):
        # The frame ends in the read that holds the bad byte, and the peer's close frame
        # follows in the same read: 1007, and the close is read as a close.
        peer = yield self.connect()
        payload = b'{"subject":"echo.x","body":"' + "é".encode() * 3000 + b"\xed\xa0\x80" + b'"}'
        data = frame(payload)
        peer.transport.write(data[:2001])
        yield deferLater()
        self.assertEqual(len(peer.frames), 1)
        peer.transport.write(data[2001:] + frame(struct.pack("!H", 1000), opcode=8))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1007)
        self.assertEqual([op for op, _ in peer.frames], [1, 8])

    @defer.inlineCallbacks
    def test_a_valid_frame_completed_by_a_read_that_holds_more_frames(self):
        # The end of a large frame, two whole frames and the start of another, in one read.
        peer = yield self.connect()
        bodies = ["a" * 9000, "short", "é" * 200, "b" * 9000]
        frames = [frame(json.dumps({"subject": "echo.x", "body": b}, ensure_ascii=False).encode())
                  for b in bodies]
        data = b"".join(frames)
        cut1 = len(frames[0]) // 2
        cut2 = len(frames[0]) + len(frames[1]) + len(frames[2]) + 100
        peer.transport.write(data[:cut1])
        yield deferLater()
        peer.transport.write(data[cut1:cut2])
        yield deferLater()
        peer.transport.write(data[cut2:])
        got = yield peer.wait_frames(5)
        self.assertEqual(self._echo_bodies(got[1:]), bodies)

    @defer.inlineCallbacks
    def test_non_minimal_64_bit_length_is_refused(self):
        peer = yield self.connect()
        mask = os.urandom(4)
        peer.transport.write(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 10) + mask + b"0123456789")
        yield peer.closed
        self.assertEqual(peer.close_code(), 1002)

    # Autobahn TestSuite 6.4.3 and 6.4.4, "fail fast on invalid UTF-8": the payload is
    # PART1 (valid), PART2 (U+110000 in UTF-8's scheme: invalid), PART3 (valid). The close
    # must come once PART2 is in, before PART3 is sent.
    PART1 = "\u03ba\u1f79\u03c3\u03bc\u03b5".encode("utf-8")
    PART2 = b"\xf4\x90\x80\x80"
    PART3 = b"edited"

    @defer.inlineCallbacks
    def _fails_fast(self, chunks):
        peer = yield self.connect()
        first, second = chunks
        peer.transport.write(first)
        yield peer.wait_frames(1)
        self.assertFalse(peer.closed.called)
        peer.transport.write(second)
        yield peer.closed  # with PART3 never sent
        self.assertEqual(peer.close_code(), 1007)

    def test_autobahn_6_4_3_invalid_text_in_fragments_fails_fast(self):
        first = frame(self.PART1, opcode=1, fin=False)
        return self._fails_fast([first, frame(self.PART2, opcode=0, fin=False)])

    def test_autobahn_6_4_4_invalid_text_in_chunks_fails_fast(self):
        whole = frame(self.PART1 + self.PART2 + self.PART3)
        head = len(whole) - len(self.PART1 + self.PART2 + self.PART3)
        return self._fails_fast([whole[:head + len(self.PART1)],
                                 whole[head + len(self.PART1):head + len(self.PART1) + len(self.PART2)]])



def deferLater():
    from twisted.internet import task
    return task.deferLater(reactor, 0, lambda: None)


class LargeFrameTests(unittest.TestCase):
    """Frames with a 64-bit length (above 65535 bytes) both ways, within MAX_MESSAGE_SIZE."""

    timeout = 20
    connect = FastFrameTests.connect
    _echo_bodies = FastFrameTests._echo_bodies

    @defer.inlineCallbacks
    def setUp(self):
        self.provider = yield start_provider(self, config={"MAX_MESSAGE_SIZE": str(1 << 20)},
                                             handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])

    @defer.inlineCallbacks
    def test_64_bit_frames_both_ways(self):
        peer = yield self.connect()
        bodies = ["a" * 70000, "b" * 300000]
        for body in bodies:
            data = frame(json.dumps({"subject": "echo.x", "body": body}).encode())
            self.assertEqual(data[1] & 0x7F, 127)
            peer.transport.write(data[:40000])
            yield deferLater()
            peer.transport.write(data[40000:])
        got = yield peer.wait_frames(3)
        self.assertEqual(self._echo_bodies(got[1:]), bodies)

    @defer.inlineCallbacks
    def test_over_the_limit_closes_1009(self):
        peer = yield self.connect()
        peer.transport.write(frame(b"x" * ((1 << 20) + 1), opcode=2))
        yield peer.closed
        self.assertEqual(peer.close_code(), 1009)


class _Socket:
    def __init__(self, accept):
        self.accept = accept  # bytes taken per send, or an exception to raise
        self.sent = []

    def send(self, data):
        if isinstance(self.accept, Exception):
            raise self.accept
        self.sent.append(bytes(data[:self.accept]))
        return min(self.accept, len(data))

    def sendmsg(self, buffers):
        return self.send(b"".join(buffers))


class _Tcp(tcp.Connection):
    """A plain Twisted TCP connection as the batch sees it, with a socket that takes
    ``accept`` bytes per send and a ``write`` that records what Twisted would buffer."""

    def __init__(self, accept=1 << 20):
        self.socket = _Socket(accept)
        self.connected, self.disconnecting = 1, 0
        self._tempDataBuffer = []  # FileDescriptor's, empty: nothing buffered
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))


class BatchedWriteTests(unittest.TestCase):
    """Frames written while one read is processed go out together (``_send_batch``)."""

    def protocol(self, transport):
        from wsprovider._fastframes import FastFramesMixin
        p = FastFramesMixin()
        p.transport = transport
        return p

    def test_one_send_when_nothing_is_buffered(self):
        t = _Tcp()
        self.protocol(t)._send_batch([b"one", b"two"])
        self.assertEqual((t.socket.sent, t.written), ([b"onetwo"], []))

    def test_what_the_socket_does_not_take_goes_to_twisted(self):
        t = _Tcp(accept=2)
        self.protocol(t)._send_batch([b"one", b"two"])
        self.assertEqual((t.socket.sent, t.written), ([b"on"], [b"etwo"]))
        t = _Tcp(accept=5)
        self.protocol(t)._send_batch([b"head", b"body" * 3])
        self.assertEqual((t.socket.sent, t.written), ([b"headb"], [b"odybodybody"]))
        t = _Tcp(accept=BlockingIOError())
        self.protocol(t)._send_batch([b"x"])
        self.assertEqual(t.written, [b"x"])

    def test_behind_twisted_buffers_tls_or_a_wrapper_nothing_jumps_the_queue(self):
        t = _Tcp()
        t._tempDataBuffer = [b"earlier"]
        self.protocol(t)._send_batch([b"later"])
        self.assertEqual((t.socket.sent, t.written), ([], [b"later"]))
        t = _Tcp()
        t.TLS = True
        self.protocol(t)._send_batch([b"secret"])
        self.assertEqual((t.socket.sent, t.written), ([], [b"secret"]))
        wrapper = StringTransport()
        wrapper.TLS, wrapper.dataBuffer, wrapper._tempDataBuffer = False, b"", []
        self.protocol(wrapper)._send_batch([b"wrapped"])
        self.assertEqual(wrapper.value(), b"wrapped")

    def test_a_close_sends_the_batch_first_and_only_once(self):
        t = _Tcp()
        p = self.protocol(t)
        p._batch = [b"reply", b"close-frame"]
        p._flush_batch()  # what _closeConnection does before the transport is closed
        self.assertEqual(p._batch, [])
        self.assertEqual(t.socket.sent, [b"replyclose-frame"])

    def test_writes_to_any_connection_during_a_read_go_out_when_it_is_done(self):
        from types import SimpleNamespace

        from wsprovider._fastframes import _OPEN
        a, b = _Tcp(), _Tcp()
        pa, pb = self.protocol(a), self.protocol(b)
        for p in (pa, pb):
            p.logOctets, p.state = False, _OPEN
            p.trafficStats = SimpleNamespace(outgoingOctetsWireLevel=0)
        seen_during_read = []

        def process(data):
            pb.sendData(b"to-b")       # e.g. a broadcast's delivery to another session
            pa.sendData(b"reply-1")
            pa.sendData(b"reply-2")
            seen_during_read.append((list(a.socket.sent), list(b.socket.sent)))

        pa._dataReceived = process
        pa.dataReceived(b"request")
        self.assertEqual(seen_during_read, [([], [])])
        self.assertEqual((a.socket.sent, b.socket.sent), ([b"reply-1reply-2"], [b"to-b"]))
        self.assertIsNone(pa._batch)
        pb.sendData(b"later")  # outside a read: Twisted's write, as before
        self.assertEqual(b.written, [b"later"])
