// wsprovider.js: the browser client of wsprovider (wire protocol wsprovider.v1, docs/protocol.rst).
// A dependency-free ES module: connect, publish, subscribe, request/reply, reconnect.
//
//   import { connect } from "/sdk/wsprovider.js";
//   const client = connect();                       // ws(s)://<this page's host>/ws
//   const session = await client.ready();           // { id, replyTo, protocol, maxMessageSize }
//   client.subscribe("chat.>", (msg) => console.log(msg.subject, msg.text));
//   client.publish("chat.room1", "hi all");
//   const reply = await client.request("echo.q", "ping", { timeout: 2000 });
//
// Types: wsprovider.d.ts next to this file.

export const JSON_PROTOCOL = "wsprovider.v1.json";
export const MSGPACK_PROTOCOL = "wsprovider.v1.msgpack";
export const VERSION = "1";

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

/** An error frame from the service, or a local failure (code "timeout", "not_connected", ...). */
export class WsproviderError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = "WsproviderError";
    this.code = code;
    this.frame = frame;
  }
}

// -- subjects ------------------------------------------------------------------------

/** NATS wildcard rules, as the service applies them: `*` one token, `>` one or more at the end. */
export function subjectMatches(pattern, subject) {
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length) return false;
    if (p[i] !== "*" && p[i] !== s[i]) return false;
  }
  return p.length === s.length;
}

// -- bodies --------------------------------------------------------------------------

/** Bytes of a body given as a string, Uint8Array, ArrayBuffer(View), or anything JSON. */
export function toBytes(body) {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  if (typeof body === "string") return encoder.encode(body);
  return encoder.encode(JSON.stringify(body));
}

export function base64Encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

