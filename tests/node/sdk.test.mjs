// Unit tests of the browser SDK (wsprovider/static/wsprovider.js) under Node's own runner:
//   node --test tests/node/
// The SDK's logic (welcome, subscriptions, requests, backoff, queueing) is driven through a
// scripted in-memory socket and a manual clock: a fake, because these tests are about the
// SDK's own decisions; tests/test_browser.py runs the same SDK in Chromium against the
// real service.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  Client, backoffDelay, base64Decode, base64Encode, connect, msgpack, subjectMatches, toBytes,
  JSON_PROTOCOL, MSGPACK_PROTOCOL, WsproviderError,
} from "../../wsprovider/static/wsprovider.js";

class Clock {
  constructor() { this.now = 0; this.timers = new Map(); this.next = 1; }
  setTimeout(fn, ms) { const id = this.next++; this.timers.set(id, { at: this.now + ms, fn }); return id; }
  clearTimeout(id) { this.timers.delete(id); }
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      let due = null;
      for (const [id, t] of this.timers) if (t.at <= until && (!due || t.at < due[1].at)) due = [id, t];
      if (!due) break;
      this.timers.delete(due[0]);
      this.now = due[1].at;
      due[1].fn();
    }
    this.now = until;
  }
}

function harness(options = {}) {
  const sockets = [];
  class ScriptedSocket {
    constructor(url, protocols) {
      this.url = url; this.protocols = protocols; this.sent = []; this.closed = null;
      sockets.push(this);
    }
    send(data) { this.sent.push(data); }
    close(code, reason) { this.closed = { code, reason }; queueMicrotask(() => this.onclose({ code, reason })); }
    // test side
    open() { this.onopen?.(); }
    frame(obj) { this.onmessage({ data: JSON.stringify(obj) }); }
    welcome(id = "S1") {
      this.open();
      this.frame({ type: "welcome", session_id: id, reply_to: `_ws.session.${id}`, protocol: JSON_PROTOCOL, max_message_size: 65536 });
    }
    drop(code = 1006) { this.onclose({ code, reason: "" }); }
    frames() { return this.sent.map((d) => JSON.parse(d)); }
  }
  const clock = new Clock();
  const client = new Client("ws://127.0.0.1:1/ws", {
    WebSocket: ScriptedSocket, timers: clock, now: () => clock.now, random: () => 0.5, ...options,
  });
  return { client, sockets, clock, last: () => sockets[sockets.length - 1] };
}

test("wildcards follow the service's rules", () => {
  assert.ok(subjectMatches("chat.*", "chat.room1"));
  assert.ok(!subjectMatches("chat.*", "chat.room1.x"));
  assert.ok(subjectMatches("chat.>", "chat.room1.x"));
  assert.ok(!subjectMatches("chat.>", "chat"));
  assert.ok(subjectMatches("a.*.c", "a.b.c"));
  assert.ok(!subjectMatches("a.b", "a.b.c"));
  assert.ok(subjectMatches(">", "anything.at.all"));
});

test("welcome gives the session; ready() resolves with it", async () => {
  const { client, last } = harness();
  assert.equal(client.state, "connecting");
  assert.deepEqual(last().protocols, [JSON_PROTOCOL]);
  const ready = client.ready();
  last().welcome("abc");
  const session = await ready;
  assert.equal(session.id, "abc");
  assert.equal(session.replyTo, "_ws.session.abc");
  assert.equal(client.state, "open");
});

test("the token goes in the query string (browsers cannot set headers)", () => {
  const { last } = harness({ token: "s3cret" });
  assert.equal(new URL(last().url).searchParams.get("token"), "s3cret");
});

test("publish: text as body, binary as body_base64; held until the welcome", () => {
  const { client, last } = harness();
  client.publish("a.b", "hi");
  client.publish("a.c", new Uint8Array([0, 1, 255]));
  assert.equal(last().sent.length, 0);
  last().welcome();
  assert.deepEqual(last().frames(), [
    { subject: "a.b", body: "hi" },
    { subject: "a.c", body_base64: "AAH/" },
  ]);
});

