"""The Server: configuration, the loop's life (threads, signals, shutdown), statistics, and
the requests (send, close, broadcast, shutdown) that may come from any thread. The clients
themselves are kept by its Registry (pyuds._registry); the loop is its Core's (pyuds._core).

Threads: one thread runs the loop (serve_forever(), or the thread start() made, or the
thread of the asyncio loop serve_async() runs in). Only that thread calls into the C server,
except Core.wakeup() and Core.post(), which are made under self._lock while the server is
serving: other threads hand their requests over with Core.post(). The Server is the handles'
owner (pyuds._handle.Owner): it routes what they ask.

Coroutine handlers and executor= always run under asyncio (pyuds._aio): serve_forever() then
runs an event loop of its own on its thread.
"""
from __future__ import annotations

import asyncio
import atexit
import dataclasses
import inspect
import logging
import os
import signal
import socket
import threading
import warnings
import weakref
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Union

from ._aio import Dispatcher, Driver
from ._client import FdLike, fd_numbers
from ._config import ServerConfig, ServerOptions, check_transport
from ._core import Core, Handler, send_error
from ._endpoint import EndpointLike, format_tcp, parse_endpoint, resolve_listen
from ._errors import ClientClosedError
from ._handle import ClientHandle, CloseReason
from ._framing import BytesLike
from ._registry import Registry
from ._systemd import Notifier

if TYPE_CHECKING:  # typing.Unpack is Python 3.11's; type checkers know typing_extensions
    from typing_extensions import Unpack
from ._workers import Supervisor

log = logging.getLogger("pyuds")


_READY, _SERVING, _CLOSED = "ready", "serving", "closed"


def echo(client: ClientHandle, message: bytes) -> bytes:
    """The default handler: replies with the message itself."""
    return message


