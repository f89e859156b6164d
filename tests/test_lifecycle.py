"""The server's life, with real sockets: what it finds at its path when it starts (stale
sockets, live servers, things that are not sockets, paths too long), the socket file's mode,
and how it ends (shutdown from any thread, the socket file removed, clients told, nothing
leaked)."""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time

import pytest

import pyuds
from conftest import is_socket, open_fds, pyuds_threads, umask, wait_until

TIMEOUT = 5.0


# ---- helpers ----------------------------------------------------------------------------------


def roundtrip(path: str, message: bytes = b"ping", framing: str = "u32") -> bytes:
    """Connects, sends one request, returns the reply."""
    with pyuds.connect(path, framing, timeout=TIMEOUT) as conn:
        return conn.request(message)


def perms(path: str) -> int:
    """The permission bits of the file at path (not following a symlink)."""
    return stat.S_IMODE(os.lstat(path).st_mode)




def stale_socket(path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Leaves a socket file at path that nobody listens on, like a server that crashed."""
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.bind(path)
    finally:
        s.close()
    assert is_socket(path)


def read_until_eof(conn: pyuds.Connection, allow_reset: bool = False) -> list[bytes]:
    """Every message until the server closes the connection (a clean EOF; with allow_reset,
    ECONNRESET counts as the end too, see test_unread_requests_at_shutdown_give_eof)."""
    messages = []
    while True:
        try:
            messages.append(conn.recv())
        except pyuds.ConnectionClosedError:
            return messages
        except ConnectionResetError:
            if not allow_reset:
                raise
            return messages


# ---- what is at the path when the server starts -----------------------------------------------


class TestStaleSocket:
    @pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET],
                             ids=["stream", "dgram", "seqpacket"])
    def test_stale_socket_is_replaced(self, sock_path, serve, kind):
        """A socket file left behind by a dead process (nobody listening) is replaced: the
        new server starts and answers."""
        stale_socket(sock_path, kind)
        serve()
        assert is_socket(sock_path)
        assert roundtrip(sock_path, b"hello") == b"hello"
        assert perms(sock_path) == 0o600  # the server's own file, not the leftover

    def test_stale_socket_left_by_a_pyuds_server(self, sock_path, serve):
        """The file of a pyuds server that did not remove it (the process died) is stale too."""
        first = serve()
        assert roundtrip(sock_path) == b"ping"
        # Simulate the crash: the file stays, nobody listens any more.
        os.link(sock_path, sock_path + ".keep")
        first.shutdown(timeout=TIMEOUT)
        os.rename(sock_path + ".keep", sock_path)
        assert is_socket(sock_path)
        serve()
        assert roundtrip(sock_path, b"again") == b"again"


class TestLiveServer:
    def test_second_pyuds_server_is_refused(self, sock_path, serve):
        """A second Server on the path of a live one raises AddressInUseError (an OSError with
        EADDRINUSE); the first keeps serving on the very same socket file."""
        serve()
        assert roundtrip(sock_path, b"one") == b"one"
        ino = os.lstat(sock_path).st_ino

        with pytest.raises(pyuds.AddressInUseError) as info:
            pyuds.Server(sock_path)
        exc = info.value
        assert isinstance(exc, OSError)
        assert isinstance(exc, pyuds.SocketPathError)
        assert isinstance(exc, pyuds.PyudsError)
        assert exc.errno == errno.EADDRINUSE
        assert exc.filename == sock_path
        assert "already listening" in str(exc)

        assert os.lstat(sock_path).st_ino == ino
        assert perms(sock_path) == 0o600
        assert roundtrip(sock_path, b"two") == b"two"

    def test_live_foreign_listener_is_left_alone(self, sock_path):
        """A plain listening socket (not pyuds) at the path: AddressInUseError, and that
        listener still accepts connections on its unchanged file."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(sock_path)
            listener.listen(16)
            listener.settimeout(TIMEOUT)
            ino = os.lstat(sock_path).st_ino

            with pytest.raises(pyuds.AddressInUseError) as info:
                pyuds.Server(sock_path)
            assert info.value.errno == errno.EADDRINUSE

            assert os.lstat(sock_path).st_ino == ino
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(TIMEOUT)
                client.connect(sock_path)
                client.sendall(b"still here")
                # The server's probe may be queued first; find our connection by its data.
                for _ in range(4):
                    peer, _ = listener.accept()
                    with peer:
                        peer.settimeout(TIMEOUT)
                        data = peer.recv(100)
                    if data:
                        break
                assert data == b"still here"
        finally:
            listener.close()

    def test_live_datagram_socket_is_left_alone(self, sock_path):
        """A bound datagram socket answers in its own type: it is live, not stale."""
        dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            dgram.bind(sock_path)
            ino = os.lstat(sock_path).st_ino
            with pytest.raises(pyuds.AddressInUseError):
                pyuds.Server(sock_path)
            assert os.lstat(sock_path).st_ino == ino
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"datagram", sock_path)
            dgram.settimeout(TIMEOUT)
            assert dgram.recv(100) == b"datagram"
        finally:
            dgram.close()


