"""The server as a user meets it: requests and replies, the client registry, pushed and
broadcast messages, handlers that fail, clients that leave early. Real sockets throughout."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import pyuds
from conftest import wait_until


def reply_with_prefix(client: pyuds.ClientHandle, message: bytes) -> bytes:
    return b"re:" + message


def read_until_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ---- requests and replies ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["u32", "line", "raw"])
def test_round_trip_each_framing(serve, sock_path, framing):
    """A request gets the handler's reply, in every framing."""
    serve(reply_with_prefix, framing=framing)
    with pyuds.connect(sock_path, framing, timeout=5) as conn:
        assert conn.request(b"hello") == b"re:hello"
        assert conn.request(b"second \r") == b"re:second \r"


def test_empty_message_and_none_reply(serve, sock_path):
    """An empty message reaches the handler; a handler returning None sends nothing."""
    seen = []

    def handler(client, message):
        seen.append(message)
        return None if message == b"quiet" else message

    serve(handler)
    with pyuds.connect(sock_path, timeout=5) as conn:
        conn.send(b"quiet")
        assert conn.request(b"") == b""
        assert conn.request(b"x") == b"x"
    assert seen == [b"quiet", b"", b"x"]


def test_bytes_like_replies(serve, sock_path):
    """A handler may return bytes, bytearray or memoryview."""
    kinds = iter([bytearray(b"from bytearray"), memoryview(b"from memoryview"), b"from bytes"])
    serve(lambda client, message: next(kinds))
    with pyuds.connect(sock_path, timeout=5) as conn:
        assert [conn.request(b"?") for _ in range(3)] == [b"from bytearray", b"from memoryview", b"from bytes"]


def test_clients_taking_turns_one_request_each_get_their_own_replies(serve, sock_path):
    """Clients that take turns, each with one request at a time (a batch of one message, from
    the same client as the last one or from another, a client reconnecting on a reused
    descriptor), each get the reply to their own request."""
    serve(lambda client, message: b"%d:" % client.id + message)
    rng = random.Random(7)
    conns = [pyuds.connect(sock_path, timeout=5) for _ in range(3)]
    ids: list[int | None] = [None] * 3
    try:
        for i in range(300):
            k = rng.randrange(3) if i % 50 else 0
            if i % 50 == 49:  # a new connection in its place: often the same slot, a new id
                conns[k].close()
                conns[k], ids[k] = pyuds.connect(sock_path, timeout=5), None
            body = b"%d-%d" % (k, i)
            got_id, _, echoed = conns[k].request(body).partition(b":")
            assert echoed == body
            if ids[k] is None:
                ids[k] = int(got_id)
            assert int(got_id) == ids[k]
        assert len(set(ids)) == 3
    finally:
        for conn in conns:
            conn.close()


def test_large_messages_both_ways(serve, sock_path):
    """Multi-megabyte requests and replies arrive intact (many reads, partial writes)."""
    serve(lambda client, message: message[::-1])
    payload = random.Random(1).randbytes(6 * 1024 * 1024)
    with pyuds.connect(sock_path, timeout=20) as conn:
        assert conn.request(payload) == payload[::-1]
        assert conn.request(b"small") == b"llams"


def test_slow_reader_gets_every_byte(serve, sock_path):
    """Replies bigger than the socket buffers wait for a slow reader and arrive complete."""
    blob = random.Random(2).randbytes(256 * 1024)
    serve(lambda client, message: blob)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.settimeout(10)
    try:
        for _ in range(20):
            sock.sendall(len(b"go").to_bytes(4, "big") + b"go")
        got = bytearray()
        want = 20 * (4 + len(blob))
        while len(got) < want:
            got += sock.recv(7000)
            time.sleep(0.0005)
        for i in range(20):
            frame = got[i * (4 + len(blob)):(i + 1) * (4 + len(blob))]
            assert int.from_bytes(frame[:4], "big") == len(blob) and frame[4:] == blob
    finally:
        sock.close()


