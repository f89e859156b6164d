#!/usr/bin/env python3
"""Benchmark runner: the same Python echo handler behind different Unix-socket servers, and
behind pyuds, uvloop and the C server on TCP over 127.0.0.1 (the -tcp servers).

    python benchmarks/run.py                       # everything: 5 scenarios x 6 servers x 3 runs
    python benchmarks/run.py --quick               # correctness smoke for CI (well under a minute)
    python benchmarks/run.py --scenarios latency,pipelined --servers c,pyuds,uvloop --runs 5

Run it with a Python that has pyuds and uvloop installed (see benchmarks/README.md). It first
runs `make -C benchmarks` (loadgen and c_echo_server), then for each measurement starts a fresh
server pinned to one CPU, primes it with one request, drives it with loadgen pinned to another
CPU and stops it. Runs are interleaved (run -> scenario -> server) so that slow drift of the
machine touches every server alike; tables show the median over runs.

While it runs, it holds the CPUs' wake-up latency at 0 through PM QoS (/dev/cpu_dma_latency held
open with 0, which needs root; --no-pm-qos leaves it alone), so that a server waking for each
request is not measured against the machine's idle states; its output says whether it did.
Each cell also shows the server's CPU time per message (its threads' run time from
/proc/PID/task/*/schedstat over the measured window, divided by the messages in it).

Exit status: 0 when every measurement verified every reply and every server stopped cleanly;
1 when anything failed (loadgen mismatch / lost reply / error, a server that did not start or
stop); 2 on a usage or build error.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
LOADGEN = HERE / "loadgen"
C_SERVER = HERE / "c_echo_server"

# name -> the command that serves u32 echo on PATH (a fresh process per measurement). The -tcp
# servers are the same programs given tcp://127.0.0.1:PORT instead, a free port of the moment.
SERVERS: dict[str, list[str]] = {
    "c": [str(C_SERVER)],
    "pyuds": [sys.executable, str(PEERS / "pyuds_server.py")],
    "uvloop": [sys.executable, str(PEERS / "uvloop_protocol.py")],
    "pyuds_async": [sys.executable, str(PEERS / "pyuds_async.py")],
    "pyuds_async_coro": [sys.executable, str(PEERS / "pyuds_async_coro.py")],
    "uvloop_tasks": [sys.executable, str(PEERS / "uvloop_tasks.py")],
    "asyncio": [sys.executable, str(PEERS / "asyncio_protocol.py")],
    "asyncio_streams": [sys.executable, str(PEERS / "asyncio_streams.py")],
    "socketserver": [sys.executable, str(PEERS / "socketserver_threading.py")],
    "c-tcp": [str(C_SERVER)],
    "pyuds-tcp": [sys.executable, str(PEERS / "pyuds_server.py")],
    "uvloop-tcp": [sys.executable, str(PEERS / "uvloop_protocol.py")],
}


def is_tcp(server: str) -> bool:
    return server.endswith("-tcp")


def free_tcp_address() -> str:
    """tcp://127.0.0.1:PORT with a port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def connect_to(path: str, timeout: float) -> socket.socket:
    """A client socket connected to a Unix path or a tcp://HOST:PORT address."""
    if path.startswith("tcp://"):
        host, _, port = path[len("tcp://"):].rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock

SCENARIOS: dict[str, dict] = {
    "latency": {"conns": 1, "depth": 1, "size": 64},
    "pipelined": {"conns": 64, "depth": 16, "size": 64},
    "many": {"conns": 1000, "depth": 1, "size": 64},
    "large": {"conns": 16, "depth": 4, "size": 65536},
    "idle": {"idle": 10000},
}

SCENARIO_TEXT = {
    "latency": "1 conn, depth 1, 64 B: one request at a time, round-trip latency",
    "pipelined": "64 conns, depth 16, 64 B: throughput with many requests in flight",
    "many": "1000 conns, depth 1, 64 B: many clients, one request each in flight",
    "large": "16 conns, depth 4, 64 KiB: bulk data",
    "idle": "idle connections held open: server memory per connection",
}

