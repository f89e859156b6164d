"""asyncio: serving inside a running loop (asyncio's own and uvloop), coroutine handlers,
blocking handlers on an executor, and the asyncio client. Real sockets throughout; every test
runs its loop under a timeout."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import pytest

import pyuds
from conftest import is_socket, recv_exactly

LOOPS = ["asyncio", "uvloop"]


def run(loop_kind: str, main: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """Runs main() in a fresh loop of that kind, bounded by timeout."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), timeout))
    finally:
        loop.close()


async def serving(server: pyuds.Server) -> asyncio.Task[None]:
    """serve_async() as a task of the running loop, once it serves."""
    task = asyncio.create_task(server.serve_async())
    while not server.serving:
        await asyncio.sleep(0.001)
    return task


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def read_frames(sock: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        (length,) = struct.unpack(">I", recv_exactly(sock, 4))
        out.append(recv_exactly(sock, length))
    return out


# Clients that each send all their requests before reading a reply, then check every reply:
# python -c PIPELINING_CLIENTS PATH CLIENTS REQUESTS (exit status 0 if every reply was right).
PIPELINING_CLIENTS = """
import asyncio, struct, sys
path, clients, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def client(i):
    reader, writer = await asyncio.open_unix_connection(path)
    sent = [b"%d-%d" % (i, k) for k in range(requests)]
    for m in sent:
        writer.write(struct.pack(">I", len(m)) + m)
    await writer.drain()
    for m in sent:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if await reader.readexactly(length) != m:
            raise SystemExit(f"client {i}: a wrong reply")
    writer.close()

async def main():
    await asyncio.gather(*(client(i) for i in range(clients)))

asyncio.run(main())
"""


# ---- ordering and bounds ----------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_replies_keep_request_order_with_random_handler_delays(loop_kind, sock_path):
    """Handlers of one client finish in random order; each client's replies still come in the
    order of its requests."""
    async def handler(client, message):
        await asyncio.sleep(random.random() * 0.004)
        return b"re:" + message

    async def client(i: int) -> None:
        async with await pyuds.open_connection(sock_path) as conn:
            for k in range(200):
                await conn.send(b"%d-%d" % (i, k))
            assert [await conn.recv() for _ in range(200)] == [b"re:%d-%d" % (i, k) for k in range(200)]

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            task = await serving(server)
            await asyncio.gather(*(client(i) for i in range(5)))
        await task

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("cap", [1, 4])
def test_max_in_flight_bounds_the_handlers_running_per_client(loop_kind, sock_path, cap):
    """At most max_in_flight handlers of one client run at once, and the cap is reached."""
    running: dict[int, int] = {}
    most: dict[int, int] = {}

    async def handler(client, message):
        running[client.id] = running.get(client.id, 0) + 1
        most[client.id] = max(most.get(client.id, 0), running[client.id])
        await asyncio.sleep(0.001)
        running[client.id] -= 1
        return message

    async def client() -> None:
        async with await pyuds.open_connection(sock_path) as conn:
            replies = await asyncio.gather(*(conn.request(b"%d" % k) for k in range(100)))
            assert replies == [b"%d" % k for k in range(100)]

    async def main():
        async with pyuds.Server(sock_path, handler, max_in_flight=cap) as server:
            await serving(server)
            await asyncio.gather(client(), client())

    run(loop_kind, main)
    assert sorted(most.values()) == [cap, cap]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_max_in_flight_total_bounds_the_handlers_running_across_clients(loop_kind, sock_path):
    """Six clients pipelining, each allowed 4 handlers at once, but 10 at most across them: no
    more than 10 run at once, 10 do, no client exceeds 4, and every client gets every reply, in
    order (the clients that find no room are served as room frees up)."""
    running = {"all": 0}
    most = {"all": 0}

    async def handler(client, message):
        running["all"] += 1
        running[client.id] = running.get(client.id, 0) + 1
        for key in ("all", client.id):
            most[key] = max(most.get(key, 0), running[key])
        await asyncio.sleep(0.001 + random.random() * 0.002)
        running["all"] -= 1
        running[client.id] -= 1
        return b"re:" + message

    async def client(i: int) -> None:
        async with await pyuds.open_connection(sock_path) as conn:
            for k in range(60):
                await conn.send(b"%d-%d" % (i, k))
            assert [await conn.recv() for _ in range(60)] == [b"re:%d-%d" % (i, k) for k in range(60)]

    async def main():
        async with pyuds.Server(sock_path, handler, max_in_flight=4, max_in_flight_total=10) as server:
            await serving(server)
            await asyncio.gather(*(client(i) for i in range(6)))

    run(loop_kind, main)
    assert most.pop("all") == 10
    assert len(most) == 6 and max(most.values()) <= 4


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_many_clients_queued_for_room_are_all_answered_in_order(loop_kind, sock_path):
    """Thirty clients of another process, each pipelining 300 requests to a handler that
    suspends, with room for 3 handlers across them: clients wait for room again and again,
    their queues emptying and filling, the first done while the others still wait; every
    client gets every reply, in order."""
    async def handler(client, message):
        await asyncio.sleep(0)
        return message

    async def main():
        async with pyuds.Server(sock_path, handler, max_in_flight=2, max_in_flight_total=3) as server:
            await serving(server)
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PIPELINING_CLIENTS, sock_path, "30", "300")
            return await proc.wait()

    assert run(loop_kind, main, timeout=30) == 0


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("suspends", [False, True], ids=["finishing", "suspending"])
def test_another_task_runs_while_a_burst_is_dispatched(loop_kind, sock_path, suspends):
    """One client sends 300 requests at once, each of whose handlers keeps the loop busy in
    its first step (a blocking sleep of a millisecond: CPU work, as the loop sees it). The C
    loop hands over up to 128 of one connection's messages per turn, but the driver's callback
    stops starting handlers once its time is up (a few milliseconds) and leaves the rest to
    its next one: another task of the loop runs between every few handlers, never after 64 in
    a row. The replies keep their order, and with handlers that suspend no more than
    max_in_flight of them run at once."""
    events: list[str] = []
    running = [0, 0]  # now, most

    async def handler(client, message):
        time.sleep(0.001)  # (blocks the loop, on purpose)
        events.append("handler")
        if suspends:
            running[0] += 1
            running[1] = max(running)
            await asyncio.sleep(0)
            running[0] -= 1
        return message

    messages = [b"m%d" % k for k in range(300)]

    def client() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(sock_path)
            sock.sendall(b"".join(frame(m) for m in messages))
            return read_frames(sock, len(messages))

    async def main():
        loop = asyncio.get_running_loop()
        async with pyuds.Server(sock_path, handler, max_in_flight=4) as server:
            await serving(server)
            done = False

            async def other() -> None:
                while not done:
                    events.append("other")
                    await asyncio.sleep(0)

            ticking = asyncio.create_task(other())
            replies = await loop.run_in_executor(None, client)
            done = True
            await ticking
            return replies

    assert run(loop_kind, main, timeout=60) == messages
    assert events.count("handler") == len(messages)
    in_a_row = max(len(run_) for run_ in "".join("h" if e == "handler" else " " for e in events).split())
    assert in_a_row < 64
    if suspends:
        assert 1 <= running[1] <= 4


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_handler_that_cancels_its_task_then_suspends_ends_cancelled(loop_kind, sock_path):
    """A handler that cancels its own task in its first step and then awaits gets the
    cancellation at that await, as in any task: no reply for it, the next requests answered."""
    async def handler(client, message):
        if message == b"cancel":
            asyncio.current_task().cancel()
            await asyncio.sleep(0)
            return b"not reached"
        await asyncio.sleep(0)
        return message

    def client() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(sock_path)
            sock.sendall(b"".join(frame(m) for m in (b"a", b"cancel", b"b", b"cancel", b"c")))
            return read_frames(sock, 3)

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            return await asyncio.get_running_loop().run_in_executor(None, client)

    assert run(loop_kind, main, timeout=20) == [b"a", b"b", b"c"]


