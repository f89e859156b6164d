"""Serving inside an asyncio event loop, and handlers that do not finish when they are called:
coroutine handlers (``async def``) and plain blocking handlers run by an Executor.

Two parts, both on the loop's thread:

- Dispatcher stands in for the handler in Core's dispatch (Core.serve_ready()). It numbers each
  client's requests as they arrive, runs up to max_in_flight of them at once, and sends each
  reply only once the replies to every request before it have left, so that a client's
  replies keep the order of its requests whatever order its handlers finish in. A client with
  max_in_flight requests in hand is held in C (uds_hold: none of it is read, the kernel keeps
  what it sends), and kept from being finished while replies are owed to it, up to its
  flush_timeout. Across clients, at most max_in_flight_total handlers run at once: asyncio
  runs every ready task in each pass of its loop, so that bound is what bounds a pass, and
  with it how long the application's other tasks wait. A client whose next request finds no
  room waits, held the same way, in a first-come queue for the room handlers leave.
- Driver puts a Core into a running asyncio loop: the C loop's epoll descriptor with
  add_reader(), its next deadline with call_at(); each readiness serves turns without waiting
  until none finds anything (or a bound), so that nothing spins and nothing sleeps in a thread.

A coroutine handler's first step runs at once, inside its task (Python 3.12's eager tasks, or
the same done by hand before): a handler that finishes without suspending costs no trip
through the loop, and its reply goes with the batch's others. Executor results come back to
the loop in batches: the first of a batch wakes the C loop, the rest ride along.

Layering: above _core (which it drives) and _registry (whose on_gone it sets), below _server.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import logging
import sys
import threading
import types
from concurrent.futures import Executor
from typing import Any, Callable, Coroutine, Generator

from ._core import Core, Handler, send_error
from ._handle import ClientHandle
from ._registry import Registry

log = logging.getLogger("pyuds")

# Turns served per readiness callback, at most, before the loop runs its other callbacks and
# tasks; and the time after which no more turns begin in that callback (the first always runs).
TURNS_PER_READINESS = 16
SECONDS_PER_READINESS = 0.002
# A datagram server cannot stop reading one peer (one socket serves them all): a peer's
# requests over max_in_flight wait in memory, up to this many times max_in_flight; further
# ones are dropped, as the kernel drops datagrams once the socket's buffer is full.
DGRAM_WAITING = 4


class Flight:
    """One client's requests in hand: numbered in arrival order (next), the number of the
    next reply to send (sent), replies finished before their turn (done), handlers running
    (running, by number: their task or future), requests waiting for room (waiting), and
    what C holds the client to (held); starved while it waits in the queue for room under
    max_in_flight_total."""

    __slots__ = ("next", "sent", "done", "running", "waiting", "held", "starved")

    def __init__(self) -> None:
        self.next = 0
        self.sent = 0
        self.done: dict[int, Any] = {}
        self.running: dict[int, Any] = {}
        self.waiting: collections.deque[tuple[int, bytes]] = collections.deque()
        self.held = (False, False)
        self.starved = False


@types.coroutine
def _drive(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Drives coro on from the point where its first step yielded `yielded`, as `await coro`
    would have from its start (the task's sends and throws go through to it)."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation, thrown in by the task
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _rest(box: list[Any]) -> Any:
    """The task of a handler whose first step was taken by hand: box holds the coroutine and
    what its first step yielded, or None if that step finished it (nothing is left to do)."""
    if box[0] is None:
        return None
    coro, yielded = box
    box[0] = None
    return await _drive(coro, yielded)


if sys.version_info >= (3, 12):
    class EagerStarter:
        """Runs handlers' first steps at once, each inside its own task (Python 3.12's eager
        tasks)."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def start(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
            """Runs coro's first step now: (None, result) if that finished it (its exception
            raised here), else (task, None)."""
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)
            if not task.done():
                return task, None
            if task.cancelled():
                return None, None
            return None, task.result()