test("subscribe delivers matching messages with bytes bodies, and is acknowledged", async () => {
  const { client, last } = harness();
  last().welcome();
  const got = [];
  const sub = client.subscribe("chat.*", (m) => got.push(m));
  assert.deepEqual(last().frames()[0], { type: "subscribe", subject: "chat.*", id: "sub:chat.*" });
  last().frame({ type: "subscribed", subject: "chat.*", id: "sub:chat.*" });
  await sub.ready;
  last().frame({ type: "message", subject: "chat.x", body: "hé", reply_to: "r.1" });
  last().frame({ type: "message", subject: "chat.y", body_base64: "AAH/" });
  assert.equal(got.length, 2);
  assert.equal(got[0].text, "hé");
  assert.equal(got[0].replyTo, "r.1");
  assert.deepEqual([...got[1].body], [0, 1, 255]);
  sub.unsubscribe();
  assert.deepEqual(last().frames().at(-1), { type: "unsubscribe", subject: "chat.*" });
});

test("overlapping subscriptions each see a message once (the service sends one frame per subscription)", () => {
  const { client, last } = harness();
  last().welcome();
  const a = [], b = [];
  client.subscribe("x.*", (m) => a.push(m.text));
  client.subscribe("x.>", (m) => b.push(m.text));
  for (const body of ["1", "2"]) {
    last().frame({ type: "message", subject: "x.y", body });
    last().frame({ type: "message", subject: "x.y", body });
  }
  assert.deepEqual(a, ["1", "2"]);
  assert.deepEqual(b, ["1", "2"]);
});

test("a refused subscription rejects its ready and is not renewed", async () => {
  const { client, last } = harness();
  last().welcome();
  const errors = [];
  client.on("error", (e) => errors.push(e.code));
  const sub = client.subscribe("$SYS.>", () => {});
  last().frame({ type: "error", code: "permission_denied", message: "no", id: "sub:$SYS.>" });
  await assert.rejects(sub.ready, (e) => e instanceof WsproviderError && e.code === "permission_denied");
  assert.deepEqual(errors, ["permission_denied"]);
});

test("messages no subscription matches are 'message' events (the session's own address)", () => {
  const { client, last } = harness();
  last().welcome("S");
  const got = [];
  client.on("message", (m) => got.push(m.subject));
  last().frame({ type: "message", subject: "_ws.session.S", body: "direct" });
  assert.deepEqual(got, ["_ws.session.S"]);
});

test("request resolves with the reply, rejects with the error code", async () => {
  const { client, last } = harness();
  last().welcome();
  const ok = client.request("svc.a", "q", { timeout: 1000 });
  const bad = client.request("svc.b", "q");
  const [f1, f2] = last().frames();
  assert.equal(f1.type, "request");
  assert.equal(f1.timeout_ms, 1000);
  assert.equal(f2.timeout_ms, 5000);
  last().frame({ type: "reply", id: f1.id, subject: "_INBOX.1", body: "answer" });
  last().frame({ type: "error", id: f2.id, code: "no_responders", message: "nobody" });
  assert.equal((await ok).text, "answer");
  await assert.rejects(bad, (e) => e.code === "no_responders");
});

test("a request the service never answers times out locally", async () => {
  const { client, last, clock } = harness();
  last().welcome();
  const p = client.request("svc.a", "q", { timeout: 100 });
  clock.advance(2100);
  await assert.rejects(p, (e) => e.code === "timeout");
});

test("reconnect: full-jitter backoff, new session, resubscribe, queued publishes sent after", async () => {
  const { client, sockets, last, clock } = harness({ minDelay: 100, maxDelay: 1000 });
  const states = [];
  client.on("state", (s) => states.push(s.state));
  last().welcome("S1");
  client.subscribe("news.>", () => {});
  const pending = client.request("svc.a", "q");
  last().drop();
  await assert.rejects(pending, (e) => e.code === "not_connected");
  assert.equal(client.state, "reconnecting");
  client.publish("news.x", "while down");
  clock.advance(49);          // random()=0.5: 0.5 * min(1000, 100 * 2^0) = 50 ms
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.equal(sockets.length, 2);
  last().drop();              // second failure: 0.5 * 200 = 100 ms
  clock.advance(99);
  assert.equal(sockets.length, 2);
  clock.advance(1);
  assert.equal(sockets.length, 3);
  last().welcome("S2");
  assert.equal(client.session.id, "S2");
  assert.deepEqual(last().frames(), [
    { type: "subscribe", subject: "news.>", id: "sub:news.>" },
    { subject: "news.x", body: "while down" },
  ]);
  assert.deepEqual(states, ["open", "reconnecting", "connecting", "reconnecting", "connecting", "open"]);
});

