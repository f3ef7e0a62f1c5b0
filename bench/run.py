"""wsprovider benchmarks, side by side with plain ``websockets``, ``picows``, Autobahn and Node ``ws``.

    python bench/run.py            # full run (about 12 minutes)
    python bench/run.py --quick    # about 2 minutes
    python bench/run.py --only W1,W3 --rounds 5
    python bench/run.py --only W6  # workers: 2 worker processes against 1

Workloads (docs/benchmarks.rst has the method and the latest numbers):

* W1 echo throughput, each client keeping WINDOW messages in flight; wsprovider runs the
  full stack (envelope, permissions, lattice routing, a Python echo component, reply
  delivered to the session's address). 100-byte JSON frames at 1 / 10 / 100 clients;
  16 KiB and 64 KiB JSON frames and 100-byte / 16 KiB MessagePack binary frames
  (wsprovider.v1.msgpack) at 10 clients;
* W2 round trip p50/p99, one 100-byte message in flight;
* W3 broadcast to 1,000 sessions of a 100-byte and a 16 KiB frame, deliveries/s;
* W4 idle sessions: memory per session (server RSS delta / sessions) and connects/s;
* W5 WebSocket -> NATS -> echo responder -> WebSocket (skipped when there is no NATS lattice);
* W6 workers (only with --only W6, or --workers): ``--workers 2`` against one process,
  messages per server CPU-second (bench/workers_bench.py).

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

KIB = 1024


def json_echo(size):
    """A JSON envelope of exactly ``size`` bytes: {"subject":"echo.bench","body":"xx..."}.

    The echo component answers with {"type":"message","subject":"_ws.session.<id>",
    "body":"xx..."} (31 bytes more); the baselines echo the frame back as is.
    """
    return ('{"subject":"echo.bench","body":"' + "x" * (size - 34) + '"}').encode()


def msgpack_echo(size):
    """A MessagePack envelope of exactly ``size`` bytes, {"subject": "echo.bench", "body": <bytes>}."""
    import msgpack
    k = size - 30
    while True:
        frame = msgpack.packb({"subject": "echo.bench", "body": (bytes(range(256)) * (k // 256 + 1))[:k]},
                              use_bin_type=True)
        if len(frame) == size:
            return frame
        k += size - len(frame)


def trigger(size):
    """The broadcast trigger whose news frame (bench/servers/news.py) is ``size`` bytes."""
    return ('{"subject":"bench.broadcast","body":"' + "n" * (size - 51) + '"}').encode()


def label(size):
    return f"{size // KIB}KiB" if size >= KIB else f"{size}B"


ECHO_MSG = json_echo(100).decode()  # the 100-byte frame (W2, W5)
assert len(ECHO_MSG) == 100 and len(trigger(100)) == 88

SERVERS = {
    # name: (argv, sends a welcome frame first, url path)
    "wsprovider": ([PY, os.path.join(HERE, "servers", "wsprovider_server.py"), "0"], True, "/ws"),
    "websockets": ([PY, os.path.join(HERE, "servers", "websockets_server.py"), "0"], False, "/"),
    "picows": ([PY, os.path.join(HERE, "servers", "picows_server.py"), "0"], False, "/"),
    "autobahn": ([PY, os.path.join(HERE, "servers", "autobahn_server.py"), "0"], False, "/"),
    "node-ws": (["node", os.path.join(NODE_DIR, "echo_server.js"), "0"], False, "/"),
}
ALL_SERVERS = ["wsprovider", "websockets", "picows", "autobahn", "node-ws"]
REFERENCES = ("websockets", "picows")  # every ratio is given against both
MSGPACK_PROTOCOL = "wsprovider.v1.msgpack"

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


_frame_dir = None
_frame_files: dict = {}


def frame_arg(frame: bytes) -> str:
    """The generator's argument for a frame: ``@path`` of a file holding it (any size, binary)."""
    global _frame_dir
    path = _frame_files.get(frame)
    if path is None:
        if _frame_dir is None:
            _frame_dir = tempfile.TemporaryDirectory(prefix="wsbench-")
        path = _frame_files[frame] = os.path.join(_frame_dir.name, f"frame{len(_frame_files)}")
        with open(path, "wb") as f:
            f.write(frame)
    return "@" + path


def loadgen(server, mode, *args, on_result=None, timeout=120, options=()):
    """Run the Node generator; returns its result with the server's CPU over the same window.

    ``bytes`` arguments are frames (passed through a file); ``options`` are generator flags
    such as ``--binary`` and ``--protocol=NAME``.
    """
    argv = (["node", LOADGEN, mode, server.url] + list(options)
            + [frame_arg(a) if isinstance(a, bytes) else str(a) for a in args] + ["1" if server.welcome else "0"])
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