else:
    from asyncio.tasks import _enter_task, _leave_task

    # Python 3.11 reuses one host task for the first steps that finish, see EagerStarter.
    _REUSE_HOSTS = sys.version_info >= (3, 11)

    class _Host:
        """A task made ready to run handlers' first steps in, and, for the first handler whose
        first step suspends, to go on with it: its coroutine (_rest) takes over from box."""

        __slots__ = ("task", "box", "context", "vars")

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.box: list[Any] = [None, None]
            self.context = contextvars.copy_context()  # the task's, where first steps run too
            self.vars = list(self.context.items())  # to tell whether a first step set any
            self.task = (loop.create_task(_rest(self.box), context=self.context) if _REUSE_HOSTS
                         else self.context.run(loop.create_task, _rest(self.box)))

        def untouched(self) -> bool:
            """Whether the task is as it was made: no context variable set in it, no
            cancellation asked of it, its first step not run (it would then be done)."""
            if self.task.done() or self.task.cancelling():
                return False
            items = self.context.items() if len(self.context) else ()
            return len(self.context) == len(self.vars) and all(
                k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, self.vars))

    class EagerStarter:
        """Runs handlers' first steps at once, each as the current task of the loop
        (asyncio.current_task(), asyncio.timeout() and task groups work in it), as Python
        3.12's eager tasks do. A first step that suspends keeps the task it ran in, which goes
        on from where it stopped. Making a task per message would cost the first steps that
        finish (an echo, a lookup) more than the rest of their work, so on 3.11 they share one:
        a host task is reused until a first step suspends in it, sets a context variable in its
        context, asks it to cancel, or the loop runs its own first step (then it is done); each
        of those retires it, so every handler still sees a task and a context of its own."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop
            self._host: _Host | None = None

        def start(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
            """Runs coro's first step now: (None, result) if that finished it (its exception
            raised here), else (task, None), the task going on from where it stopped."""
            loop, host = self._loop, self._host
            if host is None:
                host = _Host(loop)
                if _REUSE_HOSTS:
                    self._host = host
            task = host.task
            _enter_task(loop, task)
            try:
                yielded = host.context.run(coro.send, None)
            except StopIteration as stop:
                # A task that asked to cancel itself ends cancelled, its result dropped (as
                # 3.12's eager task does). (_REUSE_HOSTS: the host was not asked before.)
                return (None, None) if _REUSE_HOSTS and task.cancelling() else (None, stop.value)
            except asyncio.CancelledError:
                return None, None
            finally:
                _leave_task(loop, task)
                if self._host is not None and not host.untouched():
                    self._host = None
            host.box[0], host.box[1] = coro, yielded
            self._host = None
            return task, None


def as_reply(reply: Any) -> bytes | None:
    """A handler's return value as a reply: bytes, or None for none; TypeError otherwise."""
    if reply is None or type(reply) is bytes:
        return reply
    try:
        return bytes(memoryview(reply))
    except TypeError:
        raise TypeError(f"handler returned {type(reply).__name__}; it must return bytes or None") from None