def test_max_in_flight_total_bounds_executor_handlers(sock_path):
    """The same bound for blocking handlers in threads: 8 threads, but 3 handlers at most."""
    lock = threading.Lock()
    counts = {"now": 0, "most": 0}

    def handler(client, message):
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
        time.sleep(0.002)
        with lock:
            counts["now"] -= 1
        return message

    server = pyuds.Server(sock_path, handler, threads=8, max_in_flight_total=3)
    server.start()
    try:
        socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for i, sock in enumerate(socks):
            sock.settimeout(10)
            sock.connect(sock_path)
            sock.sendall(b"".join(frame(b"%d-%d" % (i, k)) for k in range(30)))
        for i, sock in enumerate(socks):
            assert read_frames(sock, 30) == [b"%d-%d" % (i, k) for k in range(30)]
            sock.close()
    finally:
        server.shutdown(timeout=10)
    assert counts["most"] == 3


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_client_at_the_cap_is_not_read(loop_kind, sock_path):
    """While a client's handlers are all stuck, pyuds stops reading it: the kernel holds the
    rest of its requests (its received count stays small); once they finish, every reply comes,
    in order."""
    release = None

    async def handler(client, message):
        await release.wait()
        return message

    async def main():
        nonlocal release
        release = asyncio.Event()
        async with pyuds.Server(sock_path, handler, max_in_flight=4) as server:
            await serving(server)
            conn = await pyuds.open_connection(sock_path)
            payload = b"x" * 1000
            sending = asyncio.gather(*(conn.send(payload) for _ in range(2000)))
            await asyncio.sleep(0.5)
            (handle,) = server.clients.values()
            received = handle.messages_received
            assert 4 <= received <= 4 + 300, received  # the cap, and what one read delivered
            release.set()
            await sending
            assert [await conn.recv() for _ in range(2000)] == [payload] * 2000
            assert handle.messages_received == 2000
            await conn.close()

    run(loop_kind, main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_replies_owed_outlive_the_clients_end_of_file(loop_kind, sock_path):
    """A client that sends its requests and shuts down its writing end still gets every reply
    from handlers that finish later, then end-of-file."""
    async def handler(client, message):
        await asyncio.sleep(0.05)
        return message

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(sock_path)
            sock.sendall(b"".join(frame(b"%d" % k) for k in range(3)))
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            return data

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            return await asyncio.get_running_loop().run_in_executor(None, client)

    assert run(loop_kind, main) == b"".join(frame(b"%d" % k) for k in range(3))


# ---- executor ---------------------------------------------------------------------------------


def test_a_blocking_handler_does_not_delay_another_clients_replies(sock_path):
    """With threads=, one client's handler blocks while another client is answered."""
    unblock = threading.Event()

    def handler(client, message):
        if message == b"block":
            unblock.wait(30)
        return message

    server = pyuds.Server(sock_path, handler, threads=4)
    server.start()
    try:
        with pyuds.connect(sock_path, timeout=10) as blocked, pyuds.connect(sock_path, timeout=10) as other:
            blocked.send(b"block")
            for k in range(50):
                assert other.request(b"%d" % k) == b"%d" % k
            assert not unblock.is_set()  # all of that while the first handler still blocked
            unblock.set()
            assert blocked.recv() == b"block"
    finally:
        unblock.set()
        server.shutdown(timeout=10)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_executor_handlers_keep_each_clients_order(loop_kind, sock_path):
    """executor=: blocking handlers of one client run in parallel, finish in any order, and
    their replies leave in request order."""
    def handler(client, message):
        time.sleep(random.random() * 0.003)
        return message

    async def client(i: int) -> None:
        async with await pyuds.open_connection(sock_path) as conn:
            expected = [b"%d:%d" % (i, k) for k in range(100)]
            assert await asyncio.gather(*(conn.request(m) for m in expected)) == expected

    async def main():
        with ThreadPoolExecutor(8) as executor:
            async with pyuds.Server(sock_path, handler, executor=executor, max_in_flight=8) as server:
                await serving(server)
                await asyncio.gather(*(client(i) for i in range(4)))

    run(loop_kind, main)


# ---- failures and the end ---------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_raising_coroutine_handler_closes_only_its_client(loop_kind, sock_path, caplog):
    async def handler(client, message):
        await asyncio.sleep(0.001)
        if message == b"boom":
            raise ValueError("boom")
        return message

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            bad = await pyuds.open_connection(sock_path)
            good = await pyuds.open_connection(sock_path)
            assert await good.request(b"a") == b"a"
            await bad.send(b"boom")
            with pytest.raises(pyuds.ConnectionClosedError):
                await bad.recv()
            assert await good.request(b"b") == b"b"
            assert server.stats()["handler_errors"] == 1
            await bad.close()
            await good.close()

    with caplog.at_level(logging.ERROR, logger="pyuds"):
        run(loop_kind, main)
    assert "ValueError: boom" in caplog.text


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_shutdown_mid_flight_answers_or_cancels_within_flush_timeout(loop_kind, sock_path):
    """At shutdown a handler that finishes in time is answered; one that does not is cancelled
    once flush_timeout has passed; the socket file is gone."""
    cancelled = []

    async def handler(client, message):
        try:
            await asyncio.sleep(0.1 if message == b"slow" else 3600)
        except asyncio.CancelledError:
            cancelled.append(message)
            raise
        return message

    async def main():
        server = pyuds.Server(sock_path, handler, flush_timeout=0.5)
        task = await serving(server)
        conn = await pyuds.open_connection(sock_path)
        await conn.send(b"other")  # a request before them, hanging too: the replies wait behind it
        other = await pyuds.open_connection(sock_path)
        await other.send(b"slow")
        await conn.send(b"hang")
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await server.shutdown_async()
        took = time.monotonic() - began
        assert await other.recv() == b"slow"  # answered
        with pytest.raises(pyuds.ConnectionClosedError):
            await conn.recv()  # its handlers were cancelled: nothing owed comes
        await task
        await conn.close()
        await other.close()
        return took

    took = run(loop_kind, main)
    assert sorted(cancelled) == [b"hang", b"other"]
    assert 0.4 <= took < 5.0  # flush_timeout (0.5 s), not the handlers' hour
    assert not os.path.exists(sock_path)


def test_one_server_in_two_loops_is_a_clear_error(sock_path):
    async def handler(client, message):
        return message

    server = pyuds.Server(sock_path, handler)
    other_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=other_loop.run_until_complete, args=(server.serve_async(),))
    thread.start()
    try:
        assert server._started.wait(10)

        async def again():
            with pytest.raises(RuntimeError, match="another event loop"):
                await server.serve_async()

        run("asyncio", again)
    finally:
        server.shutdown(timeout=10)
        thread.join(10)
        other_loop.close()
    assert server.closed and not os.path.exists(sock_path)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_with_serves_and_cleans_up(loop_kind, sock_path):
    """async with: a plain handler served by serve_async(), pushes from another thread, and the
    socket file gone at the end."""
    def handler(client, message):
        threading.Thread(target=client.send, args=(b"pushed",)).start()
        return message.upper()

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            task = await serving(server)
            assert is_socket(sock_path)
            async with await pyuds.open_connection(sock_path) as conn:
                assert await conn.request(b"hi") == b"HI"
                assert await conn.recv() == b"pushed"
        assert server.closed
        await task

    run(loop_kind, main)
    assert not os.path.exists(sock_path)