class Server:
    """A server on a Unix-domain socket or TCP. Bound and listening once constructed.

    ``handler(client, message)`` is called once per message with the ClientHandle and the
    payload as bytes; what it returns (bytes, or None for no reply) is sent back. A handler
    that raises costs only its own client: the traceback is logged on the "pyuds" logger and
    that client is closed.

    ``endpoint`` says where to listen: a file name (or ``unix:PATH``), ``"@name"`` (or
    ``unix-abstract:NAME``) for a name in Linux's abstract namespace (no file; file
    permissions do not protect it, so use allow_uid / allow_gid or authorize),
    ``tcp://HOST:PORT`` (``[v6]`` in brackets; port 0: any free one, see ``address``) or
    ``fd://N``. Or give ``sock=`` (as ``fd://N`` does): a socket already bound (and maybe
    listening) that the server should serve on, Unix or TCP, as a socket object or a file
    descriptor (e.g. one inherited through systemd socket activation). The server works on a
    duplicate of it, never removes its file, and leaves the original open at shutdown: it
    belongs to whoever made it.

    Over TCP a client has an address rather than credentials (``client.peer`` is an
    InetPeer), and mode, allow_uid, allow_gid and descriptor passing do not apply; with
    ``proxy_protocol=True`` the address is the one a balancer's PROXY header names.

    With ``NOTIFY_SOCKET`` set (systemd's ``Type=notify``), serve_forever() and serve_async()
    tell systemd ``READY=1`` once they serve and ``STOPPING=1`` when they shut down, and with
    ``WATCHDOG_USEC`` set send ``WATCHDOG=1`` from their loop every half of that period.

    ``authorize(client)`` runs first when a client connects, with its credentials in
    client.pid / uid / gid; only a true value admits it. False or None refuses it (closed at
    once, counted as ``unauthorized``), and so does an exception (counted as
    ``handler_error``). ``on_connect(client)`` runs next; returning False refuses it too
    (``rejected``). Refused clients never enter the registry. ``on_disconnect(client,
    reason)`` runs once for every client that was admitted, with a CloseReason.

    ``handler`` may be a coroutine function (``async def handler(client, message)``): up to
    config.max_in_flight messages of one client are then handled at once, in an asyncio loop
    (serve_async()'s, or one that serve_forever() runs), and their replies leave in the order
    the messages came. ``executor=`` (a concurrent.futures.Executor), or ``threads=N`` (threads
    the server makes), runs a plain handler there instead, so that it may block, with the same
    ordering and bounds.

    Options are the fields of ServerConfig, given either as ``config=`` or as keywords
    (keywords win): ``Server(path, handler, framing="line", mode=0o660)``.
    """

    def __init__(
        self,
        endpoint: EndpointLike | None = None,
        handler: Handler | None = None,
        *,
        sock: socket.socket | int | None = None,
        authorize: Callable[[ClientHandle], object] | None = None,
        on_connect: Callable[[ClientHandle], object] | None = None,
        on_disconnect: Callable[[ClientHandle, CloseReason], object] | None = None,
        on_worker_start: Callable[[int], object] | None = None,
        config: ServerConfig | None = None,
        executor: Executor | None = None,
        _handoff: bool = False,
        **options: Unpack[ServerOptions],
    ) -> None:
        config = dataclasses.replace(config or ServerConfig(), **options)
        parsed = None
        if _handoff:  # a worker's server (see _worker_server()): endpoint only names it
            pass
        elif (endpoint is None) == (sock is None):
            raise TypeError("give either an endpoint or sock=, not both" if endpoint is not None
                            else "an endpoint (a socket path, tcp://HOST:PORT, ...) or sock= is required")
        else:
            parsed = parse_endpoint(endpoint) if endpoint is not None else None
            if parsed is not None and parsed.scheme == "fd":
                sock, parsed = parsed.fd, None
        if config.worker_count > 1 and executor is not None:
            raise ValueError("executor= does not cross into worker processes: give threads=N, and each "
                             "worker makes its own")
        self._config = config
        self._handler = handler if handler is not None else echo
        self._coroutine = _is_coroutine_function(self._handler)
        if executor is not None and config.threads is not None:
            raise ValueError("give executor= or threads=, not both")
        if self._coroutine and (executor is not None or config.threads is not None):
            raise ValueError("a coroutine handler runs on the event loop: executor= and threads= are for "
                             "plain (blocking) handlers")
        self._executor = executor
        self._aio: Driver | None = None  # serving in an asyncio loop: its driver
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._aio_done: asyncio.Future[None] | None = None  # done once serve_async() is over
        self._lock = threading.Lock()
        self._state = _READY
        self._loop_ident: int | None = None
        self._started = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._final_stats: dict[str, Any] | None = None
        self._retiring = False  # stopping hands the clients back (_retire()) rather than closing them
        sock_fd = None
        inet = parsed is not None and parsed.is_tcp
        address: str | tuple[str, int] | None = None
        if sock is not None:
            sock_fd = sock if isinstance(sock, int) else sock.fileno()
            if sock_fd < 0:
                raise ValueError("sock is closed")
            inet = _is_inet(sock_fd)
            if _handoff and endpoint is not None:
                address = os.fsdecode(endpoint)
        elif inet:
            assert parsed is not None and parsed.host is not None and parsed.port is not None
            address = (resolve_listen(parsed.host, parsed.port), parsed.port)
        else:
            assert parsed is not None
            address = parsed.path
        check_transport(config, inet)
        if config.worker_count > 1 and inet:
            raise ValueError("workers= hands Unix-socket clients to worker processes; over TCP, run "
                             "one server per process behind a load balancer (see the README)")
        self._core = Core(address, config, sock_fd, inet, _handoff)
        self._address = self._core.address
        # The server's name in logs and repr: its path, "@name" or tcp://HOST:PORT.
        self._path = format_tcp(*self._address) if isinstance(self._address, tuple) else self._address
        self._notifier: Notifier | None = None
        self._hooks = (authorize, on_connect, on_disconnect)
        self._on_worker_start = on_worker_start
        self._registry = Registry(self._core, self, config, authorize, on_connect, on_disconnect)
        # With workers, this process supervises: the Supervisor stands in for the loop.
        self._pool: Supervisor | None = None
        if config.worker_count > 1:
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
        elif inet:
            log.info("listening on %s (%s%s)", self._path, self._describe(),
                     ", PROXY protocol" if config.proxy_protocol else "")
        elif self._path.startswith("@"):
            log.info("listening on %s (%s, abstract namespace)", self._path, self._describe())
        else:
            log.info("listening on %s (%s, mode %04o)", self._path, self._describe(), config.mode)

    def _describe(self) -> str:
        config = self._config
        return f"framing {config.framing}" if config.kind == "stream" else config.kind

    # ---- public ----

    @property
    def address(self) -> str | tuple[str, int]:
        """The address served on: the socket file's path, or "@name" for an abstract name
        (also for a socket given as sock=); for TCP the bound (host, port), with the port the
        system picked for port 0: ``("127.0.0.1", 43211)``."""
        return self._address

    @property
    def path(self) -> str:
        """A Unix socket's address, as ``address`` gives it. A TCP server has none: reading it
        raises AttributeError (see ``address``)."""
        if isinstance(self._address, str):
            return self._address
        raise AttributeError(f"a TCP server has no path: it listens on {self._path} (see address)")

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
        socket file is removed. With a coroutine handler, executor= or threads=, it runs an
        asyncio event loop of its own on this thread and serve_async() in it. With workers, it
        supervises them (see pyuds._workers) and raises WorkerError if they keep dying at
        start-up."""
        if self._pool:
            return self._pool.serve_forever()
        if self._coroutine or self._executor is not None or self._config.threads is not None:
            self._serve_in_own_loop()
            return
        with self._lock:
            if self._state != _READY:
                raise RuntimeError(f"cannot serve: the server is {self._state}")
            self._state = _SERVING
            self._loop_ident = threading.get_ident()
        self._started.set()
        restore = self._install_signal_handlers()
        graceful = False
        notifier = self._notifier = Notifier()
        try:
            if self._on_worker_start is not None:
                self._on_worker_start(0)  # the one worker there is
            if notifier.enabled:
                notifier.notify(f"READY=1\nSTATUS=serving on {self._path}")
            self._core.serve(self._registry, self._handler, draining=False, watchdog=notifier.watchdog())
            graceful = True
        finally:
            try:
                self._teardown(graceful, restore)
            finally:
                self._done.set()

    async def serve_async(self) -> None:
        """Serves inside the running asyncio event loop (asyncio's own, uvloop, any other) until
        shutdown() or shutdown_async(), then shuts down as shutdown() does: replies owed are
        flushed, handlers still running get flush_timeout to finish and are then cancelled,
        every client and the master socket are closed, the socket file is removed. The C loop's
        epoll descriptor is watched with the loop's add_reader() and its next deadline with
        call_at(): no thread, no polling. Cancelling the task that awaits it closes everything
        at once. A server serves one loop: serving it from another is a RuntimeError."""
        loop = asyncio.get_running_loop()
        if self._pool:
            raise RuntimeError("a server with workers is supervised by serve_forever() or start(), "
                               "not serve_async(): each worker process runs a loop of its own")
        with self._lock:
            if self._state != _READY:
                if self._aio_loop is not None and self._aio_loop is not loop:
                    raise RuntimeError("this server is already serving in another event loop; a server "
                                       "serves one loop (make one server per loop)")
                raise RuntimeError(f"cannot serve: the server is {self._state}")
            self._state = _SERVING
            self._loop_ident = threading.get_ident()
            self._aio_loop = loop
            self._aio_done = loop.create_future()
        core, registry, config = self._core, self._registry, self._config
        driver = Driver(core, registry, self._handler, loop)
        own_executor = None
        executor = self._executor
        if config.threads is not None:
            executor = own_executor = ThreadPoolExecutor(config.threads, thread_name_prefix="pyuds-handler")
        if self._coroutine or executor is not None:
            driver.dispatcher = Dispatcher(core, registry, self._handler, config.max_in_flight, loop,
                                           driver.kick, executor, config.max_in_flight_total)
        if self._on_worker_start is not None:
            self._on_worker_start(0)  # the one worker there is
        self._aio = driver
        driver.start()
        notifier = self._notifier = Notifier()
        watchdog = notifier.watchdog()
        pinging: asyncio.TimerHandle | None = None
        if watchdog is not None:
            def ping() -> None:  # from the loop itself: a loop that stops turning stops pinging
                nonlocal pinging
                watchdog.tick()
                pinging = loop.call_later(watchdog.poll_ms / 1000, ping)
            ping()
        if notifier.enabled:
            notifier.notify(f"READY=1\nSTATUS=serving on {self._path}")
        self._started.set()
        graceful = False
        try:
            await driver.stopped
            graceful = True
        finally:
            try:
                if graceful:
                    if notifier.enabled:
                        notifier.notify("STOPPING=1")
                    self._begin_shutdown()
                    driver.draining = True
                    driver.kick()
                    await driver.drained  # each client bounded by flush_timeout, in C
            finally:
                if pinging is not None:
                    pinging.cancel()
                notifier.close()
                driver.stop()
                if driver.dispatcher is not None:
                    driver.dispatcher.cancel_all()
                if own_executor is not None:
                    own_executor.shutdown(wait=False, cancel_futures=True)
                self._aio = None
                self._release(lambda: None)
                self._aio_done.set_result(None)
                self._done.set()

    async def shutdown_async(self, timeout: float | None = None) -> None:
        """shutdown() for a coroutine: stops serving and waits, without blocking the loop, until
        the server is closed (at most timeout seconds). From a handler, call shutdown() instead
        (it returns at once): this would wait for that handler itself."""
        loop = asyncio.get_running_loop()
        with self._lock:
            here = self._state == _SERVING and self._aio_loop is loop
            done = self._aio_done
        if not here:
            await loop.run_in_executor(None, self.shutdown, timeout)
            return
        self.shutdown()  # returns at once on the loop's thread
        assert done is not None
        await asyncio.wait_for(asyncio.shield(done), timeout)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown_async()

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
            elif state == _SERVING and self._aio is not None:
                self._aio.kick()  # the asyncio loop's thread: its next callback sees it
        if threading.get_ident() == self._loop_ident and not self._done.is_set():
            return  # inside a handler (or a task of the loop): the loop ends after this batch
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

    def broadcast(self, message: BytesLike) -> None:
        """Sends message to every connected client (with workers: of every worker). Any thread."""
        data = self._as_bytes(message)
        if self._pool:
            return self._pool.broadcast(data)
        if threading.get_ident() == self._loop_ident:
            self._broadcast_now(data)
            self._poke()
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

    def _retire(self, moved: Callable[[int], None]) -> None:
        """Stops as shutdown() does, except that each client, once nothing is owed to it, is
        handed to moved() as its socket's descriptor (which moved() then owns) instead of being
        closed (pyuds._workers: a worker replaced hands its clients back). Any thread; returns
        at once."""
        self._core.on_moved = moved
        self._retiring = True
        self.shutdown(timeout=0)

    def _worker_server(self, fd: int, handoff: bool) -> Server:
        """The server a worker process runs (pyuds._workers): clients handed over on fd, or the
        datagram socket fd that the workers share."""
        authorize, on_connect, on_disconnect = self._hooks
        return Server(self._path if handoff else None, self._handler, sock=fd, authorize=authorize,
                      on_connect=on_connect, on_disconnect=on_disconnect,
                      config=dataclasses.replace(self._config, workers=1), _handoff=handoff)

    # ---- requests from any thread ----

    def _send(self, client: ClientHandle, message: BytesLike, fds: Iterable[FdLike] = ()) -> None:
        if client._slot < 0:
            raise ClientClosedError("this datagram's sender has no address of its own (it never bound "
                                    "one), so nothing sent to it can arrive")
        if client._closed:
            raise ClientClosedError(f"client {client.id} is {'disconnected' if client.close_reason else 'closed'}")
        data = self._as_bytes(message)
        fd_list = fd_numbers(fds) if fds else []
        if fd_list and self._core.inet:
            raise ValueError("file descriptors pass over Unix sockets only: this client is connected over TCP")
        if fd_list and not data and self._config.kind == "stream" and self._config.framing == "raw":
            raise ValueError("a stream carries file descriptors only with at least one byte: "
                             "an empty raw-framed message cannot")
        if threading.get_ident() == self._loop_ident:
            rc = self._core.send(client._slot, client.id, data, fd_list)
            self._poke()
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
            self._poke()
        else:
            self._post(self._registry.close, (client, CloseReason.CLOSED), [], client)

    def _poke(self) -> None:
        """After a request made on the loop's thread: under asyncio, a task outside the loop's
        own callbacks may have made it, so a turn must come soon to carry it out."""
        if self._aio is not None:
            self._aio.kick()

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

    def _serve_in_own_loop(self) -> None:
        """serve_forever() for a server that needs asyncio: serve_async() in a new event loop
        (the policy's: uvloop's if it is installed), with serve_forever()'s signal handling."""
        restore = self._install_signal_handlers()
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.serve_async())
        finally:
            restore()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _begin_shutdown(self) -> None:
        """Runs what other threads posted, then starts closing every client (or handing them
        back, see _retire())."""
        self._core.run_posted()
        # (The clients known, not what the core's calls return: a worker's count of live
        # connections includes the drain of its handoff pair.)
        if self._retiring:
            self._core.retire()
            log.info("retiring %s: handing back %d clients", self._path, len(self.clients))
            return
        self._core.shutdown()
        log.info("shutting down %s: closing %d clients", self._path, len(self.clients))

    def _teardown(self, graceful: bool, restore_signals: Callable[[], None]) -> None:
        notifier = self._notifier
        try:
            if graceful:
                if notifier is not None and notifier.enabled:
                    notifier.notify("STOPPING=1")
                self._begin_shutdown()
                self._core.serve(self._registry, self._handler, draining=True,
                                 watchdog=notifier.watchdog() if notifier is not None else None)
        finally:
            if notifier is not None:
                notifier.close()
            self._release(restore_signals)

    def _release(self, restore_signals: Callable[[], None]) -> None:
        """The end of serving: the C server freed, the state closed."""
        core = self._core
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
        if self._aio is not None:
            self._aio.kick()  # an asyncio loop may have taken the wake-up before this ran


def _is_coroutine_function(handler: Any) -> bool:
    """Whether handler (a function, a partial of one, or an object with __call__) is async."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None))


def _is_inet(fd: int) -> bool:
    """Whether the socket fd is an internet one (then served over TCP), not a Unix one."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False  # not open: the C core says what is wrong with it
    try:
        probe = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False  # not a socket: likewise
    try:
        return probe.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        probe.close()


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