class Dispatcher:
    """The handler Core calls for a coroutine handler (executor None) or a blocking handler
    run by executor. Loop thread only, but for the results an executor hands back."""

    def __init__(self, core: Core, registry: Registry, handler: Callable[..., Any], max_in_flight: int,
                 loop: asyncio.AbstractEventLoop, kick: Callable[[], None],
                 executor: Executor | None = None, max_in_flight_total: int = 256) -> None:
        self._core = core
        self._registry = registry
        self._handler = handler
        self._cap = max_in_flight
        self._starter = EagerStarter(loop)
        self._total_cap = max_in_flight_total
        self._total = 0  # handlers running, every client's
        self._starved: collections.deque[ClientHandle] = collections.deque()  # see Flight.starved
        self._loop = loop
        self._kick = kick  # the driver serves a turn soon: replies queued since go out with it
        self._executor = executor
        self._flights: dict[ClientHandle, Flight] = {}  # by client: clients with requests in hand
        self._can_hold = True  # False for datagram servers: one socket serves every peer
        # Executor results, (client, flight, number, future), handed over by its threads:
        # the first of a batch wakes the C loop (woken), the others ride along.
        self._results: collections.deque[tuple[ClientHandle, Flight, int, Any]] = collections.deque()
        self._woken = False
        self._lock = threading.Lock()  # against the C server going away under a wake-up
        self._open = True
        registry.on_gone = self.gone

    # ---- Core's handler ----

    def __call__(self, client: ClientHandle, message: bytes) -> Any:
        flight = self._flights.get(client)
        if flight is None and self._executor is None and self._total < self._total_cap:
            # Nothing before it: a handler that finishes in its first step replies with the batch.
            task, reply = self._starter.start(self._handler(client, message))
            if task is None:
                return reply
            flight = self._flights[client] = Flight()
            flight.next = 1
            self._running(client, flight, 0, task)
            self._hold(client, flight)
            return None
        if flight is None:
            flight = self._flights[client] = Flight()
        number = flight.next
        flight.next = number + 1
        if flight.waiting or len(flight.running) >= self._cap or self._total >= self._total_cap:
            if not self._can_hold and len(flight.waiting) >= DGRAM_WAITING * self._cap:
                log.warning("datagram client %d has %d requests waiting for its handlers; dropped one",
                            client.id, len(flight.waiting))
                flight.next = number  # (never numbered: nothing waits for its reply)
                return None
            flight.waiting.append((number, message))
            self._starve(client, flight)
        else:
            self._start(client, flight, number, message)  # raising: Core closes the client
        self._hold(client, flight)
        return None

    def _start(self, client: ClientHandle, flight: Flight, number: int, message: bytes) -> None:
        """Starts the handler on request number; its reply, if it is done at once, waits in
        flight.done for its turn."""
        if self._executor is not None:
            future = self._executor.submit(self._handler, client, message)
            flight.running[number] = future
            self._total += 1
            future.add_done_callback(lambda f: self._arrived(client, flight, number, f))
            return
        task, reply = self._starter.start(self._handler(client, message))
        if task is None:
            flight.done[number] = as_reply(reply)
        else:
            self._running(client, flight, number, task)

    def _running(self, client: ClientHandle, flight: Flight, number: int, task: asyncio.Task[Any]) -> None:
        flight.running[number] = task
        self._total += 1
        task.add_done_callback(lambda t: self._finished(client, flight, number, t))

    # ---- handlers finishing ----

    def _arrived(self, client: ClientHandle, flight: Flight, number: int, future: Any) -> None:
        """An executor's thread: hands the result over to the loop's thread."""
        self._results.append((client, flight, number, future))
        if not self._woken:
            self._woken = True
            with self._lock:
                if self._open:
                    self._core.wakeup()

    def collect(self) -> None:
        """Takes the executor results handed over so far. Loop thread."""
        self._woken = False
        results = self._results
        while results:
            self._finished(*results.popleft())

    def _finished(self, client: ClientHandle, flight: Flight, number: int, future: Any) -> None:
        """Request number's handler is done (future: its task, or its executor future)."""
        if flight.running.pop(number, None) is not None:
            self._total -= 1
        # Closed or gone: nobody to answer (gone() dropped its flight).
        if not client._closed:
            try:
                reply = None if future.cancelled() else as_reply(future.result())
            except Exception as exc:
                self._registry.handler_failed(client, exc)  # closes it (gone() follows)
                self._kick()  # for C to close it now
            else:
                flight.done[number] = reply
                self._advance(client, flight)
        if self._starved and self._total < self._total_cap:
            self._resume_starved()

    def _starve(self, client: ClientHandle, flight: Flight) -> None:
        """Queues the client for room under max_in_flight_total, if that is what its waiting
        requests wait for (and it is not queued yet)."""
        if (not flight.starved and flight.waiting and len(flight.running) < self._cap
                and self._total >= self._total_cap):
            flight.starved = True
            self._starved.append(client)

    def _resume_starved(self) -> None:
        """Gives the room handlers left to the clients queued for it, first come first."""
        starved, flights = self._starved, self._flights
        while starved and self._total < self._total_cap:
            client = starved.popleft()
            flight = flights.get(client)
            if flight is None or client._closed:
                continue  # gone meanwhile
            flight.starved = False
            self._advance(client, flight)  # queued again if room runs out before its last

    def _advance(self, client: ClientHandle, flight: Flight) -> None:
        """Starts waiting requests while there is room, sends the replies whose turn has come,
        and holds or releases the client in C accordingly."""
        while (flight.waiting and len(flight.running) < self._cap and self._total < self._total_cap
               and not client._closed):
            number, message = flight.waiting.popleft()
            try:
                self._start(client, flight, number, message)
            except Exception as exc:
                self._registry.handler_failed(client, exc)
                return
        done, sent = flight.done, flight.sent
        while sent in done and not client._closed:
            reply = done.pop(sent)
            sent += 1
            if reply is not None:
                rc = self._core.reply(client._slot, client.id, reply)
                if rc:
                    self._registry.reply_failed(client, send_error(rc, client.id))
        flight.sent = sent
        self._kick()
        if client._closed:
            return
        self._starve(client, flight)
        if sent == flight.next:
            del self._flights[client]  # nothing in hand: it costs nothing more
        self._hold(client, flight)

    def _hold(self, client: ClientHandle, flight: Flight) -> None:
        """Holds the client in C while replies are owed to it, and from being read while it has
        max_in_flight requests in hand or requests waiting for room; releases it otherwise."""
        owed = flight.sent != flight.next
        want = (len(flight.running) >= self._cap or bool(flight.waiting), owed)
        if want != flight.held and self._can_hold:
            flight.held = want
            if self._core.hold(client._slot, client.id, *want) == -errno.EOPNOTSUPP:
                self._can_hold = False  # a datagram server: see DGRAM_WAITING

    # ---- clients going, and the end ----

    def gone(self, client: ClientHandle) -> None:
        """The client is closed or gone: its handlers still running are cancelled, their
        replies dropped."""
        flight = self._flights.pop(client, None)
        if flight is None:
            return
        if flight.held != (False, False) and self._can_hold:
            flight.held = (False, False)
            self._core.hold(client._slot, client.id, False, False)  # (-ENOTCONN once gone)
        flight.waiting.clear()
        for future in list(flight.running.values()):
            future.cancel()

    def cancel_all(self) -> None:
        """Cancels every handler still running (the server is done), and stops taking results."""
        with self._lock:
            self._open = False
        for flight in list(self._flights.values()):
            flight.waiting.clear()
            for future in list(flight.running.values()):
                future.cancel()
        self._flights.clear()
        self._results.clear()


