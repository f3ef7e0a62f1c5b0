"""wsprovider benchmarks, side by side with plain ``websockets`` and plain Autobahn servers.

    python bench/run.py            # full run (a few minutes)
    python bench/run.py --quick    # under a minute
    python bench/run.py --only W1,W3 --rounds 5

Workloads (docs/benchmarks.rst has the method and the latest numbers):

* W1 echo throughput, 1 / 10 / 100 clients, each keeping WINDOW messages in flight;
  wsprovider runs the full stack (envelope, permissions, lattice routing, a Python echo
  component, reply delivered to the session's address);
* W2 round trip p50/p99, one message in flight;
* W3 broadcast to 1,000 sessions, deliveries/s;
* W4 idle sessions: memory per session (server RSS delta / sessions) and connects/s;
* W5 WebSocket -> NATS -> echo responder -> WebSocket (skipped when there is no NATS lattice).

Every server runs pinned to core 0 and the load generator (Node ``ws``, bench/node) to
core 1; the generator reports its own CPU beside the server's. Rounds alternate the order
of the servers; the table shows medians, and the spread (max-min)/median as noise.
Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NODE_DIR = os.path.join(HERE, "node")
LOADGEN = os.path.join(NODE_DIR, "loadgen.js")
PY = sys.executable

# 100-byte JSON envelopes. The echo component answers with
# {"type":"message","subject":"_ws.session.<id>","body":"..."} (131 bytes); the baselines
# echo the 100 bytes back. The broadcast frame is 100 bytes for every server.
ECHO_MSG = '{"subject":"echo.bench","body":"' + "x" * 66 + '"}'
NEWS_BODY = "n" * 49
TRIGGER = '{"subject":"bench.broadcast","body":"' + NEWS_BODY + '"}'
NEWS = '{"type":"message","subject":"bench.news","body":"' + NEWS_BODY + '"}'
assert len(ECHO_MSG) == 100 and len(NEWS) == 100

SERVERS = {
    # name: (argv, sends a welcome frame first, url path)
    "wsprovider": ([PY, os.path.join(HERE, "servers", "wsprovider_server.py"), "0"], True, "/ws"),
    "websockets": ([PY, os.path.join(HERE, "servers", "websockets_server.py"), "0", NEWS], False, "/"),
    "autobahn": ([PY, os.path.join(HERE, "servers", "autobahn_server.py"), "0", NEWS], False, "/"),
    "node-ws": (["node", os.path.join(NODE_DIR, "echo_server.js"), "0", NEWS], False, "/"),
}

SERVER_CORE = 0
GEN_CORE = 1


# -- plumbing ---------------------------------------------------------------------------

def ensure_node():
    if shutil.which("node") is None:
        sys.exit("bench: node is not installed; the load generator needs Node >= 18")
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        print("bench: installing the load generator's dependencies (npm install in bench/node) ...", flush=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True)


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pinned(core):
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        return None

    def set_affinity():
        os.sched_setaffinity(0, {core})
    return set_affinity


class Server:
    def __init__(self, name, extra_args=()):
        self.name = name
        argv, self.welcome, path = SERVERS[name]
        env = dict(os.environ, PYTHONPATH=ROOT)
        # stderr to a file: a full pipe would block a server that logs (websockets logs
        # a traceback per connection the generator drops at the end of a run).
        self.errfile = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(list(argv) + list(extra_args), stdout=subprocess.PIPE, stderr=self.errfile,
                                     text=True, env=env, preexec_fn=pinned(SERVER_CORE), cwd=ROOT)
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY") or not line:
                break
        if not line.startswith("READY"):
            self.stop()
            self.errfile.seek(0)
            err = self.errfile.read()
            raise RuntimeError(f"{name} server did not start: {line!r} {err[-2000:]}")
        self.port = int(line.split()[1])
        self.url = f"ws://127.0.0.1:{self.port}{path}"
        self.ps = psutil.Process(self.proc.pid)

    def cpu(self):
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self):
        return self.ps.memory_info().rss

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errfile.close()


def loadgen(server, mode, *args, on_result=None, timeout=120):
    """Run the Node generator; returns its result with the server's CPU over the same window."""
    argv = ["node", LOADGEN, mode, server.url] + [str(a) for a in args] + ["1" if server.welcome else "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=pinned(GEN_CORE), cwd=NODE_DIR)
    result = None
    c0 = t0 = None
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if line.startswith("START"):
                c0, t0 = server.cpu(), time.monotonic()
            elif line.startswith("{"):
                c1, t1 = server.cpu(), time.monotonic()
                result = json.loads(line)
                if t0 is not None:
                    result["server_cpu"] = (c1 - c0) / max(t1 - t0, 1e-9)
                if on_result is not None:
                    on_result(result)
                proc.stdin.close()
                break
            if time.monotonic() > deadline:
                break
        proc.wait(timeout=max(5, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if result is None:
        raise RuntimeError(f"loadgen {mode} against {server.name} failed: {proc.stderr.read()[-2000:]}")
    time.sleep(0.2)  # let the server finish closing before the next measurement
    return result


# -- workloads --------------------------------------------------------------------------

def w1_echo(server, p, record, clients):
    r = loadgen(server, "echo", clients, p.window, p.warmup, p.duration, ECHO_MSG)
    if r.get("error_frames"):
        raise RuntimeError(f"{server.name}: echo replies contained error frames")
    record("W1", f"echo {clients} clients", server.name, r["rate"], "msgs/s", r)
    if r.get("server_cpu"):
        record("W1", f"echo {clients} clients per server core-second", server.name,
               r["rate"] / r["server_cpu"], "msgs/s", r)


def w2_latency(server, p, record):
    r = loadgen(server, "latency", p.latency_count, p.latency_count // 10, ECHO_MSG)
    record("W2", "round trip p50", server.name, r["p50_us"], "us", r)
    record("W2", "round trip p99", server.name, r["p99_us"], "us", r)


def w3_broadcast(server, p, record):
    r = loadgen(server, "broadcast", p.broadcast_clients, 8, p.warmup, p.duration, TRIGGER)
    record("W3", f"broadcast to {p.broadcast_clients}", server.name, r["rate"], "deliveries/s", r)
    if r.get("server_cpu"):
        record("W3", f"broadcast to {p.broadcast_clients} per server core-second", server.name,
               r["rate"] / r["server_cpu"], "deliveries/s", r)


def w4_idle(name, p, record):
    server = Server(name)
    try:
        time.sleep(0.3)
        before = server.rss()

        def measure(r):
            time.sleep(1.0)  # let the last welcomes and handshakes settle
            r["rss_delta"] = server.rss() - before
        r = loadgen(server, "connect", p.idle_sessions, 200, 60, on_result=measure)
        if r["failed"]:
            raise RuntimeError(f"{name}: {r['failed']} of {p.idle_sessions} connections failed: {r['errors']}")
        record("W4", f"memory per idle session ({p.idle_sessions})", name, r["rss_delta"] / r["opened"] / 1024,
               "KiB", r)
        record("W4", f"connects/s ({p.idle_sessions})", name, r["rate"], "conn/s", r)
    finally:
        server.stop()


def nats_lattice_available():
    return os.path.exists(os.path.join(ROOT, "wsprovider", "lattice", "nats.py"))


def w5_nats(p, record, notes):
    try:
        import nats_bench
    except ImportError:
        nats_bench = None
    if not nats_lattice_available() or nats_bench is None:
        notes.append("W5 skipped: NATS lattice not available")
        return
    nats_bench.run(p, record, notes, Server, loadgen, ECHO_MSG)


# -- report -----------------------------------------------------------------------------

HIGHER_IS_BETTER = {"msgs/s": True, "deliveries/s": True, "conn/s": True, "us": False, "KiB": False}


def table(results, order):
    rows = []
    for (wl, metric), per_server in results.items():
        unit = per_server["_unit"]
        line = [wl, metric, unit]
        ref = per_server.get("websockets")
        ref_med = statistics.median(v for v, _ in ref) if ref else None
        for name in order:
            vals = per_server.get(name)
            if not vals:
                line.append("-")
                continue
            xs = [v for v, _ in vals]
            med = statistics.median(xs)
            spread = (max(xs) - min(xs)) / med * 100 if med and len(xs) > 1 else 0.0
            cell = f"{med:,.1f}" if med < 100 else f"{med:,.0f}"
            if len(xs) > 1:
                cell += f" ±{spread / 2:.0f}%"
            line.append(cell)
        ours = per_server.get("wsprovider")
        paired = ratio(results, (wl, metric))
        line.append(f"{paired:.2f}x" if paired is not None else "-")
        srv = [r.get("server_cpu") for v, r in ours or () if r.get("server_cpu") is not None]
        gen = [r.get("gen_cpu") for v, r in ours or () if r.get("gen_cpu") is not None]
        line.append(f"{statistics.median(srv) * 100:.0f}%/{statistics.median(gen) * 100:.0f}%" if srv and gen else "-")
        rows.append(line)
    head = ["wl", "metric", "unit"] + order + ["ours/ws*", "cpu srv/gen"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in [head] + rows]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def ratio(results, key):
    """Median over rounds of (ours / websockets) measured back to back in the same round."""
    per = results.get(key)
    if not per or not per.get("wsprovider") or not per.get("websockets"):
        return None
    pairs = [a / b for (a, _), (b, _) in zip(per["wsprovider"], per["websockets"]) if b]
    return statistics.median(pairs) if pairs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small and short: under a minute")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds measured per throughput run")
    ap.add_argument("--only", help="comma-separated workloads, e.g. W1,W3")
    ap.add_argument("--servers", help="comma-separated servers (default: all)")
    ap.add_argument("--idle-sessions", type=int)
    ap.add_argument("--json", help="also write the raw results to this file")
    p = ap.parse_args()
    quick = p.quick
    p.rounds = p.rounds or (1 if quick else 3)
    p.duration = p.duration or (1.0 if quick else 3.0)
    p.warmup = 0.3 if quick else 1.0
    p.window = 16
    p.clients = (1, 10, 100)
    p.latency_count = 2000 if quick else 10000
    p.broadcast_clients = 1000
    p.idle_sessions = p.idle_sessions or (2000 if quick else 10000)
    only = set((p.only or "W1,W2,W3,W4,W5").upper().split(","))
    names = p.servers.split(",") if p.servers else (
        ["wsprovider", "websockets", "node-ws"] if quick else ["wsprovider", "websockets", "autobahn", "node-ws"])

    ensure_node()
    fds = raise_fd_limit(p.idle_sessions + 1000)
    if fds < p.idle_sessions + 200:
        print(f"bench: only {fds} file descriptors allowed; W4 uses {fds - 500} sessions", flush=True)
        p.idle_sessions = fds - 500
    if len(os.sched_getaffinity(0)) < 2:
        print("bench: fewer than 2 cores: server and generator share one; numbers are pessimistic", flush=True)

    started = time.monotonic()
    results: dict = {}
    notes: list[str] = []

    def record(wl, metric, server, value, unit, raw):
        per = results.setdefault((wl, metric), {"_unit": unit})
        per.setdefault(server, []).append((value, raw))

    for rnd in range(p.rounds):
        # All servers of the round run side by side (idle ones sleep on core 0) and every
        # item is measured on each server back to back, in alternating order, so that
        # drift on the machine hits them alike.
        steps = []
        if "W1" in only:
            steps += [(f"W1-{c}", lambda srv, c=c: w1_echo(srv, p, record, c), True) for c in p.clients]
        if "W2" in only:
            steps.append(("W2", lambda srv: w2_latency(srv, p, record), False))
        if "W3" in only:
            steps.append(("W3", lambda srv: w3_broadcast(srv, p, record), not quick))
        servers = {}
        try:
            if steps:
                for name in names:
                    servers[name] = Server(name)
            for i, (_, step, with_node) in enumerate(steps):
                order = names if (rnd + i) % 2 == 0 else list(reversed(names))
                for name in order:
                    if name != "node-ws" or with_node:
                        step(servers[name])
        finally:
            for server in servers.values():
                server.stop()
        order = names if rnd % 2 == 0 else list(reversed(names))
        if "W4" in only:
            for name in order:
                if name in ("wsprovider", "websockets") or (name == "autobahn" and not quick):
                    w4_idle(name, p, record)
        print(f"bench: round {rnd + 1}/{p.rounds} done ({time.monotonic() - started:.0f}s)", flush=True)
    if "W5" in only:
        w5_nats(p, record, notes)

    order = [n for n in ["wsprovider", "websockets", "autobahn", "node-ws"] if n in names]
    print()
    print(f"wsprovider benchmarks: {p.rounds} round(s), {p.duration:.0f}s per throughput run, "
          f"server on core {SERVER_CORE}, generator (Node ws) on core {GEN_CORE}; "
          f"median ±half-spread over rounds; *ours/ws = median of per-round ratios (measured back to back); "
          f"cpu = wsprovider server / generator, 100% = one core")
    print(table(results, order))
    for n in notes:
        print(n)
    if p.json:
        with open(p.json, "w") as f:
            json.dump({f"{k[0]} {k[1]}": {s: [v for v, _ in vals] for s, vals in per.items() if s != "_unit"}
                       for k, per in results.items()}, f, indent=1)
    print(f"bench: total {time.monotonic() - started:.0f}s")
    print()

    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"

    if "W1" in only:
        per_count = [ratio(results, ("W1", f"echo {c} clients")) for c in p.clients]
        if all(per_count):
            gm = math.exp(sum(math.log(x) for x in per_count) / len(per_count))
            print("W1 echo ratio by clients: " + ", ".join(f"{c}={fmt(x)}" for c, x in zip(p.clients, per_count))
                  + " (summary: geometric mean)")
        else:
            gm = None
        print(f"W1 echo ratio_vs_websockets={fmt(gm)}")
    if "W2" in only:
        print(f"W2 p50 ratio_vs_websockets={fmt(ratio(results, ('W2', 'round trip p50')))}")
    if "W3" in only:
        print(f"W3 broadcast ratio_vs_websockets={fmt(ratio(results, ('W3', f'broadcast to {p.broadcast_clients}')))}")
    if "W4" in only:
        print(f"W4 connects ratio_vs_websockets={fmt(ratio(results, ('W4', f'connects/s ({p.idle_sessions})')))}")
        print(f"W4 memory ratio_vs_websockets={fmt(ratio(results, ('W4', f'memory per idle session ({p.idle_sessions})')))}")


if __name__ == "__main__":
    main()
