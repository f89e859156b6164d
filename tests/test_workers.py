"""Worker processes under a supervisor (pyuds._workers): real processes, real signals sent by
pid, real clients. Every wait is bounded, and every process a test starts (the supervisor, and
the workers it forks, found through /proc) is killed by its pid at the end if still alive."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

import pyuds

APP = '''
import asyncio, atexit, os, time

def handle(client, message):
    if message == b"stick":
        time.sleep(3600)  # a loop stuck in a handler
    if message.startswith(b"slow"):
        time.sleep(0.3)
    if message == b"nap":
        time.sleep(2)  # a loop busy for a while (its handoff queue fills)
    return b"%d:%s" % (os.getpid(), message)

async def ahandle(client, message):  # up to max_in_flight of a client's requests at once
    await asyncio.sleep(0.001)
    return handle(client, message)

def boom(worker_id):
    raise RuntimeError("cannot open the database")

def mark(worker_id):
    here = os.path.dirname(os.path.abspath(__file__))
    open(os.path.join(here, "started-%d-%d" % (worker_id, os.getpid())), "w").close()
    stopped = os.path.join(here, "stopped-%d-%d" % (worker_id, os.getpid()))
    atexit.register(lambda: open(stopped, "w").close())  # runs as the worker exits
'''

# A supervisor in the main thread (so that it takes signals), driven by lines on its stdin:
# "hup" (a reload), "stats" (prints stats() as JSON), "fill" (takes every descriptor left to
# the process) and "free" (gives them back); end-of-file stops it.
HARNESS = '''
import json, logging, os, resource, signal, sys, threading
import pyuds
from app import handle

logging.basicConfig(level=logging.INFO, format="%(levelname)s [%(process)d] %(message)s")
path, limit = sys.argv[1], int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
server = pyuds.Server(path, handle, workers=2)
held = []

def commands():
    for line in sys.stdin:
        word = line.strip()
        if word == "hup":
            os.kill(os.getpid(), signal.SIGHUP)
        elif word == "stats":
            print(json.dumps(server.stats()), flush=True)
        elif word == "fill":
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            print("full", flush=True)
        elif word == "free":
            while held:
                os.close(held.pop())
            print("freed", flush=True)
    server.shutdown()

threading.Thread(target=commands, daemon=True).start()
server.serve_forever()
'''

DEADLINE = 15.0  # seconds any one wait may take


def wait_for(predicate, timeout: float = DEADLINE, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> set[int]:
    """The processes pid forked that are still alive."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def reply_pid(conn: pyuds.Connection, message: bytes = b"x") -> int:
    pid, _, echoed = conn.request(message).partition(b":")
    assert echoed == message
    return int(pid)