def test_coroutine_handler_with_start_runs_its_own_loop(sock_path):
    async def handler(client, message):
        await asyncio.sleep(0)
        return b"%s in a task: %d" % (message, asyncio.current_task() is not None)

    server = pyuds.Server(sock_path, handler)
    server.start()
    try:
        with pyuds.connect(sock_path, timeout=10) as conn:
            assert conn.request(b"hi") == b"hi in a task: 1"
    finally:
        server.shutdown(timeout=10)
    assert server.closed and not os.path.exists(sock_path)


def test_executor_options_are_checked(sock_path):
    async def handler(client, message):
        return message

    with pytest.raises(ValueError, match="coroutine handler"):
        pyuds.Server(sock_path, handler, threads=2)
    with pytest.raises(ValueError, match="max_in_flight"):
        pyuds.Server(sock_path, max_in_flight=0)
    with ThreadPoolExecutor(1) as executor, pytest.raises(ValueError, match="not both"):
        pyuds.Server(sock_path, executor=executor, threads=2)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_datagram_server_with_a_coroutine_handler(loop_kind, sock_path):
    async def handler(client, message):
        await asyncio.sleep(0.001)
        return b"re:" + message

    async def main():
        async with pyuds.Server(sock_path, handler, kind="datagram") as server:
            await serving(server)

            def client():
                with pyuds.connect(sock_path, kind="datagram", timeout=10) as conn:
                    return [conn.request(b"%d" % k) for k in range(20)]

            return await asyncio.get_running_loop().run_in_executor(None, client)

    assert run(loop_kind, main) == [b"re:%d" % k for k in range(20)]


