"""The Server: configuration, the loop's life (threads, signals, shutdown), statistics, and
the requests (send, close, broadcast, shutdown) that may come from any thread. The clients
themselves are kept by its Registry (pyuds._registry); the loop is its Core's (pyuds._core).

Threads: one thread runs the loop (serve_forever(), or the thread start() made). Only that
thread calls into the C server, except Core.wakeup() and Core.post(), which are made under
self._lock while the server is serving: other threads hand their requests over with
Core.post(). The Server is the handles' owner (pyuds._handle.Owner): it routes what they ask.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import signal
import socket
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, Union

from ._client import fd_numbers
from ._config import ServerConfig
from ._core import Core, Handler, send_error
from ._errors import ClientClosedError
from ._handle import ClientHandle, CloseReason
from ._registry import Registry
from ._workers import Supervisor

log = logging.getLogger("pyuds")

PathLike = Union[str, "os.PathLike[str]"]

_READY, _SERVING, _CLOSED = "ready", "serving", "closed"


def echo(client: ClientHandle, message: bytes) -> bytes:
    """The default handler: replies with the message itself."""
    return message


class Server:
    """A Unix-domain-socket server. Bound and listening once constructed.

    ``handler(client, message)`` is called once per message with the ClientHandle and the
    payload as bytes; what it returns (bytes, or None for no reply) is sent back. A handler
    that raises costs only its own client: the traceback is logged on the "pyuds" logger and
    that client is closed.

    ``path`` is a file name, or ``"@name"`` for a name in Linux's abstract namespace (no file;
    file permissions do not protect it, so use allow_uid / allow_gid or authorize). Or give
    ``sock=``: a socket already bound (and maybe listening) that the server should serve on,
    as a socket object or a file descriptor (e.g. one inherited through systemd socket
    activation). The server works on a duplicate of it, never removes its file, and leaves
    the original open at shutdown: it belongs to whoever made it.

    ``authorize(client)`` runs first when a client connects, with its credentials in
    client.pid / uid / gid; only a true value admits it. False or None refuses it (closed at
    once, counted as ``unauthorized``), and so does an exception (counted as
    ``handler_error``). ``on_connect(client)`` runs next; returning False refuses it too
    (``rejected``). Refused clients never enter the registry. ``on_disconnect(client,
    reason)`` runs once for every client that was admitted, with a CloseReason.

    Options are the fields of ServerConfig, given either as ``config=`` or as keywords
    (keywords win): ``Server(path, handler, framing="line", mode=0o660)``.
    """

    def __init__(
        self,
        path: PathLike | None = None,
        handler: Handler | None = None,
        *,
        sock: socket.socket | int | None = None,
        authorize: Callable[[ClientHandle], Any] | None = None,
        on_connect: Callable[[ClientHandle], Any] | None = None,
        on_disconnect: Callable[[ClientHandle, CloseReason], Any] | None = None,
        on_worker_start: Callable[[int], Any] | None = None,
        config: ServerConfig | None = None,
        _handoff: bool = False,
        **options: Any,
    ) -> None:
        config = dataclasses.replace(config or ServerConfig(), **options)
        if (path is None) == (sock is None) and not _handoff:
            raise TypeError("give either a socket path or sock=, not both" if path is not None
                            else "a socket path or sock= is required")
        self._config = config
        self._handler = handler if handler is not None else echo
        self._lock = threading.Lock()
        self._state = _READY
        self._loop_ident: int | None = None
        self._started = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._final_stats: dict[str, Any] | None = None
        sock_fd = None
        if sock is not None:
            sock_fd = sock if isinstance(sock, int) else sock.fileno()
            if sock_fd < 0:
                raise ValueError("sock is closed")
        self._core = Core(None if path is None else os.fspath(path), config, sock_fd, _handoff)
        self._path = self._core.address
        self._hooks = (authorize, on_connect, on_disconnect)
        self._on_worker_start = on_worker_start
        self._registry = Registry(self._core, self, config, authorize, on_connect, on_disconnect)
        # With workers, this process supervises: the Supervisor stands in for the loop.
        self._pool: Supervisor | None = None
        if config.workers > 1:
            self._pool = Supervisor(self._core, config, self._path, self._worker_server, on_worker_start)
        # A server dropped without shutdown() still closes its sockets and removes its file
        # when collected, with a ResourceWarning, as an unclosed socket does.
        # Not at interpreter exit: atexit runs the last registered first, so this would free the
        # C server under a loop thread still running; _shutdown_running() stops those first.
        weakref.finalize(self, _collect, self._core, self._path).atexit = False
        if _handoff:
            log.debug("worker %d serving clients of %s", os.getpid(), self._path)
        elif sock_fd is not None:
            log.info("serving on %s (%s, inherited socket, fd %d)", self._path, self._describe(), sock_fd)
        elif self._path.startswith("@"):
            log.info("listening on %s (%s, abstract namespace)", self._path, self._describe())
        else:
            log.info("listening on %s (%s, mode %04o)", self._path, self._describe(), config.mode)

    def _describe(self) -> str:
        config = self._config
        return f"framing {config.framing}" if config.kind == "stream" else config.kind

    # ---- public ----

    @property
    def path(self) -> str:
        """The address served on: the socket file's path, or "@name" for an abstract name
        (also for a socket given as sock=)."""
        return self._path

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def clients(self) -> Mapping[int, ClientHandle]:
        """Live, read-only mapping of client id to ClientHandle, for every connected client.
        From another thread than the loop's, iterate over a copy: ``dict(server.clients)``.
        With workers, each worker has its own clients: the supervisor's mapping is empty."""
        return self._pool.clients if self._pool else self._registry.clients

    @property
    def serving(self) -> bool:
        return self._pool.serving if self._pool else self._state == _SERVING

    @property
    def closed(self) -> bool:
        return self._pool.closed if self._pool else self._state == _CLOSED

    def serve_forever(self) -> None:
        """Serves until shutdown() is called, or SIGINT or SIGTERM arrives (when called on the
        main thread and those signals have their default handlers), then shuts down cleanly:
        replies owed are flushed, every client and the master socket are closed, and the
        socket file is removed. With workers, supervises them (see pyuds._workers) and raises
        WorkerError if they keep dying at start-up."""
        if self._pool:
            return self._pool.serve_forever()
        with self._lock:
            if self._state != _READY:
                raise RuntimeError(f"cannot serve: the server is {self._state}")
            self._state = _SERVING
            self._loop_ident = threading.get_ident()
        self._started.set()
        restore = self._install_signal_handlers()
        graceful = False
        try:
            if self._on_worker_start is not None:
                self._on_worker_start(0)  # the one worker there is
            self._core.serve(self._registry, self._handler, draining=False)
            graceful = True
        finally:
            try:
                self._teardown(graceful, restore)
            finally:
                self._done.set()

    def start(self) -> None:
        """Runs the server in a background thread; returns once it is serving."""
        if self._pool:
            _running.add(self)
            return self._pool.start()
        with self._lock:
            if self._state != _READY or self._thread is not None:
                raise RuntimeError(f"cannot start: the server is {self._state}")
            self._thread = threading.Thread(target=self._run_in_thread, daemon=True,
                                            name=f"pyuds {self._path}")
        _running.add(self)
        self._thread.start()
        self._started.wait()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops serving: no new clients, owed replies flushed (each client bounded by
        config.flush_timeout), every connection closed, the socket file removed. From another
        thread it waits until that is done (at most timeout seconds); from inside a handler it
        returns at once and the loop stops after the current batch. Calling it again is
        harmless."""
        if self._pool:
            return self._pool.shutdown(timeout)
        with self._lock:
            state = self._state
            self._core.stop()
            if state == _READY:
                self._state = _CLOSED
                self._final_stats = self._core.stats()
                self._core.free()
                self._done.set()
                self._started.set()
                log.info("closed %s", self._path)
                return
            if state == _SERVING and threading.get_ident() != self._loop_ident:
                self._core.wakeup()
        if threading.get_ident() == self._loop_ident and not self._done.is_set():
            return  # inside a handler: the loop ends after this batch
        self._done.wait(timeout)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters since the server was made (any thread, also after shutdown):
        connections_accepted / _rejected / _current, messages_in / _out and bytes_in / _out
        (payload bytes), handler_errors, accept_pauses (times accepting paused because file
        descriptors ran out), fds_received / fds_sent (descriptors passed with messages);
        for datagram servers datagrams_truncated (dropped: longer than max_message_size, or
        with more descriptors than max_fds), datagrams_refused (dropped by allow_uid /
        allow_gid, or from a peer authorize() refused) and replies_unroutable (replies to
        senders with no address); and
        closed: how many connections ended for each CloseReason (``unauthorized`` counts the
        clients allow_uid / allow_gid refused at accept as well as those authorize() refused).
        A connection refused by on_connect counts as accepted and as rejected; one closed at
        accept because of max_connections only as rejected. With workers: the workers' counters
        summed (as they last reported them, at most a second ago), and under "workers" each
        worker's own, with its id, pid and state."""
        if self._pool:
            return self._pool.stats()
        with self._lock:
            core = self._final_stats if self._final_stats is not None else self._core.stats()
        stats: dict[str, Any] = {}
        for name, value in core.items():
            stats[name] = dict(value) if name == "closed" else value
            if name == "bytes_out":  # handler errors are counted by the registry, not in C
                stats["handler_errors"] = self._registry.handler_errors
        return stats

    def broadcast(self, message: bytes) -> None:
        """Sends message to every connected client (with workers: of every worker). Any thread."""
        data = self._as_bytes(message)
        if self._pool:
            return self._pool.broadcast(data)
        if threading.get_ident() == self._loop_ident:
            self._broadcast_now(data)
        else:
            self._post(self._broadcast_now, (data,), [])

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        if self._pool:
            return f"<pyuds.Server {self._path!r} supervising {self._config.workers} workers>"
        return f"<pyuds.Server {self._path!r} {self._state}, {len(self._registry.clients)} clients>"

    def _worker_server(self, fd: int, handoff: bool) -> Server:
        """The server a worker process runs (pyuds._workers): clients handed over on fd, or the
        datagram socket fd that the workers share."""
        authorize, on_connect, on_disconnect = self._hooks
        return Server(self._path if handoff else None, self._handler, sock=fd, authorize=authorize,
                      on_connect=on_connect, on_disconnect=on_disconnect,
                      config=dataclasses.replace(self._config, workers=1), _handoff=handoff)

    # ---- requests from any thread ----

    def _send(self, client: ClientHandle, message: bytes, fds: Iterable[Any] = ()) -> None:
        if client._slot < 0:
            raise ClientClosedError("this datagram's sender has no address of its own (it never bound "
                                    "one), so nothing sent to it can arrive")
        if client._closed:
            raise ClientClosedError(f"client {client.id} is {'disconnected' if client.close_reason else 'closed'}")
        data = self._as_bytes(message)
        fd_list = fd_numbers(fds) if fds else []
        if fd_list and not data and self._config.kind == "stream" and self._config.framing == "raw":
            raise ValueError("a stream carries file descriptors only with at least one byte: "
                             "an empty raw-framed message cannot")
        if threading.get_ident() == self._loop_ident:
            rc = self._core.send(client._slot, client.id, data, fd_list)
            if rc:
                raise send_error(rc, client.id)
        else:
            # Duplicated now: the caller may close its own once send() returns.
            dups = [os.dup(fd) for fd in fd_list]
            try:
                self._post(self._send_posted, (client, data, dups), dups, client)
            except BaseException:
                for fd in dups:
                    os.close(fd)
                raise

    def _send_posted(self, client: ClientHandle, data: bytes, fds: list[int]) -> None:
        if not client._closed:  # (closed since it was posted)
            self._core.send(client._slot, client.id, data, fds)  # framing checked already

    def _close(self, client: ClientHandle) -> None:
        if client._closed:
            return
        client._closed = True
        if threading.get_ident() == self._loop_ident:
            self._registry.close(client, CloseReason.CLOSED)
        else:
            self._post(self._registry.close, (client, CloseReason.CLOSED), [], client)

    def _peer_address(self, client: ClientHandle) -> str | None:
        return self._core.peer_address(client._slot, client.id)

    def _broadcast_now(self, data: bytes) -> None:
        send = self._core.send
        for client in list(self._registry.clients.values()):
            if not client._closed:
                rc = send(client._slot, client.id, data)
                if rc and not isinstance(send_error(rc, client.id), ClientClosedError):
                    raise send_error(rc, client.id)

    def _as_bytes(self, message: Any) -> bytes:
        data = message if type(message) is bytes else bytes(memoryview(message))
        rc = self._core.check_frame(data)
        if rc:
            raise send_error(rc, 0)
        return data

    def _post(self, fn: Callable[..., Any], args: tuple[Any, ...], fds: list[int],
              client: ClientHandle | None = None) -> None:
        """Hands fn(*args) to the loop thread (fds: descriptors it will close); the request is
        about client, if one."""
        with self._lock:
            if self._state != _SERVING or self._done.is_set():
                if client is not None:
                    raise ClientClosedError(f"client {client.id} is disconnected (the server is {self._state})")
                return  # a broadcast with no server running reaches nobody
            self._core.post(fn, args, fds)

    # ---- life ----

    def _run_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException:
            log.exception("the server loop for %s stopped on an error", self._path)
        finally:
            self._started.set()

    def _teardown(self, graceful: bool, restore_signals: Callable[[], None]) -> None:
        core = self._core
        try:
            if graceful:
                core.run_posted()
                remaining = core.shutdown()
                log.info("shutting down %s: closing %d clients", self._path, remaining)
                core.serve(self._registry, self._handler, draining=True)
        finally:
            restore_signals()  # before free(): the wakeup fd closes there
            with self._lock:
                self._state = _CLOSED
                if core.is_open():
                    self._final_stats = core.stats()
                core.free()  # and the requests still posted
            self._registry.abandon()  # only after a failure: normally no client is left
            _running.discard(self)
            log.info("stopped %s", self._path)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """On the main thread: SIGINT and SIGTERM, if they have their default handlers, stop
        the server. Returns the function that puts everything back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, self._on_signal)
        # A signal delivered to another thread must still wake the poll: Python's C-level
        # handler writes to the wakeup fd. Only take it if nobody else has.
        old_fd = signal.set_wakeup_fd(self._core.wakeup_fd(), warn_on_full_buffer=False)
        if old_fd != -1:
            signal.set_wakeup_fd(old_fd)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if old_fd == -1:
                signal.set_wakeup_fd(-1)

        return restore

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._pool:
            return self._pool.request_stop(signum)
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self._core.stop()


def _collect(core: Core, path: str) -> None:
    if core.is_open():
        warnings.warn(f"unclosed pyuds.Server {path!r}: call shutdown() or use it as a context manager",
                      ResourceWarning, stacklevel=1)
        core.free()


# Servers started in a background thread are shut down cleanly at interpreter exit, so that
# their socket files do not outlive the process.
_running: weakref.WeakSet[Server] = weakref.WeakSet()


@atexit.register
def _shutdown_running() -> None:
    for server in list(_running):
        server.shutdown(timeout=server.config.flush_timeout + 1.0)