export function base64Decode(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function utf8OrNull(bytes) {
  try {
    return strictDecoder.decode(bytes);
  } catch {
    return null;
  }
}

/** A received message. `body` is always a Uint8Array; `text` and `json()` read it. */
export class Message {
  constructor(client, subject, body, replyTo) {
    this.subject = subject;
    this.body = body;
    this.replyTo = replyTo ?? null;
    Object.defineProperty(this, "_client", { value: client });
  }
  get text() {
    return new TextDecoder().decode(this.body);
  }
  json() {
    return JSON.parse(this.text);
  }
  /** Answer a message that carries a reply_to (once). */
  respond(body) {
    if (!this.replyTo) throw new WsproviderError("bad_frame", `message on ${this.subject} has no reply_to`);
    this._client.publish(this.replyTo, body);
  }
}

// -- MessagePack: the subset the protocol uses (maps, strings, bytes, ints, floats, bool, nil, arrays)

export const msgpack = {
  encode(value) {
    const parts = [];
    let size = 0;
    const push = (bytes) => {
      parts.push(bytes);
      size += bytes.length;
    };
    const head = (small, base8, length) => {
      if (small !== null && length < 16) push(Uint8Array.of(small | length));
      else if (length < 0x10000) push(Uint8Array.of(base8 + 1, length >> 8, length & 0xff));
      else push(Uint8Array.of(base8 + 2, length >>> 24, (length >> 16) & 0xff, (length >> 8) & 0xff, length & 0xff));
    };
    const write = (v) => {
      if (v === null || v === undefined) push(Uint8Array.of(0xc0));
      else if (v === false) push(Uint8Array.of(0xc2));
      else if (v === true) push(Uint8Array.of(0xc3));
      else if (typeof v === "number" && Number.isInteger(v) && v >= 0 && v < 2 ** 32) {
        if (v < 128) push(Uint8Array.of(v));
        else if (v < 256) push(Uint8Array.of(0xcc, v));
        else if (v < 0x10000) push(Uint8Array.of(0xcd, v >> 8, v & 0xff));
        else push(Uint8Array.of(0xce, v >>> 24, (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff));
      } else if (typeof v === "number" && Number.isInteger(v) && v < 0 && v >= -(2 ** 31)) {
        if (v >= -32) push(Uint8Array.of(v & 0xff));
        else {
          const b = new Uint8Array(5);
          b[0] = 0xd2;
          new DataView(b.buffer).setInt32(1, v);
          push(b);
        }
      } else if (typeof v === "number") {
        const b = new Uint8Array(9);
        b[0] = 0xcb;
        new DataView(b.buffer).setFloat64(1, v);
        push(b);
      } else if (typeof v === "string") {
        const bytes = encoder.encode(v);
        if (bytes.length < 32) push(Uint8Array.of(0xa0 | bytes.length));
        else if (bytes.length < 256) push(Uint8Array.of(0xd9, bytes.length));
        else head(null, 0xd9, bytes.length);
        push(bytes);
      } else if (v instanceof Uint8Array) {
        if (v.length < 256) push(Uint8Array.of(0xc4, v.length));
        else head(null, 0xc4, v.length);
        push(v);
      } else if (Array.isArray(v)) {
        head(0x90, 0xdc - 1, v.length);
        v.forEach(write);
      } else if (typeof v === "object") {
        const keys = Object.keys(v).filter((k) => v[k] !== undefined);
        head(0x80, 0xde - 1, keys.length);
        for (const k of keys) {
          write(k);
          write(v[k]);
        }
      } else throw new TypeError(`msgpack: cannot encode ${typeof v}`);
    };
    write(value);
    const out = new Uint8Array(size);
    let offset = 0;
    for (const p of parts) {
      out.set(p, offset);
      offset += p.length;
    }
    return out;
  },

  decode(input) {
    const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let pos = 0;
    const need = (n) => {
      if (pos + n > bytes.length) throw new WsproviderError("bad_frame", "msgpack: truncated data");
    };
    const u = (n) => {
      need(n);
      let v = 0;
      for (let i = 0; i < n; i++) v = v * 256 + bytes[pos++];
      return v;
    };
    const raw = (n) => {
      need(n);
      const out = bytes.slice(pos, pos + n);
      pos += n;
      return out;
    };
    const str = (n) => new TextDecoder().decode(raw(n));
    const arr = (n) => Array.from({ length: n }, () => read());
    const map = (n) => {
      const out = {};
      for (let i = 0; i < n; i++) {
        const k = read();
        out[k] = read();
      }
      return out;
    };
    const signed = (n) => {
      need(n);
      const at = pos;
      pos += n;
      if (n === 1) return view.getInt8(at);
      if (n === 2) return view.getInt16(at);
      if (n === 4) return view.getInt32(at);
      return Number(view.getBigInt64(at));
    };
    const read = () => {
      const b = u(1);
      if (b < 0x80) return b;
      if (b < 0x90) return map(b & 0x0f);
      if (b < 0xa0) return arr(b & 0x0f);
      if (b < 0xc0) return str(b & 0x1f);
      if (b >= 0xe0) return b - 256;
      switch (b) {
        case 0xc0: return null;
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return raw(u(1));
        case 0xc5: return raw(u(2));
        case 0xc6: return raw(u(4));
        case 0xca: { need(4); const v = view.getFloat32(pos); pos += 4; return v; }
        case 0xcb: { need(8); const v = view.getFloat64(pos); pos += 8; return v; }
        case 0xcc: return u(1);
        case 0xcd: return u(2);
        case 0xce: return u(4);
        case 0xcf: return u(8);
        case 0xd0: return signed(1);
        case 0xd1: return signed(2);
        case 0xd2: return signed(4);
        case 0xd3: return signed(8);
        case 0xd9: return str(u(1));
        case 0xda: return str(u(2));
        case 0xdb: return str(u(4));
        case 0xdc: return arr(u(2));
        case 0xdd: return arr(u(4));
        case 0xde: return map(u(2));
        case 0xdf: return map(u(4));
        default: throw new WsproviderError("bad_frame", `msgpack: unsupported type 0x${b.toString(16)}`);
      }
    };
    const value = read();
    if (pos !== bytes.length) throw new WsproviderError("bad_frame", "msgpack: trailing bytes");
    return value;
  },
};

// -- codecs: frame objects <-> WebSocket payloads ------------------------------------------

const jsonCodec = {
  protocol: JSON_PROTOCOL,
  encode(frame, body) {
    if (body !== undefined) {
      const text = utf8OrNull(body);
      if (text !== null) frame.body = text;
      else frame.body_base64 = base64Encode(body);
    }
    return JSON.stringify(frame);
  },
  decode(data) {
    if (typeof data !== "string") throw new WsproviderError("bad_frame", "the JSON protocol uses text frames");
    const frame = JSON.parse(data);
    if (typeof frame.body_base64 === "string") frame.body = base64Decode(frame.body_base64);
    else if (typeof frame.body === "string") frame.body = encoder.encode(frame.body);
    return frame;
  },
};

const msgpackCodec = {
  protocol: MSGPACK_PROTOCOL,
  encode(frame, body) {
    if (body !== undefined) frame.body = body;
    return msgpack.encode(frame);
  },
  decode(data) {
    if (typeof data === "string") throw new WsproviderError("bad_frame", "the msgpack protocol uses binary frames");
    const frame = msgpack.decode(new Uint8Array(data));
    if (typeof frame.body === "string") frame.body = encoder.encode(frame.body);
    return frame;
  },
};

// -- the client ------------------------------------------------------------------------

const DEFAULTS = {
  protocol: "json",
  requestTimeout: 5000,
  reconnect: true,
  minDelay: 500,
  maxDelay: 30000,
  maxAttempts: Infinity,
  stableAfter: 5000,
  maxQueued: 1000,
};

/** The URL of the service that served this page: ws(s)://host/ws. */
export function defaultUrl(path = "/ws") {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new WsproviderError("bad_frame", "connect(url): no URL given and no page location to derive one from");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}${path}`;
}

/** Capped full-jitter backoff: a random delay in [0, min(maxDelay, minDelay * 2^attempt)). */
export function backoffDelay(attempt, minDelay, maxDelay, random = Math.random) {
  return random() * Math.min(maxDelay, minDelay * 2 ** attempt);
}

/**
 * A connection to wsprovider that reconnects by itself. States: "connecting", "open",
 * "reconnecting" (waiting before the next attempt), "closed" (by close(), or gave up).
 * Events (client.on(name, fn) returns a function that removes fn):
 *   "state" {state, previous}; "welcome" session; "message" Message (not matched by any
 *   subscription: to this session's address, broadcasts); "error" WsproviderError (error
 *   frames not tied to a request); "subscribed" pattern (live at the service, again after
 *   each reconnect); "close" {code, reason, willReconnect}.
 */
export class Client {
  constructor(url, options = {}) {
    this.url = url ?? defaultUrl(options.path);
    this.options = { ...DEFAULTS, ...options };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this._WebSocket) throw new WsproviderError("bad_frame", "no WebSocket implementation: pass options.WebSocket");
    this._timers = options.timers ?? { setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) };
    this._random = options.random ?? Math.random;
    this._now = options.now ?? (() => Date.now());
    this.codec = this.options.protocol === "msgpack" ? msgpackCodec : jsonCodec;
    this.state = "connecting";
    this.session = null;
    this.attempts = 0;
    this._listeners = new Map();
    this._subs = new Map();      // pattern -> {pattern, queue, callbacks: Set, acked, waiters}
    this._rr = new Map();        // subject -> round-robin counter over overlapping subscriptions
    this._pending = new Map();   // request id -> {resolve, reject, timer}
    this._queue = [];            // frames sent while not open, flushed after welcome
    this._nextId = 1;
    this._socket = null;
    this._retry = null;
    this._openedAt = 0;
    this._readyWaiters = [];
    this._closedWaiters = [];
    this._open();
  }

  // -- events --
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }
  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }
  _emit(name, value) {
    for (const fn of [...(this._listeners.get(name) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }
  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  /** Resolves with the session once welcomed (now, if already open). */
  ready() {
    if (this.state === "open" && this.session) return Promise.resolve(this.session);
    if (this.state === "closed") return Promise.reject(new WsproviderError("not_connected", "the client is closed"));
    return new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }));
  }

  // -- connection --
  _connectUrl() {
    const token = typeof this.options.token === "function" ? this.options.token() : this.options.token;
    if (!token) return this.url;
    const u = new URL(this.url);
    u.searchParams.set("token", token);
    return u.toString();
  }

  _open() {
    let socket;
    try {
      socket = new this._WebSocket(this._connectUrl(), [this.codec.protocol]);
    } catch (e) {
      this._emit("error", new WsproviderError("not_connected", `cannot open ${this.url}: ${e.message}`));
      this._scheduleReconnect(1006, String(e.message));
      return;
    }
    socket.binaryType = "arraybuffer";
    this._socket = socket;
    socket.onopen = () => {
      this._openedAt = this._now();
    };
    socket.onmessage = (event) => this._received(event.data);
    socket.onclose = (event) => {
      if (this._socket !== socket) return;
      this._socket = null;
      this._lost(event.code, event.reason);
    };
    socket.onerror = () => {}; // the close event follows, with the code
  }

  _received(data) {
    let frame;
    try {
      frame = this.codec.decode(data);
    } catch (e) {
      this._emit("error", new WsproviderError("bad_frame", `undecodable frame from the service: ${e.message}`));
      return;
    }
    switch (frame.type) {
      case "welcome": return this._welcome(frame);
      case "message": return this._message(frame);
      case "reply": return this._settle(frame.id, (p) => p.resolve(new Message(this, frame.subject, frame.body ?? new Uint8Array(0), frame.reply_to)));
      case "error": {
        const error = new WsproviderError(frame.code, frame.message, frame);
        if (frame.id !== undefined && this._pending.has(frame.id)) return this._settle(frame.id, (p) => p.reject(error));
        this._failSubscribeWaiters(frame.id, error);
        return this._emit("error", error);
      }
      case "subscribed": return this._subscribed(frame.subject);
      case "pong": return this._settle(frame.id, (p) => p.resolve(frame));
      default: return undefined; // unsubscribed, and future frame types
    }
  }

  _welcome(frame) {
    this.session = {
      id: frame.session_id,
      replyTo: frame.reply_to,
      protocol: frame.protocol,
      maxMessageSize: frame.max_message_size,
    };
    this._setState("open");
    for (const sub of this._subs.values()) {
      sub.acked = false;
      this._send({ type: "subscribe", subject: sub.pattern, queue: sub.queue, id: `sub:${sub.pattern}` });
    }
    for (const [queued, body] of this._queue.splice(0)) {
      if (queued.type === "request" || queued.type === "ping") {
        const pending = this._pending.get(queued.id);
        if (!pending) continue; // timed out while waiting for the connection
        pending.sent = true;
      }
      this._send(queued, body);
    }
    this._emit("welcome", this.session);
    for (const w of this._readyWaiters.splice(0)) w.resolve(this.session);
  }

  _message(frame) {
    const msg = new Message(this, frame.subject, frame.body ?? new Uint8Array(0), frame.reply_to);
    const matching = [];
    for (const sub of this._subs.values()) if (subjectMatches(sub.pattern, msg.subject)) matching.push(sub);
    if (matching.length === 0) return this._emit("message", msg);
    // The service sends one frame per matching subscription (as NATS does): hand each
    // subscription one of them, so overlapping patterns each see the message once.
    const turn = this._rr.get(msg.subject) ?? 0;
    this._rr.set(msg.subject, (turn + 1) % matching.length);
    if (this._rr.size > 10000) this._rr.clear();
    const sub = matching[turn % matching.length];
    for (const cb of [...sub.callbacks]) {
      try {
        cb(msg);
      } catch (e) {
        queueMicrotask(() => { throw e; });
      }
    }
  }

  _settle(id, fn) {
    const pending = this._pending.get(id);
    if (!pending) return;
    this._pending.delete(id);
    this._timers.clearTimeout(pending.timer);
    fn(pending);
  }

  _lost(code, reason) {
    const stable = this._openedAt && this._now() - this._openedAt >= this.options.stableAfter;
    if (stable) this.attempts = 0;
    this._openedAt = 0;
    const error = new WsproviderError("not_connected", `connection lost (${code}${reason ? ": " + reason : ""}); the request may or may not have been delivered`);
    for (const [id, p] of [...this._pending]) if (p.sent || this.state === "closed") this._settle(id, (q) => q.reject(error));
    if (this.state === "closed") {
      this._emit("close", { code, reason, willReconnect: false });
      for (const w of this._closedWaiters.splice(0)) w();
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    const o = this.options;
    const willReconnect = o.reconnect !== false && this.attempts < o.maxAttempts;
    this._emit("close", { code, reason, willReconnect });
    if (!willReconnect) {
      this._setState("closed");
      const error = new WsproviderError("not_connected", `gave up connecting to ${this.url} after ${this.attempts} attempts`);
      for (const w of this._readyWaiters.splice(0)) w.reject(error);
      return;
    }
    const delay = backoffDelay(this.attempts, o.minDelay, o.maxDelay, this._random);
    this.attempts += 1;
    this._setState("reconnecting");
    this._retry = this._timers.setTimeout(() => {
      this._retry = null;
      if (this.state !== "reconnecting") return;
      this._setState("connecting");
      this._open();
    }, delay);
  }

  /** Close for good (no reconnect). Resolves once the socket is closed. */
  close(code = 1000, reason = "") {
    if (this.state === "closed" && !this._socket) return Promise.resolve();
    this._setState("closed");
    if (this._retry !== null) {
      this._timers.clearTimeout(this._retry);
      this._retry = null;
    }
    const error = new WsproviderError("not_connected", "the client was closed");
    for (const w of this._readyWaiters.splice(0)) w.reject(error);
    this._queue.length = 0;
    const socket = this._socket;
    if (!socket) {
      for (const id of [...this._pending.keys()]) this._settle(id, (p) => p.reject(error));
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      this._closedWaiters.push(resolve);
      socket.close(code, reason);
    });
  }

  // -- sending --
  /** Send now (true) or hold until the next welcome (false). */
  _send(frame, body) {
    if (this.state !== "open" || !this._socket) {
      if (this.state === "closed") throw new WsproviderError("not_connected", "the client is closed");
      if (this._queue.length >= this.options.maxQueued) {
        throw new WsproviderError("buffer_full", `${this._queue.length} frames wait for the connection (maxQueued)`);
      }
      this._queue.push([frame, body]);
      return false;
    }
    this._socket.send(this.codec.encode({ ...frame }, body));
    return true;
  }

  /** Publish a body (string, Uint8Array, or JSON-able) to a subject. Held in order while reconnecting. */
  publish(subject, body, { replyTo } = {}) {
    const frame = { subject };
    if (replyTo) frame.reply_to = replyTo;
    this._send(frame, toBytes(body));
  }

  /**
   * Call callback(Message) for every message on subjects matching pattern (`*`, `>`).
   * Returns a Subscription; its `ready` resolves once the service has it live, and it is
   * renewed by itself after every reconnect.
   */
  subscribe(pattern, callback, { queue } = {}) {
    let sub = this._subs.get(pattern);
    if (!sub) {
      sub = { pattern, queue, callbacks: new Set(), acked: false, waiters: [] };
      this._subs.set(pattern, sub);
      // Not open yet: the welcome (re)subscribes every pattern in the table.
      if (this.state === "open") this._send({ type: "subscribe", subject: pattern, queue, id: `sub:${pattern}` });
    }
    sub.callbacks.add(callback);
    const ready = sub.acked ? Promise.resolve() : new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
    ready.catch(() => {});
    return {
      pattern,
      ready,
      unsubscribe: () => this._unsubscribe(pattern, callback),
    };
  }

  _subscribed(pattern) {
    const sub = this._subs.get(pattern);
    if (!sub) return;
    sub.acked = true;
    for (const w of sub.waiters.splice(0)) w.resolve();
    this._emit("subscribed", pattern);
  }

  _failSubscribeWaiters(id, error) {
    if (typeof id !== "string" || !id.startsWith("sub:")) return;
    const pattern = id.slice(4);
    const sub = this._subs.get(pattern);
    if (!sub) return;
    this._subs.delete(pattern); // refused (permission_denied, too_many_subscriptions): not renewed
    for (const w of sub.waiters.splice(0)) w.reject(error);
  }

  _unsubscribe(pattern, callback) {
    const sub = this._subs.get(pattern);
    if (!sub) return;
    sub.callbacks.delete(callback);
    if (sub.callbacks.size > 0) return;
    this._subs.delete(pattern);
    if (this.state === "open") this._send({ type: "unsubscribe", subject: pattern });
  }

  /** Publish and wait for one reply. Resolves with a Message; rejects with WsproviderError
   * ("timeout", "no_responders", "not_connected", ...). */
  request(subject, body, { timeout } = {}) {
    const timeoutMs = Math.max(1, Math.round(timeout ?? this.options.requestTimeout));
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      // The service enforces timeout_ms and answers "timeout"; this timer only covers a
      // service that never answers at all.
      const timer = this._timers.setTimeout(() => {
        this._pending.delete(id);
        reject(new WsproviderError("timeout", `no reply to ${subject} within ${timeoutMs} ms`));
      }, timeoutMs + 2000);
      const pending = { resolve, reject, timer, sent: false };
      this._pending.set(id, pending);
      try {
        pending.sent = this._send({ type: "request", id, subject, timeout_ms: timeoutMs }, toBytes(body));
      } catch (e) {
        this._settle(id, (p) => p.reject(e));
      }
    });
  }

  /** Round trip to the service (a ping frame). */
  ping({ timeout = 5000 } = {}) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = this._timers.setTimeout(() => {
        this._pending.delete(id);
        reject(new WsproviderError("timeout", `no pong within ${timeout} ms`));
      }, timeout);
      const pending = { resolve, reject, timer, sent: false };
      this._pending.set(id, pending);
      try {
        pending.sent = this._send({ type: "ping", id });
      } catch (e) {
        this._settle(id, (p) => p.reject(e));
      }
    });
  }
}

/** Open a client (see Client). `url` defaults to ws(s)://<this page's host>/ws. */
export function connect(url, options) {
  if (url !== undefined && typeof url === "object" && url !== null) return new Client(undefined, url);
  return new Client(url, options);
}

export default connect;