def _snapshot(path: str) -> tuple:
    """What a NotASocketError must leave unchanged at path."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        detail = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        detail = sorted(os.listdir(path))
    elif stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            detail = f.read()
    else:
        detail = None
    return st.st_ino, st.st_mode, detail


class TestNotASocket:
    @staticmethod
    def _make(kind: str, path: str, sockdir: str) -> str:
        """Creates the thing; returns the words the error must use for it."""
        if kind == "regular file":
            with open(path, "wb") as f:
                f.write(b"precious data\n")
            return "regular file"
        if kind == "directory":
            os.mkdir(path)
            with open(os.path.join(path, "inside"), "wb") as f:
                f.write(b"x")
            return "directory"
        if kind == "symlink to a file":
            target = os.path.join(sockdir, "target.txt")
            with open(target, "wb") as f:
                f.write(b"target data")
            os.symlink(target, path)
            return "symbolic link"
        if kind == "dangling symlink":
            os.symlink(os.path.join(sockdir, "nowhere"), path)
            return "symbolic link"
        if kind == "symlink to a stale socket":
            target = os.path.join(sockdir, "real.sock")
            stale_socket(target)
            os.symlink(target, path)
            return "symbolic link"
        if kind == "fifo":
            os.mkfifo(path)
            return "not a socket"
        raise AssertionError(kind)

    @pytest.mark.parametrize("kind", ["regular file", "directory", "symlink to a file", "dangling symlink",
                                      "symlink to a stale socket", "fifo"])
    def test_not_a_socket_is_refused_and_untouched(self, sock_path, sockdir, kind):
        """Anything but a socket at the path: NotASocketError naming what it is, and the thing
        is left exactly as it was (content, inode, link target)."""
        words = self._make(kind, sock_path, sockdir)
        before = _snapshot(sock_path)
        listing = sorted(os.listdir(sockdir))

        with pytest.raises(pyuds.NotASocketError) as info:
            pyuds.Server(sock_path)
        exc = info.value
        assert isinstance(exc, OSError) and isinstance(exc, pyuds.SocketPathError)
        assert exc.errno == errno.ENOTSOCK
        assert exc.filename == sock_path
        assert words in str(exc)

        assert _snapshot(sock_path) == before
        assert sorted(os.listdir(sockdir)) == listing

    def test_symlink_target_untouched(self, sock_path, sockdir):
        """A symlink's target (here a stale socket) is neither removed nor replaced."""
        target = os.path.join(sockdir, "real.sock")
        stale_socket(target)
        ino = os.lstat(target).st_ino
        os.symlink(target, sock_path)
        with pytest.raises(pyuds.NotASocketError):
            pyuds.Server(sock_path)
        assert is_socket(target) and os.lstat(target).st_ino == ino


