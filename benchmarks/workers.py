"""Worker processes measured: messages per second with 1 and with N workers, how the
connections spread over the workers, what handing a client over costs, and how the other
design (workers accepting on a shared listener with EPOLLEXCLUSIVE) spreads them.

    python benchmarks/workers.py [--workers 2] [--duration 5] [--conns 100] [--burn-us 50]

Scenarios, each printed as a table:

- cpu: a handler that burns about --burn-us of Python CPU per message (a fixed amount of work,
  calibrated here at start), 100 connections x 1 in flight, pyuds's C load generator.
- echo: the echo handler, 100 connections x 16 in flight.
- balance: the share of the 100 connections and of the messages each worker got (from
  Server.stats()["workers"]).
- connect: new connections per second (connect, one request, close) from 4 clients, through
  one process and through a supervisor that hands each to a worker.
- shared listener: the same number of processes waiting in epoll on one listener with
  EPOLLEXCLUSIVE, one accept per wake-up (the design not taken), 100 clients connecting.

Servers are not pinned: the workers and the load generator share the machine's cores, so on a
small machine the figures are indicative. Nothing here is a test; it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

HANDLERS = '''
import os
N = int(os.environ.get("BURN_N", "0"))

def burn(client, message):
    total = 0
    for i in range(N):
        total += i
    return message
'''

# The server, in a process of its own: serves until stdin closes, then prints its stats.
SERVE = '''
import json, sys
import pyuds, handlers
path, workers, handler = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = pyuds.Server(path, getattr(handlers, handler) if handler != "echo" else None, workers=workers)
server.start()
print("ready", flush=True)
sys.stdin.read()
stats = server.stats()
server.shutdown(timeout=30)
print(json.dumps(stats), flush=True)
'''


def calibrate(burn_us: float) -> int:
    """The loop count of handlers.burn that takes burn_us of CPU here (best of several)."""
    def cost(n: int) -> float:
        best = float("inf")
        for _ in range(20):
            t = time.process_time_ns()
            total = 0
            for i in range(n):
                total += i
            best = min(best, time.process_time_ns() - t)
        return best / 1000

    n = 1000
    return max(1, int(n * burn_us / cost(n)))


def run_server(workdir: str, workers: int, handler: str, env: dict) -> subprocess.Popen:
    path = os.path.join(workdir, "w.sock")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, path, str(workers), handler], cwd=workdir, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError("the server did not start")
    time.sleep(0.5)  # the workers report ready
    return proc


def stop_server(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate("", timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def loadgen(path: str, conns: int, depth: int, duration: float, workdir: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "pyuds._bench", "--loadgen", "--path", path, "--conns", str(conns),
                          "--depth", str(depth), "--size", "64", "--duration", str(duration), "--warmup", "1",
                          "--verify", "echo"], cwd=workdir, capture_output=True, text=True, timeout=duration + 60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if out.returncode != 0 or result.get("errors") or result.get("lost"):
        raise RuntimeError(f"the load generator saw errors: {out.stderr.strip()[:300]}")
    return result


def throughput(args, workdir: str, handler: str, depth: int, env: dict) -> dict[int, tuple[float, dict]]:
    results = {}
    for workers in (1, args.workers):
        proc = run_server(workdir, workers, handler, env)
        try:
            result = loadgen(os.path.join(workdir, "w.sock"), args.conns, depth, args.duration, workdir)
        finally:
            stats = stop_server(proc)
        results[workers] = (result["msgs_per_s"], stats)
    return results


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect_rate(args, workdir: str, env: dict) -> dict[int, tuple[float, float]]:
    """Connections per second, each a connect, one request and a close, from 4 threads (which
    the clients' own Python limits), and the CPU the server process (with workers, the
    supervisor alone) spent per connection."""
    import pyuds

    rates = {}
    for workers in (1, args.workers):
        proc = run_server(workdir, workers, "echo", env)
        path = os.path.join(workdir, "w.sock")
        counts = [0] * 4
        stop = time.monotonic() + args.duration

        def client(k: int) -> None:
            while time.monotonic() < stop:
                with pyuds.connect(path, timeout=10) as conn:
                    conn.request(b"x")
                counts[k] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        cpu = cpu_seconds(proc.pid)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu = cpu_seconds(proc.pid) - cpu
        stop_server(proc)
        rates[workers] = (sum(counts) / args.duration, 1e6 * cpu / max(1, sum(counts)))
    return rates


def shared_listener(workers: int, clients: int, workdir: str) -> list[int]:
    """Workers accepting on one listener, each in epoll with EPOLLEXCLUSIVE, one accept per
    wake-up; clients connect one after another. Returns how many each accepted."""
    path = os.path.join(workdir, "x.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    listener.setblocking(False)
    report_r, report_w = os.pipe()
    pids = []
    for k in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                ep = select.epoll()
                ep.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
                held = []
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    for _fd, _ev in ep.poll(0.1, 1):
                        try:
                            held.append(listener.accept()[0])
                        except BlockingIOError:
                            pass
                os.write(report_w, b"%d %d\n" % (k, len(held)))
            finally:
                os._exit(0)
        pids.append(pid)
    time.sleep(0.5)  # every worker waits in epoll
    conns = []
    for _ in range(clients):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        conns.append(conn)
        time.sleep(0.001)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(report_w)
    for conn in conns:
        conn.close()
    listener.close()
    counts = [0] * workers
    with os.fdopen(report_r) as report:
        for line in report.read().splitlines():
            k, n = map(int, line.split())
            counts[k] = n
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--burn-us", type=float, default=50.0)
    parser.add_argument("--scenarios", default="cpu,echo,connect,shared",
                        help="comma-separated, of cpu, echo, connect, shared (default: all)")
    args = parser.parse_args()
    args.scenarios = args.scenarios.split(",")
    workdir = tempfile.mkdtemp(prefix="pyuds-workers-", dir="/tmp")
    try:
        with open(os.path.join(workdir, "handlers.py"), "w") as f:
            f.write(HANDLERS)
        burn_n = calibrate(args.burn_us)
        env = {**os.environ, "BURN_N": str(burn_n)}
        print(f"{os.cpu_count()} CPUs; {args.conns} connections; {args.duration:g} s per run after 1 s of warm-up; "
              f"handler burn: {burn_n} loop turns = {args.burn_us:g} us of CPU here")
        for name, handler, depth in (("cpu", "burn", 1), ("echo", "echo", 16)):
            if name not in args.scenarios:
                continue
            results = throughput(args, workdir, handler, depth, env)
            one, many = results[1][0], results[args.workers][0]
            print(f"\n{name}: {args.conns} connections x {depth} in flight, handler {handler}")
            print(f"  1 worker            {one:12,.0f} msgs/s")
            print(f"  {args.workers} workers           {many:12,.0f} msgs/s   ({many / one:.2f}x)")
            workers = results[args.workers][1]["workers"]
            conns = [w["connections_accepted"] for w in workers]
            msgs = [w["messages_in"] for w in workers]
            print(f"  balance             connections {conns} (largest share {max(conns) / max(1, sum(conns)):.0%}), "
                  f"messages {[f'{m / max(1, sum(msgs)):.0%}' for m in msgs]}")
        if "connect" in args.scenarios:
            rates = connect_rate(args, workdir, env)
            print("\nconnect: connect + 1 request + close, 4 client threads (the clients limit the rate)")
            print(f"  1 process           {rates[1][0]:12,.0f} connections/s, {rates[1][1]:.0f} us of server CPU each")
            print(f"  {args.workers} workers           {rates[args.workers][0]:12,.0f} connections/s, "
                  f"{rates[args.workers][1]:.0f} us of the supervisor's CPU each (accept, hand over)")
        if "shared" not in args.scenarios:
            return 0
        counts = shared_listener(args.workers, args.conns, workdir)
        print(f"\nshared listener with EPOLLEXCLUSIVE (not used), {args.conns} clients connecting: "
              f"accepted per worker {counts}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
