"""Hardening: what a misbehaving or overwhelming client costs the server, and what the limits
in ServerConfig do about it, seen from the outside.

- Memory and CPU are measured on a server running in a separate process (`python -m pyuds
  serve ...`, or a small script around pyuds.Server when the test needs the server's stats()
  or a custom handler), from /proc/PID/status (VmRSS, VmHWM), /proc/PID/stat (utime + stime)
  and /proc/PID/fd.
- Behaviour (close reasons, stats(), the registry, ordering) is checked on in-process servers
  (the ``serve`` fixture).

The heavy tests (many clients, many connections, a process out of descriptors) carry the
``heavy`` mark: they run by default and stay bounded in time; ``-m "not heavy"`` leaves them
out. Every process a test starts is ended by its own pid at the end of the test.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import pytest

import pyuds
from conftest import is_socket, measures_memory, recv_exactly, wait_until

heavy = pytest.mark.heavy  # registered in pyproject.toml

KiB = 1024
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Child processes never start in the repository root: `python -m` (and `python -c`) put the
# working directory first on sys.path, where the source tree's pyuds/ would be imported.
NEUTRAL_CWD = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT = 20.0   # interpreter start and import, on a loaded machine
EXIT_TIMEOUT = 10.0

# A server around pyuds.Server, for tests that need more than `pyuds serve`: argv is PATH and a
# JSON object of ServerConfig options plus
#   reply_size:       reply to every message with that many zero bytes (default: echo)
#   sigpipe_default:  set SIGPIPE back to SIG_DFL first, as a host application might
#   spare_fds:        open that many descriptors (on /dev/null) first; the message
#                     b"free spares" closes them, as an application closing its files would
# The message b"stats" is answered with json.dumps(server.stats()). SIGTERM stops it cleanly.
SERVER_SCRIPT = r"""
import json, logging, os, signal, sys
import pyuds

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
path, options = sys.argv[1], json.loads(sys.argv[2])
reply_size = options.pop("reply_size", None)
if options.pop("sigpipe_default", False):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
spares = [os.open("/dev/null", os.O_RDONLY) for _ in range(options.pop("spare_fds", 0))]
server = None

def handle(client, message):
    if message == b"stats":
        return json.dumps(server.stats()).encode()
    if message == b"free spares":
        while spares:
            os.close(spares.pop())
        return b"freed"
    if reply_size is not None:
        return bytes(reply_size)
    return message

server = pyuds.Server(path, handle, **options)
server.serve_forever()
"""


# ---- helpers ----------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """payload in u32 framing."""
    return struct.pack(">I", len(payload)) + payload


def unix_socket(path: Optional[str] = None, timeout: Optional[float] = 10.0) -> socket.socket:
    """A plain client socket, connected to path if given."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if path is not None:
            sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Reads (and drops) until the server ends the connection; returns "eof" or "reset".
    Fails if it is still open after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the connection was still open after {timeout}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(256 * KiB)
        except ConnectionResetError:
            return "reset"
        except socket.timeout:
            continue
        if not chunk:
            return "eof"


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