class TestPathLength:
    @staticmethod
    def _path_of(sockdir: str, nbytes: int, fill: str = "a") -> str:
        head = sockdir + "/"
        name_bytes = nbytes - len(os.fsencode(head))
        assert name_bytes > 0
        if fill == "a":
            name = "a" * name_bytes
        else:  # two-byte characters, then ASCII to make up the count
            name = "é" * (name_bytes // 2) + "a" * (name_bytes % 2)
        path = head + name
        assert len(os.fsencode(path)) == nbytes
        return path

    @pytest.mark.parametrize("nbytes", [108, 109, 200, 4000])
    def test_too_long_path_is_refused(self, sockdir, nbytes):
        """108 bytes or more: PathTooLongError (a ValueError and an OSError), and no file."""
        path = self._path_of(sockdir, nbytes)
        with pytest.raises(pyuds.PathTooLongError) as info:
            pyuds.Server(path)
        exc = info.value
        assert isinstance(exc, ValueError) and isinstance(exc, OSError)
        assert isinstance(exc, pyuds.SocketPathError)
        assert exc.errno == errno.ENAMETOOLONG
        assert f"{nbytes} bytes" in str(exc)
        assert "107" in str(exc)
        assert os.listdir(sockdir) == []

    def test_length_counts_bytes_not_characters(self, sockdir):
        """A path under 108 characters but over 107 bytes (non-ASCII) is too long."""
        path = self._path_of(sockdir, 108, fill="é")
        assert len(path) < 108
        with pytest.raises(pyuds.PathTooLongError):
            pyuds.Server(path)
        assert os.listdir(sockdir) == []

    def test_107_bytes_works(self, sockdir, serve):
        """Exactly 107 bytes (the most sun_path holds with its NUL): serves, then cleans up."""
        path = self._path_of(sockdir, 107)
        server = serve(path=path)
        assert is_socket(path)
        assert roundtrip(path, b"long path") == b"long path"
        server.shutdown(timeout=TIMEOUT)
        assert not os.path.lexists(path)


# ---- the socket file's mode ---------------------------------------------------------------------


class TestMode:
    def test_default_mode_is_0600(self, sock_path, serve):
        """By default only the owner may connect."""
        with umask(0o000):
            serve()
        assert perms(sock_path) == 0o600
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)

    @pytest.mark.parametrize("mask", [0o022, 0o077, 0o000], ids=lambda m: f"umask{m:03o}")
    @pytest.mark.parametrize("mode", [0o660, 0o640, 0o666, 0o600, 0o700, 0o000], ids=lambda m: f"mode{m:03o}")
    def test_configured_mode_is_exact_whatever_the_umask(self, sock_path, serve, mode, mask):
        """mode= is honoured exactly: neither narrowed by the umask nor widened."""
        with umask(mask):
            server = serve(mode=mode)
            assert os.umask(mask) == mask  # the library left the process umask alone
        assert perms(sock_path) == mode
        assert server.config.mode == mode
        if mode & 0o600 == 0o600:
            assert roundtrip(sock_path) == b"ping"

    def test_mode_given_through_config(self, sock_path, serve):
        """ServerConfig(mode=...) works like the keyword."""
        with umask(0o077):
            serve(config=pyuds.ServerConfig(mode=0o660))
        assert perms(sock_path) == 0o660

    def test_mode_never_wider_than_asked(self, sock_path):
        """While servers are created and shut down 200 times (mode 0o600, umask 0o000, so a
        bind-then-chmod implementation would briefly show 0o777), a thread polling lstat()
        never sees the socket file with any permission beyond 0o600."""

        def cycle(i: int) -> None:
            server = pyuds.Server(sock_path, mode=0o600)
            if i % 10 == 0:
                server.start()
            server.shutdown(timeout=TIMEOUT)
            assert not os.path.lexists(sock_path)

        with umask(0o000):
            seen = _watch_modes(sock_path, cycle, 200)
        assert seen, "the watcher never saw the socket file: the test proves nothing"
        wider = {oct(m): n for m, n in seen.items() if m & ~0o600}
        assert not wider, f"socket file seen with modes wider than 0o600: {wider}"

    def test_watcher_catches_bind_then_chmod(self, sock_path):
        """Control for the test above: the same watcher does see the 0o777 instant of a plain
        bind() followed by chmod(0o600) under umask 0o000."""
        caught = threading.Event()

        def cycle(i: int) -> None:
            if caught.is_set():
                return
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(sock_path)
                os.chmod(sock_path, 0o600)
            os.unlink(sock_path)

        with umask(0o000):
            seen = _watch_modes(sock_path, cycle, 5000, caught=caught, catch=0o777)
        assert 0o777 in seen, f"watcher saw only {[oct(m) for m in seen]}"


