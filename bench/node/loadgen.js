#!/usr/bin/env node
// Load generator for bench/run.py (Node + ws). Every loop is bounded by a duration or a
// count; it only ever connects to the URL it is given (run.py passes 127.0.0.1).
//
//   node loadgen.js echo      URL CLIENTS WINDOW WARMUP_S DURATION_S MESSAGE WELCOME
//   node loadgen.js latency   URL COUNT WARMUP MESSAGE WELCOME
//   node loadgen.js broadcast URL CLIENTS WINDOW WARMUP_S DURATION_S TRIGGER WELCOME
//   node loadgen.js connect   URL COUNT CONCURRENCY HOLD_S WELCOME
//
// MESSAGE / TRIGGER is the frame's text, or @PATH to read the frame from a file (large
// or binary frames). Options anywhere after the mode: --binary sends binary frames,
// --protocol=NAME offers that WebSocket subprotocol (e.g. wsprovider.v1.msgpack).
// WELCOME=1 waits for the server's first frame (wsprovider's welcome) before a
// connection counts as open. Output: "START" when the measured window begins, then one
// JSON line with the result (including this process's own CPU use in that window).
'use strict';
const WebSocket = require('ws');

const fs = require('fs');

let TEXT = { binary: false };
// An all-zero masking key: ws then skips masking its frames (the servers unmask as usual),
// which keeps the generator below its ceiling with 16 and 64 KiB frames. Fine for a
// benchmark on loopback; a browser's random key protects proxies, not the server.
const OPTS = { perMessageDeflate: false, maxPayload: 1 << 20, generateMask: (mask) => mask.fill(0) };
let PROTOCOLS = [];
// An error frame in either codec: JSON '"type":"error"', msgpack fixstr "type" then "error".
const ERROR_JSON = '"type":"error"';
const ERROR_MSGPACK = Buffer.from([0xa4, 0x74, 0x79, 0x70, 0x65, 0xa5, 0x65, 0x72, 0x72, 0x6f, 0x72]);

function frame(spec) {
  return spec.startsWith('@') ? fs.readFileSync(spec.slice(1)) : Buffer.from(spec);
}

function isError(data) {
  return data.indexOf(ERROR_JSON) !== -1 || data.indexOf(ERROR_MSGPACK) !== -1;
}