# ---- the asyncio client -----------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_the_asyncio_client_pipelines(loop_kind, sock_path):
    """Many requests in flight on one connection at once, each answered with its own reply;
    the server saw them together (more than one handler running at a time)."""
    running, most = 0, 0

    async def handler(client, message):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        return message * 2

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            async with await pyuds.open_connection(sock_path, framing="u32") as conn:
                requests = [b"%d" % k for k in range(500)]
                assert await asyncio.gather(*(conn.request(m) for m in requests)) == [m * 2 for m in requests]

    run(loop_kind, main)
    assert most > 1


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("form", ["unix:", "tcp://", "fd://"])
def test_the_asyncio_client_takes_every_endpoint_form(loop_kind, sock_path, form):
    """open_connection() takes the endpoints pyuds.connect() takes: unix:PATH, tcp://HOST:PORT
    (a TCP server on a port the system picked) and fd://N (a socket already connected, which
    the caller keeps: the connection works on a duplicate)."""
    endpoint = "tcp://127.0.0.1:0" if form == "tcp://" else sock_path

    async def handler(client, message):
        await asyncio.sleep(0)
        return b"re:" + message

    async def main():
        async with pyuds.Server(endpoint, handler) as server:
            await serving(server)
            mine = None
            if form == "tcp://":
                target = "tcp://%s:%d" % server.address
            elif form == "unix:":
                target = "unix:" + sock_path
            else:
                mine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                mine.connect(sock_path)
                target = "fd://%d" % mine.fileno()
            async with await pyuds.open_connection(target) as conn:
                assert await asyncio.gather(*(conn.request(b"%d" % k) for k in range(20))) == \
                    [b"re:%d" % k for k in range(20)]
            if mine is not None:
                assert mine.fileno() >= 0 and mine.getpeername() == sock_path  # still the caller's
                mine.close()

    run(loop_kind, main)


