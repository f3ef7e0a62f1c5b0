"""W6: ``--workers N`` against one process, in messages per server CPU-second (used by run.py).

Both runs are ``twistd wsprovider`` with the ``wsprovider.handlers:echo`` handler, as an
operator starts it; W1's 100-byte echo at 100 clients is the traffic (session-local: a
session's message goes to the echo handler and the reply to the session). One process
uses the embedded lattice; N workers use the embedded nats-server they meet on (its CPU
is counted as server CPU, as are the supervisor's and every worker's). By default every
server process is pinned to core 0 and the generator to core 1, so the figure is the
cost of worker mode per message, not its scaling; ``--unpinned`` leaves placement to
the kernel (a machine with more cores: then msgs/s shows the scaling).
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TWISTD = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwistdServer:
    welcome = True

    def __init__(self, workers, pin_core=None):
        self.name = "wsprovider"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.log = tempfile.TemporaryFile("w+")
        argv = [sys.executable] + TWISTD + ["-n", "--pidfile=", "wsprovider", f"--workers={workers}",
                                            f"--uri=tcp:{self.port}:interface=127.0.0.1:backlog=4096",
                                            "--handler=wsprovider.handlers:echo"]
        pre = (lambda: os.sched_setaffinity(0, {pin_core})) if pin_core is not None else None
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=ROOT), preexec_fn=pre)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.log.seek(0)
            text = self.log.read()
            if "wsprovider listening for WebSocket clients" in text:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd --workers={workers} exited: {text[-2000:]}")
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"twistd --workers={workers} did not start")
        time.sleep(0.5)

    def cpu(self):
        total = 0.0
        for p in [self.ps] + self.ps.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                for p in self.ps.children(recursive=True):
                    p.kill()
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run(p, record, notes, loadgen_argv, json_echo, clients=100):
    loadgen = loadgen_argv
    pin = None if p.unpinned or len(os.sched_getaffinity(0)) < 2 else 0
    frame = json_echo(100)
    for rnd in range(p.rounds):
        per = {}
        order = [1, p.workers] if rnd % 2 == 0 else [p.workers, 1]
        for workers in order:
            server = TwistdServer(workers, pin)
            try:
                r = loadgen(server, "echo", clients, p.window, p.warmup, p.duration, frame)
            finally:
                server.stop()
            if r.get("error_frames"):
                raise RuntimeError(f"W6: --workers={workers}: echo replies contained error frames")
            per[workers] = r
            label = "1 process" if workers == 1 else f"{workers} workers"
            record("W6", f"echo {clients} clients, {label}", "wsprovider", r["rate"], "msgs/s", r)
            record("W6", f"echo {clients} clients per server CPU-second, {label}", "wsprovider",
                   r["rate"] / r["server_cpu"], "msgs/s", r)
        ratio = (per[p.workers]["rate"] / per[p.workers]["server_cpu"]) / (per[1]["rate"] / per[1]["server_cpu"])
        record("W6", f"echo {clients} clients per server CPU-second, {p.workers} workers / 1", "wsprovider",
               ratio, "x", {})
    notes.append("W6 " + ("unpinned" if pin is None else "server processes (supervisor, workers, nats-server) "
                          "pinned to core 0") + "; server CPU = the whole process tree")