class Driver:
    """Serves a Core from a running asyncio loop: the C loop's epoll descriptor is watched with
    add_reader(), its next deadline with call_at(), and each callback serves the turns that are
    ready. stopped is done once Core.stop() was seen (shutdown() or a signal); with draining
    set, drained is done once no client is left."""

    def __init__(self, core: Core, registry: Registry, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._registry = registry
        self._handler = handler
        self._loop = loop
        self._fd = core.epoll_fd()
        self.dispatcher: Dispatcher | None = None
        self._soon: asyncio.Handle | None = None    # a callback due at once
        self._timer: asyncio.TimerHandle | None = None  # the next deadline's
        self._deadline = -1.0
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self.draining = False

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._ready)
        self.kick()

    def stop(self) -> None:
        self._loop.remove_reader(self._fd)
        for handle in (self._soon, self._timer):
            if handle is not None:
                handle.cancel()
        self._soon = self._timer = None

    def kick(self) -> None:
        """Serves a turn soon (after the callbacks ready now): for output queued or clients
        released since the last turn. Loop thread."""
        if self._soon is None:
            self._soon = self._loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._soon = None
        core, handler = self._core, self.dispatcher
        if handler is not None:
            handler.collect()
        core.serve_ready(self._registry, handler or self._handler, TURNS_PER_READINESS, SECONDS_PER_READINESS)
        if handler is not None:
            handler.collect()  # those whose wake-up these turns' polls took
        if core._stopping and not self.stopped.done():
            self.stopped.set_result(None)
        if self.draining and core.live() <= 0:
            if not self.drained.done():
                self.drained.set_result(None)
            return
        self._schedule(core.timeout())

    def _schedule(self, ms: int) -> None:
        """Serves again in ms milliseconds (0: soon; -1: only on readiness)."""
        if ms == 0:
            self.kick()
            return
        deadline = -1.0 if ms < 0 else self._loop.time() + ms / 1000
        if self._timer is not None:
            if ms > 0 and abs(deadline - self._deadline) < 0.001:
                return  # as planned already
            self._timer.cancel()
            self._timer = None
        self._deadline = deadline
        if ms > 0:
            self._timer = self._loop.call_at(deadline, self._timed)

    def _timed(self) -> None:
        self._timer = None
        self._ready()