class Supervised:
    """A `pyuds serve --workers ...` process and what it forked."""

    def __init__(self, sockdir: str, args: list[str], kind: str = "stream", framing: str = "u32",
                 harness: list[str] | None = None) -> None:
        with open(os.path.join(sockdir, "app.py"), "w") as f:
            f.write(APP)
        self.path = os.path.join(sockdir, "w.sock")
        self.kind, self.framing = kind, framing
        self.log = open(os.path.join(sockdir, "serve.log"), "w+")
        if harness is not None:  # HARNESS, args its own; commands on its stdin, its answers on stdout
            with open(os.path.join(sockdir, "harness.py"), "w") as f:
                f.write(HARNESS)
            self.proc = subprocess.Popen([sys.executable, "harness.py", self.path, *harness], cwd=sockdir,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "pyuds", "serve", self.path, "--handler",
                                          "app:handle", "--kind", kind, "--framing", framing, *args],
                                         cwd=sockdir, stdout=self.log, stderr=subprocess.STDOUT)
        self.seen: set[int] = set()  # every worker pid seen, to kill at the end

    def workers(self) -> set[int]:
        pids = children(self.proc.pid)
        self.seen |= pids
        return pids

    def connect(self) -> pyuds.Connection:
        return pyuds.connect(self.path, self.framing, kind=self.kind, timeout=DEADLINE)

    def command(self, word: str, answer: bool = True) -> str:
        """Sends a command to the harness; returns the line it answers with, if it does."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline() if answer else ""

    def serving_pids(self) -> set[int]:
        """The workers the supervisor has logged as serving (each told it it was ready)."""
        return {int(pid) for pid in re.findall(r"\(pid (\d+)\) is serving", self.output())}

    def wait_serving(self, workers: int) -> None:
        """Waits until there are that many workers, each of them serving as far as the
        supervisor knows (a worker that has not told it yet gets no clients), and a client is
        answered."""
        def ready() -> bool:
            pids = self.workers()
            if len(pids) != workers or not pids <= self.serving_pids():
                return False
            try:
                with self.connect() as conn:
                    reply_pid(conn)
            except OSError:
                return False
            return True
        wait_for(ready, what=f"{workers} workers serving")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        self.workers()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        for pid in [self.proc.pid, *self.seen]:
            with contextlib.suppress(ProcessLookupError):
                if pid == self.proc.pid and self.proc.poll() is not None:
                    continue
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(DEADLINE)
        for pid in self.seen:  # workers are the supervisor's to reap; once it is gone, init's
            wait_for(lambda: not alive(pid), what=f"worker {pid} gone")
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def supervised(sockdir: str) -> Iterator:
    started: list[Supervised] = []

    def start(*args: str, kind: str = "stream", framing: str = "u32", harness: list[str] | None = None) -> Supervised:
        sup = Supervised(sockdir, list(args), kind, framing, harness)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.close()


class Load(threading.Thread):
    """A client sending requests one at a time as fast as it can, each checked. A connection
    the server closes before the reply (a worker that stops) is opened again and the request
    sent again; any other failure, a wrong reply or a timeout is an error."""

    def __init__(self, sup: Supervised, name: str) -> None:
        super().__init__(daemon=True)
        self.sup, self.tag = sup, name.encode()
        self.stop = threading.Event()
        self.answered = self.reconnects = 0
        self.errors: list[str] = []
        self.pids: list[int] = []  # the worker that answered each request
        self.gone = False  # the server is gone (nothing listens any more)

    def run(self) -> None:
        conn = None
        i = 0
        while not self.stop.is_set():
            message = b"%s-%d" % (self.tag, i)
            reply = None
            for _attempt in range(50):
                try:
                    if conn is None:
                        conn = self.sup.connect()
                    reply = conn.request(message)
                    break
                except TimeoutError:
                    self.errors.append(f"{message!r}: no reply in time")
                    return
                except (FileNotFoundError, ConnectionRefusedError):
                    self.gone = True
                    return
                except (pyuds.ConnectionClosedError, ConnectionError):
                    if conn is not None:
                        conn.close()
                    conn, self.reconnects = None, self.reconnects + 1
            if reply is None:
                self.errors.append(f"{message!r}: no reply after 50 connections")
                return
            pid, _, echoed = reply.partition(b":")
            if echoed != message:
                self.errors.append(f"{message!r}: wrong reply {reply!r}")
                return
            self.pids.append(int(pid))
            self.answered += 1
            i += 1
        if conn is not None:
            conn.close()


def run_load(sup: Supervised, n: int) -> list[Load]:
    loads = [Load(sup, f"c{k}") for k in range(n)]
    for load in loads:
        load.start()
    wait_for(lambda: all(load.answered > 20 for load in loads), what="load running")
    return loads


def stop_load(loads: list[Load]) -> None:
    for load in loads:
        load.stop.set()
    for load in loads:
        load.join(DEADLINE)
        assert not load.is_alive()


class Steady(threading.Thread):
    """A client on one connection for its whole life (it never connects again): it sends
    requests without pause, `depth` in flight at once (1: one at a time), and checks that each
    reply is the right one, in order. Any failure (the connection closed, a wrong reply, a
    timeout) is an error, and ends it."""

    def __init__(self, sup: Supervised, name: str, depth: int) -> None:
        super().__init__(daemon=True)
        self.conn = sup.connect()
        self.tag, self.depth = name.encode(), depth
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.pids: list[int] = []  # the worker that answered each request, in order

    def run(self) -> None:
        sent: list[bytes] = []
        i = 0
        try:
            while True:
                while len(sent) < self.depth and not self.stop.is_set():
                    sent.append(b"%s-%d" % (self.tag, i))
                    self.conn.send(sent[-1])
                    i += 1
                if not sent:
                    return
                pid, _, echoed = self.conn.recv().partition(b":")
                if echoed != sent[0]:
                    self.errors.append(f"{sent[0]!r}: wrong reply {echoed!r}")
                    return
                sent.pop(0)
                self.pids.append(int(pid))
        except Exception as exc:  # the connection closed, a timeout: all failures here
            self.errors.append(f"{sent[0] if sent else b''!r}: {exc!r}")
        finally:
            self.conn.close()


def answered_by(clients: list[Steady], pids: set[int], more: int = 10) -> bool:
    """Whether each client's last `more` replies came from workers in pids."""
    return all(len(c.pids) >= more and set(c.pids[-more:]) <= pids for c in clients)