START_TIMEOUT = 15.0      # the server's socket file must appear within this
PRIME_TIMEOUT = 10.0      # ... and it must answer one request within this
STOP_TIMEOUT = 20.0       # SIGTERM, then SIGKILL after this
IDLE_READY_TIMEOUT = 120.0
METRICS = ("msgs_per_s", "mb_per_s", "p50_us", "p99_us", "p999_us", "server_cpu_us_per_msg")
PM_QOS = "/dev/cpu_dma_latency"


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- child processes

class Children:
    """Every process this runner started, so that none outlives it (killed by pid only)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], *, cpu: int, **kw) -> subprocess.Popen:
        def preexec() -> None:
            if _prctl is not None:  # should this runner die without cleaning up: SIGTERM
                _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            os.sched_setaffinity(0, {cpu})
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        # start_new_session: a Ctrl-C at the terminal reaches only this runner, which then
        # stops its children itself (the finally in main()).
        proc = subprocess.Popen(argv, preexec_fn=preexec, start_new_session=True,
                                stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> tuple[int | None, bool]:
        """SIGTERM, wait, SIGKILL if needed. Returns (exit status, whether SIGKILL was needed)."""
        killed = False
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                proc.kill()
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode, killed

    def stop_all(self) -> None:
        for proc in list(self.procs):
            try:
                self.stop(proc, timeout=3)
            except Exception as exc:  # keep going: stop the others
                log(f"warning: could not stop pid {proc.pid}: {exc}")


# ----------------------------------------------------------------------------- helpers

def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def prime(path: str, deadline: float) -> None:
    """One connection, one verified request, so that lazy setup is not measured."""
    payload = os.urandom(64)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with connect_to(path, max(0.1, deadline - time.monotonic())) as sock:
                sock.sendall(struct.pack(">I", len(payload)) + payload)
                (n,) = struct.unpack(">I", recv_exactly(sock, 4))
                reply = recv_exactly(sock, n)
            if reply != payload:
                raise RuntimeError("priming request: the reply is not the echo of the request")
            return
        except (FileNotFoundError, ConnectionRefusedError) as exc:  # not listening yet
            last = exc
            time.sleep(0.02)
    raise RuntimeError(f"priming request got no reply within {PRIME_TIMEOUT:.0f} s ({last})")


def cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of pid so far, in ns (the first field of schedstat); None if
    the process is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total


class WakeupLatency:
    """Holds the CPUs' wake-up latency at 0 through PM QoS while open (the kernel keeps the
    request as long as the file stays open)."""

    def __init__(self, wanted: bool) -> None:
        self.fd: int | None = None
        self.state = "not held (--no-pm-qos)"
        if not wanted:
            return
        try:
            self.fd = os.open(PM_QOS, os.O_WRONLY)
            os.write(self.fd, struct.pack("i", 0))
            self.state = f"held at 0 us (PM QoS, {PM_QOS})"
        except OSError as exc:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.state = f"not held: {PM_QOS}: {exc.strerror}"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def parse_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def thread_limits_problem(n: int) -> str | None:
    """Why this machine cannot give one process n more threads, or None if it can."""
    def read_int(p: str) -> int | None:
        try:
            return int(Path(p).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    need = n + 100
    for name, value in (("kernel.threads-max", read_int("/proc/sys/kernel/threads-max")),
                        ("kernel.pid_max", read_int("/proc/sys/kernel/pid_max"))):
        if value is not None and value < need:
            return f"{n} threads need {name} >= {need}, it is {value}"
    maps = read_int("/proc/sys/vm/max_map_count")
    if maps is not None and maps < 2 * n + 1000:  # a stack and its guard page per thread
        return f"{n} thread stacks need vm.max_map_count >= {2 * n + 1000}, it is {maps}"
    if os.geteuid() != 0:
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if soft != resource.RLIM_INFINITY and soft < need:
            return f"{n} threads need RLIMIT_NPROC >= {need}, it is {soft}"
    if read_int("/proc/sys/vm/overcommit_memory") == 2:
        return f"{n} thread stacks of 8 MiB do not fit with vm.overcommit_memory=2"
    return None


# ----------------------------------------------------------------------------- one measurement

class Runner:
    def __init__(self, args: argparse.Namespace, tmpdir: Path, cpus: tuple[int, int]) -> None:
        self.args = args
        self.tmpdir = tmpdir
        self.server_cpu, self.loadgen_cpu = cpus
        self.children = Children()
        self.counter = 0

    def measure(self, server: str, scenario: str, run: int) -> dict:
        self.counter += 1
        path = free_tcp_address() if is_tcp(server) else str(self.tmpdir / f"s{self.counter}.sock")
        server_log = self.tmpdir / f"s{self.counter}-{server}-{scenario}.log"
        rec: dict = {"server": server, "scenario": scenario, "run": run, "status": "ok",
                     "problems": []}
        params = dict(SCENARIOS[scenario])
        if scenario == "idle":
            params["idle"] = self.args.idle_conns
            if server == "socketserver":
                why = thread_limits_problem(params["idle"])
                if why:
                    rec.update(status="n/a", reason=f"thread per connection: {why}")
                    return rec
        rec["params"] = params

        proc = None
        with open(server_log, "wb") as logf:
            try:
                proc = self.children.spawn(SERVERS[server] + [path], cpu=self.server_cpu,
                                           stdout=logf, stderr=subprocess.STDOUT,
                                           cwd=self.tmpdir)
                rec["server_pid"] = proc.pid
                self._wait_listening(proc, path)
                prime(path, time.monotonic() + PRIME_TIMEOUT)
                if scenario == "idle":
                    self._idle(rec, proc, path, params["idle"])
                else:
                    self._load(rec, path, params, proc.pid)
                if proc.poll() is not None:
                    rec["problems"].append(f"server exited during the run (status {proc.returncode})")
            except Exception as exc:  # a failed measurement is reported, not a crash
                rec["problems"].append(f"{type(exc).__name__}: {exc}")
            finally:
                if proc is not None:
                    status, killed = self.children.stop(proc)
                    rec["server_exit"] = status
                    if killed:
                        rec["problems"].append(f"server ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killed")
                    elif status not in (0, -signal.SIGTERM) and not rec["problems"]:
                        rec["problems"].append(f"server exit status {status} after SIGTERM")
                    if not is_tcp(server) and os.path.exists(path):
                        rec["problems"].append("server left its socket file behind")
                        os.unlink(path)

        # socketserver needs a thread per idle connection: if it could not start them, that is
        # a limit of its model on this machine, not a wrong reply.
        log_text = tail(server_log, 200)
        if (scenario == "idle" and server == "socketserver" and rec["problems"]
                and "can't start new thread" in log_text):
            rec.update(status="n/a", problems=[],
                       reason=f"could not start a thread per connection for {params['idle']} "
                              "connections (RuntimeError: can't start new thread)")
        elif rec["problems"]:
            rec["status"] = "FAILED"
            rec["server_log_tail"] = tail(server_log)
        return rec

    def _wait_listening(self, proc: subprocess.Popen, path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        if path.startswith("tcp://"):  # no file to appear: the priming request retries
            return
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no socket file after {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def _load(self, rec: dict, path: str, p: dict, server_pid: int) -> None:
        a = self.args
        argv = [str(LOADGEN), "--path", path, "--conns", str(p["conns"]), "--depth", str(p["depth"]),
                "--size", str(p["size"]), "--duration", str(a.duration), "--warmup", str(a.warmup),
                "--verify", "echo"]
        proc = self.children.spawn(argv, cpu=self.loadgen_cpu, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=self.tmpdir)
        limit = a.duration + a.warmup + 60
        try:
            # The server's CPU time over (most of) loadgen's measured window: from the end of
            # its warm-up to a little before the end of its run.
            time.sleep(a.warmup + min(0.1, a.duration / 10))
            cpu0, t0 = cpu_ns(server_pid), time.monotonic()  # (None: the server is gone)
            time.sleep(a.duration * 0.8)
            cpu1, t1 = cpu_ns(server_pid), time.monotonic()
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            self.children.stop(proc, timeout=2)
            raise RuntimeError(f"loadgen did not finish within {limit:.0f} s: killed")
        finally:
            if proc in self.children.procs:
                self.children.procs.remove(proc)
        out_s, err_s = out.decode(errors="replace"), err.decode(errors="replace")
        rec["loadgen_exit"] = proc.returncode
        result = parse_json_line(out_s)
        if result is not None and result.get("msgs_per_s") and cpu0 is not None and cpu1 is not None:
            result["server_cpu_us_per_msg"] = (cpu1 - cpu0) / 1000 / (result["msgs_per_s"] * (t1 - t0))
        rec["result"] = result
        if err_s.strip():
            rec["loadgen_stderr"] = "\n".join(err_s.strip().splitlines()[-10:])
        if proc.returncode != 0:
            what = {1: "mismatched or lost replies", 2: "usage or connect error"}.get(
                proc.returncode, "crashed" if proc.returncode < 0 else "error")
            msg = f"loadgen exit {proc.returncode} ({what})"
            if err_s.strip():
                msg += ": " + err_s.strip().splitlines()[0]
            rec["problems"].append(msg)
        if result is None:
            rec["problems"].append("loadgen printed no JSON result")
        elif result.get("errors") or result.get("lost"):
            rec["problems"].append(f"loadgen counted errors={result.get('errors')} lost={result.get('lost')}")

    def _idle(self, rec: dict, server: subprocess.Popen, path: str, n: int) -> None:
        time.sleep(0.2)
        before = rss_kib(server.pid)
        hold = self.args.idle_hold
        argv = [str(LOADGEN), "--path", path, "--idle", str(n), "--hold", str(hold)]
        proc = self.children.spawn(argv, cpu=self.loadgen_cpu, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=self.tmpdir)
        try:
            line = b""
            deadline = time.monotonic() + IDLE_READY_TIMEOUT
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"loadgen --idle not ready within {IDLE_READY_TIMEOUT:.0f} s")
                ready, _, _ = select.select([proc.stdout], [], [], left)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break  # loadgen exited before it was ready
                    line += chunk
            info = parse_json_line(line.decode(errors="replace"))
            if info and info.get("ready"):
                # every connection has had its reply: the server has accepted and set up all
                # of them. Sample a few times and keep the highest.
                samples = []
                for _ in range(5):
                    time.sleep(0.1)
                    samples.append(rss_kib(server.pid))
                held = max(samples)
                rec["result"] = {"idle_conns": n, "rss_before_kib": before, "rss_held_kib": held,
                                 "bytes_per_conn": (held - before) * 1024 / n}
            try:
                out, err = proc.communicate(timeout=hold + 60)
            except subprocess.TimeoutExpired:
                self.children.stop(proc, timeout=2)
                raise RuntimeError("loadgen --idle did not exit after its hold time: killed")
            rec["loadgen_exit"] = proc.returncode
            err_s = err.decode(errors="replace").strip()
            if err_s:
                rec["loadgen_stderr"] = "\n".join(err_s.splitlines()[-10:])
            if proc.returncode != 0:
                msg = f"loadgen --idle exit {proc.returncode}"
                if err_s:
                    msg += ": " + err_s.splitlines()[0]
                rec["problems"].append(msg)
            if "result" not in rec:
                rec["problems"].append(f"loadgen --idle never reported ready (printed {line[:200]!r})")
        finally:
            if proc.poll() is None:
                self.children.stop(proc, timeout=2)
            if proc in self.children.procs:
                self.children.procs.remove(proc)


# ----------------------------------------------------------------------------- summary & output

def medians(records: list[dict], servers: list[str], scenarios: list[str]) -> dict:
    out: dict = {}
    for scen in scenarios:
        out[scen] = {}
        for srv in servers:
            recs = [r for r in records if r["scenario"] == scen and r["server"] == srv]
            good = [r for r in recs if r["status"] == "ok" and r.get("result")]
            entry: dict = {"runs": len(recs), "runs_ok": len(good),
                           "failed": sum(r["status"] == "FAILED" for r in recs)}
            na = [r for r in recs if r["status"] == "n/a"]
            if na and not good:
                entry["status"] = "n/a"
                entry["reason"] = na[0]["reason"]
            if good:
                keys = ("bytes_per_conn", "rss_before_kib", "rss_held_kib") if scen == "idle" else METRICS
                for k in keys:
                    vals = [r["result"][k] for r in good if r["result"].get(k) is not None]
                    if vals:
                        entry[k] = statistics.median(vals)
            out[scen][srv] = entry
    return out


def fmt_num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def fmt_ratio(v: float | None, base: float | None) -> str:
    if v is None or not base:
        return "-"
    return f"{v / base:.2f}x"


def tables(med: dict, records: list[dict], servers: list[str], scenarios: list[str],
           runs: int, idle_conns: int) -> str:
    lines: list[str] = []
    for scen in scenarios:
        m = med[scen]
        if scen == "idle":
            lines.append(f"== idle: {idle_conns} idle connections, server RSS per connection "
                         f"(median of {runs} run{'s' * (runs != 1)}) ==")
            lines.append(f"{'server':<16} {'bytes/conn':>11} {'RSS before':>11} {'RSS held':>11} "
                         f"{'vs uvloop':>9} {'vs C':>7}")
        else:
            p = SCENARIOS[scen]
            lines.append(f"== {scen}: {p['conns']} conn{'s' * (p['conns'] != 1)}, depth {p['depth']}, "
                         f"{p['size']} B (median of {runs} run{'s' * (runs != 1)}) ==")
            lines.append(f"{'server':<16} {'msgs/s':>11} {'p50 us':>9} {'p99 us':>9} "
                         f"{'CPU us/msg':>10} {'vs uvloop':>9} {'vs C':>7}")
        key = "bytes_per_conn" if scen == "idle" else "msgs_per_s"
        for srv in servers:
            e = m[srv]
            # TCP servers are compared with their TCP peers, the others with the Unix ones.
            suffix = "-tcp" if is_tcp(srv) else ""
            base_uv = m.get("uvloop" + suffix, {}).get(key)
            base_c = m.get("c" + suffix, {}).get(key)
            failed = [r for r in records if r["scenario"] == scen and r["server"] == srv
                      and r["status"] == "FAILED"]
            if e.get("status") == "n/a":
                lines.append(f"{srv:<16} n/a: {e['reason']}")
                continue
            if key not in e:
                row = f"{srv:<16} {'-':>11}"
            elif scen == "idle":
                row = (f"{srv:<16} {fmt_num(e[key]):>11} {fmt_num(e['rss_before_kib'] / 1024, 1) + ' MiB':>11} "
                       f"{fmt_num(e['rss_held_kib'] / 1024, 1) + ' MiB':>11} "
                       f"{fmt_ratio(e[key], base_uv):>9} {fmt_ratio(e[key], base_c):>7}")
            else:
                row = (f"{srv:<16} {fmt_num(e[key]):>11} {fmt_num(e.get('p50_us'), 1):>9} "
                       f"{fmt_num(e.get('p99_us'), 1):>9} {fmt_num(e.get('server_cpu_us_per_msg'), 3):>10} "
                       f"{fmt_ratio(e[key], base_uv):>9} {fmt_ratio(e[key], base_c):>7}")
            if failed:
                row += f"   !!! FAILED {len(failed)}/{e['runs']} run(s): {failed[0]['problems'][0]}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def machine_facts(loadgen_cpu: int, server_cpu: int) -> dict:
    def cpu_model() -> str | None:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git_commit() -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True,
                               text=True, timeout=10)
            return r.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    u = os.uname()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_total_bytes": mem_total,
        "kernel": f"{u.sysname} {u.release} {u.machine}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "pyuds": version("pyuds"),
        "uvloop": version("uvloop"),
        "git_commit": git_commit(),
        "server_cpu": server_cpu,
        "loadgen_cpu": loadgen_cpu,
        "rlimit_nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# ----------------------------------------------------------------------------- main

class Terminated(BaseException):  # not caught by the per-measurement "except Exception"
    """SIGTERM or SIGHUP reached the runner."""


def parse_list(text: str, known: dict, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"run.py: unknown {what}: {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma-separated, from: {', '.join(SERVERS)} (default: all)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--runs", type=int, default=3, help="measurements per server and scenario (default 3)")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before (default 1)")
    ap.add_argument("--idle-conns", type=int, default=10000, help="connections in the idle scenario (default 10000)")
    ap.add_argument("--idle-hold", type=float, default=3.0, help="seconds loadgen holds the idle connections (default 3)")
    ap.add_argument("--json", default=str(HERE / "results.json"), help="where to write all results (default benchmarks/results.json)")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 1 run, 0.5 s duration, 0.2 s warmup, 200 idle connections")
    ap.add_argument("--no-build", action="store_true", help="do not run `make -C benchmarks` first")
    ap.add_argument("--no-pm-qos", action="store_true",
                    help=f"do not hold the CPUs' wake-up latency at 0 through {PM_QOS}")
    args = ap.parse_args(argv)

    servers = parse_list(args.servers, SERVERS, "server")
    scenarios = parse_list(args.scenarios, SCENARIOS, "scenario")
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 0.5, 0.2
        args.idle_conns, args.idle_hold = 200, 1.0
    if args.runs < 1 or args.duration <= 0 or args.warmup < 0 or args.idle_conns < 1 or args.idle_hold < 1:
        ap.error("--runs, --duration, --idle-conns must be positive, --idle-hold at least 1 s")

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        log(f"run.py: needs 2 CPUs (server on one, loadgen on another); this process may use {cpus}")
        return 2
    server_cpu, loadgen_cpu = cpus[0], cpus[1]

    if not args.no_build:
        r = subprocess.run(["make", "-C", str(HERE)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            log(f"run.py: `make -C {HERE}` failed:\n{r.stdout}{r.stderr}")
            return 2
    for exe in (LOADGEN, C_SERVER) if {"c", "c-tcp"} & set(servers) else (LOADGEN,):
        if not os.access(exe, os.X_OK):
            log(f"run.py: {exe} is missing: run `make -C {HERE}`")
            return 2
    needs = {"pyuds": "pyuds", "uvloop": "uvloop", "pyuds_async": "pyuds, uvloop",
             "pyuds_async_coro": "pyuds, uvloop", "uvloop_tasks": "uvloop", "pyuds-tcp": "pyuds",
             "uvloop-tcp": "uvloop"}
    for srv, mod in needs.items():
        if srv in servers and subprocess.run([sys.executable, "-c", f"import {mod}"],
                                             capture_output=True, cwd="/").returncode != 0:
            log(f"run.py: server {srv!r} needs the {mod} package in {sys.executable}")
            return 2

    # The idle scenario needs idle_conns + a few fds in the server and in loadgen.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if "idle" in scenarios and hard != resource.RLIM_INFINITY and hard < args.idle_conns + 64:
        log(f"run.py: the idle scenario needs RLIMIT_NOFILE >= {args.idle_conns + 64}; "
            f"the hard limit is {hard} (use --idle-conns)")
        return 2

    def on_term(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, on_term)  # a killed runner still stops its servers
    signal.signal(signal.SIGHUP, on_term)
    wakeup = WakeupLatency(not args.no_pm_qos)
    facts = machine_facts(loadgen_cpu, server_cpu)
    facts["cpu_wakeup_latency"] = wakeup.state
    started = datetime.datetime.now(datetime.timezone.utc)
    tmpdir = Path(tempfile.mkdtemp(prefix="pyuds-bench-", dir="/tmp"))
    runner = Runner(args, tmpdir, (server_cpu, loadgen_cpu))
    records: list[dict] = []
    total = args.runs * len(scenarios) * len(servers)
    interrupted = False
    log(f"run.py: {total} measurements; servers on CPU {server_cpu}, loadgen on CPU {loadgen_cpu}; "
        f"CPU wake-up latency {wakeup.state}; sockets in {tmpdir}")
    try:
        for run in range(1, args.runs + 1):          # interleaved: run -> scenario -> server
            for scen in scenarios:
                for srv in servers:
                    t0 = time.monotonic()
                    rec = runner.measure(srv, scen, run)
                    rec["seconds"] = round(time.monotonic() - t0, 2)
                    records.append(rec)
                    res = rec.get("result") or {}
                    if rec["status"] == "ok":
                        shown = (f"{res['bytes_per_conn']:,.0f} B/conn" if scen == "idle"
                                 else f"{res.get('msgs_per_s', 0):,.0f} msgs/s p99 {res.get('p99_us', 0):,.0f} us")
                    elif rec["status"] == "n/a":
                        shown = f"n/a: {rec['reason']}"
                    else:
                        shown = "FAILED: " + "; ".join(rec["problems"])
                    log(f"[{len(records)}/{total}] run {run} {scen:<9} {srv:<15} {shown}")
    except (KeyboardInterrupt, Terminated):
        interrupted = True
        log("run.py: interrupted; stopping the servers and reporting what was measured")
    finally:
        runner.children.stop_all()
        shutil.rmtree(tmpdir, ignore_errors=True)
        wakeup.close()

    med = medians(records, servers, scenarios)
    failures = [r for r in records if r["status"] == "FAILED"]
    print(f"CPU wake-up latency: {wakeup.state}; servers on CPU {server_cpu}, loadgen on CPU "
          f"{loadgen_cpu}; CPU us/msg: the server's CPU time per message\n")
    print(tables(med, records, servers, scenarios, args.runs, args.idle_conns))
    if failures:
        print(f"!!! {len(failures)} FAILED measurement(s):")
        for r in failures:
            print(f"!!!   run {r['run']} {r['scenario']} {r['server']}: {'; '.join(r['problems'])}")
    if interrupted:
        print(f"!!! INTERRUPTED after {len(records)} of {total} measurements")
    elif not failures:
        print(f"all {len(records)} measurements verified every reply "
              f"({sum(r['status'] == 'n/a' for r in records)} not applicable)")

    doc = {
        "date": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": facts,
        "config": {"servers": servers, "scenarios": scenarios, "runs": args.runs,
                   "duration_s": args.duration, "warmup_s": args.warmup,
                   "idle_conns": args.idle_conns, "idle_hold_s": args.idle_hold,
                   "quick": args.quick, "interrupted": interrupted,
                   "scenario_params": {s: SCENARIOS[s] if s != "idle" else {"idle": args.idle_conns}
                                       for s in scenarios}},
        "ok": not failures and not interrupted,
        "failures": [{"run": r["run"], "scenario": r["scenario"], "server": r["server"],
                      "problems": r["problems"]} for r in failures],
        "median": med,
        "raw": records,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    log(f"run.py: results in {args.json}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
