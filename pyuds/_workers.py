"""Worker processes: a supervisor that owns the master socket and the socket file, and the
workers it forks, each running the normal loop and registry on the clients it is given.

Balancing (stream and seqpacket): the supervisor alone accepts. Each client it accepts goes to
the worker with the fewest clients over that worker's own SOCK_SEQPACKET pair, one packet with
the connected socket (SCM_RIGHTS); the worker's C server takes its clients from that pair
(UDS_ADOPT_HANDOFF) as a plain server takes them from accept(). A worker's load is the clients
handed to it less those its counters report gone, so the choice needs no round trip. Workers
waiting in epoll on a shared listener instead (EPOLLEXCLUSIVE) are woken in a fixed order: with
idle workers, the first one takes every client (benchmarks/workers.py measures both).
Datagram servers have no connections to hand out: their workers share the socket, and each
datagram goes to the worker that reads it first.

The socket file is the supervisor's: it made it (pyuds._core.Core, as a server without workers
does) and only it removes it, once, when it stops; a worker never owns a file (its C server
takes clients from a pair, or works on a duplicate of an adopted datagram socket), forgets the
supervisor's C server without freeing it, and leaves with os._exit(), which runs no finalizer.

Supervision: each worker has a control pair (SOCK_STREAM, messages framed as u32 length, then
a type byte and a payload). A worker reports "ready" once on_worker_start and its server are
done, then its loop beats: a thread of the worker posts a beat to the loop every
beat_interval(), and the loop sends it, with its counters, when it gets to it; a loop stuck in
a handler sends none, and the supervisor kills a worker silent for worker_timeout. A worker
that dies is replaced, with a back-off; workers that die before they are ready
START_ATTEMPTS times in a row stop the supervisor with WorkerError. SIGHUP replaces every
worker: the new ones start, and once the new worker with an id is ready the old one with that
id gets no more clients and is told to stop (HAND_BACK): it takes the clients already handed
to it, answers what it was sent, hands its clients back and exits. SIGTTIN and SIGTTOU add and
remove a worker, the one removed stopping the same way. SIGTERM, SIGINT and shutdown() stop
accepting, remove the socket file, and stop every worker with STOP instead: it answers what it
was sent and closes its clients (each within flush_timeout), since the whole server stops.

Handing back (config.reload_clients "move", the default; "close" stops with STOP): the
worker's C server retires (uds_retire()): it reads each client only to the end of the frame
it has begun, and once none of the client's input is held, no handler of it runs and its
replies are all written, it takes the connection out of its loop without closing it. The
worker sends that socket to the supervisor over its handoff pair (the other way, one packet
with SCM_RIGHTS, _give_back()); what the client sent and the worker did not read stays in the
socket's receive queue and goes with it. The supervisor hands it to the least-loaded serving
worker as it hands a client it accepted (waiting, for flush_timeout at most, for room on a
pair if every one is full), and that worker reads what waits (level-triggered epoll: no new
readiness is needed). It is a new client there: authorize and on_connect run again, and what
the application kept on the old ClientHandle stays behind (the old worker's on_disconnect gets
CloseReason.MOVED; stats() counts it in closed["moved"]). A client not handed back within
flush_timeout is closed (closed["shutdown"]).

Layering: above pyuds._core (the supervisor holds the Core that owns the master socket),
below pyuds._server, which hands the supervisor a factory for the server each worker runs (the
WorkerServer protocol) and delegates to it; tests/test_layering.py checks.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import os
import select
import selectors
import signal
import socket
import threading
import time
import types
from typing import Any, Callable, Mapping, NoReturn, Protocol

from ._config import ServerConfig
from ._core import Core
from ._errors import WorkerError
from ._systemd import Notifier

log = logging.getLogger("pyuds")

START_ATTEMPTS = 5       # workers in a row that die before they are ready: the supervisor gives up
BACKOFF_MIN = 0.1        # seconds before a worker that died soon after it started is replaced ...
BACKOFF_MAX = 10.0       # ... doubling up to this
STEADY = 10.0            # seconds after which a worker that dies is replaced at once
TICK = 0.1               # the supervisor's longest sleep: reaping, deadlines
STOP_GRACE = 2.0         # seconds a stopping worker gets beyond flush_timeout before SIGKILL
CONTROL_TIMEOUT = 2.0    # seconds a message to a worker may take to go out before it is given up
ACCEPTS_PER_WAKE = 64    # clients accepted per readiness of the master socket

# Control messages.
READY, BEAT, FINAL = b"R", b"H", b"F"    # worker -> supervisor (BEAT, FINAL: its counters, JSON)
STOP, HAND_BACK, BROADCAST = b"S", b"M", b"B"  # supervisor -> worker (STOP: closing its clients;
                                         # HAND_BACK: handing them back over its handoff pair)

STARTING, SERVING, RETIRING = "starting", "serving", "retiring"

# Counters that are not summed over workers.
_NOT_SUMMED = ("closed", "workers")


def beat_interval(config: ServerConfig) -> float:
    """Seconds between a worker's beats: several per worker_timeout, at least two a second
    (the beats carry the counters stats() sums and the loads the supervisor balances by)."""
    return min(0.5, config.worker_timeout / 4)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + kind + payload


def unframe(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """The complete messages at the start of buf, taken out of it: (type, payload) each."""
    out = []
    while len(buf) >= 4:
        n = int.from_bytes(buf[:4], "big")
        if len(buf) < 4 + n:
            break
        out.append((bytes(buf[4:5]), bytes(buf[5:4 + n])))
        del buf[:4 + n]
    return out


class WorkerServer(Protocol):
    """The server a worker runs (a pyuds.Server without workers): what the worker asks of it."""

    @property
    def serving(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def serve_forever(self) -> None: ...

    def shutdown(self, timeout: float | None = None) -> None: ...

    def broadcast(self, message: bytes) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def _post(self, fn: Callable[..., Any], args: tuple[Any, ...], fds: list[int]) -> None: ...

    def _retire(self, moved: Callable[[int], None]) -> None: ...


#: Makes the server a worker runs, in the worker: (fd, handoff) -> server. handoff: fd is the
#: worker's end of its handoff pair; else fd is the datagram socket the workers share.
ServerFactory = Callable[[int, bool], WorkerServer]


@dataclasses.dataclass(eq=False)
class Worker:
    """The supervisor's record of one worker process."""

    id: int                      # its place, 0 to workers - 1: a replacement takes the same id
    generation: int              # the reload it was started for
    pid: int
    control: socket.socket       # the supervisor's end of its control pair
    handoff: socket.socket | None  # the supervisor's end of its handoff pair (not datagram)
    started: float               # time.monotonic() at fork
    state: str = STARTING
    last_beat: float = 0.0
    handed: int = 0              # clients handed to it
    stats: dict[str, Any] | None = None  # its counters, as last reported
    deadline: float = 0.0        # RETIRING: when it is killed if it has not exited
    inbuf: bytearray = dataclasses.field(default_factory=bytearray)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # control writes

    def load(self) -> int:
        """Clients it holds: those handed to it less those its counters report gone (each
        client handed over ends in exactly one of its closed counts)."""
        gone = sum(self.stats["closed"].values()) if self.stats else 0
        return self.handed - gone