def _watch_modes(path: str, cycle, times: int, caught: threading.Event | None = None,
                 catch: int | None = None) -> dict[int, int]:
    """Runs cycle(i) times times while a thread polls lstat(path) as fast as it can; returns
    how often each permission mode was seen. Sets caught once mode catch is seen."""
    seen: dict[int, int] = {}
    stop = threading.Event()

    def watch() -> None:
        lstat, S_IMODE = os.lstat, stat.S_IMODE
        while not stop.is_set():
            try:
                m = S_IMODE(lstat(path).st_mode)
            except FileNotFoundError:
                continue
            seen[m] = seen.get(m, 0) + 1
            if m == catch and caught is not None:
                caught.set()

    watcher = threading.Thread(target=watch, name="mode watcher", daemon=True)
    watcher.start()
    try:
        for i in range(times):
            cycle(i)
    finally:
        stop.set()
        watcher.join(TIMEOUT)
    return seen


# ---- the end: shutdown and the socket file ------------------------------------------------------


def _serve_in_thread(server: pyuds.Server) -> threading.Thread:
    """Runs serve_forever() in a thread of the test's own; returns once it is serving."""
    thread = threading.Thread(target=server.serve_forever, name="test serve_forever", daemon=True)
    thread.start()
    wait_until(lambda: server.serving or not thread.is_alive())
    assert server.serving
    return thread


class TestSocketFileRemoval:
    def test_removed_at_shutdown(self, sock_path):
        """shutdown() removes the socket file; the server reports itself closed."""
        server = pyuds.Server(sock_path)
        server.start()
        assert roundtrip(sock_path) == b"ping"
        server.shutdown(timeout=TIMEOUT)
        assert not os.path.lexists(sock_path)
        assert server.closed and not server.serving
        server.shutdown(timeout=TIMEOUT)  # again: harmless
        assert server.closed

    def test_replaced_file_is_not_removed(self, sock_path):
        """If the socket file was replaced while the server ran (here by a regular file),
        shutdown() leaves the newcomer alone."""
        server = pyuds.Server(sock_path)
        try:
            server.start()
            assert roundtrip(sock_path) == b"ping"
            os.unlink(sock_path)
            with open(sock_path, "wb") as f:
                f.write(b"someone else's file")
        finally:
            server.shutdown(timeout=TIMEOUT)
        assert os.path.isfile(sock_path)
        with open(sock_path, "rb") as f:
            assert f.read() == b"someone else's file"

    def test_replaced_by_another_server_is_not_removed(self, sock_path, serve):
        """If another server took the path meanwhile, shutting the first one down neither
        removes the second one's file nor stops it from serving."""
        first = serve(lambda c, m: b"first")
        os.unlink(sock_path)  # e.g. a careless deploy script
        serve(lambda c, m: b"second")
        ino = os.lstat(sock_path).st_ino
        first.shutdown(timeout=TIMEOUT)
        assert is_socket(sock_path) and os.lstat(sock_path).st_ino == ino
        assert roundtrip(sock_path) == b"second"

    def test_never_served_server_removes_file_at_shutdown(self, sock_path):
        """A Server constructed (so bound and listening) but never served: shutdown() removes
        the file and the server cannot be started afterwards."""
        server = pyuds.Server(sock_path)
        assert is_socket(sock_path) and not server.serving and not server.closed
        server.shutdown()
        assert not os.path.lexists(sock_path)
        assert server.closed
        with pytest.raises(RuntimeError):
            server.start()
        with pytest.raises(RuntimeError):
            server.serve_forever()

    def test_context_manager_removes_file(self, sock_path):
        """`with Server(...) as s: s.start()` serves inside the block and cleans up at exit."""
        with pyuds.Server(sock_path) as server:
            server.start()
            assert server.serving
            assert roundtrip(sock_path, b"inside") == b"inside"
        assert not os.path.lexists(sock_path)
        assert server.closed
        assert pyuds_threads() == []

    def test_context_manager_without_start_removes_file(self, sock_path):
        with pyuds.Server(sock_path) as server:
            assert is_socket(sock_path)
        assert not os.path.lexists(sock_path)
        assert server.closed

    def test_context_manager_cleans_up_on_exception(self, sock_path):
        """An exception in the with block still shuts the server down, then propagates."""
        with pytest.raises(KeyError):
            with pyuds.Server(sock_path) as server:
                server.start()
                raise KeyError("boom")
        assert not os.path.lexists(sock_path)
        assert server.closed
        assert pyuds_threads() == []