class ServerProcess:
    """A server in its own process, measured through /proc."""

    def __init__(self, argv: Sequence[str], path: str, stderr_path: str,
                 preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.path = path
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(list(argv), cwd=NEUTRAL_CWD, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, preexec_fn=preexec_fn)
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self) -> None:
        """Waits until the server answers a request (its loop runs)."""
        def answers() -> bool:
            if not self.alive():
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.stderr}")
            if not is_socket(self.path):
                return False
            try:
                with pyuds.connect(self.path, timeout=START_TIMEOUT) as conn:
                    conn.request(b"ready")
            except ConnectionRefusedError:
                return False
            return True

        wait_until(answers, timeout=START_TIMEOUT, interval=0.01)

    def request(self, message: bytes, timeout: float = 10.0) -> bytes:
        """One request on a new connection."""
        with pyuds.connect(self.path, timeout=timeout) as conn:
            return conn.request(message)

    def stats(self, conn: Optional[pyuds.Connection] = None) -> dict:
        """server.stats() of a SERVER_SCRIPT server, over conn or a new connection."""
        if conn is not None:
            return json.loads(conn.request(b"stats"))
        return json.loads(self.request(b"stats"))

    def _status_kib(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def rss(self) -> int:
        """Resident memory now, in bytes."""
        return self._status_kib("VmRSS") * KiB

    def address_space(self) -> int:
        """Bytes the process has mapped (VmSize), resident or not."""
        return self._status_kib("VmSize") * KiB

    def peak_rss(self) -> int:
        """The most resident memory so far (VmHWM), in bytes."""
        return self._status_kib("VmHWM") * KiB

    def ignored_signals(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return int(line.split()[1], 16)
        raise AssertionError("no SigIgn")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)

    def fds(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
            except FileNotFoundError:
                pass  # closed meanwhile
        return out

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def socket_count(self) -> int:
        """Sockets the server holds open: the listening one and one per client."""
        return sum(target.startswith("socket:") for target in self.fds())

    def quiet_fd_count(self, clients: int = 0) -> int:
        """The descriptor count once exactly `clients` clients are connected."""
        wait_until(lambda: self.socket_count() == 1 + clients, timeout=10)
        return self.fd_count()

    def stop(self) -> int:
        """SIGTERM (by pid); returns the exit status. SIGKILL if it does not exit in time."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(EXIT_TIMEOUT)
                raise AssertionError(f"the server did not exit on SIGTERM:\n{self.stderr[-3000:]}")
        return self.proc.returncode


@pytest.fixture
def server_process(tmp_path, sock_path) -> Iterator[Callable[..., ServerProcess]]:
    """server_process(*cli_args) -> `python -m pyuds serve sock_path *cli_args`;
    server_process(script_options={...}) -> SERVER_SCRIPT with those options. Both started
    and listening; killed by pid at the end of the test if still running."""
    procs: list[ServerProcess] = []

    def start(*cli_args: str, script_options: Optional[dict] = None,
              preexec_fn: Optional[Callable[[], None]] = None) -> ServerProcess:
        if script_options is not None:
            argv = [sys.executable, "-c", SERVER_SCRIPT, sock_path, json.dumps(script_options)]
        else:
            argv = [sys.executable, "-m", "pyuds", "serve", sock_path, *cli_args]
        proc = ServerProcess(argv, sock_path, str(tmp_path / f"server{len(procs)}.stderr"), preexec_fn)
        procs.append(proc)
        proc.wait_listening()
        return proc

    yield start
    for proc in procs:
        if proc.alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.proc.wait(EXIT_TIMEOUT)


def report(**figures: object) -> None:
    """Measured figures, shown with pytest -s (or -rP)."""
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


# ---- memory and CPU: a server in its own process ----------------------------------------------


@measures_memory
@heavy
@pytest.mark.timeout(90)
def test_thousand_clients_that_never_read_cost_bounded_memory(server_process):
    """1,000 clients send requests as fast as the kernel lets them and never read a reply.
    With max_output_buffer 256 KiB the server stops reading each of them once it owes it
    128 KiB, so its memory grows by less than 300 MiB (not by everything they sent), none of
    them is dropped, and 50 well-behaved clients doing request/reply at the same time get every
    reply."""
    server = server_process("--max-output-buffer", str(256 * KiB))
    rss_before = server.rss()

    # 1 KiB requests, each in a send() of its own: a non-blocking send of 1 KiB is queued
    # whole or not at all, so every flooder's input is whole frames and the figure is steady.
    request = frame(b"f" * 1020)
    flooders = []
    try:
        for _ in range(1000):
            sock = unix_socket(server.path)
            sock.setblocking(False)
            flooders.append(sock)

        good_errors: list[str] = []
        good_counts = [0] * 50

        def well_behaved(k: int) -> None:
            try:
                with pyuds.connect(server.path, timeout=30) as conn:
                    for i in range(100):
                        message = b"good %d %d " % (k, i) + b"." * 500
                        reply = conn.request(message)
                        if reply != message:
                            good_errors.append(f"client {k} request {i}: wrong reply {reply[:40]!r}")
                            return
                        good_counts[k] += 1
                        time.sleep(0.005)
            except Exception as exc:  # reported by the main thread
                good_errors.append(f"client {k}: {exc!r}")

        good = [threading.Thread(target=well_behaved, args=(k,), daemon=True) for k in range(50)]
        for t in good:
            t.start()

        # Rounds: each flooder sends until its socket would block; the server reading from it
        # makes room for the next round, until it has stopped reading from every one of them
        # (backpressure): a round in which nobody can send anything.
        sent_per_round: list[int] = []
        dropped = 0
        t0 = time.monotonic()
        while len(sent_per_round) < 3 or (sent_per_round[-1] > 0 and time.monotonic() - t0 < 30):
            sent = 0
            for sock in flooders:
                if sock.fileno() < 0:
                    continue
                while True:
                    try:
                        n = sock.send(request)
                    except BlockingIOError:
                        break
                    except (BrokenPipeError, ConnectionResetError):
                        dropped += 1
                        sock.close()
                        break
                    assert n == len(request), f"a 1 KiB send was split ({n} bytes)"
                    sent += n
            sent_per_round.append(sent)
            time.sleep(0.3)

        time.sleep(0.5)  # let the server take in what the last round sent
        rss_after, peak = server.rss(), server.peak_rss()

        for t in good:
            t.join(timeout=45)
        assert not any(t.is_alive() for t in good), "well-behaved clients still waiting for replies"
        assert good_errors == []
        assert good_counts == [100] * 50

        assert dropped == 0, f"{dropped} clients that do not read were disconnected; backpressure should pause them"
        assert sent_per_round[-1] == 0, "the server still reads from clients that owe it 128 KiB of replies"
        assert server.socket_count() >= 1 + 1000, "clients that do not read were disconnected"
        # Each flooder got well past what the kernel alone holds for a peer that does not read
        # (about 93 KiB of 1 KiB sends): the server read from it, up to the high-water mark.
        assert sum(sent_per_round) > 1000 * 300 * KiB
        report(rss_before_mib=round(rss_before / MiB, 1), rss_growth_mib=round((rss_after - rss_before) / MiB, 1),
               peak_growth_mib=round((peak - rss_before) / MiB, 1),
               sent_per_round_mib=[round(s / MiB) for s in sent_per_round])
        assert rss_after - rss_before < 300 * MiB
        assert peak - rss_before < 300 * MiB

        assert server.alive()
        assert server.request(b"still there?") == b"still there?"
    finally:
        close_all(flooders)
    assert server.stop() == 0


@heavy
@pytest.mark.timeout(90)
def test_out_of_file_descriptors_pauses_accepting_without_spinning(server_process):
    """A server with RLIMIT_NOFILE 64 (and max_connections 1000, so descriptors run out
    first) meets 500 connection attempts: it accepts until accept() fails with EMFILE, then
    pauses accepting instead of spinning (under 10% of a core while saturated), keeps serving
    its established clients, and, once connections close and descriptors are free, takes a new
    client at once (reply within 1 s)."""
    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = server_process(script_options={"max_connections": 1000}, preexec_fn=limit_fds)
    established = [pyuds.connect(server.path, timeout=10) for _ in range(10)]
    extras: list[socket.socket] = []
    try:
        for i, conn in enumerate(established):
            assert conn.request(b"hello %d" % i) == b"hello %d" % i
        fds_with_ten = server.quiet_fd_count(clients=10)

        queued = refused = 0
        for _ in range(500):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(server.path)
                queued += 1
            except (BlockingIOError, InterruptedError):
                refused += 1  # the backlog is full: the attempt stays pending
            extras.append(sock)

        # Saturated: every one of the 64 descriptors is in use, accepting has paused.
        wait_until(lambda: server.fd_count() == 64, timeout=10)
        wait_until(lambda: server.stats(established[0])["accept_pauses"] > 0, timeout=5)

        time.sleep(0.3)
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        time.sleep(2.0)
        cpu1, t1 = server.cpu_seconds(), time.monotonic()
        cpu_share = (cpu1 - cpu0) / (t1 - t0)

        # Established clients are still served while accepting is paused.
        for i, conn in enumerate(established):
            assert conn.request(b"still %d" % i) == b"still %d" % i
        stats = server.stats(established[0])
        assert stats["accept_pauses"] > 0
        assert server.fd_count() == 64

        # Free descriptors: the extra connections go away, a new client is served at once.
        close_all(extras)
        t_free = time.monotonic()
        with pyuds.connect(server.path, timeout=1.0) as conn:
            assert conn.request(b"newcomer") == b"newcomer"
        newcomer_s = time.monotonic() - t_free

        report(cpu_percent_saturated=round(100 * cpu_share, 2), newcomer_reply_s=round(newcomer_s, 3),
               accept_pauses=stats["accept_pauses"], queued=queued, backlog_full=refused)
        assert cpu_share < 0.10, f"the server used {100 * cpu_share:.1f}% of a core while out of descriptors"
        assert newcomer_s < 1.0

        for i, conn in enumerate(established):
            assert conn.request(b"after %d" % i) == b"after %d" % i
        wait_until(lambda: server.fd_count() == fds_with_ten, timeout=10)
        stats = server.stats(established[0])
        assert stats["connections_current"] == 10
        assert stats["connections_rejected"] == 0  # max_connections never came into play
    finally:
        close_all(extras)
        close_all(established)
    assert server.stop() == 0


def test_accepting_resumes_after_backoff_when_descriptors_free_up(server_process):
    """Out of descriptors with no connection closing, accepting resumes by itself after its
    back-off (at most 500 ms): when the application frees descriptors of its own, a client
    waiting in the backlog is accepted and answered within a second, without any help."""
    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = server_process(script_options={"max_connections": 1000, "spare_fds": 8}, preexec_fn=limit_fds)
    control = pyuds.connect(server.path, timeout=10)
    fillers: list[socket.socket] = []
    late = None
    try:
        assert control.request(b"hi") == b"hi"
        # Fill the descriptor table: connections until accept() fails and accepting pauses.
        while server.stats(control)["accept_pauses"] == 0:
            assert len(fillers) < 64
            fillers.append(unix_socket(server.path))
            wait_until(lambda: server.fd_count() == 64 or
                       server.stats(control)["connections_current"] == len(fillers) + 1, timeout=5)
        assert server.fd_count() == 64
        waiting = len(fillers) + 1 - server.stats(control)["connections_current"]
        assert 0 <= waiting < 8

        late = unix_socket(server.path, timeout=5)  # queued in the backlog, its request too
        late.sendall(frame(b"late"))
        time.sleep(1.0)                              # the back-off grows: 50, 100, 200, 400, 500 ms
        late.setblocking(False)
        with pytest.raises(BlockingIOError):         # not accepted, so not answered
            late.recv(1, socket.MSG_PEEK)
        before = server.stats(control)
        assert before["connections_current"] == len(fillers) + 1 - waiting

        assert control.request(b"free spares") == b"freed"  # 8 descriptors free, nobody closed
        t0 = time.monotonic()
        late.settimeout(2.0)
        assert recv_exactly(late, 8) == frame(b"late")
        resumed_s = time.monotonic() - t0
        report(resumed_after_s=round(resumed_s, 3), fillers=len(fillers), waiting=waiting)
        assert resumed_s < 1.0
        after = server.stats(control)
        assert after["closed"] == before["closed"]  # no connection closed to make room
        assert after["connections_current"] == before["connections_current"] + waiting + 1
    finally:
        close_all(fillers + ([late] if late is not None else []))
        control.close()
    assert server.stop() == 0


@measures_memory
def test_huge_length_headers_cost_no_memory(server_process):
    """100 clients each send the u32 header 0xFFFFFFFF (a 4 GiB message, over
    max_message_size): each is disconnected with an error logged, and the server's memory
    grows by less than 1 MiB: nothing is set aside for the payload announced."""
    server = server_process()
    assert server.request(b"warm") == b"warm"
    rss_before = server.rss()

    socks = [unix_socket(server.path) for _ in range(100)]
    try:
        for sock in socks:
            sock.sendall(b"\xff\xff\xff\xff")
        endings = [wait_closed(sock, timeout=5) for sock in socks]
    finally:
        close_all(socks)
    assert set(endings) <= {"eof", "reset"}
    rss_after = server.rss()
    report(rss_growth_kib=(rss_after - rss_before) // KiB, endings={e: endings.count(e) for e in set(endings)})
    assert rss_after - rss_before < 1 * MiB
    wait_until(lambda: server.stderr.count("larger than max_message_size") == 100, timeout=5)
    assert server.request(b"fine") == b"fine"
    assert server.stop() == 0


def queued_by_kernel(sock: socket.socket) -> int:
    """Bytes sock has sent that its peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


@measures_memory
def test_clients_trickling_in_a_frame_hold_about_what_they_sent(server_process):
    """500 clients each begin a 100 KB frame and then send it a few bytes at a time (a
    slowloris). Each holds a partial frame between reads, and the server sets aside about
    what each sent, not a read's worth (64 KiB) each: its address space grows by less than
    16 MiB (500 x 128 KiB = 62.5 MiB before reads asked the socket how much waits)."""
    server = server_process(script_options={"max_message_size": 1 * MiB})
    assert server.request(b"warm") == b"warm"
    size_before = server.address_space()
    data = frame(b"s" * 100_000)
    socks = [unix_socket(server.path) for _ in range(500)]
    try:
        sent = 0
        for upto in (3, 4, 6, 9):
            for sock in socks:
                sock.sendall(data[sent:upto])
            sent = upto
            wait_until(lambda: all(queued_by_kernel(sock) == 0 for sock in socks), timeout=10)
        wait_until(lambda: server.stats()["connections_current"] >= 500, timeout=10)
        growth = server.address_space() - size_before
        report(address_space_growth_kib=growth // KiB)
        assert growth < 16 * MiB
        for sock in socks[:10]:  # the frames still complete
            sock.sendall(data[sent:])
        for sock in socks[:10]:
            assert recv_exactly(sock, len(data)) == data
    finally:
        close_all(socks)
    assert server.request(b"fine") == b"fine"
    assert server.stop() == 0


@heavy
@pytest.mark.timeout(90)
def test_hundred_thousand_connects_and_closes_leak_no_descriptors(server_process):
    """100,000 connect/close cycles: plain, after a partial frame, after whole requests
    (some waiting for the reply and closing without reading it, which the server sees as a
    reset), a few with SO_LINGER 0. Afterwards the server's descriptor count is back to what it
    was, every connection is accounted for, and it still serves."""
    n_cycles = 100_000
    server = server_process(script_options={})
    accepted_before = server.stats()["connections_accepted"]
    baseline = server.quiet_fd_count()

    partial = frame(b"p" * 100)[:14]                 # header promises 100 bytes, 10 arrive
    whole = frame(b"abc")
    linger0 = struct.pack("ii", 1, 0)
    n_threads = 2
    errors: list[str] = []

    def cycles(k: int) -> None:
        try:
            for i in range(k, n_cycles, n_threads):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(server.path)
                    kind = i % 8
                    if kind in (1, 2):
                        sock.send(partial)                       # closes mid-frame
                    elif kind == 3:
                        sock.send(whole + partial)
                    elif kind == 4:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
                        sock.send(partial)
                    elif kind == 5 and i % 64 == 5:
                        sock.send(whole)                         # reply arrives, never read:
                        sock.settimeout(5)                       # closing then resets the server's end
                        sock.recv(1, socket.MSG_PEEK)
                finally:
                    sock.close()
        except Exception as exc:
            errors.append(repr(exc))

    t0 = time.monotonic()
    threads = [threading.Thread(target=cycles, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=80)
    assert not any(t.is_alive() for t in threads)
    loop_s = time.monotonic() - t0
    assert errors == []

    wait_until(lambda: server.fd_count() == baseline, timeout=20, interval=0.05)
    settled_s = time.monotonic() - t0
    stats = server.stats()  # on a connection of its own, still open while it answers
    report(cycles=n_cycles, client_loop_s=round(loop_s, 2), settled_s=round(settled_s, 2),
           fds=baseline, closed=stats["closed"])
    assert server.alive()
    assert stats["connections_accepted"] - accepted_before == n_cycles + 1  # + the stats request
    assert stats["connections_current"] == 1
    assert server.request(b"alive") == b"alive"
    wait_until(lambda: server.fd_count() == baseline, timeout=5)
    assert server.stop() == 0


def test_sigpipe_default_does_not_kill_the_server(server_process):
    """In a host process that set SIGPIPE back to SIG_DFL, 50 clients that ask for a 1 MiB
    reply and close without reading it (or after reading a little) do not kill the server:
    writing to them fails with EPIPE / ECONNRESET, not a signal. It still serves afterwards."""
    server = server_process(script_options={"reply_size": MiB, "sigpipe_default": True})
    assert not server.ignored_signals() & (1 << (signal.SIGPIPE - 1)), "SIGPIPE should not be ignored here"

    for i in range(50):
        sock = unix_socket(server.path)
        try:
            sock.sendall(frame(b"give me a megabyte"))
            if i % 2:
                sock.recv(64 * KiB)  # the reply has begun: the server is mid-write when we go
        finally:
            sock.close()
    time.sleep(0.5)
    assert server.alive(), f"the server died: exit status {server.proc.returncode}"
    # It wrote to clients that were gone, and counted each of them as gone:
    wait_until(lambda: server.stats()["closed"]["peer"] >= 50, timeout=10)
    assert len(server.request(b"one more", timeout=10)) == MiB
    stats = server.stats()
    assert stats["connections_current"] == 1
    assert server.alive()
    assert server.stop() == 0


# ---- behaviour: in-process servers ------------------------------------------------------------


def test_partial_header_is_closed_after_frame_timeout(serve, sock_path, caplog):
    """500 clients send 2 bytes of a 4-byte header and stop. With frame_timeout 1 s, each of
    them sees its connection closed between 1 and 2 s after sending, for reason frame_timeout;
    a client that finishes its frame in time is answered and stays connected."""
    caplog.set_level(logging.WARNING, logger="pyuds")
    reasons: list[str] = []
    server = serve(on_disconnect=lambda client, reason: reasons.append(reason), frame_timeout=1.0)

    socks = [unix_socket(sock_path) for _ in range(500)]
    patient = unix_socket(sock_path)
    try:
        wait_until(lambda: len(server.clients) == 501, timeout=10)
        sel = selectors.DefaultSelector()
        sent_at: dict[int, float] = {}
        for sock in socks:
            sock.sendall(b"\x00\x00")
            sent_at[sock.fileno()] = time.monotonic()
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)

        # Meanwhile a client that takes 0.5 s over its frame is within the limit.
        request = frame(b"in time")
        patient.sendall(request[:2])
        time.sleep(0.5)
        patient.sendall(request[2:])
        assert recv_exactly(patient, len(request)) == request

        closed_after: dict[int, float] = {}
        deadline = max(sent_at.values()) + 4.0
        while len(closed_after) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(16)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"unexpected bytes from the server: {data!r}"
                closed_after[key.fd] = time.monotonic() - sent_at[key.fd]
                sel.unregister(key.fileobj)
        sel.close()

        patient.sendall(frame(b"still here"))
        assert recv_exactly(patient, 14) == frame(b"still here")
        assert len(server.clients) == 1
    finally:
        close_all(socks + [patient])

    assert len(closed_after) == 500, f"only {len(closed_after)} of 500 were closed"
    report(first_close_s=round(min(closed_after.values()), 3), last_close_s=round(max(closed_after.values()), 3))
    assert min(closed_after.values()) >= 0.9
    assert max(closed_after.values()) <= 2.0
    wait_until(lambda: len(reasons) == 501)  # and the patient client, gone since
    assert reasons.count(pyuds.CloseReason.FRAME_TIMEOUT) == 500
    assert reasons.count(pyuds.CloseReason.PEER) == 1
    stats = server.stats()
    assert stats["closed"]["frame_timeout"] == 500
    assert any("did not finish it within 1s" in r.getMessage() for r in caplog.records if r.name == "pyuds")


def test_slow_consumer_is_disconnected_others_unaffected(serve, sock_path, caplog):
    """max_output_buffer 256 KiB: a client that never reads is pushed 64 KiB messages until
    what it is owed would pass the cap; then it is disconnected (reason slow_consumer, a
    WARNING on the pyuds logger, counted in stats) after a bounded amount was queued. A
    well-behaved client connected all along is served throughout."""
    caplog.set_level(logging.WARNING, logger="pyuds")
    reasons: dict[int, str] = {}
    server = serve(on_disconnect=lambda client, reason: reasons.__setitem__(client.id, reason),
                   max_output_buffer=256 * KiB)

    sleeper = unix_socket(sock_path)  # never reads
    wait_until(lambda: len(server.clients) == 1)
    (handle,) = dict(server.clients).values()
    good = pyuds.connect(sock_path, timeout=10)
    try:
        big = b"x" * (64 * KiB)
        pushed = 0
        while True:
            try:
                handle.send(big)
            except pyuds.ClientClosedError:
                break
            pushed += 1
            assert pushed <= 100, "6.4 MiB pushed to a client that does not read, and it is still connected"
            if pushed % 4 == 0:
                assert good.request(b"ping %d" % pushed) == b"ping %d" % pushed
            time.sleep(0.002)

        wait_until(lambda: handle.id in reasons)
        report(pushes_before_disconnect=pushed)
        assert reasons[handle.id] == pyuds.CloseReason.SLOW_CONSUMER
        assert handle.close_reason == pyuds.CloseReason.SLOW_CONSUMER
        assert server.stats()["closed"]["slow_consumer"] == 1
        warnings_seen = [r for r in caplog.records if r.name == "pyuds" and r.levelno == logging.WARNING
                         and "max_output_buffer" in r.getMessage()]
        assert len(warnings_seen) == 1
        assert handle.id not in server.clients
        assert wait_closed(sleeper, timeout=5) in ("eof", "reset")

        assert good.request(b"unaffected") == b"unaffected"
        assert len(server.clients) == 1
    finally:
        sleeper.close()
        good.close()


@pytest.mark.parametrize("n, request_size, reply_size", [
    pytest.param(20_000, 100, None, id="20000x100B-echo"),
    # Replies bigger than requests: what one read takes in bounds what one turn adds to the
    # output, so reads must stay at 64 KiB even after the buffer has grown.
    pytest.param(4_000, 996, 1896, id="1000B-requests-1900B-replies"),
])
def test_pipelining_slow_reader_is_paused_not_disconnected(serve, sock_path, n, request_size, reply_size):
    """A client pipelines thousands of requests (megabytes of replies) and does not read for
    a while: the server stops taking its requests (messages_in stalls) instead of buffering
    replies without bound, and does not disconnect it: reading slowly, it gets every reply, in
    order.

    With max_output_buffer 256 KiB, reading pauses at 128 KiB of unsent output. The server
    reads 64 KiB at a time (at most 66 requests of 1000 bytes) and serves at most 128 messages
    per client per turn, so the output it queues past the high-water mark is at most
    66 x 1900 B = 125,400 B here, and 128 KiB + that stays under 256 KiB."""
    reasons: list[str] = []

    def handler(client, message):
        return message if reply_size is None else message[:8] + b"r" * (reply_size - 8)

    server = serve(handler, on_disconnect=lambda client, reason: reasons.append(reason),
                   max_output_buffer=256 * KiB)
    requests = [b"%08d" % i + b"-" * (request_size - 8) for i in range(n)]
    replies = requests if reply_size is None else [r[:8] + b"r" * (reply_size - 8) for r in requests]
    sock = unix_socket(sock_path, timeout=30)
    send_error: list[BaseException] = []

    def pipeline() -> None:
        try:
            sock.sendall(b"".join(frame(m) for m in requests))
        except BaseException as exc:
            send_error.append(exc)

    sender = threading.Thread(target=pipeline, daemon=True)
    try:
        sender.start()

        def stalled() -> bool:
            before = server.stats()["messages_in"]
            time.sleep(0.3)
            return server.stats()["messages_in"] == before

        wait_until(stalled, timeout=10, interval=0)  # fails if it keeps taking requests
        stalled_at = server.stats()["messages_in"]
        assert reasons == [], f"disconnected ({reasons[0]}) after {stalled_at} requests"
        assert stalled_at < n, "every request was taken in: its replies are all buffered"
        assert sender.is_alive()  # its sendall waits: the kernel holds what it sends

        expected = b"".join(frame(m) for m in replies)
        got = bytearray()
        while len(got) < len(expected):
            try:
                chunk = sock.recv(8 * KiB)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                wait_until(lambda: reasons, timeout=5)
                raise AssertionError(f"disconnected ({reasons[0]}) after {len(got)} of {len(expected)} bytes of replies")
            got += chunk
            time.sleep(0.0005)
        sender.join(timeout=10)
        assert send_error == []
        assert bytes(got) == expected
        report(messages_in_while_not_reading=stalled_at)
        assert len(server.clients) == 1 and reasons == []
        assert server.stats()["closed"]["slow_consumer"] == 0
    finally:
        sock.close()


def test_idle_timeout(serve, sock_path):
    """idle_timeout 0.5 s: a client with no traffic is closed (end-of-file) 0.5 to 2 s after
    it connected, for reason idle_timeout. A client sending a request every 0.1 s, and one that
    only receives a message pushed every 0.1 s, are not closed within 1.5 s."""
    closed_at: dict[int, tuple[str, float]] = {}
    server = serve(on_disconnect=lambda client, reason: closed_at.__setitem__(client.id, (reason, time.monotonic())),
                   idle_timeout=0.5)

    def connect_one() -> tuple[pyuds.Connection, pyuds.ClientHandle]:
        before = set(server.clients)
        conn = pyuds.connect(sock_path, timeout=10)
        wait_until(lambda: len(set(server.clients) - before) == 1)
        (cid,) = set(server.clients) - before
        return conn, server.clients[cid]

    before = set(server.clients)
    idle_t0 = time.monotonic()  # before connecting: the server's clock starts later
    idle_sock = unix_socket(sock_path)
    wait_until(lambda: len(set(server.clients) - before) == 1)
    (idle_id,) = set(server.clients) - before
    idle_result: list = []
    watcher = threading.Thread(target=lambda: idle_result.append(
        (wait_closed(idle_sock, timeout=5), time.monotonic() - idle_t0)), daemon=True)
    watcher.start()
    talker, talker_handle = connect_one()
    listener, listener_handle = connect_one()
    try:
        t_end = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < t_end:
            assert talker.request(b"tick %d" % i) == b"tick %d" % i
            listener_handle.send(b"push %d" % i)
            assert listener.recv() == b"push %d" % i
            i += 1
            time.sleep(0.1)
        watcher.join(timeout=5)

        ending, after = idle_result[0]
        report(idle_closed_after_s=round(after, 3))
        assert ending == "eof"
        assert 0.45 <= after <= 2.0
        assert closed_at[idle_id][0] == pyuds.CloseReason.IDLE_TIMEOUT
        assert talker_handle.id not in closed_at and not talker_handle.closed
        assert listener_handle.id not in closed_at and not listener_handle.closed
        assert talker.request(b"still open") == b"still open"

        # Once they fall silent, they too are closed.
        wait_until(lambda: talker_handle.id in closed_at and listener_handle.id in closed_at, timeout=3)
        assert closed_at[talker_handle.id][0] == pyuds.CloseReason.IDLE_TIMEOUT
        assert server.stats()["closed"]["idle_timeout"] == 3
    finally:
        idle_sock.close()
        talker.close()
        listener.close()


def test_max_connections(serve, sock_path):
    """max_connections 5: five clients are admitted and served; a sixth is closed at once
    (end-of-file or reset on its first read), never appears in server.clients, and costs the
    five nothing; once one of the five leaves, a new client is admitted."""
    connected: list[int] = []
    server = serve(on_connect=lambda client: connected.append(client.id), max_connections=5)
    five = [pyuds.connect(sock_path, timeout=10) for _ in range(5)]
    extra = unix_socket()
    newcomer = None
    try:
        for i, conn in enumerate(five):
            assert conn.request(b"in %d" % i) == b"in %d" % i
        assert len(server.clients) == 5

        extra.connect(sock_path)
        t0 = time.monotonic()
        ending = wait_closed(extra, timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert ending in ("eof", "reset")
        stats = server.stats()
        assert stats["connections_rejected"] == 1
        assert stats["closed"]["rejected"] == 1
        assert stats["connections_accepted"] == 5
        assert len(connected) == 5 and len(server.clients) == 5

        for i, conn in enumerate(five):
            assert conn.request(b"still %d" % i) == b"still %d" % i

        five.pop().close()
        wait_until(lambda: len(server.clients) == 4)
        newcomer = pyuds.connect(sock_path, timeout=10)
        assert newcomer.request(b"welcome") == b"welcome"
        assert len(server.clients) == 5 and len(connected) == 6
        assert server.stats()["connections_rejected"] == 1
    finally:
        extra.close()
        for conn in five + ([newcomer] if newcomer is not None else []):
            conn.close()


def test_a_pipelining_client_does_not_stall_others(serve, sock_path):
    """One client pipelines 100,000 small requests while another does 10 request/reply round
    trips: the handler sees all 10 light requests before the heavy client's last request:
    nobody waits behind a whole pipeline. (The heavy client starts reading its replies only
    once the light one is done, so its pipeline cannot simply run out first: the server can
    finish the whole pipeline in well under a second, faster than this process's threads can
    be scheduled for ten round trips.)"""
    n_heavy = 100_000
    heavy_seen = [0]
    light_at: list[int] = []   # heavy requests handled before each light one

    def handler(client, message):
        if message[:1] == b"L":
            light_at.append(heavy_seen[0])
        else:
            heavy_seen[0] += 1
        return message

    serve(handler)
    heavy_sock = unix_socket(sock_path, timeout=30)
    heavy_errors: list[BaseException] = []
    stream = b"".join(frame(b"h%07d" % i) for i in range(n_heavy))
    received = [0]

    def heavy_send() -> None:
        try:
            heavy_sock.sendall(stream)
        except BaseException as exc:
            heavy_errors.append(exc)

    def heavy_read() -> None:
        try:
            while received[0] < len(stream):
                chunk = heavy_sock.recv(256 * KiB)
                if not chunk:
                    raise AssertionError("the heavy client was disconnected")
                received[0] += len(chunk)
        except BaseException as exc:
            heavy_errors.append(exc)

    threads = [threading.Thread(target=heavy_send, daemon=True), threading.Thread(target=heavy_read, daemon=True)]
    light = pyuds.connect(sock_path, timeout=10)
    try:
        threads[0].start()
        wait_until(lambda: heavy_seen[0] >= 2000, timeout=10)
        for i in range(10):
            assert light.request(b"L%d" % i) == b"L%d" % i
        heavy_when_light_done = heavy_seen[0]
        threads[1].start()
        for t in threads:
            t.join(timeout=30)
        assert heavy_errors == []
        assert received[0] == len(stream)
    finally:
        light.close()
        heavy_sock.close()
    report(heavy_handled_before_each_light=light_at, heavy_when_light_done=heavy_when_light_done)
    assert len(light_at) == 10
    assert max(light_at) < n_heavy, "the light client waited for the whole pipeline"
    assert heavy_seen[0] == n_heavy


def test_clients_streaming_large_messages_do_not_starve_another(serve, sock_path):
    """Three clients stream 128 KiB requests as fast as the server takes them (reading their
    replies as they come), far more than one turn of the loop reads, while a fourth makes ten
    round trips of its own 128 KiB request: each is answered while the three still stream
    (a turn reads at most its budget and the connections it left unread go first in the next;
    none waits behind the others' streams)."""
    size = 128 * KiB
    stop = threading.Event()
    errors: list[BaseException] = []
    answered = [0, 0, 0]

    def heavy(i: int) -> None:
        try:
            with unix_socket(sock_path, timeout=30) as sock:
                request = frame(bytes([65 + i]) * size)

                def send() -> None:
                    try:
                        while not stop.is_set():
                            sock.sendall(request)
                        sock.shutdown(socket.SHUT_WR)
                    except BaseException as exc:
                        errors.append(exc)

                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                while True:
                    header = sock.recv(4, socket.MSG_WAITALL)
                    if not header:  # every reply is in: the server closed after them
                        break
                    reply = recv_exactly(sock, struct.unpack(">I", header)[0])
                    assert reply == request[4:]
                    answered[i] += 1
                sender.join(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    serve()
    threads = [threading.Thread(target=heavy, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: min(answered) >= 20, timeout=20)
        with pyuds.connect(sock_path, timeout=20) as light:
            for k in range(10):
                message = bytes([48 + k]) * size
                assert light.request(message) == message
        streamed = answered[:]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert min(answered) > min(streamed) >= 20, "the heavy clients had stopped streaming"


def test_handler_errors_are_counted(serve, sock_path, caplog):
    """A handler that raises, or returns something that is not bytes, closes only that client
    (after the replies it was already owed), and is counted: stats handler_errors and
    closed['handler_error'], on_disconnect reason handler_error."""
    caplog.set_level(logging.CRITICAL, logger="pyuds")  # the tracebacks are expected

    handled: list[bytes] = []

    def handler(client, message):
        handled.append(message)
        if message == b"boom":
            raise RuntimeError("boom")
        if message == b"number":
            return 42
        return message

    reasons: list[str] = []
    server = serve(handler, on_disconnect=lambda client, reason: reasons.append(reason))
    bystander = pyuds.connect(sock_path, timeout=10)
    failing = [unix_socket(sock_path) for _ in range(3)]
    try:
        for sock, bad in zip(failing, [b"boom", b"boom", b"number"]):
            sock.sendall(frame(b"first") + frame(bad) + frame(b"never handled"))
            sock.settimeout(5)
            assert recv_exactly(sock, 9) == frame(b"first")  # owed before the failure: still sent
            assert wait_closed(sock, timeout=5) == "eof"
        wait_until(lambda: len(reasons) == 3)
        stats = server.stats()
        assert stats["handler_errors"] == 3
        assert stats["closed"]["handler_error"] == 3
        assert reasons == [pyuds.CloseReason.HANDLER_ERROR] * 3
        assert b"never handled" not in handled
        assert bystander.request(b"fine") == b"fine"
        assert len(server.clients) == 1
    finally:
        close_all(failing)
        bystander.close()


def test_stats_count_exactly(serve, sock_path):
    """After a known exchange, stats() counts exactly: messages and payload bytes in and out
    (replies and pushed messages; a None reply sends nothing), connections accepted and
    current (which matches len(server.clients)), close reasons. It still answers after
    shutdown, with every client counted as closed."""
    def handler(client, message):
        if message.startswith(b"quiet"):
            return None
        return message * 2

    server = serve(handler)
    clients = [pyuds.connect(sock_path, timeout=10) for _ in range(3)]
    sent_in = sent_out = 0
    n_in = n_out = 0
    try:
        for k, conn in enumerate(clients):
            for i in range(10 + k):
                message = b"c%d-m%d" % (k, i) + b"." * i
                assert conn.request(message) == message * 2
                n_in += 1
                n_out += 1
                sent_in += len(message)
                sent_out += 2 * len(message)
            conn.send(b"quiet, please")
            n_in += 1
            sent_in += len(b"quiet, please")
        wait_until(lambda: server.stats()["messages_in"] == n_in)
        next(iter(dict(server.clients).values())).send(b"pushed")
        n_out += 1
        sent_out += len(b"pushed")
        wait_until(lambda: server.stats()["messages_out"] == n_out)

        clients[0].close()
        wait_until(lambda: len(server.clients) == 2)
        stats = server.stats()
        assert stats["messages_in"] == n_in
        assert stats["bytes_in"] == sent_in
        assert stats["messages_out"] == n_out
        assert stats["bytes_out"] == sent_out
        assert stats["connections_accepted"] == 3
        assert stats["connections_current"] == len(server.clients) == 2
        assert stats["connections_rejected"] == 0
        assert stats["handler_errors"] == 0
        assert stats["closed"]["peer"] == 1
        assert sum(c.messages_received for c in dict(server.clients).values()) == n_in - (10 + 1)
    finally:
        for conn in clients:
            conn.close()
    wait_until(lambda: len(server.clients) == 0)
    extra = pyuds.connect(sock_path, timeout=10)
    try:
        assert extra.request(b"last") == b"lastlast"
        server.shutdown(timeout=10)
    finally:
        extra.close()
    after = server.stats()
    assert after["connections_current"] == 0
    assert after["connections_accepted"] == 4
    assert after["messages_in"] == n_in + 1
    assert after["bytes_out"] == sent_out + len(b"lastlast")
    assert after["closed"]["shutdown"] == 1 and after["closed"]["peer"] == 3


def test_pipelined_replies_past_the_output_cap_while_the_client_reads(serve, sock_path):
    """max_output_buffer 16 KiB, 3,000-byte replies, 40 requests in one write: one batch owes
    the connection 120 KB, far more than the cap, so its replies are queued one by one, each
    written out to the socket when the cap is reached (the socket takes them all). The client
    gets every reply, in order, and is not taken for a slow consumer."""
    server = serve(lambda client, message: message * 1000, max_output_buffer=16 * KiB)
    with pyuds.connect(sock_path, timeout=10) as conn:
        for round in range(3):
            conn._sock.sendall(b"".join(b"\0\0\0\3%03d" % i for i in range(40)))
            for i in range(40):
                assert conn.recv() == b"%03d" % i * 1000
    assert server.stats()["closed"]["slow_consumer"] == 0


@pytest.mark.parametrize("reply_size", [16_000, 40_000], ids=["batched-replies", "big-replies"])
def test_one_turn_of_replies_far_past_the_cap_to_a_client_that_reads(serve, sock_path, reply_size):
    """max_output_buffer 64 KiB, 100 requests in one write, each answered with 16 or 40 KB: one
    turn owes the client 1.6 or 4 MB, far past the cap and more than its socket takes. Replies
    to a client's own requests are never a reason to drop it (reading from it stays paused
    while they wait): it reads, and gets every one, in order."""
    reasons: list[str] = []
    server = serve(lambda client, message: message * (reply_size // len(message)),
                   max_output_buffer=64 * KiB, on_disconnect=lambda client, reason: reasons.append(reason))
    with pyuds.connect(sock_path, timeout=10) as conn:
        for _ in range(3):
            conn._sock.sendall(b"".join(frame(b"%04d" % i) for i in range(100)))
            for i in range(100):
                assert conn.recv() == b"%04d" % i * (reply_size // 4)
        assert conn.request(b"last") == b"last" * (reply_size // 4)
    wait_until(lambda: reasons == ["peer"])
    assert server.stats()["closed"]["slow_consumer"] == 0


def test_pipelined_replies_to_a_client_that_stops_reading(serve, sock_path):
    """The same, but the client reads nothing: with replies past the cap waiting, it is
    disconnected as a slow consumer once it has taken nothing for flush_timeout (1 s here), and
    what it then reads is whole replies, in order, then the end."""
    reasons: list[str] = []
    server = serve(lambda client, message: message * 1000, max_output_buffer=16 * KiB, flush_timeout=1.0,
                   on_disconnect=lambda client, reason: reasons.append(reason))
    sock = unix_socket(sock_path)
    sock.sendall(b"".join(b"\0\0\0\3%03d" % i for i in range(1000)))
    wait_until(lambda: reasons == [pyuds.CloseReason.SLOW_CONSUMER], timeout=10)
    got = bytearray()
    sock.settimeout(10)
    while chunk := sock.recv(1 << 16):
        got += chunk
    sock.close()
    expected = b"".join(b"\0\0\x0b\xb8" + b"%03d" % i * 1000 for i in range(1000))
    assert 0 < len(got) < len(expected)
    assert len(got) % 3004 == 0 and expected.startswith(got)
    assert server.stats()["closed"]["slow_consumer"] == 1