def generations(pids: list[int], gens: list[set[int]]) -> list[int]:
    """The generation of the worker behind each reply, in order."""
    return [next(g for g, members in enumerate(gens) if pid in members) for pid in pids]


# ---- the tests -----------------------------------------------------------------------------


def test_each_of_n_workers_answers_from_its_own_process(supervised):
    sup = supervised("--workers", "3")
    sup.wait_serving(3)
    workers = sup.workers()
    conns = [sup.connect() for _ in range(30)]
    try:
        pids = [reply_pid(conn) for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert set(pids) == workers and sup.proc.pid not in pids
    # Least-loaded first: 30 clients at once are spread evenly.
    assert sorted(pids.count(pid) for pid in workers) == [10, 10, 10]


def test_a_worker_killed_is_replaced_and_other_clients_do_not_notice(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    conns = [sup.connect() for _ in range(6)]
    try:
        by_pid: dict[int, list[pyuds.Connection]] = {}
        for conn in conns:
            by_pid.setdefault(reply_pid(conn), []).append(conn)
        victim, survivor = sorted(by_pid)
        os.kill(victim, signal.SIGKILL)
        for conn in by_pid[victim]:  # its own clients lose their connection ...
            with pytest.raises((pyuds.ConnectionClosedError, ConnectionError)):
                conn.request(b"x")
        for round_ in range(20):  # ... the others go on as if nothing happened
            for conn in by_pid[survivor]:
                assert reply_pid(conn, b"r%d" % round_) == survivor
        replacement = wait_for(lambda: sup.workers() - {survivor, victim}, what="a replacement")
        assert len(replacement) == 1 and victim not in sup.workers()
        sup.wait_serving(2)
    finally:
        for conn in conns:
            conn.close()
    assert "was killed by SIGKILL; starting another" in sup.output()


def test_sighup_under_load_replaces_every_worker_without_a_failed_request(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    old = sup.workers()
    loads = run_load(sup, 6)
    os.kill(sup.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(sup.workers()) == 2 and not sup.workers() & old, what="every worker replaced")
    new = sup.workers()
    marks = [load.answered for load in loads]
    wait_for(lambda: all(load.answered > mark + 20 for load, mark in zip(loads, marks)), what="load after reload")
    stop_load(loads)
    assert [e for load in loads for e in load.errors] == []
    late = [pid for load, mark in zip(loads, marks) for pid in load.pids[mark + 5:]]
    assert set(late) <= new  # after the reload, only new workers answer
    assert {pid for load in loads for pid in load.pids} & old  # (and the old ones did before it)
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(DEADLINE) == 0


@pytest.mark.parametrize("kind,framing,handler", [("stream", "u32", "app:handle"), ("stream", "line", "app:handle"),
                                                  ("seqpacket", "u32", "app:handle"),
                                                  ("stream", "u32", "app:ahandle")])
def test_sighup_moves_every_client_to_the_new_workers_with_no_request_lost(supervised, kind, framing, handler):
    """Clients that never connect again, pipelining or one request at a time, across two
    reloads: every request is answered, on the connection it was sent on, by the old workers
    until each client is moved and by the new ones after; the old workers exit. A client idle
    throughout is moved too, and answered when it speaks. (A coroutine handler: handlers in
    flight are waited for.)"""
    sup = supervised("--workers", "2", "--handler", handler, kind=kind, framing=framing)
    sup.wait_serving(2)
    gens = [sup.workers()]
    idle = sup.connect()
    clients = [Steady(sup, f"c{k}", depth=3 if k % 2 else 1) for k in range(20)]
    try:
        first = reply_pid(idle)
        assert first in gens[0]
        for c in clients:
            c.start()
        wait_for(lambda: answered_by(clients, gens[0]), what="load on the first workers")
        for reload in (1, 2):
            os.kill(sup.proc.pid, signal.SIGHUP)
            wait_for(lambda: len(sup.workers()) == 2 and not sup.workers() & gens[-1], what=f"reload {reload} done")
            gens.append(sup.workers())
            wait_for(lambda: answered_by(clients, gens[-1]), what=f"load on the workers of reload {reload}")
            assert all(not alive(pid) for pid in gens[-2])  # the old ones exited
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(DEADLINE)
            assert not c.is_alive()
        assert [e for c in clients for e in c.errors] == []
        for c in clients:  # old workers until moved, then new ones: never back
            order = generations(c.pids, gens)
            assert order == sorted(order) and order[0] == 0 and order[-1] == 2
        assert reply_pid(idle, b"still here") in gens[2]
    finally:
        idle.close()
        for c in clients:
            c.stop.set()
    out = sup.output()
    assert "no worker could take" not in out and "closed it" not in out
    assert len(re.findall(r"retiring .*: handing back \d+ clients", out)) == 4
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(DEADLINE) == 0


def test_sigterm_during_a_reload_stops_everything(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    clients = [Steady(sup, f"c{k}", depth=2) for k in range(6)]
    for c in clients:
        c.start()
    wait_for(lambda: all(len(c.pids) > 5 for c in clients), what="load running")
    os.kill(sup.proc.pid, signal.SIGHUP)
    wait_for(lambda: "retiring" in sup.output(), what="the reload under way")
    sup.workers()  # (the new ones seen)
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(DEADLINE) == 0
    assert not os.path.exists(sup.path)
    for pid in sup.seen:
        wait_for(lambda: not alive(pid), what=f"worker {pid} gone")
    for c in clients:  # (their connections end: the whole server stopped)
        c.join(DEADLINE)
        assert not c.is_alive()


def test_reload_clients_close_answers_then_closes_the_clients(supervised):
    sup = supervised("--workers", "2", "--reload-clients", "close")
    sup.wait_serving(2)
    old = sup.workers()
    conn = sup.connect()
    try:
        assert reply_pid(conn) in old
        conn.send(b"slow1")  # (being handled when the reload comes)
        os.kill(sup.proc.pid, signal.SIGHUP)
        pid, _, echoed = conn.recv().partition(b":")
        assert echoed == b"slow1" and int(pid) in old  # answered ...
        with pytest.raises(pyuds.ConnectionClosedError):  # ... then closed
            conn.recv()
    finally:
        conn.close()
    wait_for(lambda: len(sup.workers()) == 2 and not sup.workers() & old, what="every worker replaced")
    with sup.connect() as again:  # connecting again finds the new ones
        assert reply_pid(again) in sup.workers()
    assert "handing back" not in sup.output()


def half_frame_at_reload(sup: Supervised) -> tuple[pyuds.Connection, int, bytes]:
    """A client of a worker whose request is half sent (and read by it) when a reload begins:
    its connection, the worker's pid, and the rest of the frame."""
    conn = sup.connect()
    old = reply_pid(conn)
    frame = (10).to_bytes(4, "big") + b"0123456789"
    conn._sock.sendall(frame[:9])  # the header and half the payload
    time.sleep(0.3)  # (read by the worker meanwhile)
    os.kill(sup.proc.pid, signal.SIGHUP)
    wait_for(lambda: re.search(rf"\[{old}\].*retiring", sup.output()), what="the old worker retiring")
    return conn, old, frame[9:]


def test_a_frame_half_sent_at_reload_is_answered_and_the_client_moved(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    conn, old, rest = half_frame_at_reload(sup)
    try:
        time.sleep(0.3)  # the old worker waits for the rest (flush_timeout: 5 s)
        conn._sock.sendall(rest)
        assert conn.recv() == b"%d:0123456789" % old  # answered by the worker that read its start
        assert reply_pid(conn, b"next") in sup.workers() - {old}  # then served on by a new one
        wait_for(lambda: not alive(old), what="the old worker gone")
    finally:
        conn.close()


def test_a_frame_not_finished_within_flush_timeout_at_reload_is_closed(supervised):
    sup = supervised("--workers", "2", "--flush-timeout", "1")
    sup.wait_serving(2)
    other = sup.connect()
    conn, old, _rest = half_frame_at_reload(sup)
    try:
        with pytest.raises(pyuds.ConnectionClosedError):  # the rest never comes: closed
            conn.recv()
        assert reply_pid(other) not in {old}  # an idle client was moved meanwhile
        wait_for(lambda: not alive(old), what="the old worker gone")
    finally:
        conn.close()
        other.close()


def test_with_every_handoff_pair_full_a_client_is_closed_and_serving_goes_on(supervised):
    """Both workers busy in a handler: the clients accepted meanwhile queue on their handoff
    pairs until those are full; the next one is closed (with a warning), the supervisor goes
    on, and once the workers are back every client queued is served, and new ones too."""
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    by_pid: dict[int, pyuds.Connection] = {}
    spare: list[pyuds.Connection] = []
    conns: list[pyuds.Connection] = []
    try:
        while len(by_pid) < 2:  # a client of each worker
            conn = sup.connect()
            pid = reply_pid(conn)
            if pid in by_pid:
                spare.append(conn)
            else:
                by_pid[pid] = conn
        for conn in by_pid.values():
            conn.send(b"nap")  # each worker busy for 2 s
        time.sleep(0.1)
        while "no worker could take a client" not in sup.output() and len(conns) < 3000:
            conns.extend(sup.connect() for _ in range(50))
        assert "no worker could take a client of " + sup.path + ": closed it" in sup.output()
        assert sup.proc.poll() is None
        for pid, conn in by_pid.items():
            assert conn.recv() == b"%d:nap" % pid
        served = closed = 0
        for conn in conns:  # (opened while the workers were busy)
            try:
                assert reply_pid(conn) in by_pid
                served += 1
            except (pyuds.ConnectionClosedError, ConnectionError):
                closed += 1
        assert closed >= 1 and served >= 2 * 100  # (the pairs held hundreds each)
        with sup.connect() as fresh:
            assert reply_pid(fresh) in by_pid
    finally:
        for conn in conns + spare + list(by_pid.values()):
            conn.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_out_of_descriptors_the_supervisor_pauses_accepting_then_serves_the_waiting_clients(supervised):
    sup = supervised(harness=["256"])  # RLIMIT_NOFILE 256 before the server is made
    sup.wait_serving(2)
    assert sup.command("fill") == "full\n"  # every descriptor of the supervisor taken
    waiting = [sup.connect() for _ in range(5)]  # connected in the backlog, not accepted
    try:
        for k, conn in enumerate(waiting):
            conn.send(b"w%d" % k)
        wait_for(lambda: "accept() failed on " + sup.path in sup.output(), what="accept failing")
        before, start = cpu_seconds(sup.proc.pid), time.monotonic()
        time.sleep(1.0)
        spent, wall = cpu_seconds(sup.proc.pid) - before, time.monotonic() - start
        assert spent < wall / 4  # it waits between attempts: no spinning
        assert sup.command("free") == "freed\n"
        for k, conn in enumerate(waiting):
            pid, _, echoed = conn.recv().partition(b":")
            assert echoed == b"w%d" % k and int(pid) in sup.workers()
    finally:
        for conn in waiting:
            conn.close()
    out = sup.output()
    assert out.count("accept() failed") == 1 and "accepting on " + sup.path + " again" in out
    sup.proc.stdin.close()  # the harness stops
    assert sup.proc.wait(DEADLINE) == 0


def test_stats_count_the_clients_moved(supervised):
    sup = supervised(harness=["0"])
    sup.wait_serving(2)
    old = sup.workers()
    conns = [sup.connect() for _ in range(4)]
    try:
        assert {reply_pid(conn) for conn in conns} <= old
        sup.command("hup", answer=False)
        wait_for(lambda: len(sup.workers()) == 2 and not sup.workers() & old, what="every worker replaced")
        assert {reply_pid(conn) for conn in conns} <= sup.workers()

        def moved() -> dict | None:
            stats = json.loads(sup.command("stats"))
            return stats if stats["closed"]["moved"] == 4 and stats["connections_current"] == 4 else None
        stats = wait_for(moved, what="the moves counted")
        assert sum(w["connections_current"] for w in stats["workers"]) == 4
    finally:
        for conn in conns:
            conn.close()


def test_sigterm_under_load_answers_what_was_sent_exits_0_and_removes_the_file(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    loads = run_load(sup, 4)
    slow = [sup.connect() for _ in range(4)]
    try:
        for k, conn in enumerate(slow):
            conn.send(b"slow%d" % k)  # each takes its handler 0.3 s
        time.sleep(0.1)  # (arrived)
        os.kill(sup.proc.pid, signal.SIGTERM)
        replies = [conn.recv() for conn in slow]
        assert [r.partition(b":")[2] for r in replies] == [b"slow%d" % k for k in range(4)]
        for conn in slow:
            with pytest.raises(pyuds.ConnectionClosedError):
                conn.recv()
    finally:
        for conn in slow:
            conn.close()
    assert sup.proc.wait(DEADLINE) == 0
    assert not os.path.exists(sup.path)
    wait_for(lambda: all(load.gone or not load.is_alive() for load in loads), what="load stopped")
    stop_load(loads)
    assert [e for load in loads for e in load.errors] == []
    assert "stopped " + sup.path in sup.output()


def test_workers_dying_at_start_up_stop_the_supervisor_with_a_clear_error(supervised):
    sup = supervised("--workers", "2", "--on-worker-start", "app:boom")
    assert sup.proc.wait(DEADLINE) == 1
    out = sup.output()
    assert "pyuds serve: workers keep dying at start-up (5 in a row" in out
    assert "RuntimeError: cannot open the database" in out  # why, from the worker
    assert not os.path.exists(sup.path)


def test_sigttin_and_sigttou_add_and_remove_a_worker(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    os.kill(sup.proc.pid, signal.SIGTTIN)
    sup.wait_serving(3)
    os.kill(sup.proc.pid, signal.SIGTTOU)  # (one at a time: two at once may arrive as one)
    sup.wait_serving(2)
    os.kill(sup.proc.pid, signal.SIGTTOU)
    sup.wait_serving(1)
    os.kill(sup.proc.pid, signal.SIGTTOU)  # the last one stays
    time.sleep(0.3)
    sup.wait_serving(1)
    assert "SIGTTOU: keeping the last worker" in sup.output()


def test_sigttou_moves_the_clients_of_the_worker_removed_to_the_others(supervised):
    sup = supervised("--workers", "2")
    sup.wait_serving(2)
    conns = [sup.connect() for _ in range(6)]
    try:
        first = [reply_pid(conn) for conn in conns]
        assert set(first) == sup.workers()
        os.kill(sup.proc.pid, signal.SIGTTOU)
        wait_for(lambda: len(sup.workers()) == 1, what="a worker removed")
        (left,) = sup.workers()
        assert [reply_pid(conn, b"after") for conn in conns] == [left] * 6  # the same connections
    finally:
        for conn in conns:
            conn.close()


def test_a_stuck_worker_is_killed_and_replaced(supervised):
    sup = supervised("--workers", "2", "--worker-timeout", "1")
    sup.wait_serving(2)
    a, b = sup.connect(), sup.connect()
    try:
        pa, pb = reply_pid(a), reply_pid(b)
        assert pa != pb
        a.send(b"stick")
        wait_for(lambda: pa not in sup.workers(), timeout=5, what="the stuck worker killed")
        assert reply_pid(b) == pb  # the other worker's client is served throughout
        sup.wait_serving(2)
    finally:
        a.close()
        b.close()
    assert "no heartbeat for 1s (its loop is stuck): killing it" in sup.output()


@pytest.mark.parametrize("kind", ["seqpacket", "datagram"])
def test_other_kinds_with_workers(supervised, kind):
    sup = supervised("--workers", "2", kind=kind)
    sup.wait_serving(2)
    workers = sup.workers()
    for _ in range(20):
        with sup.connect() as conn:
            assert reply_pid(conn) in workers
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(DEADLINE) == 0
    assert not os.path.exists(sup.path)


def test_api_stats_broadcast_on_worker_start_and_shutdown(sockdir):
    """In this process: start() supervises from a thread; the workers are forked from here.
    on_worker_start runs in each, and the atexit functions it registers run as it exits."""
    sys.path.insert(0, sockdir)
    with open(os.path.join(sockdir, "app.py"), "w") as f:
        f.write(APP)
    try:
        import app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(sockdir)
    path = os.path.join(sockdir, "a.sock")
    server = pyuds.Server(path, app.handle, workers=2, on_worker_start=app.mark)
    pids: set[int] = set()
    conns: list[pyuds.Connection] = []
    started: list[str] = []
    try:
        server.start()
        wait_for(lambda: len([w for w in server.stats()["workers"] if w["state"] == "serving"]) == 2,
                 what="workers serving")
        pids = {w["pid"] for w in server.stats()["workers"]}
        conns = [pyuds.connect(path, timeout=DEADLINE) for _ in range(4)]
        assert {reply_pid(conn) for conn in conns} == pids
        stats = wait_for(lambda: (lambda s: s if s["messages_in"] == 4 else None)(server.stats()),
                         what="counters reported")
        assert stats["connections_current"] == 4 and [w["messages_in"] for w in stats["workers"]] == [2, 2]
        assert sorted(w["id"] for w in stats["workers"]) == [0, 1] and server.clients == {}
        server.broadcast(b"to all")
        assert [conn.recv() for conn in conns] == [b"to all"] * 4
        started = sorted(name for name in os.listdir(sockdir) if name.startswith("started-"))
        assert started == sorted(f"started-{w['id']}-{w['pid']}" for w in stats["workers"])
    finally:
        for conn in conns:
            conn.close()
        server.shutdown(timeout=DEADLINE)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert server.closed and not os.path.exists(path)
    assert server.stats()["messages_in"] == 4  # the workers' final counts
    stopped = sorted(name for name in os.listdir(sockdir) if name.startswith("stopped-"))
    assert stopped == [name.replace("started", "stopped") for name in started]


def test_an_inherited_socket_with_workers_is_never_removed(sockdir):
    path = os.path.join(sockdir, "i.sock")
    own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    own.bind(path)
    server = pyuds.Server(sock=own, workers=2)
    pids: set[int] = set()
    try:
        server.start()
        wait_for(lambda: len([w for w in server.stats()["workers"] if w["state"] == "serving"]) == 2,
                 what="workers serving")
        pids = {w["pid"] for w in server.stats()["workers"]}
        with pyuds.connect(path, timeout=DEADLINE) as conn:
            assert conn.request(b"hi") == b"hi"
    finally:
        server.shutdown(timeout=DEADLINE)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert server.closed  # (not stuck: the socket it shares with its owner is blocking again)
    assert os.path.exists(path)  # the owner's, not ours
    own.close()


def test_workers_option_is_checked():
    assert pyuds.ServerConfig(workers="auto").workers == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="workers must be a number of processes or 'auto'"):
        pyuds.ServerConfig(workers="many")
    with pytest.raises(ValueError, match="workers must be between 1"):
        pyuds.ServerConfig(workers=0)
    with pytest.raises(ValueError, match="worker_timeout must be at least 0.1"):
        pyuds.ServerConfig(worker_timeout=0)
    assert pyuds.ServerConfig().reload_clients == "move"
    with pytest.raises(ValueError, match="reload_clients must be one of move, close, not 'keep'"):
        pyuds.ServerConfig(reload_clients="keep")