@pytest.mark.parametrize("framing", ["line", "u32"])
def test_the_asyncio_client_against_a_threaded_server(serve, sock_path, framing):
    """open_connection() speaks each framing; a cancelled request's reply is dropped, not
    handed to the next request."""
    def handler(client, message):
        if message == b"slow":
            time.sleep(0.3)
        return b"re:" + message

    serve(handler, framing=framing)

    async def main():
        async with await pyuds.open_connection(sock_path, framing=framing) as conn:
            assert await conn.request(b"a") == b"re:a"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.request(b"slow"), 0.05)
            assert await conn.request(b"b") == b"re:b"
        with pytest.raises(pyuds.ConnectionClosedError):
            await conn.request(b"c")

    run("asyncio", main)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_task_of_the_loop_pushes_and_closes(loop_kind, sock_path):
    """send() and close() from a task of the loop (not a handler) take effect at once."""
    async def main():
        async with pyuds.Server(sock_path) as server:
            await serving(server)
            async with await pyuds.open_connection(sock_path) as conn:
                assert await conn.request(b"hi") == b"hi"
                (client,) = server.clients.values()
                client.send(b"from a task")
                assert await conn.recv() == b"from a task"
                client.close()
                with pytest.raises(pyuds.ConnectionClosedError):
                    await conn.recv()

    run(loop_kind, main, timeout=20)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_coroutine_handler_runs_in_a_task_of_its_own(loop_kind, sock_path):
    """Before and after its first await, a handler is inside its own task, with its own
    context: a context variable it sets is still set after the await, and not seen by the
    handlers of other messages."""
    var: contextvars.ContextVar[bytes] = contextvars.ContextVar("var", default=b"unset")

    async def handler(client, message):
        seen = var.get()
        var.set(message)
        task = asyncio.current_task()
        # (asyncio.timeout() needs the current task: 3.11 and later)
        async with asyncio.timeout(5) if hasattr(asyncio, "timeout") else contextlib.nullcontext():
            await asyncio.sleep(0.001 if message != b"now" else 0)
        assert asyncio.current_task() is task
        return seen + b"/" + var.get()

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            async with await pyuds.open_connection(sock_path) as conn:
                return await asyncio.gather(*(conn.request(m) for m in (b"a", b"b", b"now")))

    assert run(loop_kind, main, timeout=20) == [b"unset/a", b"unset/b", b"unset/now"]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_handlers_that_finish_at_once_leave_nothing_to_the_next(loop_kind, sock_path):
    """Handlers whose first step finishes (no await that suspends), pipelined so that many run
    in one batch, each still see a context and a task of their own: a context variable one
    sets is not seen by the next; one that cancels its own task ends cancelled (no reply) and
    does not cancel the next; one that then suspends goes on in a live task of its own."""
    var: contextvars.ContextVar[bytes] = contextvars.ContextVar("var2", default=b"unset")

    async def handler(client, message):
        if message == b"set":
            var.set(b"leaked")
        elif message == b"cancel-self":
            asyncio.current_task().cancel()
        elif message == b"suspend":
            task = asyncio.current_task()
            await asyncio.sleep(0.001)
            assert asyncio.current_task() is task and not task.done()
        return var.get()

    round_ = [b"peek", b"set", b"peek", b"cancel-self", b"suspend", b"peek", b"suspend"]
    answered = [b"unset", b"leaked", b"unset", b"unset", b"unset", b"unset"]  # all but cancel-self

    def client() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(sock_path)
            sock.sendall(b"".join(frame(m) for m in round_ * 20))
            return read_frames(sock, len(answered) * 20)

    async def main():
        async with pyuds.Server(sock_path, handler) as server:
            await serving(server)
            return await asyncio.get_running_loop().run_in_executor(None, client)

    assert run(loop_kind, main, timeout=20) == answered * 20
