"""`pyuds bench`: a handler of yours under load, measured.

Starts `pyuds serve` with the handler in a process of its own, drives it with pyuds's C load
generator in another (each pinned to a core of its own where there are two), and prints what
a user wants to know: messages per second, latency percentiles, the server's CPU, and whether
every reply was right. With the default echo handler every reply is checked byte for byte;
with another handler, replies are counted and their framing checked.

The generator's child process is this module run as a script: `python -m pyuds._bench
--loadgen ...` (the generator may exit() the process it runs in).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, TextIO

from . import _core
from ._config import ServerConfig
from ._framing import Decoder, encode


def _pin(cpu: int | None) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _prime(path: str, size: int, deadline: float) -> None:
    """Waits for the server and makes one request, so that nothing lazy is measured."""
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start listening") from None
            time.sleep(0.02)
    with sock:
        sock.sendall(encode("u32", b"x" * size))
        decoder = Decoder("u32")
        while decoder.next() is None:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the priming connection (does the handler reply?)")
            decoder.feed(chunk)


def _show_progress(load: subprocess.Popen[str], server_pid: int, cpu_before: float, started: float,
                   warmup: float, duration: float, err: TextIO) -> None:
    """Waits for the load generator, showing how far it got and the server's CPU so far: on a
    terminal one line, redrawn in place (and wiped at the end); otherwise a plain line a second."""
    live = err.isatty()
    total = warmup + duration
    shown = -1.0  # when the last plain line was printed
    while load.poll() is None:
        now = time.monotonic()
        elapsed = min(now - started, total)
        phase = "warm-up" if elapsed < warmup else "measuring"
        cpu = (_cpu_seconds(server_pid) - cpu_before) / max(now - started, 1e-9)
        if live:
            bar = "#" * int(30 * elapsed / total)
            err.write(f"\r  {phase:<9} [{bar:<30}] {elapsed:4.1f}/{total:g} s  server CPU {100 * cpu:3.0f}%")
            err.flush()
        elif shown < 0 or now - shown >= 1.0:
            shown = now
            print(f"pyuds bench: {phase} {elapsed:.1f}/{total:g} s, server CPU {100 * cpu:.0f}%", file=err, flush=True)
        time.sleep(0.25)
    if live:
        err.write("\r" + " " * 72 + "\r")
        err.flush()


def bench(args: argparse.Namespace) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    workdir = tempfile.mkdtemp(prefix="pyuds-bench-", dir="/tmp")
    path = os.path.join(workdir, "bench.sock")
    # The server runs where the user is, so that their handler module is found there, but it
    # imports pyuds from where this process did: from a source checkout, `python -m pyuds`
    # would pick up the checkout's unbuilt pyuds/ instead.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    serve = [sys.executable, "-c",
             "import sys; sys.path.insert(0, sys.argv.pop(1)); from pyuds._cli import main; "
             "sys.exit(main(sys.argv[1:]))",
             package_parent, "serve", path,
             "--max-message-size", str(max(args.size, ServerConfig.max_message_size))]
    if args.handler:
        serve += ["--handler", args.handler]
    server = load = None
    out = sys.stdout
    try:
        # The user's handler module is looked up from where they run the command.
        server = subprocess.Popen(serve, cwd=os.getcwd(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "server.log"), "w"),
                                  preexec_fn=_pin(server_cpu))
        try:
            _prime(path, args.size, time.monotonic() + 20)
        except (OSError, TimeoutError) as exc:
            server.poll()
            print(f"pyuds bench: {exc}", file=sys.stderr)
            print(open(os.path.join(workdir, "server.log")).read()[-3000:], file=sys.stderr)
            return 1
        verify = "none" if args.handler else "echo"
        cpu_before = _cpu_seconds(server.pid)
        started = time.monotonic()
        load = subprocess.Popen(
            [sys.executable, "-m", "pyuds._bench", "--loadgen", "--path", path, "--conns", str(args.conns),
             "--depth", str(args.depth), "--size", str(args.size), "--duration", str(args.duration),
             "--warmup", str(args.warmup), "--verify", verify],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_pin(load_cpu))
        _show_progress(load, server.pid, cpu_before, started, args.warmup, args.duration, sys.stderr)
        cpu = (_cpu_seconds(server.pid) - cpu_before) / max(time.monotonic() - started, 1e-9)
        stdout, stderr = load.communicate()
        try:
            result = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            print(f"pyuds bench: the load generator failed: {stderr.strip()}", file=sys.stderr)
            return 1
    finally:
        for proc in (load, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    ok = load.returncode == 0 and not result.get("errors") and not result.get("lost")
    pinned = f"server on CPU {server_cpu}, load on CPU {load_cpu}" if server_cpu is not None else "not pinned (one CPU)"
    rows = [
        ("handler", args.handler or "echo (the default)"),
        ("load", f"{args.conns} connections x {args.depth} in flight, {args.size}-byte messages, "
                 f"{args.duration:g} s after {args.warmup:g} s of warm-up; {pinned}"),
        ("throughput", f"{result['msgs_per_s']:,.0f} msgs/s  ({result['mb_per_s']:,.1f} MB/s of payload)"),
        ("latency", "  ".join(f"{name} {result[key]:,.1f} us" if result.get(key) is not None else f"{name} -"
                              for name, key in (("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")))),
        ("server CPU", f"{100 * cpu:.0f}% of one core"),
        ("replies", ("every reply checked byte for byte" if verify == "echo" else "counted and their framing checked")
         + f"; errors {result.get('errors', '?')}, lost {result.get('lost', '?')}"),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}", file=out)
    if not ok:
        print("pyuds bench: some replies were wrong or missing (see errors and lost above)"
              + (f": {stderr.strip()[:500]}" if stderr.strip() else ""), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__" and sys.argv[1:2] == ["--loadgen"]:
    sys.exit(_core.run_loadgen(["pyuds-loadgen", *sys.argv[2:]]))
