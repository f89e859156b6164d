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
  add_reader(), its next deadline with call_at(); each callback takes the ends of handlers
  and serves turns without waiting until none finds anything, or its time is up
  (SECONDS_PER_READINESS), so that nothing spins, nothing sleeps in a thread, and the loop's
  other tasks run between callbacks.

A coroutine handler's first step runs at once, inside its task (Python 3.12's eager tasks, or
the same done by hand before): a handler that finishes without suspending costs no trip
through the loop, and its reply goes with the batch's others. A callback whose time is up
starts no more handlers: the requests left wait in their clients' queues for the next one.
Handlers that suspend end into a queue that the driver's next callback takes whole, one
callback a pass of the loop whatever the number of handlers that ended in it; on Python 3.11
and before, the task reports its handler's end itself, so that no callback per handler is
scheduled. Executor results come back the same way: the first of a batch wakes the C loop,
the rest ride along. Nothing is made per message that only the cyclic garbage collector
would free: what a message needs dies with it by reference counting.

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
from time import monotonic
from typing import Any, Callable, Coroutine, Generator

from ._core import Core, Handler, send_error
from ._handle import ClientHandle
from ._registry import Registry

log = logging.getLogger("pyuds")

# The time one loop callback of the driver may take, about: no turn begins in it after this
# (the first always runs), and no handler starts in it after this (those left wait in their
# clients' queues for the next callback, the loop's other tasks running in between); and the
# turns it serves, at most.
TURNS_PER_READINESS = 16
SECONDS_PER_READINESS = 0.002
# A datagram server cannot stop reading one peer (one socket serves them all): a peer's
# requests over max_in_flight wait in memory, up to this many times max_in_flight; further
# ones are dropped, as the kernel drops datagrams once the socket's buffer is full.
DGRAM_WAITING = 4
# Flights kept for reuse once their clients have nothing in hand (see Dispatcher._spare).
SPARE_FLIGHTS = 64

# How a handler ended, as the starters report it: ended(client, flight, number, result, error),
# error the exception it raised, or result and error both None if it was cancelled.
Ended = Callable[[ClientHandle, "Flight", int, Any, "BaseException | None"], None]


class Flight:
    """One client's requests in hand: numbered in arrival order (next), the number of the
    next reply to send (sent), replies finished before their turn (done), handlers running
    (running, by number: their task or future), requests waiting to start (waiting: the last
    len(waiting) numbers before next, in order), and what C holds the client to (read, open);
    starved while it waits in the queue for room under max_in_flight_total or for the next
    callback."""

    __slots__ = ("next", "sent", "done", "running", "waiting", "read", "open", "starved")

    def __init__(self) -> None:
        self.next = 0
        self.sent = 0
        self.done: dict[int, Any] = {}
        self.running: dict[int, Any] = {}
        self.waiting: collections.deque[bytes] = collections.deque()
        self.read = False  # held from being read
        self.open = False  # held open: replies are owed
        self.starved = False


if sys.version_info >= (3, 12):
    class EagerStarter:
        """Runs handlers' first steps at once, each inside its own task (Python 3.12's eager
        tasks); reports to ended how those that suspend end."""

        def __init__(self, loop: asyncio.AbstractEventLoop, ended: Ended) -> None:
            self._loop = loop
            self._ended = ended
            self._followed: dict[asyncio.Task[Any], tuple[ClientHandle, Flight, int]] = {}
            self._on_done = self._done  # one bound method for every task

        def start(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
            """Runs coro's first step now: (None, result) if that finished it (its exception
            raised here), else (task, None); follow() that task then."""
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)
            if not task.done():
                return task, None
            if task.cancelled():
                return None, None
            return None, task.result()

        def follow(self, task: asyncio.Task[Any], client: ClientHandle, flight: Flight, number: int) -> None:
            """Reports how the task start() returned ends, as request number's."""
            self._followed[task] = (client, flight, number)
            task.add_done_callback(self._on_done)

        def _done(self, task: asyncio.Task[Any]) -> None:
            client, flight, number = self._followed.pop(task)
            if task.cancelled():
                self._ended(client, flight, number, None, None)
            elif (error := task.exception()) is not None:
                self._ended(client, flight, number, None, error)
            else:
                self._ended(client, flight, number, task.result(), None)