class TestShutdown:
    def test_shutdown_from_another_thread_stops_serve_forever(self, sock_path):
        """serve_forever() in a thread; shutdown() from the main thread returns once the
        server is done, and serve_forever() returns."""
        server = pyuds.Server(sock_path)
        thread = _serve_in_thread(server)
        try:
            assert roundtrip(sock_path) == b"ping"
            t0 = time.monotonic()
            server.shutdown(timeout=TIMEOUT)
            assert time.monotonic() - t0 < 10.0  # it finished: it did not wait out a timeout
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "serve_forever() did not return"
            assert server.closed
            assert not os.path.lexists(sock_path)
        finally:
            server.shutdown(timeout=TIMEOUT)
            thread.join(TIMEOUT)

    def test_shutdown_from_inside_a_handler(self, sock_path):
        """A handler may call server.shutdown(): it returns at once, the reply to that very
        request still reaches the client, then the connection ends and serve_forever() returns."""
        took: list[float] = []

        def handler(client, message):
            if message == b"stop":
                t0 = time.monotonic()
                server.shutdown()
                took.append(time.monotonic() - t0)
                return b"stopping"
            return message

        server = pyuds.Server(sock_path, handler)
        thread = _serve_in_thread(server)
        try:
            with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
                assert conn.request(b"hi") == b"hi"
                assert conn.request(b"stop") == b"stopping"
                with pytest.raises(pyuds.ConnectionClosedError):
                    conn.recv()
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "serve_forever() did not return"
            assert took and took[0] < 5.0, took  # returned: it did not wait for its own loop
            assert server.closed
            assert not os.path.lexists(sock_path)
        finally:
            server.shutdown(timeout=TIMEOUT)
            thread.join(TIMEOUT)

    def test_shutdown_from_inside_a_handler_with_start(self, sock_path):
        """The same with start(): the background thread ends by itself."""
        def handler(client, message):
            server.shutdown()
            return b"bye"

        server = pyuds.Server(sock_path, handler)
        server.start()
        try:
            assert roundtrip(sock_path, b"stop") == b"bye"
            wait_until(lambda: server.closed and not pyuds_threads())
            assert not os.path.lexists(sock_path)
        finally:
            server.shutdown(timeout=TIMEOUT)

    def test_repeated_start_shutdown_leaks_nothing(self, sock_path):
        """20 servers in a row, each started, asked one request with a client still connected
        at shutdown: afterwards no extra file descriptor and no extra thread."""
        base_fds = open_fds()
        base_threads = threading.active_count()
        for i in range(20):
            server = pyuds.Server(sock_path)
            server.start()
            conn = pyuds.connect(sock_path, timeout=TIMEOUT)
            try:
                assert conn.request(b"n%d" % i) == b"n%d" % i
                server.shutdown(timeout=TIMEOUT)
                assert server.closed
                with pytest.raises(pyuds.ConnectionClosedError):
                    conn.recv()
            finally:
                conn.close()
                server.shutdown(timeout=TIMEOUT)
            assert not os.path.lexists(sock_path)
        assert pyuds_threads() == []
        assert threading.active_count() == base_threads
        extra = open_fds() - base_fds
        assert not extra, {fd: _fd_target(fd) for fd in extra}

    def test_idle_servers_leak_nothing(self, sock_path):
        """Constructed and shut down without serving, 50 times: no descriptor left over."""
        base_fds = open_fds()
        for _ in range(50):
            pyuds.Server(sock_path).shutdown()
        extra = open_fds() - base_fds
        assert not extra, {fd: _fd_target(fd) for fd in extra}


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class TestShutdownWithClients:
    def test_every_connected_client_sees_eof(self, sock_path, serve):
        """Clients connected at shutdown, busy or idle, each see the connection end."""
        server = serve()
        conns = [pyuds.connect(sock_path, timeout=TIMEOUT) for _ in range(8)]
        try:
            for i, conn in enumerate(conns[:4]):  # half of them have talked, half are idle
                assert conn.request(b"c%d" % i) == b"c%d" % i
            wait_until(lambda: len(server.clients) == 8)
            server.shutdown(timeout=TIMEOUT)
            for conn in conns:
                with pytest.raises(pyuds.ConnectionClosedError):
                    conn.recv()
            assert len(server.clients) == 0
        finally:
            for conn in conns:
                conn.close()

    def test_disconnect_reason_is_shutdown(self, sock_path, serve):
        """on_disconnect sees CloseReason.SHUTDOWN for each client closed by shutdown()."""
        reasons = []
        server = serve(on_disconnect=lambda c, r: reasons.append(r))
        conns = [pyuds.connect(sock_path, timeout=TIMEOUT) for _ in range(3)]
        try:
            for conn in conns:
                assert conn.request(b"x") == b"x"
            server.shutdown(timeout=TIMEOUT)
            assert reasons == [pyuds.CloseReason.SHUTDOWN] * 3
        finally:
            for conn in conns:
                conn.close()

    def test_received_requests_are_answered_before_close(self, sock_path, serve):
        """200 pipelined requests, all received by the server (sent in one write; the first
        is in the handler) when shutdown() is called from another thread, with a small batch
        size so most of them are still waiting in the server's input buffer: every one is
        answered, in order, then the client sees EOF."""
        first, go = threading.Event(), threading.Event()

        def handler(client, message):
            if not first.is_set():
                first.set()
                go.wait(TIMEOUT)
            return b"re:" + message

        server = serve(handler, batch_size=8)
        n = 200
        requests = [b"req %d" % i for i in range(n)]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(sock_path)
        with pyuds.Connection(sock) as conn:
            sock.sendall(b"".join(len(r).to_bytes(4, "big") + r for r in requests))  # one write
            assert first.wait(TIMEOUT)
            stopper = threading.Thread(target=server.shutdown, kwargs={"timeout": TIMEOUT})
            stopper.start()
            time.sleep(0.1)  # let shutdown() ask the loop to stop while the handler is busy
            go.set()
            replies = read_until_eof(conn)
            stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert replies == [b"re:" + r for r in requests]
        assert server.closed and not os.path.lexists(sock_path)

    def test_pipelined_requests_then_immediate_shutdown(self, sock_path, serve):
        """200 pipelined requests, shutdown() called right away from another thread: whatever
        the client gets is correct and in order (replies to a prefix of its requests), and it
        sees the connection end. Requests the server had not read yet get no reply.

        When the server did leave requests unread (it depends on timing), the end is an
        ECONNRESET rather than an EOF: accepted here, shown as a bug deterministically in
        test_unread_requests_at_shutdown_give_eof."""
        server = serve(lambda c, m: b"re:" + m)
        n = 200
        requests = [b"req %d" % i for i in range(n)]
        with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
            assert conn.request(b"warm") == b"re:warm"
            for r in requests:
                conn.send(r)
            stopper = threading.Thread(target=server.shutdown, kwargs={"timeout": TIMEOUT})
            stopper.start()
            replies = read_until_eof(conn, allow_reset=True)
            stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert replies == [b"re:" + r for r in requests[: len(replies)]]
        assert server.closed and not os.path.lexists(sock_path)