class Supervisor:
    """Owns the master socket (through core), forks and watches the workers, hands them the
    clients. Its public methods are those of pyuds.Server that it stands in for."""

    def __init__(self, core: Core, config: ServerConfig, address: str, make_server: ServerFactory,
                 on_worker_start: Callable[[int], Any] | None) -> None:
        self._core = core
        self._config = config
        self._address = address
        self._make_server = make_server
        self._on_worker_start = on_worker_start
        self._target = config.worker_count
        self._generation = 0
        self._workers: dict[int, Worker] = {}   # by pid
        self._restart_at: dict[int, float] = {}  # by id: when a worker may be started again
        self._backoff: dict[int, float] = {}
        self._start_failures = 0
        self._failure: WorkerError | None = None
        self._retired: dict[str, Any] = {}  # counters of the workers gone, summed
        # Every counter a worker reports, at zero and in pyuds.Server.stats()'s order.
        self._zero: dict[str, Any] = {}
        for name, value in core.stats().items():
            self._zero[name] = {reason: 0 for reason in value} if name == "closed" else 0
            if name == "bytes_out":
                self._zero["handler_errors"] = 0
        self._stop = False
        self._signals: list[int] = []
        self._state = "ready"
        self._lock = threading.Lock()  # the workers table and counters, for other threads
        self._started = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._accepting = False
        self._accept_paused_until = 0.0  # accept() failed (out of descriptors): try again then
        self._accept_failures = 0  # ... and how many times in a row it did
        self._moves = config.reload_clients == "move"  # a worker replaced hands its clients back
        # Clients handed back by workers that stop, waiting for a serving worker's pair to have
        # room: (socket, until when it may wait).
        self._returned: collections.deque[tuple[socket.socket, float]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.clients: Mapping[int, Any] = types.MappingProxyType({})

    # ---- what pyuds.Server delegates ----

    @property
    def serving(self) -> bool:
        return self._state == "serving"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def serve_forever(self) -> None:
        """Starts the workers and supervises them until shutdown() or a signal; then stops
        them all and removes the socket file. Raises WorkerError if workers keep dying at
        start-up."""
        with self._lock:
            if self._state != "ready":
                raise RuntimeError(f"cannot serve: the server is {self._state}")
            self._state = "serving"
        restore = self._install_signal_handlers()
        # systemd (Type=notify) hears from the supervisor, the service's main process; the
        # workers are told nothing of NOTIFY_SOCKET (see _worker_main()).
        notifier = Notifier()
        watchdog = notifier.watchdog()
        try:
            self._open()
            self._started.set()
            if notifier.enabled:
                notifier.notify(f"READY=1\nSTATUS=serving on {self._address} with {self._target} workers")
            while not self._stop:
                self._turn()
                if watchdog is not None:
                    watchdog.tick()
        finally:
            try:
                if notifier.enabled:
                    notifier.notify("STOPPING=1")
                self._teardown()
            finally:
                notifier.close()
                restore()
                with self._lock:
                    self._state = "closed"
                self._done.set()
                self._started.set()
        if self._failure is not None:
            raise self._failure

    def start(self) -> None:
        """Supervises in a background thread (no signal handling there); returns once the
        workers are being started."""
        with self._lock:
            if self._state != "ready" or self._thread is not None:
                raise RuntimeError(f"cannot start: the server is {self._state}")
            self._thread = threading.Thread(target=self._run_in_thread, daemon=True,
                                            name=f"pyuds supervisor {self._address}")
        self._thread.start()
        self._started.wait()

    def _run_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException:
            log.exception("the supervisor of %s stopped on an error", self._address)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops every worker (each answers what it was sent) and removes the socket file.
        From another thread it waits until done, at most timeout seconds."""
        with self._lock:
            if self._state == "ready":
                self._state = "closed"
                self._core.free()
                self._done.set()
                self._started.set()
                return
        self.request_stop()
        if self._thread is not threading.current_thread() and self._state != "ready":
            self._done.wait(timeout)

    def request_stop(self, signum: int | None = None) -> None:
        """Makes the supervisor stop (any thread, and signal handlers)."""
        if signum is not None:
            log.info("received %s: stopping the workers", signal.Signals(signum).name)
        self._stop = True
        self._wake()

    def stats(self) -> dict[str, Any]:
        """The workers' counters summed (those of workers gone included, so that counts never
        go back), and "workers": each live worker's own, with its id, pid and state."""
        with self._lock:
            total = _summed([self._zero, self._retired] + [w.stats for w in self._workers.values() if w.stats])
            total["workers"] = [
                {"id": w.id, "pid": w.pid, "state": w.state, "clients_handed": w.handed, **(w.stats or {})}
                for w in sorted(self._workers.values(), key=lambda w: (w.id, w.started))]
        return total

    def broadcast(self, message: bytes) -> None:
        """Sends message to every client of every worker (each worker sends it to its own)."""
        with self._lock:
            workers = [w for w in self._workers.values() if w.state != STARTING]
        for w in workers:
            self._send(w, BROADCAST, message)

    # ---- the supervisor's loop ----

    @property
    def _selector(self) -> selectors.BaseSelector:
        assert self._sel is not None, "the supervisor's loop is not open"
        return self._sel

    def _open(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        if self._config.kind != "datagram":
            self._listener = socket.socket(fileno=os.dup(self._core.listen_fd()))
            self._listener.setblocking(False)
        if self._stop:
            return  # asked to stop before it began
        log.info("supervising %d workers on %s", self._target, self._address)
        for wid in range(self._target):
            self._spawn(wid)

    def _turn(self) -> None:
        for key, _events in self._selector.select(self._timeout()):
            key.data()
        self._handle_signals()
        self._reap()
        now = time.monotonic()
        self._check_workers(now)
        self._start_due(now)
        self._place_returned()
        self._set_accepting()

    def _timeout(self) -> float:
        now = time.monotonic()
        soonest = now + TICK
        for at in self._restart_at.values():
            soonest = min(soonest, at)
        return max(0.0, soonest - now)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake, or gone

    def _drain_wake(self) -> None:
        # Signal numbers arrive here too (signal.set_wakeup_fd): their handlers record them.
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    # ---- signals (the main thread only) ----

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        # Taken unless the application handles them itself (as pyuds.Server does); SIGHUP,
        # SIGTTIN and SIGTTOU also when ignored (a background job, nohup), since they are
        # the supervisor's controls.
        previous: dict[int, Any] = {}
        for sig, free in ((signal.SIGINT, (signal.default_int_handler,)), (signal.SIGTERM, (signal.SIG_DFL,)),
                          (signal.SIGHUP, (signal.SIG_DFL, signal.SIG_IGN)),
                          (signal.SIGTTIN, (signal.SIG_DFL, signal.SIG_IGN)),
                          (signal.SIGTTOU, (signal.SIG_DFL, signal.SIG_IGN))):
            if signal.getsignal(sig) in free:
                previous[sig] = signal.signal(sig, self._on_signal)
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_signal)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_fd)

        return restore

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            self.request_stop(signum)
        elif signum != signal.SIGCHLD:
            self._signals.append(signum)  # handled by the loop, between turns

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self._resize(self._target + 1)
            elif signum == signal.SIGTTOU:
                self._resize(self._target - 1)

    def reload(self) -> None:
        """Replaces every worker: new ones start, and each old one stops once the new one with
        its id is ready (loop thread)."""
        self._generation += 1
        log.info("reloading: starting %d new workers", self._target)
        for wid in range(self._target):
            self._restart_at.pop(wid, None)
            self._spawn(wid)

    def _resize(self, target: int) -> None:
        if target < 1:
            log.warning("SIGTTOU: keeping the last worker")
            return
        log.info("workers: %d -> %d", self._target, target)
        old, self._target = self._target, target
        for w in list(self._workers.values()):
            if w.id >= target and w.state != RETIRING:
                self._retire(w, self._moves)
        for wid in range(old, target):
            self._spawn(wid)

    # ---- starting, watching and stopping workers ----

    def _spawn(self, wid: int) -> None:
        control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff = worker_handoff = None
        if self._config.kind != "datagram":
            handoff, worker_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            self._run_worker(wid, worker_control, worker_handoff, [control, handoff])
        worker_control.close()
        if worker_handoff is not None:
            worker_handoff.close()
        control.setblocking(False)
        if handoff is not None:
            handoff.setblocking(False)
        now = time.monotonic()
        w = Worker(wid, self._generation, pid, control, handoff, now, last_beat=now)
        with self._lock:
            self._workers[pid] = w
        self._selector.register(control, selectors.EVENT_READ, lambda: self._on_control(w))
        if handoff is not None:  # (what comes back on it: the clients it hands back as it stops)
            self._selector.register(handoff, selectors.EVENT_READ, lambda: self._take_back(w))
        log.info("started worker %d (pid %d)", wid, pid)

    def _on_control(self, w: Worker, gone: bool = False) -> bool:
        """Reads what w sent on its control pair and acts on it; gone: w has exited (only its
        last counters matter). Returns whether anything came (more may wait)."""
        try:
            data = w.control.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            try:
                self._selector.unregister(w.control)  # it is exiting: reaping follows
            except (KeyError, ValueError):
                pass
            return False
        w.inbuf += data
        for kind, payload in unframe(w.inbuf):
            now = time.monotonic()
            if kind == READY and not gone:
                self._ready(w, now)
            elif kind in (BEAT, FINAL):
                w.last_beat = now
                try:
                    stats = json.loads(payload)
                except ValueError:
                    continue
                with self._lock:
                    w.stats = stats
        return True

    def _ready(self, w: Worker, now: float) -> None:
        w.last_beat = now
        if w.state != STARTING:
            return
        w.state = SERVING
        self._start_failures = 0
        log.info("worker %d (pid %d) is serving", w.id, w.pid)
        # A worker replaced (a reload) stops once its successor serves.
        for old in list(self._workers.values()):
            if old.id == w.id and old.generation < w.generation and old.state != RETIRING:
                self._retire(old, self._moves)

    def _retire(self, w: Worker, move: bool = False) -> None:
        """No more clients for w; it answers what it owes and exits, its clients handed back
        (move: each, once nothing is owed to it, comes back to go to a serving worker) or
        closed."""
        w.state = RETIRING
        w.deadline = time.monotonic() + self._config.flush_timeout + STOP_GRACE
        self._send(w, HAND_BACK if move and w.handoff is not None else STOP)

    def _send(self, w: Worker, kind: bytes, payload: bytes = b"") -> None:
        """Sends a control message to w, waiting at most CONTROL_TIMEOUT for room; a worker that
        takes none is killed (a message cut short would leave its control stream unreadable)."""
        data = memoryview(frame(kind, payload))
        deadline = time.monotonic() + CONTROL_TIMEOUT
        with w.lock:
            try:
                while data:
                    try:
                        data = data[w.control.send(data):]
                    except BlockingIOError:
                        left = deadline - time.monotonic()
                        if left <= 0 or not select.select([], [w.control], [], left)[1]:
                            raise TimeoutError("no room") from None
                return
            except OSError as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    return  # it is gone already: reaping follows
                log.error("worker %d (pid %d) takes no control messages (%s): killing it", w.id, w.pid, exc)
        self._kill(w)

    def _kill(self, w: Worker) -> None:
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _check_workers(self, now: float) -> None:
        timeout = self._config.worker_timeout
        for w in list(self._workers.values()):
            if w.state == RETIRING:
                if now > w.deadline:
                    log.error("worker %d (pid %d) did not stop within %gs: killing it", w.id, w.pid,
                              self._config.flush_timeout + STOP_GRACE)
                    w.deadline = float("inf")
                    self._kill(w)
            elif now - w.last_beat > timeout:
                log.error("worker %d (pid %d): no heartbeat for %gs (its loop is stuck): killing it",
                          w.id, w.pid, timeout)
                w.last_beat = float("inf")  # killed once
                self._kill(w)

    def _reap(self) -> None:
        for w in list(self._workers.values()):
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = w.pid, 0
            if pid == w.pid:
                self._exited(w, status)

    def _exited(self, w: Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        while self._on_control(w, gone=True):  # its final counters, if it sent them after the last turn read
            pass
        with self._lock:
            del self._workers[w.pid]
            if w.stats:
                self._retired = _summed([self._retired, {**w.stats, "connections_current": 0}])
        try:
            self._selector.unregister(w.control)
        except (KeyError, ValueError):
            pass
        w.control.close()
        if w.handoff is not None:
            while self._take_back(w):  # what it handed back before it went
                pass
            w.handoff.close()  # clients handed over and not yet taken are closed with it
        if w.state == RETIRING or self._stop:
            log.info("worker %d (pid %d) %s", w.id, w.pid, how)
            return
        if any(o.id == w.id and o.state != RETIRING and o.generation >= w.generation
               for o in self._workers.values()):
            return  # replaced already (an old worker that died during a reload)
        now = time.monotonic()
        if w.state == STARTING:
            self._start_failures += 1
            log.error("worker %d (pid %d) %s before it was ready (%d in a row)", w.id, w.pid, how,
                      self._start_failures)
            if self._start_failures >= START_ATTEMPTS:
                self._failure = WorkerError(
                    f"workers keep dying at start-up ({self._start_failures} in a row; the last, worker "
                    f"{w.id}, {how} before it was ready): stopped. See the errors logged above")
                log.error("%s", self._failure)
                self._stop = True
                return
        else:
            log.warning("worker %d (pid %d) %s; starting another", w.id, w.pid, how)
        delay = 0.0 if now - w.started >= STEADY and w.state == SERVING else self._backoff.get(w.id, BACKOFF_MIN)
        self._backoff[w.id] = BACKOFF_MIN if delay == 0 else min(delay * 2, BACKOFF_MAX)
        self._restart_at[w.id] = now + delay

    def _start_due(self, now: float) -> None:
        if self._stop:
            return
        for wid, at in list(self._restart_at.items()):
            if now >= at:
                del self._restart_at[wid]
                if wid < self._target:
                    self._spawn(wid)

    # ---- clients ----

    def _set_accepting(self) -> None:
        """Accepts while some worker serves; otherwise clients wait in the backlog."""
        if self._listener is None:
            return
        want = (not self._stop and time.monotonic() >= self._accept_paused_until
                and any(w.state == SERVING for w in self._workers.values()))
        if want != self._accepting:
            if want:
                self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
            else:
                self._selector.unregister(self._listener)
            self._accepting = want

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of descriptors, say: the backlog keeps them meanwhile
                if not self._accept_failures:  # (said once a pause: tried again every TICK)
                    log.warning("accept() failed on %s: %s; clients wait in the backlog, accepting again "
                                "every %gs until it works", self._address, exc, TICK)
                self._accept_failures += 1
                self._accept_paused_until = time.monotonic() + TICK
                return
            if self._accept_failures:
                log.info("accepting on %s again (after %d failed attempts)", self._address, self._accept_failures)
                self._accept_failures = 0
            with conn:
                self._hand_over_accepted(conn)

    def _hand_over_accepted(self, conn: socket.socket) -> None:
        if not self._hand_over(conn):
            log.warning("no worker could take a client of %s: closed it", self._address)

    def _hand_over(self, conn: socket.socket) -> bool:
        """Gives conn to the least-loaded serving worker (another one if its pair is full);
        False if none could take it."""
        candidates = sorted((w for w in self._workers.values() if w.state == SERVING),
                            key=lambda w: (w.load(), w.handed))
        for w in candidates:
            assert w.handoff is not None  # (a worker of a kind that hands over)
            try:
                socket.send_fds(w.handoff, [b"c"], [conn.fileno()])
            except OSError:
                continue  # full (its loop is behind) or gone: the next one
            w.handed += 1
            return True
        return False

    def _take_back(self, w: Worker) -> bool:
        """Takes a client w hands back (it stops, see _retire()), to be handed to a serving
        worker as an accepted one is. Returns whether one came (False: none waits, or w is
        gone, and its pair then leaves the selector)."""
        assert w.handoff is not None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(w.handoff, 1, 1)
        except BlockingIOError:
            return False
        except OSError:
            msg, fds = b"", []
        if not msg and not fds:  # end-of-file: it is gone (reaping follows)
            try:
                self._selector.unregister(w.handoff)
            except (KeyError, ValueError):
                pass
            return False
        if not fds:  # (the kernel closed it: recvmsg() could not make it a descriptor here)
            log.error("a client handed back by worker %d (pid %d) was lost: the supervisor could not take "
                      "its descriptor (out of descriptors?)", w.id, w.pid)
        until = time.monotonic() + self._config.flush_timeout
        for fd in fds:
            self._returned.append((socket.socket(fileno=fd), until))
        self._place_returned()
        return True

    def _place_returned(self) -> None:
        """Hands the clients handed back to serving workers, in order. One that no worker can
        take yet (their pairs full while they take the others, or none serving) waits, for
        flush_timeout at most; then it is closed, as it is when the supervisor stops."""
        now = time.monotonic()
        while self._returned:
            conn, until = self._returned[0]
            if not self._hand_over(conn):
                if self._stop:
                    log.info("closed a client handed back by a worker: %s is stopping", self._address)
                elif now < until:
                    return
                else:
                    log.warning("no worker could take a client of %s handed back by a worker that stopped "
                                "(for %gs): closed it", self._address, self._config.flush_timeout)
            self._returned.popleft()
            conn.close()

    # ---- the end ----

    def _teardown(self) -> None:
        """Stops accepting (the socket file goes), hands over what waits in the backlog, stops
        every worker and waits for them, bounded by flush_timeout and STOP_GRACE."""
        self._stop = True
        if self._sel is None:
            self._core.free()
            return
        self._core.shutdown()  # the file goes; our duplicate of the master socket still accepts
        if self._listener is not None:
            self._set_accepting()  # (off)
            if any(w.state == SERVING for w in self._workers.values()):
                self._accept_all()
            self._listener.close()
        for w in list(self._workers.values()):
            if w.state != RETIRING:
                self._retire(w)
        while self._workers:
            for key, _events in self._selector.select(TICK):
                key.data()
            self._reap()
            self._check_workers(time.monotonic())
        self._place_returned()  # (closes those still waiting)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._core.free()
        log.info("stopped %s", self._address)

    def _accept_all(self) -> None:
        """Hands over the clients waiting in the backlog. Asks select() before each accept():
        an inherited socket is blocking again by now (the C server, closing, put back its
        owner's file status flags, which our duplicate shares), and accept() would wait for
        the next client."""
        listener = self._listener
        assert listener is not None
        while select.select([listener], [], [], 0)[0]:
            try:
                conn, _addr = listener.accept()
            except OSError:
                return
            with conn:
                self._hand_over_accepted(conn)

    # ---- in the worker process ----

    def _run_worker(self, wid: int, control: socket.socket, handoff: socket.socket | None,
                    theirs: list[socket.socket | None]) -> NoReturn:
        """The worker's life, in the forked process: never returns. It leaves with os._exit(),
        so nothing of the supervisor's runs here (no finalizer, no atexit function: those
        registered before the fork are the supervisor's, and are dropped); atexit functions
        registered in the worker (by on_worker_start, say) run as it exits."""
        code = 1
        atexit._clear()
        try:
            code = self._worker_main(wid, control, handoff, theirs)
        except BaseException:
            log.exception("worker %d failed", wid)
        finally:
            try:
                atexit._run_exitfuncs()
            except BaseException:
                log.exception("an atexit function failed in worker %d", wid)
            for handler in logging.getLogger().handlers + log.handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            os._exit(code)

    def _worker_main(self, wid: int, control: socket.socket, handoff: socket.socket | None,
                     theirs: list[socket.socket | None]) -> int:
        signal.set_wakeup_fd(-1)  # the supervisor's: signals here must not wake it
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)  # systemd hears from the supervisor only
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # the supervisor's to act on (a terminal sends them to all)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)  # SIGTERM: the worker's server stops gracefully
        # Nothing of the supervisor's stays open here: a worker holding the supervisor's end
        # of a pair would hide the end of the supervisor (or of a sibling) from the other side.
        for s in theirs + [self._wake_r, self._wake_w, self._listener] + [c for c, _ in self._returned]:
            if s is not None:
                s.close()
        for other in self._workers.values():
            other.control.close()
            if other.handoff is not None:
                other.handoff.close()
        if self._sel is not None:
            self._sel.close()
        shared = self._core.listen_fd()
        self._core.forget()
        if handoff is not None:
            os.close(shared)  # the supervisor accepts; a datagram worker keeps it to share
        try:
            if self._on_worker_start is not None:
                self._on_worker_start(wid)
            server = self._make_server(handoff.fileno() if handoff else shared, handoff is not None)
        except BaseException:
            log.exception("worker %d (pid %d) could not start", wid, os.getpid())
            return 3
        finally:
            if handoff is None:
                os.close(shared)
        # The server took a duplicate of the handoff pair's end; this one is for handing the
        # clients back as the worker stops (a send that waits for room at most CONTROL_TIMEOUT).
        if handoff is not None:
            handoff.settimeout(CONTROL_TIMEOUT)
        control.sendall(frame(READY))
        thread = threading.Thread(target=_worker_control,
                                  args=(server, control, beat_interval(self._config), handoff),
                                  daemon=True, name="pyuds worker control")
        thread.start()
        server.serve_forever()
        try:
            control.sendall(frame(FINAL, json.dumps(server.stats()).encode()))
        except OSError:
            pass
        return 0