def w1_metric(clients, size=100, codec="json"):
    """100-byte JSON keeps its historical name ("echo 10 clients"); the others say what they are."""
    if size == 100 and codec == "json":
        return f"echo {clients} clients"
    what = label(size) if codec == "json" else f"{codec} {label(size)}"
    return f"echo {what}, {clients} clients"


def w1_echo(server, p, record, clients, size=100, codec="json"):
    options = ()
    if codec == "msgpack":
        frame = msgpack_echo(size)
        options = ("--binary", f"--protocol={MSGPACK_PROTOCOL}") if server.name == "wsprovider" else ("--binary",)
    else:
        frame = json_echo(size)
    # 64 KiB frames: 4 in flight per client (256 KiB), well inside every server's buffers.
    window = min(p.window, max(2, 256 * KIB // size))
    r = loadgen(server, "echo", clients, window, p.warmup, p.duration, frame, options=options)
    if r.get("error_frames"):
        raise RuntimeError(f"{server.name}: echo replies contained error frames")
    metric = w1_metric(clients, size, codec)
    record("W1", metric, server.name, r["rate"], "msgs/s", r)
    if r.get("server_cpu"):
        record("W1", f"{metric} per server core-second", server.name, r["rate"] / r["server_cpu"], "msgs/s", r)


def w2_latency(server, p, record):
    r = loadgen(server, "latency", p.latency_count, p.latency_count // 10, ECHO_MSG)
    record("W2", "round trip p50", server.name, r["p50_us"], "us", r)
    record("W2", "round trip p99", server.name, r["p99_us"], "us", r)


def w3_metric(p, size=100):
    return f"broadcast to {p.broadcast_clients}" + ("" if size == 100 else f", {label(size)}")


def w3_broadcast(server, p, record, size=100):
    window = 8 if size <= 1024 else 2
    r = loadgen(server, "broadcast", p.broadcast_clients, window, p.warmup, p.duration, trigger(size))
    metric = w3_metric(p, size)
    record("W3", metric, server.name, r["rate"], "deliveries/s", r)
    if r.get("server_cpu"):
        record("W3", f"{metric} per server core-second", server.name, r["rate"] / r["server_cpu"], "deliveries/s", r)


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

HIGHER_IS_BETTER = {"x": True, "msgs/s": True, "deliveries/s": True, "conn/s": True, "us": False, "KiB": False}


def table(results, order):
    rows = []
    for (wl, metric), per_server in results.items():
        unit = per_server["_unit"]
        line = [wl, metric, unit]
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
        for ref in REFERENCES:
            paired = ratio(results, (wl, metric), ref)
            line.append(f"{paired:.2f}x" if paired is not None else "-")
        srv = [r.get("server_cpu") for v, r in ours or () if r.get("server_cpu") is not None]
        gen = [r.get("gen_cpu") for v, r in ours or () if r.get("gen_cpu") is not None]
        line.append(f"{statistics.median(srv) * 100:.0f}%/{statistics.median(gen) * 100:.0f}%" if srv and gen else "-")
        rows.append(line)
    head = ["wl", "metric", "unit"] + order + ["ours/ws*", "ours/picows*", "cpu srv/gen"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in [head] + rows]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def ratio(results, key, ref="websockets"):
    """Median over rounds of (ours / ref) measured back to back in the same round."""
    per = results.get(key)
    if not per or not per.get("wsprovider") or not per.get(ref):
        return None
    pairs = [a / b for (a, _), (b, _) in zip(per["wsprovider"], per[ref]) if b]
    return statistics.median(pairs) if pairs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short round, fewer sessions: about 2 minutes")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float, help="seconds measured per throughput run")
    ap.add_argument("--only", help="comma-separated workloads, e.g. W1,W3 (W6 runs only when named)")
    ap.add_argument("--servers", help="comma-separated servers (default: all)")
    ap.add_argument("--idle-sessions", type=int)
    ap.add_argument("--unpinned", action="store_true",
                    help="W6: do not pin the workers or the generator (a machine with more than 2 cores)")
    ap.add_argument("--workers", type=int, default=2, help="W6: the worker count measured against 1 (default 2)")
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
        ["wsprovider", "websockets", "picows", "node-ws"] if quick else list(ALL_SERVERS))
    for name in names:
        if name not in SERVERS:
            sys.exit(f"bench: unknown server {name!r}; known: {', '.join(SERVERS)}")
    # Payload sizes and the msgpack variant run at 10 clients, without Autobahn (the
    # slowest baseline; 100-byte JSON still measures it).
    sized = [(json_size, "json") for json_size in (16 * KIB, 64 * KIB)] + [(100, "msgpack"), (16 * KIB, "msgpack")]

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

    everyone = set(names)
    no_autobahn = everyone - {"autobahn"}
    for rnd in range(p.rounds):
        # All servers of the round run side by side (idle ones sleep on core 0) and every
        # item is measured on each server back to back, in alternating order, so that
        # drift on the machine hits them alike.
        steps = []  # (what, step, servers it runs on)
        if "W1" in only:
            steps += [(f"W1-{c}", lambda srv, c=c: w1_echo(srv, p, record, c), everyone) for c in p.clients]
            steps += [(f"W1-{codec}-{size}", lambda srv, size=size, codec=codec: w1_echo(srv, p, record, 10, size, codec),
                       no_autobahn) for size, codec in sized]
        if "W2" in only:
            steps.append(("W2", lambda srv: w2_latency(srv, p, record), everyone - {"node-ws"}))
        if "W3" in only:
            for size in (100, 16 * KIB):
                on = everyone if size == 100 else no_autobahn
                steps.append((f"W3-{size}", lambda srv, size=size: w3_broadcast(srv, p, record, size),
                              on if not quick else on - {"node-ws"}))
        servers = {}
        try:
            if steps:
                for name in names:
                    servers[name] = Server(name)
            for i, (_, step, on) in enumerate(steps):
                order = names if (rnd + i) % 2 == 0 else list(reversed(names))
                for name in order:
                    if name in on:
                        step(servers[name])
        finally:
            for server in servers.values():
                server.stop()
        order = names if rnd % 2 == 0 else list(reversed(names))
        if "W4" in only:
            for name in order:
                if name in ("wsprovider", "websockets", "picows") or (name == "autobahn" and not quick):
                    w4_idle(name, p, record)
        print(f"bench: round {rnd + 1}/{p.rounds} done ({time.monotonic() - started:.0f}s)", flush=True)
    if "W5" in only:
        w5_nats(p, record, notes)
    if "W6" in only:
        sys.path.insert(0, HERE)
        import workers_bench
        workers_bench.run(p, record, notes, loadgen_argv=loadgen, json_echo=json_echo)

    order = [n for n in ALL_SERVERS if n in names]
    print()
    print(f"wsprovider benchmarks: {p.rounds} round(s), {p.duration:.0f}s per throughput run, "
          f"server on core {SERVER_CORE}, generator (Node ws) on core {GEN_CORE}; "
          f"median ±half-spread over rounds; *ours/ws, *ours/picows = median of per-round ratios (measured back "
          f"to back); cpu = wsprovider server / generator, 100% = one core")
    print(table(results, order))
    for n in notes:
        print(n)
    if p.json:
        with open(p.json, "w") as f:
            json.dump({f"{k[0]} {k[1]}": {s: [v for v, _ in vals] for s, vals in per.items() if s != "_unit"}
                       for k, per in results.items()}, f, indent=1)
    print(f"bench: total {time.monotonic() - started:.0f}s")
    print()
    for line in summary(results, p, only, sized):
        print(line)


def _fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


def summary(results, p, only, sized):
    """The last lines: ``<item> ratio_vs_<baseline>=<x>`` for every item and both baselines."""
    out = []

    def both(prefix, key):
        for ref in REFERENCES:
            out.append(f"{prefix} ratio_vs_{ref}={_fmt(ratio(results, key, ref))}")

    if "W1" in only:
        for ref in REFERENCES:
            per_count = [ratio(results, ("W1", f"echo {c} clients"), ref) for c in p.clients]
            gm = math.exp(sum(math.log(x) for x in per_count) / len(per_count)) if all(per_count) else None
            if ref == "websockets":
                out.append("W1 echo ratio by clients: " + ", ".join(f"{c}={_fmt(x)}" for c, x in zip(p.clients, per_count))
                           + " (summary: geometric mean)")
            else:
                out.append("W1 echo ratio_vs_picows by clients: "
                           + ", ".join(f"{c}={_fmt(x)}" for c, x in zip(p.clients, per_count)))
            out.append(f"W1 echo ratio_vs_{ref}={_fmt(gm)}")
        for size, codec in sized:
            what = label(size) if codec == "json" else f"{codec} {label(size)}"
            both(f"W1 echo {what}", ("W1", w1_metric(10, size, codec)))
    if "W2" in only:
        both("W2 p50", ("W2", "round trip p50"))
    if "W3" in only:
        both("W3 broadcast", ("W3", w3_metric(p)))
        both(f"W3 broadcast {label(16 * KIB)}", ("W3", w3_metric(p, 16 * KIB)))
    if "W4" in only:
        both("W4 connects", ("W4", f"connects/s ({p.idle_sessions})"))
        both("W4 memory", ("W4", f"memory per idle session ({p.idle_sessions})"))
    if "W6" in only:
        key = ("W6", f"echo 100 clients per server CPU-second, {p.workers} workers / 1")
        per = results.get(key)
        if per and per.get("wsprovider"):
            out.append(f"W6 workers per_cpu_ratio_{p.workers}_vs_1="
                       f"{_fmt(statistics.median(v for v, _ in per['wsprovider']))}")
    return out


if __name__ == "__main__":
    main()