else:
    from asyncio.tasks import _enter_task, _leave_task

    # Python 3.11 reuses one host task for the first steps that finish, see EagerStarter.
    _REUSE_HOSTS = sys.version_info >= (3, 11)

    @types.coroutine
    def _go_on(box: list[Any], ended: Ended) -> Generator[Any, Any, None]:
        """The coroutine of a host task. Made primed (run to its first yield), so that even a
        cancellation thrown in before its first step lands in it. box: what start() lent it,
        the coroutine of a handler whose first step suspended, what that step yielded, and
        whose request it is (client, flight, number); or None if it was lent none. It goes on
        with the handler as `await handler` would have, and tells ended how it ended: from
        inside the task, so that no callback per handler is scheduled."""
        thrown: BaseException | None = None
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException as exc:  # cancelled before its first step
            thrown = exc
        if box[0] is None:
            if thrown is not None:
                raise thrown
            return
        coro, yielded, client, flight, number = box
        try:
            if thrown is not None:
                yielded = coro.throw(thrown)
            elif yielded is None:  # a bare yield (sleep(0)) asks to go on soon: this is soon
                yielded = coro.send(None)
            while True:
                try:
                    sent = yield yielded
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:  # a cancellation, thrown in by the task
                    yielded = coro.throw(exc)
                else:
                    yielded = coro.send(sent)
        except StopIteration as stop:
            ended(client, flight, number, stop.value, None)
        except GeneratorExit:
            raise
        except Exception as exc:  # the handler's: reported, the task ends well
            ended(client, flight, number, None, exc)
        except BaseException:  # cancelled (reported), or KeyboardInterrupt and the like
            ended(client, flight, number, None, None)
            raise

    class _Host:
        """A task made ready to run handlers' first steps in, and, for the first handler whose
        first step suspends, to go on with it: its coroutine (_go_on) takes over from box."""

        __slots__ = ("task", "box", "context", "vars")

        def __init__(self, loop: asyncio.AbstractEventLoop, ended: Ended) -> None:
            self.box: list[Any] = [None] * 5
            self.context = contextvars.copy_context()  # the task's, where first steps run too
            self.vars = tuple(self.context.items())  # to tell whether a first step set any
            coro = _go_on(self.box, ended)
            coro.send(None)  # primed
            self.task = (loop.create_task(coro, context=self.context) if _REUSE_HOSTS
                         else self.context.run(loop.create_task, coro))

        def untouched(self) -> bool:
            """Whether the task is as it was made: no context variable set in it, no
            cancellation asked of it, its first step not run (it would then be done)."""
            task = self.task
            if task.done() or task.cancelling():
                return False
            n = len(self.context)
            # (No variable at all, the common case, is told without walking them: once a message.)
            return n == len(self.vars) and (n == 0 or all(
                k is k0 and v is v0 for (k, v), (k0, v0) in zip(self.context.items(), self.vars)))

    class EagerStarter:
        """Runs handlers' first steps at once, each as the current task of the loop
        (asyncio.current_task(), asyncio.timeout() and task groups work in it), as Python
        3.12's eager tasks do. A first step that suspends keeps the task it ran in, which goes
        on from where it stopped. Making a task per message would cost the first steps that
        finish (an echo, a lookup) more than the rest of their work, so on 3.11 they share one:
        a host task is reused until a first step suspends in it, sets a context variable in its
        context, asks it to cancel, or the loop runs its own first step (then it is done); each
        of those retires it, so every handler still sees a task and a context of its own.
        Reports to ended how the handlers that suspend end."""

        def __init__(self, loop: asyncio.AbstractEventLoop, ended: Ended) -> None:
            self._loop = loop
            self._ended = ended
            self._host: _Host | None = None
            self._lent: list[Any] | None = None  # the box of the task start() returned last

        def start(self, coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
            """Runs coro's first step now: (None, result) if that finished it (its exception
            raised here), else (task, None), the task going on from where it stopped once
            follow() said whose request it is."""
            loop, host = self._loop, self._host
            if host is None:
                host = _Host(loop, self._ended)
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
            box = self._lent = host.box
            box[0], box[1] = coro, yielded
            self._host = None
            return task, None

        def follow(self, task: asyncio.Task[Any], client: ClientHandle, flight: Flight, number: int) -> None:
            """Reports how the task start() returned ends, as request number's."""
            box, self._lent = self._lent, None
            assert box is not None
            box[2], box[3], box[4] = client, flight, number


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
    run by executor. Loop thread only, but for the results an executor hands back.

    Handlers end into queues that the driver's next callback takes whole (collect()): the
    replies of every handler that ended in one pass of the loop leave together, and the
    requests waiting for their room start there, within that callback's time (begin()). A
    start that finds the time up waits in its client's queue, as for room, so that one
    callback runs no more than about SECONDS_PER_READINESS of handlers' first steps."""

    def __init__(self, core: Core, registry: Registry, handler: Callable[..., Any], max_in_flight: int,
                 loop: asyncio.AbstractEventLoop, kick: Callable[[], None],
                 executor: Executor | None = None, max_in_flight_total: int = 256) -> None:
        self._core = core
        self._registry = registry
        self._handler = handler
        self._cap = max_in_flight
        self._starter = EagerStarter(loop, self._ended)
        self._total_cap = max_in_flight_total
        self._total = 0  # handlers running, every client's
        self._starved: collections.deque[ClientHandle] = collections.deque()  # see Flight.starved
        self._until = 0.0  # monotonic(): when the time of the current callback is up
        self._loop = loop
        self._kick = kick  # the driver's callback runs soon: replies queued since go out with it
        self._executor = executor
        self._flights: dict[ClientHandle, Flight] = {}  # by client: clients with requests in hand
        # Flights of clients that had nothing more in hand, emptied for the next client that
        # has: one that sends a request at a time to a handler that suspends needs one each.
        self._spare: list[Flight] = []
        self._can_hold = True  # False for datagram servers: one socket serves every peer
        # Coroutine handlers that ended, as ended() was told, for the next callback.
        self._ends: collections.deque[tuple[ClientHandle, Flight, int, Any, BaseException | None]] = \
            collections.deque()
        # Executor results, their futures handed over by its threads (whose request: submitted):
        # the first of a batch wakes the C loop (woken), the others ride along.
        self._submitted: dict[Any, tuple[ClientHandle, Flight, int]] = {}
        self._results: collections.deque[Any] = collections.deque()
        self._on_arrival = self._arrived  # one bound method for every future
        self._woken = False
        self._lock = threading.Lock()  # against the C server going away under a wake-up
        self._open = True
        registry.on_gone = self.gone

    # ---- Core's handler ----

    def __call__(self, client: ClientHandle, message: bytes) -> Any:
        flight = self._flights.get(client)
        if (flight is None and self._executor is None and self._total < self._total_cap
                and (monotonic() <= self._until or not self._can_hold)):
            # Nothing before it: a handler that finishes in its first step replies with the batch.
            task, reply = self._starter.start(self._handler(client, message))
            if task is None:
                return reply
            flight = self._flights[client] = self._spare.pop() if self._spare else Flight()
            flight.next = 1
            self._running(client, flight, 0, task)
            self._hold(client, flight)
            return None
        if flight is None:
            flight = self._flights[client] = self._spare.pop() if self._spare else Flight()
        number = flight.next
        flight.next = number + 1
        if (flight.waiting or len(flight.running) >= self._cap or self._total >= self._total_cap
                or self._late()):
            if not self._can_hold and len(flight.waiting) >= DGRAM_WAITING * self._cap:
                log.warning("datagram client %d has %d requests waiting for its handlers; dropped one",
                            client.id, len(flight.waiting))
                flight.next = number  # (never numbered: nothing waits for its reply)
                return None
            flight.waiting.append(message)
            self._starve(client, flight)
        else:
            self._start(client, flight, number, message)  # raising: Core closes the client
        self._hold(client, flight)
        return None

    def _late(self) -> bool:
        """Whether this callback's time for first steps is up (never for an executor's
        handlers, which take no time of the loop's, nor for a datagram server's, which has no
        way to make a peer wait but dropping its requests)."""
        return self._executor is None and self._can_hold and monotonic() > self._until

    def _start(self, client: ClientHandle, flight: Flight, number: int, message: bytes) -> None:
        """Starts the handler on request number; its reply, if it is done at once, waits in
        flight.done for its turn."""
        if self._executor is not None:
            future = self._executor.submit(self._handler, client, message)
            flight.running[number] = future
            self._total += 1
            self._submitted[future] = (client, flight, number)
            future.add_done_callback(self._on_arrival)
            return
        task, reply = self._starter.start(self._handler(client, message))
        if task is None:
            flight.done[number] = as_reply(reply)
        else:
            self._running(client, flight, number, task)

    def _running(self, client: ClientHandle, flight: Flight, number: int, task: asyncio.Task[Any]) -> None:
        flight.running[number] = task
        self._total += 1
        self._starter.follow(task, client, flight, number)

    # ---- handlers ending ----

    def _ended(self, client: ClientHandle, flight: Flight, number: int, result: Any,
               error: BaseException | None) -> None:
        """A coroutine handler ended (see Ended): its end waits for the next callback."""
        if self._open:
            self._ends.append((client, flight, number, result, error))
            self._kick()

    def _arrived(self, future: Any) -> None:
        """An executor's thread: hands the result over to the loop's thread."""
        self._results.append(future)
        if not self._woken:
            self._woken = True
            with self._lock:
                if self._open:
                    self._core.wakeup()

    def begin(self, seconds: float) -> None:
        """A callback of the driver begins, which may start handlers for seconds: takes the
        ends of handlers so far, and starts what waits, in that time."""
        self._until = monotonic() + seconds
        self.collect()

    def collect(self) -> None:
        """Takes the ends of handlers handed over so far. Loop thread."""
        self._woken = False
        results, submitted, ends, finished = self._results, self._submitted, self._ends, self._finished
        while results:
            future = results.popleft()
            request = submitted.pop(future, None)
            if request is None:
                continue  # (handed over after cancel_all())
            client, flight, number = request
            if future.cancelled():
                finished(client, flight, number, None, None)
            elif (error := future.exception()) is not None:
                finished(client, flight, number, None, error)
            else:
                finished(client, flight, number, future.result(), None)
        while ends:
            finished(*ends.popleft())
        if self._starved and self._total < self._total_cap:
            self._resume_starved()

    def _finished(self, client: ClientHandle, flight: Flight, number: int, result: Any,
                  error: BaseException | None) -> None:
        """Request number's handler ended (see Ended)."""
        if flight.running.pop(number, None) is not None:
            self._total -= 1
        # Closed or gone: nobody to answer (gone() dropped its flight).
        if client._closed:
            return
        if error is None:
            try:
                reply = as_reply(result)
            except TypeError as exc:
                error = exc
        if error is not None:
            if not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and the like: not the client's doing
            self._registry.handler_failed(client, error)  # closes it (gone() follows)
            self._kick()  # for C to close it now
            return
        flight.done[number] = reply
        self._advance(client, flight)

    def _starve(self, client: ClientHandle, flight: Flight) -> None:
        """Queues the client for a later start, if its waiting requests wait for room under
        max_in_flight_total or for the next callback (and it is not queued yet)."""
        if not flight.starved and flight.waiting and len(flight.running) < self._cap:
            flight.starved = True
            self._starved.append(client)
            if self._total < self._total_cap:
                self._kick()  # the time was up: the next callback starts it

    def _resume_starved(self) -> None:
        """Gives the room handlers left to the clients queued for it, first come first, while
        this callback's time lasts."""
        starved, flights = self._starved, self._flights
        while starved and self._total < self._total_cap and not self._late():
            client = starved.popleft()
            flight = flights.get(client)
            if flight is None or client._closed or not flight.starved:
                continue  # gone meanwhile
            flight.starved = False
            self._advance(client, flight)  # queued again if room or time runs out before its last

    def _advance(self, client: ClientHandle, flight: Flight) -> None:
        """Starts waiting requests while there is room and time, sends the replies whose turn
        has come, and holds or releases the client in C accordingly."""
        waiting = flight.waiting
        while (waiting and len(flight.running) < self._cap and self._total < self._total_cap
               and not client._closed and not self._late()):
            number = flight.next - len(waiting)
            message = waiting.popleft()
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
        self._hold(client, flight)
        if sent == flight.next:
            del self._flights[client]  # nothing in hand: it costs nothing more
            if len(self._spare) < SPARE_FLIGHTS and not flight.read and not flight.open:
                flight.next = flight.sent = 0
                flight.starved = False  # (its client may still be in the queue: it is skipped)
                self._spare.append(flight)

    def _hold(self, client: ClientHandle, flight: Flight) -> None:
        """Holds the client in C while replies are owed to it, and from being read while it has
        max_in_flight requests in hand or requests waiting to start; releases it otherwise."""
        read = len(flight.running) >= self._cap or bool(flight.waiting)
        owed = flight.sent != flight.next
        if (read != flight.read or owed != flight.open) and self._can_hold:
            flight.read, flight.open = read, owed
            if self._core.hold(client._slot, client.id, read, owed) == -errno.EOPNOTSUPP:
                self._can_hold = False  # a datagram server: see DGRAM_WAITING

    # ---- clients going, and the end ----

    def gone(self, client: ClientHandle) -> None:
        """The client is closed or gone: its handlers still running are cancelled, their
        replies dropped."""
        flight = self._flights.pop(client, None)
        if flight is None:
            return
        if (flight.read or flight.open) and self._can_hold:
            flight.read = flight.open = False
            self._core.hold(client._slot, client.id, False, False)  # (-ENOTCONN once gone)
        flight.waiting.clear()
        for future in list(flight.running.values()):
            future.cancel()

    def cancel_all(self) -> None:
        """Cancels every handler still running (the server is done), and stops taking their
        ends."""
        with self._lock:
            self._open = False
        for flight in list(self._flights.values()):
            flight.waiting.clear()
            for future in list(flight.running.values()):
                future.cancel()
        self._flights.clear()
        self._results.clear()
        self._submitted.clear()
        self._ends.clear()


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
            self._soon = self._loop.call_soon(self._kicked)

    def _kicked(self) -> None:
        self._soon = None
        self._ready()

    def _ready(self) -> None:
        if self._soon is not None:  # due anyway: this one does its work (one per pass, not more)
            self._soon.cancel()
            self._soon = None
        core, handler = self._core, self.dispatcher
        seconds = SECONDS_PER_READINESS
        if handler is not None:
            until = monotonic() + seconds
            handler.begin(seconds)
            seconds = until - monotonic()
        core.serve_ready(self._registry, handler or self._handler, TURNS_PER_READINESS, seconds)
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