@pytest.mark.parametrize("framing", ["u32", "line"])
def test_large_distinct_replies_reach_a_slow_reader_whole(serve, sock_path, framing):
    """Replies of 1 KB to 600 KB, each of its own bytes, to a client that reads in small
    pieces: a large one goes straight to the socket when nothing waits before it, the socket
    takes part of it, and the rest of it waits with the replies after it. Everything arrives
    whole and in order."""
    sizes = [600_000, 40_000, 300_000, 17_000, 1_000, 250_000]
    letters = bytes(range(65, 91)) * 26 + b"0123456789"  # no b"\n": a line-framed payload

    def reply(i: int) -> bytes:  # a pattern of its own, which a copy from a wrong offset breaks
        start = i * 101 % len(letters)
        return ((letters[start:] + letters[:start]) * (sizes[i] // len(letters) + 1))[:sizes[i]]

    serve(lambda client, message: reply(int(message)), framing=framing, max_message_size=1 << 20)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    sock.settimeout(10)

    def framed(m: bytes) -> bytes:
        return len(m).to_bytes(4, "big") + m if framing == "u32" else m + b"\n"

    try:
        sock.sendall(b"".join(framed(b"%d" % i) for i in range(len(sizes))))
        want = b"".join(framed(reply(i)) for i in range(len(sizes)))
        got = bytearray()
        while len(got) < len(want):
            chunk = sock.recv(7000)
            assert chunk, "the server closed the connection"
            got += chunk
            time.sleep(0.0002)
        assert got == want
    finally:
        sock.close()


def test_hundred_clients_thousand_pipelined_requests(serve, sock_path):
    """100 concurrent clients each pipeline 1,000 requests of varied sizes: every reply is
    the right one, in order."""
    serve(reply_with_prefix)
    n_clients, n_requests = 100, 1000
    errors: list[str] = []
    barrier = threading.Barrier(n_clients)

    def client(k: int) -> None:
        rng = random.Random(k)
        messages = [b"%d/%d:" % (k, i) + rng.randbytes(rng.randrange(0, 200)) for i in range(n_requests)]
        try:
            with pyuds.connect(sock_path, timeout=30) as conn:
                barrier.wait(timeout=30)
                sender = threading.Thread(target=lambda: [conn.send(m) for m in messages])
                sender.start()
                for i, message in enumerate(messages):
                    reply = conn.recv()
                    if reply != b"re:" + message:
                        errors.append(f"client {k}, request {i}: wrong reply {reply[:40]!r}")
                        break
                sender.join()
        except Exception as exc:  # reported below with the client's number
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert errors == []


@contextlib.contextmanager
def clients_with_a_request_each(sock_path: str, n: int) -> Iterator[list[pyuds.Connection]]:
    """n clients connected at once, client i having sent b"<i>" before any reads; closed after."""
    conns = [pyuds.connect(sock_path, timeout=10) for _ in range(n)]
    try:
        for i, conn in enumerate(conns):
            conn.send(b"%d" % i)
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_many_connections_at_once(serve, sock_path):
    """500 clients connected at the same time are all accepted and served."""
    server = serve(reply_with_prefix)
    with clients_with_a_request_each(sock_path, 500) as conns:
        for i, conn in enumerate(conns):
            assert conn.recv() == b"re:%d" % i
        assert len(server.clients) == 500
    wait_until(lambda: len(server.clients) == 0)


def test_raising_handler_among_many_clients_with_a_request_each(serve, sock_path):
    """300 clients send a request each before reading; the handler raises for every tenth
    client's: those ten percent see their connection end, every other client gets its reply,
    and the server goes on serving."""
    def handler(client, message):
        if int(message) % 10 == 0:
            raise ValueError("refusing " + message.decode())
        return b"re:" + message

    server = serve(handler)
    with clients_with_a_request_each(sock_path, 300) as conns:
        for i, conn in enumerate(conns):
            if i % 10 == 0:
                with pytest.raises(pyuds.ConnectionClosedError):
                    conn.recv()
            else:
                assert conn.recv() == b"re:%d" % i
        assert server.stats()["handler_errors"] == 30
        assert conns[1].request(b"1") == b"re:1"


# ---- the registry ------------------------------------------------------------------------------


def test_registry_follows_connects_and_disconnects(serve, sock_path):
    """server.clients holds a handle for each connected client, with the peer's credentials,
    counters and per-client data; it goes away when the client does."""
    def handler(client, message):
        client.data["count"] = client.data.get("count", 0) + 1
        return b"%d" % client.data["count"]

    gone = []
    server = serve(handler, on_disconnect=lambda client, reason: gone.append((client.id, reason)))
    assert dict(server.clients) == {}
    before = time.time()
    conn = pyuds.connect(sock_path, timeout=5)
    assert [conn.request(b"abc") for _ in range(3)] == [b"1", b"2", b"3"]
    (client,) = server.clients.values()
    assert server.clients[client.id] is client
    assert (client.pid, client.uid, client.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert before - 1 <= client.connected_at <= time.time()
    assert client.data == {"count": 3}
    assert (client.messages_received, client.bytes_received) == (3, 9)
    assert (client.messages_sent, client.bytes_sent) == (3, 3)
    assert not client.closed
    with pytest.raises(TypeError):
        server.clients[99] = client  # read-only

    conn2 = pyuds.connect(sock_path, timeout=5)
    conn2.request(b"x")
    assert len(server.clients) == 2
    conn.close()
    wait_until(lambda: client.id not in server.clients)
    assert client.closed and client.close_reason == "peer"
    assert gone == [(client.id, pyuds.CloseReason.PEER)]
    assert client.messages_received == 3  # counters stay readable after the end
    assert len(server.clients) == 1
    conn2.close()
    wait_until(lambda: len(server.clients) == 0)
    assert len(gone) == 2


def test_client_ids_are_unique(serve, sock_path):
    """Ids are never reused, even when the kernel reuses the descriptor."""
    server = serve()
    ids = set()
    for _ in range(20):
        with pyuds.connect(sock_path, timeout=5) as conn:
            conn.request(b"x")
            ids.update(server.clients)
        wait_until(lambda: len(server.clients) == 0)
    assert len(ids) == 20


def test_on_connect_refuses(serve, sock_path):
    """A client that on_connect refuses is closed at once, never in the registry, and gets no
    on_disconnect; others are admitted."""
    seen, gone = [], []

    def on_connect(client):
        seen.append(client.id)
        return len(seen) != 2  # refuse the second

    server = serve(on_connect=on_connect, on_disconnect=lambda c, r: gone.append(c.id))
    first = pyuds.connect(sock_path, timeout=5)
    assert first.request(b"a") == b"a"
    second = socket.socket(socket.AF_UNIX)
    second.connect(sock_path)
    assert read_until_eof(second) == b""
    third = pyuds.connect(sock_path, timeout=5)
    assert third.request(b"c") == b"c"
    assert sorted(server.clients) == [seen[0], seen[2]]
    for sock in (first, second, third):
        sock.close()
    wait_until(lambda: len(gone) == 2)
    assert sorted(gone) == [seen[0], seen[2]]


def test_on_connect_raising_closes_that_client(serve, sock_path, caplog):
    """on_connect raising is logged and costs only that client."""
    calls = []

    def on_connect(client):
        calls.append(client.id)
        if len(calls) == 1:
            raise RuntimeError("no thanks")

    serve(on_connect=on_connect)
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(sock_path)
    assert read_until_eof(bad) == b""
    bad.close()
    with pyuds.connect(sock_path, timeout=5) as good:
        assert good.request(b"ok") == b"ok"
    wait_until(lambda: any("on_connect raised" in r.getMessage() for r in caplog.records))


# ---- pushing, broadcasting, closing ------------------------------------------------------------


def test_push_from_handler_and_from_other_thread(serve, sock_path):
    """client.send() pushes a message from a handler (before its reply) or from any thread."""
    def handler(client, message):
        client.send(b"push:" + message)
        return b"reply:" + message

    server = serve(handler)
    with pyuds.connect(sock_path, timeout=5) as conn:
        conn.send(b"a")
        assert [conn.recv(), conn.recv()] == [b"push:a", b"reply:a"]
        (client,) = server.clients.values()
        client.send(b"from the test thread")
        client.send(memoryview(b"as a memoryview"))
        assert conn.recv() == b"from the test thread"
        assert conn.recv() == b"as a memoryview"


def test_pushes_from_many_threads_keep_each_threads_order(serve, sock_path):
    """Four threads pushing 500 messages each: all 2,000 arrive, each thread's in order."""
    server = serve()
    with pyuds.connect(sock_path, timeout=10) as conn:
        conn.request(b"hi")
        (client,) = server.clients.values()

        def pusher(t):
            for i in range(500):
                client.send(b"%d:%d" % (t, i))

        threads = [threading.Thread(target=pusher, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        last = {t: -1 for t in range(4)}
        for _ in range(2000):
            t, i = map(int, conn.recv().split(b":"))
            assert i == last[t] + 1
            last[t] = i
        for t in threads:
            t.join()
    assert last == {t: 499 for t in range(4)}


def test_broadcast_reaches_every_client(serve, sock_path):
    """server.broadcast() sends to every connected client, from another thread or a handler."""
    holder = []

    def handler(client, message):
        holder[0].broadcast(b"all:" + message)
        return None

    server = serve(handler)
    holder.append(server)
    conns = [pyuds.connect(sock_path, timeout=5) for _ in range(5)]
    try:
        wait_until(lambda: len(server.clients) == 5)
        server.broadcast(b"news")
        assert [conn.recv() for conn in conns] == [b"news"] * 5
        conns[3].send(b"shout")
        assert [conn.recv() for conn in conns] == [b"all:shout"] * 5
    finally:
        for conn in conns:
            conn.close()


def test_send_to_disconnected_client_raises(serve, sock_path):
    server = serve()
    conn = pyuds.connect(sock_path, timeout=5)
    conn.request(b"x")
    (client,) = server.clients.values()
    conn.close()
    wait_until(lambda: client.close_reason is not None)
    with pytest.raises(pyuds.ClientClosedError, match="disconnected"):
        client.send(b"anyone?")


def test_close_from_another_thread(serve, sock_path):
    """client.close() from another thread: the client sees EOF, on_disconnect says 'closed'."""
    gone = []
    server = serve(on_disconnect=lambda c, r: gone.append(r))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    wait_until(lambda: len(server.clients) == 1)
    (client,) = server.clients.values()
    client.close()
    client.close()  # harmless
    assert read_until_eof(sock) == b""
    sock.close()
    wait_until(lambda: gone == ["closed"])
    with pytest.raises(pyuds.ClientClosedError):
        client.send(b"x")


def test_close_in_handler_still_delivers_its_reply(serve, sock_path):
    """A handler may close its client and still return a last reply."""
    def handler(client, message):
        if message == b"quit":
            client.close()
            return b"bye"
        return message

    serve(handler)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    sock.sendall(b"\0\0\0\2hi\0\0\0\4quit\0\0\0\5never")
    assert read_until_eof(sock) == b"\0\0\0\2hi\0\0\0\3bye"
    sock.close()


def test_framing_violation_on_send_is_refused(serve, sock_path):
    """Pushing a line-framed message that contains a newline raises FramingError."""
    server = serve(framing="line")
    with pyuds.connect(sock_path, "line", timeout=5) as conn:
        conn.request(b"x")
        (client,) = server.clients.values()
        with pytest.raises(pyuds.FramingError):
            client.send(b"two\nlines")
        with pytest.raises(pyuds.FramingError):
            server.broadcast(b"two\nlines")
        assert conn.request(b"still fine") == b"still fine"


# ---- handlers that fail, clients that leave ----------------------------------------------------


def test_raising_handler_closes_only_its_client(serve, sock_path, caplog):
    """A handler that raises: the traceback is logged, that client is closed (after the replies
    already owed to it), everyone else goes on being served."""
    caplog.set_level(logging.ERROR, logger="pyuds")
    gone = []

    def handler(client, message):
        if message == b"boom":
            raise ValueError("handler exploded")
        return message

    server = serve(handler, on_disconnect=lambda c, r: gone.append(r))
    good = pyuds.connect(sock_path, timeout=5)
    assert good.request(b"before") == b"before"
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(sock_path)
    bad.sendall(b"\0\0\0\2ok\0\0\0\4boom\0\0\0\5after")
    assert read_until_eof(bad) == b"\0\0\0\2ok"  # owed reply kept; nothing after the failure
    bad.close()
    assert good.request(b"after") == b"after"
    wait_until(lambda: "handler_error" in gone)
    records = [r for r in caplog.records if r.name == "pyuds" and r.exc_info]
    assert records and "handler exploded" in str(records[0].exc_info[1])
    assert server.serving
    good.close()


def test_handler_returning_str_is_a_handler_error(serve, sock_path, caplog):
    serve(lambda client, message: "not bytes")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    sock.sendall(b"\0\0\0\1x")
    assert read_until_eof(sock) == b""
    sock.close()
    wait_until(lambda: any(r.exc_info and "must return bytes" in str(r.exc_info[1]) for r in caplog.records))


def test_half_closed_client_gets_its_replies(serve, sock_path):
    """A client that shuts its writing end after its requests still receives every reply,
    then EOF."""
    serve(reply_with_prefix)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    sock.sendall(b"".join(len(m).to_bytes(4, "big") + m for m in (b"a", b"bb", b"ccc")))
    sock.shutdown(socket.SHUT_WR)
    expected = b"".join(len(m).to_bytes(4, "big") + m for m in (b"re:a", b"re:bb", b"re:ccc"))
    assert read_until_eof(sock) == expected
    sock.close()


def test_messages_from_a_client_that_left_are_still_handled(serve, sock_path):
    """Fire and forget: a client that sends and closes at once still has its messages handled."""
    seen = []
    server = serve(lambda client, message: seen.append(message))
    for i in range(10):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(sock_path)
        sock.sendall(b"\0\0\0\1%d" % i)
        sock.close()
    wait_until(lambda: len(seen) == 10 and len(server.clients) == 0)
    assert sorted(seen) == [b"%d" % i for i in range(10)]


def test_vanishing_clients_do_not_hurt_the_server(serve, sock_path):
    """Clients that reset mid-frame or leave with replies unread cost the server nothing."""
    server = serve(lambda client, message: message * 1000)
    for i in range(50):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(sock_path)
        if i % 2:
            sock.sendall(b"\0\0\1\0partial")  # half a frame
        else:
            sock.sendall(b"\0\0\0\3abc" * 100)  # replies it will never read
        sock.close()
    wait_until(lambda: len(server.clients) == 0)
    with pyuds.connect(sock_path, timeout=5) as conn:
        assert conn.request(b"z") == b"z" * 1000


# ---- order of output when requests arrive in batches ------------------------------------------


def test_pushes_and_replies_keep_their_order_in_a_pipeline(serve, sock_path):
    """Pipelined requests are handled a batch at a time and replies leave together, yet a
    handler that pushes a message and then replies produces p0 r0 p1 r1 ... in that order."""
    def handler(client, message):
        client.send(b"p" + message)
        return b"r" + message

    serve(handler)
    with pyuds.connect(sock_path, timeout=10) as conn:
        for i in range(200):
            conn.send(b"%d" % i)
        got = [conn.recv() for _ in range(400)]
    assert got == [x for i in range(200) for x in (b"p%d" % i, b"r%d" % i)]


def test_replies_of_every_kind_keep_their_order_in_a_pipeline(serve, sock_path):
    """In one batch, small replies (sent together), big ones (sent on their own), bytes-like
    ones and no reply at all still reach the client in request order."""
    big = b"B" * (64 * 1024)

    def handler(client, message):
        i = int(message)
        return [b"small %d" % i, big + b"%d" % i, bytearray(b"ba %d" % i), None][i % 4]

    serve(handler)
    with pyuds.connect(sock_path, timeout=10) as conn:
        # One write: a client that makes hundreds of small writes without reading can fill its
        # own send buffer while the server, rightly, waits for it to read (backpressure).
        conn._sock.sendall(b"".join(len(b"%d" % i).to_bytes(4, "big") + b"%d" % i for i in range(400)))
        expected = [[b"small %d" % i, big + b"%d" % i, b"ba %d" % i][i % 4] for i in range(400) if i % 4 != 3]
        assert [conn.recv() for _ in expected] == expected
        assert conn.request(b"4") == b"small 4"  # and it goes on serving


def test_reused_reply_buffer_is_copied_when_returned(serve, sock_path):
    """A handler that fills and returns the same bytearray for every request: each reply is
    what the buffer held when that call returned, even when a whole pipeline is one batch."""
    buf = bytearray()

    def handler(client, message):
        buf[:] = b"re:" + message
        return buf

    serve(handler)
    with pyuds.connect(sock_path, timeout=10) as conn:
        conn._sock.sendall(b"".join(len(b"%d" % i).to_bytes(4, "big") + b"%d" % i for i in range(300)))
        assert [conn.recv() for _ in range(300)] == [b"re:%d" % i for i in range(300)]


def test_replies_at_the_batch_length_limit(serve, sock_path):
    """Replies of 32,767 bytes (the longest sent together with others), 32,768 and 65,536 (sent
    on their own), mixed with small ones and none in one pipeline, arrive whole and in order."""
    sizes = [32767, 3, None, 32768, 0, 32767, None, 65536, 7] * 4

    def handler(client, message):
        i = int(message)
        return None if sizes[i] is None else bytes([i % 251]) * sizes[i]

    serve(handler)
    with pyuds.connect(sock_path, timeout=10, max_message_size=1 << 20) as conn:
        conn._sock.sendall(b"".join(len(b"%d" % i).to_bytes(4, "big") + b"%d" % i for i in range(len(sizes))))
        expected = [bytes([i % 251]) * n for i, n in enumerate(sizes) if n is not None]
        assert [conn.recv() for _ in expected] == expected
        assert conn.request(b"1") == bytes([1]) * 3  # and nothing else was owed before it


def test_wrong_reply_type_in_a_pipeline(serve, sock_path, caplog):
    """The fifth request of a pipeline gets a str back from the handler: the four replies before
    it arrive, then the connection ends; the handler is not called for that client again, and
    another client is served."""
    calls = []

    def handler(client, message):
        calls.append(message)
        return "five" if message == b"5" else message

    serve(handler)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    sock.sendall(b"".join(b"\0\0\0\1%d" % i for i in range(1, 10)))
    assert read_until_eof(sock) == b"".join(b"\0\0\0\1%d" % i for i in range(1, 5))
    sock.close()
    assert calls == [b"%d" % i for i in range(1, 6)]
    wait_until(lambda: any(r.exc_info and "must return bytes" in str(r.exc_info[1]) for r in caplog.records))
    with pyuds.connect(sock_path, timeout=10) as conn:
        assert conn.request(b"next") == b"next"


# ---- one request at a time ---------------------------------------------------------------------
# A batch of one message is answered with the next poll (one crossing into C per request): what
# else goes to the client meanwhile must still keep its order.


def test_one_at_a_time_reply_precedes_what_other_threads_send_after_it(serve, sock_path):
    """The handler has another thread push a message and waits for that push to be posted
    before it returns its reply: the client gets the reply first, then the push (the order they
    were made in), request after request."""
    def handler(client, message):
        pusher = threading.Thread(target=client.send, args=(b"after " + message,))
        pusher.start()
        pusher.join()
        return b"reply " + message

    serve(handler)
    with pyuds.connect(sock_path, timeout=5) as conn:
        for i in range(20):
            conn.send(b"%d" % i)
            assert [conn.recv(), conn.recv()] == [b"reply %d" % i, b"after %d" % i]


def test_one_at_a_time_failures_cost_only_their_own_reply(serve, sock_path, caplog):
    """One request at a time: a reply the framing refuses (a line with a newline) closes that
    client as a handler error, after the replies before it; a handler returning None sends
    nothing; the next client is served."""
    def handler(client, message):
        return None if message == b"quiet" else b"two\nlines" if message == b"bad" else message

    server = serve(handler, framing="line")
    with pyuds.connect(sock_path, framing="line", timeout=5) as conn:
        assert conn.request(b"one") == b"one"
        conn.send(b"quiet")
        assert conn.request(b"two") == b"two"
        conn.send(b"bad")
        with pytest.raises(pyuds.ConnectionClosedError):
            conn.recv()
    wait_until(lambda: server.stats()["closed"]["handler_error"] == 1)
    with pyuds.connect(sock_path, framing="line", timeout=5) as conn:
        assert conn.request(b"next") == b"next"


def _thread_cpu_seconds(thread: threading.Thread) -> float:
    """CPU time a thread of this process has used, from the kernel's schedstat (ns)."""
    with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


@pytest.mark.parametrize("busy_poll_us", [0, 300_000])
def test_busy_poll_keeps_the_loop_polling_after_a_request(serve, sock_path, busy_poll_us):
    """busy_poll_us: after a request the loop polls without sleeping that long before it sleeps,
    which a user sees as CPU time spent while idle; requests are answered either way. With 0 it
    sleeps at once."""
    server = serve(busy_poll_us=busy_poll_us)
    with pyuds.connect(sock_path, timeout=5) as conn:
        for i in range(50):
            assert conn.request(b"%d" % i) == b"%d" % i
        before = _thread_cpu_seconds(server._thread)
        time.sleep(0.25)  # idle, within the busy-poll window
        used = _thread_cpu_seconds(server._thread) - before
        assert conn.request(b"after") == b"after"
    if busy_poll_us:
        assert used > 0.1, f"the loop used {used:.3f} s of CPU in 0.25 s idle"
    else:
        assert used < 0.05, f"the loop used {used:.3f} s of CPU in 0.25 s idle"


def test_busy_poll_us_is_checked():
    with pytest.raises(ValueError, match="busy_poll_us"):
        pyuds.ServerConfig(busy_poll_us=1_000_001)
    with pytest.raises(ValueError, match="busy_poll_us"):
        pyuds.ServerConfig(busy_poll_us=-1)
    with pytest.raises(TypeError, match="busy_poll_us"):
        pyuds.ServerConfig(busy_poll_us=0.5)