# ---- races and resets ---------------------------------------------------------------------------


def test_unread_requests_at_shutdown_give_eof(sock_path, serve):
    """A client that sent more requests while the server was busy with an earlier one, which
    ended in shutdown(): the requests it sent before the shutdown still get their replies
    (the server drains what waits in the socket), in order, then a clean end of connection
    (ConnectionClosedError), not a connection reset."""
    busy, go = threading.Event(), threading.Event()

    def handler(client, message):
        if message == b"hold":
            busy.set()
            go.wait(TIMEOUT)
            server.shutdown()  # from inside the handler: the loop stops after this batch
            return b"held"
        return b"re:" + message

    server = serve(handler)
    with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
        conn.send(b"hold")
        assert busy.wait(TIMEOUT)
        for i in range(20):  # the loop is inside the handler: these wait in the kernel
            conn.send(b"late %d" % i)
        go.set()
        assert conn.recv() == b"held"
        assert [conn.recv() for _ in range(20)] == [b"re:late %d" % i for i in range(20)]
        with pytest.raises(pyuds.ConnectionClosedError):
            conn.recv()
    wait_until(lambda: server.closed)


@pytest.mark.parametrize("stale", [False, True], ids=["free-path", "stale-file"])
def test_simultaneous_starts_have_one_winner(sock_path, stale):
    """Several threads construct a Server on the same path at the same moment, the path free or
    holding a crashed server's socket file: exactly one succeeds, and it is the server a client
    reaches at the path; every other one gets AddressInUseError (never a silently orphaned
    server, listening on a file another starter removed as stale). Repeated for many rounds,
    stopping at the first round with two winners."""
    threads_per_round, rounds, deadline = 8, 500, time.monotonic() + 6.0
    for round_no in range(rounds):
        if stale:
            stale_socket(sock_path)
        barrier = threading.Barrier(threads_per_round)
        winners: list[pyuds.Server] = []
        unexpected: list[BaseException] = []
        lock = threading.Lock()

        def attempt() -> None:
            barrier.wait(TIMEOUT)
            try:
                server = pyuds.Server(sock_path, pyuds.echo)
            except pyuds.AddressInUseError:
                return
            except BaseException as exc:  # reported below
                with lock:
                    unexpected.append(exc)
                return
            with lock:
                winners.append(server)

        threads = [threading.Thread(target=attempt) for _ in range(threads_per_round)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        try:
            assert not unexpected, f"round {round_no}: {unexpected!r}"
            assert len(winners) == 1, (
                f"round {round_no}: {len(winners)} of {threads_per_round} simultaneous Server() calls "
                f"on one path succeeded; only one of them owns the socket file")
            winners[0].start()
            assert roundtrip(sock_path, b"round %d" % round_no) == b"round %d" % round_no
        finally:
            for server in winners:
                server.shutdown(timeout=TIMEOUT)
            if os.path.lexists(sock_path):
                os.unlink(sock_path)
        if time.monotonic() > deadline:
            break


def test_dropped_server_is_cleaned_up_with_a_warning(sock_path):
    """A Server dropped without shutdown() closes its descriptors and removes its socket file
    when collected, with a ResourceWarning (as an unclosed socket does)."""
    import gc

    before = open_fds()
    server = pyuds.Server(sock_path)
    assert os.path.exists(sock_path)
    with pytest.warns(ResourceWarning, match="unclosed pyuds.Server"):
        del server
        gc.collect()
    assert not os.path.lexists(sock_path)
    assert open_fds() == before