function cpuNow() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function now() {
  return Number(process.hrtime.bigint()) / 1e9;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(msg) {
  process.stderr.write('loadgen: ' + msg + '\n');
  process.exit(2);
}

// Open `count` connections, at most `concurrency` handshakes at a time.
function openMany(url, count, concurrency, welcome, onEach) {
  return new Promise((resolve) => {
    const socks = new Array(count);
    let started = 0, opened = 0, failed = 0, inflight = 0;
    const errors = {};
    function startOne() {
      const i = started++;
      inflight++;
      const ws = new WebSocket(url, PROTOCOLS, OPTS);
      socks[i] = ws;
      let done = false;
      const ready = () => {
        if (done) return;
        done = true;
        inflight--;
        opened++;
        if (onEach) onEach(ws, i);
        next();
      };
      ws.on('error', (e) => {
        if (!done) {
          done = true;
          inflight--;
          failed++;
          errors[e.code || e.message] = (errors[e.code || e.message] || 0) + 1;
          next();
        }
      });
      if (welcome) ws.once('message', ready);
      else ws.once('open', ready);
    }
    function next() {
      if (opened + failed === count) {
        resolve({ socks, opened, failed, errors });
        return;
      }
      while (started < count && inflight < concurrency) startOne();
    }
    next();
  });
}

function sleep(s) {
  return new Promise((r) => setTimeout(r, s * 1000));
}

// Close handshakes (so that servers do not log dropped connections), bounded by 3 s.
function closeAll(socks) {
  const open = socks.filter((ws) => ws && ws.readyState !== WebSocket.CLOSED);
  let left = open.length;
  if (!left) return Promise.resolve();
  return Promise.race([
    new Promise((r) => {
      for (const ws of open) {
        ws.once('close', () => { if (--left === 0) r(); });
        ws.close(1000);
      }
    }),
    sleep(3),
  ]).then(() => { for (const ws of open) ws.terminate(); });
}

async function echo(url, clients, window, warmup, duration, message, welcome) {
  const payload = frame(message);
  const { socks, opened, failed, errors } = await openMany(url, clients, 100, welcome);
  if (failed) fail(`echo: ${failed} connections failed ${JSON.stringify(errors)}`);
  let received = 0, errorsSeen = 0, running = true;
  for (const ws of socks) {
    ws.on('message', (data) => {
      received++;
      if ((received & 63) === 1 && isError(data)) errorsSeen++;
      if (running) ws.send(payload, TEXT);
    });
    for (let k = 0; k < window; k++) ws.send(payload, TEXT);
  }
  await sleep(warmup);
  const r0 = received, c0 = cpuNow(), t0 = now();
  process.stdout.write('START\n');
  await sleep(duration);
  const r1 = received, c1 = cpuNow(), t1 = now();
  running = false;
  emit({ workload: 'echo', clients: opened, window, msgs: r1 - r0, seconds: t1 - t0,
         rate: (r1 - r0) / (t1 - t0), gen_cpu: (c1 - c0) / (t1 - t0), error_frames: errorsSeen });
  await closeAll(socks);
}

async function latency(url, count, warmup, message, welcome) {
  const payload = frame(message);
  const { socks, failed } = await openMany(url, 1, 1, welcome);
  if (failed) fail('latency: connection failed');
  const ws = socks[0];
  const samples = new Float64Array(count);
  let i = -warmup, t = 0n, c0 = 0, t0 = 0;
  await new Promise((resolve) => {
    ws.on('message', () => {
      const dt = process.hrtime.bigint() - t;
      if (i >= 0) samples[i] = Number(dt) / 1e3;
      i++;
      if (i === 0) { c0 = cpuNow(); t0 = now(); process.stdout.write('START\n'); }
      if (i >= count) { resolve(); return; }
      t = process.hrtime.bigint();
      ws.send(payload, TEXT);
    });
    t = process.hrtime.bigint();
    ws.send(payload, TEXT);
  });
  const t1 = now(), c1 = cpuNow();
  const sorted = Array.from(samples).sort((a, b) => a - b);
  const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  emit({ workload: 'latency', count, p50_us: q(0.5), p90_us: q(0.9), p99_us: q(0.99),
         mean_us: sorted.reduce((a, b) => a + b, 0) / sorted.length,
         seconds: t1 - t0, gen_cpu: (c1 - c0) / (t1 - t0) });
  await closeAll([ws]);
}

async function broadcast(url, clients, window, warmup, duration, trigger, welcome) {
  const payload = frame(trigger);
  const { socks, failed, errors } = await openMany(url, clients, 100, welcome);
  if (failed) fail(`broadcast: ${failed} connections failed ${JSON.stringify(errors)}`);
  const sender = socks[0];
  let delivered = 0, sent = 0, running = true;
  const pump = () => {
    // at most `window` broadcasts not yet seen by every session
    while (running && sent - Math.floor(delivered / clients) < window) {
      sent++;
      sender.send(payload, TEXT);
    }
  };
  for (const ws of socks) {
    ws.on('message', () => {
      delivered++;
      if (delivered % clients === 0) pump();
    });
  }
  pump();
  await sleep(warmup);
  const d0 = delivered, c0 = cpuNow(), t0 = now();
  process.stdout.write('START\n');
  await sleep(duration);
  const d1 = delivered, c1 = cpuNow(), t1 = now();
  running = false;
  emit({ workload: 'broadcast', clients, window, deliveries: d1 - d0, seconds: t1 - t0,
         rate: (d1 - d0) / (t1 - t0), broadcasts_sent: sent, gen_cpu: (c1 - c0) / (t1 - t0) });
  await closeAll(socks);
}

async function connect(url, count, concurrency, hold, welcome) {
  const c0 = cpuNow(), t0 = now();
  process.stdout.write('START\n');
  const { socks, opened, failed, errors } = await openMany(url, count, concurrency, welcome);
  const t1 = now(), c1 = cpuNow();
  emit({ workload: 'connect', requested: count, opened, failed, errors, seconds: t1 - t0,
         rate: opened / (t1 - t0), gen_cpu: (c1 - c0) / (t1 - t0) });
  // Hold the idle connections until run.py has measured the server (stdin closes) or
  // until the hold time is over, whichever comes first.
  await Promise.race([sleep(hold), new Promise((r) => { process.stdin.on('end', r); process.stdin.on('close', r); process.stdin.resume(); })]);
  await closeAll(socks);
}

async function main() {
  const argv = [];
  for (const arg of process.argv.slice(2)) {
    if (arg === '--binary') TEXT = { binary: true };
    else if (arg.startsWith('--protocol=')) PROTOCOLS = [arg.slice('--protocol='.length)];
    else argv.push(arg);
  }
  const [mode, url, ...a] = argv;
  if (!url || !url.startsWith('ws://127.0.0.1:')) fail('the URL must be ws://127.0.0.1:PORT/...');
  const welcome = a[a.length - 1] === '1';
  if (mode === 'echo') await echo(url, +a[0], +a[1], +a[2], +a[3], a[4], welcome);
  else if (mode === 'latency') await latency(url, +a[0], +a[1], a[2], welcome);
  else if (mode === 'broadcast') await broadcast(url, +a[0], +a[1], +a[2], +a[3], a[4], welcome);
  else if (mode === 'connect') await connect(url, +a[0], +a[1], +a[2], welcome);
  else fail('unknown mode ' + mode);
  setTimeout(() => process.exit(0), 200);
}

main().catch((e) => fail(e.stack || String(e)));