def _worker_control(server: WorkerServer, control: socket.socket, interval: float,
                    handoff: socket.socket | None) -> None:
    """The worker's thread: passes the supervisor's messages to the server, and posts a beat to
    the loop every interval (sent by the loop itself, so that a stuck loop sends none)."""
    while not server.serving and not server.closed:
        time.sleep(0.01)
    buf = bytearray()
    next_beat = time.monotonic()
    while not server.closed:
        now = time.monotonic()
        if now >= next_beat:
            server._post(_beat, (server, control), [])
            next_beat = now + interval
        readable = select.select([control], [], [], max(0.0, next_beat - now))[0]
        if not readable:
            continue
        try:
            data = control.recv(65536)
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: stop as if told to
            log.warning("worker %d: the supervisor is gone; stopping", os.getpid())
            server.shutdown(timeout=0)
            return
        buf += data
        for kind, payload in unframe(buf):
            if kind == STOP:
                server.shutdown(timeout=0)
            elif kind == HAND_BACK and handoff is not None:
                server._retire(lambda fd: _give_back(handoff, fd))
            elif kind == BROADCAST:
                try:
                    server.broadcast(payload)
                except Exception:
                    log.exception("broadcast failed in worker %d", os.getpid())


def _give_back(handoff: socket.socket, fd: int) -> None:
    """On the worker's loop, as it stops: a client handed back (fd, its socket, ours to close)
    goes to the supervisor over the handoff pair, which carries clients both ways."""
    try:
        socket.send_fds(handoff, [b"m"], [fd])
    except OSError as exc:  # (no room for CONTROL_TIMEOUT: the supervisor is stuck or gone)
        log.error("worker %d could not hand a client back to the supervisor (%s): closed it", os.getpid(), exc)
    finally:
        os.close(fd)


def _beat(server: WorkerServer, control: socket.socket) -> None:
    """On the worker's loop: tells the supervisor it is alive, with its counters."""
    try:
        control.sendall(frame(BEAT, json.dumps(server.stats()).encode()))
    except OSError:
        pass  # the supervisor is gone: the control thread sees it too


def _summed(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters of several servers added up ("closed" by reason)."""
    total: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name == "closed":
                closed = total.setdefault("closed", {})
                for reason, n in value.items():
                    closed[reason] = closed.get(reason, 0) + n
            elif name not in _NOT_SUMMED and isinstance(value, int):
                total[name] = total.get(name, 0) + value
    return total