test("the backoff is capped and resets after a stable connection", () => {
  assert.equal(backoffDelay(20, 500, 30000, () => 0.999999) < 30000, true);
  assert.equal(backoffDelay(3, 500, 30000, () => 1), 4000);
  const { client, sockets, last, clock } = harness({ minDelay: 100, maxDelay: 1000, stableAfter: 1000 });
  last().welcome();
  last().drop();
  clock.advance(50);
  last().welcome();
  clock.advance(5000);  // stable for long enough
  last().drop();
  assert.equal(client.attempts, 1); // reset to 0, then this attempt
  clock.advance(50);
  assert.equal(sockets.length, 3);
});

test("maxAttempts: gives up, state closed, ready() rejects", async () => {
  const { client, last, clock } = harness({ maxAttempts: 1, minDelay: 10 });
  const ready = client.ready();
  last().drop();
  clock.advance(10);
  last().drop();
  assert.equal(client.state, "closed");
  await assert.rejects(ready, (e) => e.code === "not_connected");
});

test("close() is clean: close frame, no reconnect, pending requests rejected", async () => {
  const { client, sockets, last, clock } = harness();
  last().welcome();
  const closes = [];
  client.on("close", (c) => closes.push(c));
  const pending = client.request("svc.a", "q");
  await client.close();
  assert.deepEqual(last().closed, { code: 1000, reason: "" });
  await assert.rejects(pending, (e) => e.code === "not_connected");
  clock.advance(60000);
  assert.equal(sockets.length, 1);
  assert.deepEqual(closes, [{ code: 1000, reason: "", willReconnect: false }]);
  assert.throws(() => client.publish("a", "b"), (e) => e.code === "not_connected");
});

test("the offline queue is bounded", () => {
  const { client } = harness({ maxQueued: 2 });
  client.publish("a", "1");
  client.publish("a", "2");
  assert.throws(() => client.publish("a", "3"), (e) => e.code === "buffer_full");
});

test("msgpack: round trip of every type the protocol uses, and the msgpack subprotocol", () => {
  const value = {
    type: "message", subject: "s".repeat(40), body: new Uint8Array(300).fill(7), id: 70000,
    neg: -5, neg32: -70000, f: 1.5, t: true, n: null, list: [1, "two", [3]], long: "x".repeat(70000),
  };
  const back = msgpack.decode(msgpack.encode(value));
  assert.deepEqual({ ...back, body: [...back.body] }, { ...value, body: [...value.body] });
  const { client, last } = harness({ protocol: "msgpack" });
  assert.deepEqual(last().protocols, [MSGPACK_PROTOCOL]);
  last().open();
  last().onmessage({ data: msgpack.encode({ type: "welcome", session_id: "M", reply_to: "_ws.session.M" }).buffer });
  client.publish("bin", new Uint8Array([1, 2]));
  const sent = msgpack.decode(last().sent[0]);
  assert.deepEqual([...sent.body], [1, 2]);
  assert.equal(sent.subject, "bin");
});

test("bodies: strings, bytes, JSON values; base64 both ways", () => {
  assert.deepEqual([...toBytes("é")], [0xc3, 0xa9]);
  assert.deepEqual([...toBytes({ a: 1 })], [...new TextEncoder().encode('{"a":1}')]);
  const bytes = new Uint8Array(70000).map((_, i) => i & 0xff);
  assert.deepEqual([...base64Decode(base64Encode(bytes))], [...bytes]);
});

test("connect() without a URL needs a page location", () => {
  assert.throws(() => connect(undefined, { WebSocket: class {} }), /no URL given/);
});
