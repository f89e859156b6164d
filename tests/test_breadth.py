"""Unix-socket breadth on the server side: SEQPACKET servers, abstract names, peer-credential
policy, file descriptors passed with messages, and sockets handed to the server (inherited,
or by systemd socket activation). Real sockets and processes; raw client sockets, so that
what is checked is what goes over the wire."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

import pyuds
from conftest import connect_when_listening, is_socket, open_fds, wait_until

TIMEOUT = 10.0


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def stream_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", recv_exactly(sock, 4))
    return recv_exactly(sock, n)


def recv_frame_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One u32 frame and the descriptors that came with its first bytes (server to client)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 4, 16, socket.MSG_CMSG_CLOEXEC)
    data += recv_exactly(sock, 4 - len(data))
    (n,) = struct.unpack(">I", data)
    return recv_exactly(sock, n), list(fds)


def abstract_name() -> str:
    return f"@pyuds-test-{uuid.uuid4().hex}"


def at(name: str) -> str:
    """A "@name" as Python's socket module takes it."""
    return "\0" + name[1:]


# ---- abstract namespace ----------------------------------------------------------------------


class TestAbstract:
    def test_round_trip_and_no_file(self, serve, sockdir):
        name = abstract_name()
        before = set(os.listdir(sockdir)), set(os.listdir("."))
        server = serve(path=name)
        assert server.path == name
        with stream_client(at(name)) as sock:
            sock.sendall(frame(b"hello"))
            assert recv_frame(sock) == b"hello"
        server.shutdown()
        assert (set(os.listdir(sockdir)), set(os.listdir("."))) == before
        # The name is free again once the server is gone.
        with pytest.raises(ConnectionRefusedError):
            stream_client(at(name))

    def test_name_in_use(self, serve):
        name = abstract_name()
        serve(path=name)
        with pytest.raises(pyuds.AddressInUseError):
            pyuds.Server(name)

    def test_longest_name(self, serve):
        name = "@" + "n" * 107  # sun_path's 108 bytes: the leading NUL and 107 of name
        serve(path=name)
        with stream_client(at(name)) as sock:
            sock.sendall(frame(b"x"))
            assert recv_frame(sock) == b"x"
        with pytest.raises(pyuds.PathTooLongError):
            pyuds.Server(name + "n")


# ---- SEQPACKET -------------------------------------------------------------------------------


def packet_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


class TestSeqpacket:
    def test_hundred_clients_boundaries_kept(self, serve, sock_path):
        seen = []
        server = serve(lambda client, message: seen.append(len(message)) or message[::-1], kind="seqpacket")
        clients = [packet_client(sock_path) for _ in range(100)]
        try:
            # Several packets in flight per client, sizes that would run together on a stream.
            for i, sock in enumerate(clients):
                for k in range(5):
                    sock.send(bytes([i % 256]) * (k * 7) + b"%d" % k)
            for i, sock in enumerate(clients):
                for k in range(5):
                    assert sock.recv(65536) == (bytes([i % 256]) * (k * 7) + b"%d" % k)[::-1]
        finally:
            for sock in clients:
                sock.close()
        assert len(seen) == 500
        wait_until(lambda: server.stats()["connections_current"] == 0)

    def test_empty_packet_is_a_message_not_end_of_file(self, serve, sock_path):
        got = []
        serve(lambda client, message: got.append(message) or b"[" + message + b"]", kind="seqpacket")
        with packet_client(sock_path) as sock:
            sock.send(b"")
            assert sock.recv(100) == b"[]"
            sock.send(b"after")
            assert sock.recv(100) == b"[after]"
        assert got == [b"", b"after"]

    def test_large_packets_spill_and_arrive_whole(self, serve, sock_path):
        serve(kind="seqpacket", max_message_size=1 << 20)
        with packet_client(sock_path) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            for size in (0, 1, 65535, 65536, 65537, 150_000):
                payload = os.urandom(size)
                sock.send(payload)
                assert sock.recv(1 << 20) == payload

    def test_too_large_closes_only_that_client(self, serve, sock_path, caplog):
        server = serve(kind="seqpacket", max_message_size=1000)
        with packet_client(sock_path) as good, packet_client(sock_path) as bad:
            bad.send(b"first")
            bad.send(b"x" * 1001)
            assert bad.recv(2000) == b"first"  # owed before the bad packet: still answered
            assert bad.recv(2000) == b""       # then closed
            good.send(b"y" * 1000)
            assert good.recv(2000) == b"y" * 1000
        wait_until(lambda: server.stats()["closed"]["too_large"] == 1)
        # (C counts the close before the loop's Python side hears of it and logs it)
        wait_until(lambda: "larger than max_message_size" in caplog.text)
        assert "larger than max_message_size" in caplog.text

    def test_stream_client_is_refused_by_type(self, serve, sock_path):
        serve(kind="seqpacket")
        with pytest.raises(OSError) as info:
            stream_client(sock_path)
        assert info.value.errno == errno.EPROTOTYPE

    @pytest.mark.parametrize("kind, framing", [("seqpacket", "line"), ("datagram", "raw")])
    def test_a_framing_with_a_packet_kind_is_an_error(self, sock_path, kind, framing):
        """A packet keeps its boundaries: asking for a stream framing is a mistake, said at once
        (and nothing is made at the path)."""
        with pytest.raises(ValueError, match="framing applies to kind='stream' only"):
            pyuds.Server(sock_path, kind=kind, framing=framing)
        with pytest.raises(ValueError, match="framing applies to kind='stream' only"):
            pyuds.ServerConfig(kind=kind, framing=framing)
        assert not os.path.exists(sock_path)


# ---- peer credentials ------------------------------------------------------------------------


class TestCredentials:
    def test_allowed_uid_is_served(self, serve, sock_path):
        server = serve(allow_uid=[os.getuid()])
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"in"))
            assert recv_frame(sock) == b"in"
        assert server.stats()["closed"]["unauthorized"] == 0

    def test_other_uid_is_refused_before_any_handler(self, serve, sock_path, caplog):
        events = []
        server = serve(lambda c, m: events.append("message"), allow_uid=[os.getuid() + 1],
                       on_connect=lambda c: events.append("connect"))
        with caplog.at_level(logging.WARNING, logger="pyuds"):
            with stream_client(sock_path) as sock:
                assert sock.recv(10) == b""
            wait_until(lambda: server.stats()["closed"]["unauthorized"] == 1)
            # (C counts the refusal at accept; the loop's Python side logs it after the poll)
            wait_until(lambda: "not in allow_uid / allow_gid" in caplog.text)
        assert events == []
        assert server.clients == {}
        assert "not in allow_uid / allow_gid" in caplog.text
        assert server.stats()["connections_accepted"] == 0

    def test_primary_gid_allows(self, serve, sock_path):
        serve(allow_uid=[os.getuid() + 1], allow_gid=[os.getgid()])
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"group"))
            assert recv_frame(sock) == b"group"

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
    def test_child_with_another_uid(self, serve, sock_path):
        """A forked child drops to uid/gid 65534 and connects: refused by a uid policy that
        names only root; served once its gid is allowed."""
        os.chmod(os.path.dirname(sock_path), 0o755)

        def child_result(mode: int) -> str:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: drop privileges, connect, report, exit
                try:
                    os.close(r)
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    with stream_client(sock_path) as sock:
                        try:
                            sock.sendall(frame(b"nobody"))
                            answer = recv_frame(sock)
                        except (EOFError, BrokenPipeError, ConnectionResetError):
                            answer = b"refused"
                    os.write(w, answer)
                finally:
                    os._exit(0)
            os.close(w)
            try:
                with os.fdopen(r, "rb") as f:
                    return f.read().decode()
            finally:
                os.waitpid(pid, 0)

        server = serve(mode=0o666, allow_uid=[0])
        assert child_result(0) == "refused"
        assert server.stats()["closed"]["unauthorized"] == 1
        server.shutdown()
        serve(mode=0o666, allow_uid=[0], allow_gid=[65534])
        assert child_result(0) == "nobody"

    def test_authorize_hook(self, serve, sock_path):
        order = []

        def authorize(client):
            order.append(("authorize", client.uid == os.getuid(), client.pid == os.getpid()))
            return len(order) > 1  # refuse the first client only

        server = serve(authorize=authorize, on_connect=lambda c: order.append(("connect",)),
                       on_disconnect=lambda c, r: order.append(("disconnect", str(r))))
        with stream_client(sock_path) as first:
            assert first.recv(10) == b""
        with stream_client(sock_path) as second:
            second.sendall(frame(b"ok"))
            assert recv_frame(second) == b"ok"
        wait_until(lambda: len(order) == 4)
        assert order == [("authorize", True, True), ("authorize", True, True), ("connect",),
                         ("disconnect", "peer")]
        assert server.stats()["closed"]["unauthorized"] == 1

    def test_authorize_fails_closed(self, serve, sock_path):
        """Only a true value admits: a hook that returns nothing refuses, and one that raises
        refuses (counted as a handler error); neither reaches on_connect or the handler."""
        verdicts = iter([None, 0, RuntimeError("policy store down"), "yes"])
        connected = []

        def authorize(client):
            verdict = next(verdicts)
            if isinstance(verdict, Exception):
                raise verdict
            return verdict

        server = serve(authorize=authorize, on_connect=connected.append)
        for _ in range(3):
            with stream_client(sock_path) as sock:
                assert sock.recv(10) == b""
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"admitted"))
            assert recv_frame(sock) == b"admitted"
        assert len(connected) == 1
        closed = server.stats()["closed"]
        assert (closed["unauthorized"], closed["handler_error"]) == (2, 1)


# ---- file descriptors ------------------------------------------------------------------------


class TestFds:
    def test_pipe_passed_to_server_is_used_there(self, serve, sock_path):
        def handler(client, message):
            for fd in client.take_fds():
                with os.fdopen(fd, "wb") as f:
                    f.write(b"written by the server: " + message)
            return b"done"

        serve(handler)
        r, w = os.pipe()
        with stream_client(sock_path) as sock, os.fdopen(r, "rb") as pipe:
            socket.send_fds(sock, [frame(b"hi")], [w])
            os.close(w)
            assert recv_frame(sock) == b"done"
            assert pipe.read() == b"written by the server: hi"  # EOF: the server closed its copy

    def test_fds_not_taken_are_closed(self, serve, sock_path):
        fd_flags = []

        def handler(client, message):
            fd_flags.append([fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in client._fds or ()])
            return message  # takes none

        server = serve(handler)
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"warm up"))
            recv_frame(sock)
            baseline = open_fds()
            r, w = os.pipe()
            for _ in range(20):
                socket.send_fds(sock, [frame(b"fds")], [r, w, r])
                assert recv_frame(sock) == b"fds"
            os.close(r)
            os.close(w)
            wait_until(lambda: server.stats()["fds_received"] == 60)
            assert open_fds() == baseline
        assert fd_flags[1:] == [[1, 1, 1]] * 20  # close-on-exec, all of them

    def test_fds_go_with_the_message_whose_last_read_byte_brought_them(self, serve, sock_path):
        """A then B (with fds), sent back to back so that they may arrive in one read: the fds
        are B's."""
        got = []

        def handler(client, message):
            fds = client.take_fds()
            got.append((message, len(fds)))
            for fd in fds:
                os.close(fd)
            return message

        serve(handler)
        r, w = os.pipe()
        with stream_client(sock_path) as sock:
            for i in range(50):
                sock.sendall(frame(b"A%d" % i))
                socket.send_fds(sock, [frame(b"B%d" % i)], [r, w])
                assert recv_frame(sock) == b"A%d" % i
                assert recv_frame(sock) == b"B%d" % i
        os.close(r)
        os.close(w)
        assert got == [x for i in range(50) for x in ((b"A%d" % i, 0), (b"B%d" % i, 2))]

    def test_fds_arriving_before_the_message_completes(self, serve, sock_path):
        got = []

        def handler(client, message):
            fds = client.take_fds()
            got.append(len(fds))
            for fd in fds:
                os.close(fd)

        server = serve(handler)
        r, w = os.pipe()
        with stream_client(sock_path) as sock:
            data = frame(b"p" * 100_000)
            socket.send_fds(sock, [data[:10]], [r])
            time.sleep(0.05)
            sock.sendall(data[10:])
            wait_until(lambda: got == [1])
            sock.sendall(frame(b"no fds"))
            wait_until(lambda: got == [1, 0])
        os.close(r)
        os.close(w)
        assert server.stats()["closed"]["too_many_fds"] == 0

    def test_more_than_max_fds_closes_only_that_client(self, serve, sock_path, caplog):
        server = serve(max_fds=2)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
        try:
            with stream_client(sock_path) as good, stream_client(sock_path) as bad:
                bad.sendall(frame(b"before"))
                assert recv_frame(bad) == b"before"
                socket.send_fds(bad, [frame(b"three")], fds)  # the kernel cuts it: MSG_CTRUNC
                assert bad.recv(10) == b""
                socket.send_fds(good, [frame(b"two")], fds[:2])
                assert recv_frame(good) == b"two"
        finally:
            for fd in fds:
                os.close(fd)
        wait_until(lambda: server.stats()["closed"]["too_many_fds"] == 1)
        wait_until(lambda: "more file descriptors" in caplog.text)  # logged after C counts it
        assert "more file descriptors" in caplog.text

    def test_over_the_limit_across_reads(self, serve, sock_path):
        """Two sends that each fit, both for one message: together over max_fds."""
        server = serve(max_fds=2)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
        try:
            with stream_client(sock_path) as sock:
                data = frame(b"m" * 1000)
                socket.send_fds(sock, [data[:100]], fds)
                time.sleep(0.05)
                socket.send_fds(sock, [data[100:]], fds)
                assert sock.recv(10) == b""
        finally:
            for fd in fds:
                os.close(fd)
        wait_until(lambda: server.stats()["closed"]["too_many_fds"] == 1)

    def test_server_sends_fds(self, serve, sock_path):
        r, w = os.pipe()

        def handler(client, message):
            client.send(b"take this", fds=[w])  # a reply with fds: send it, return None
            return b"and a plain reply"

        serve(handler)
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"give"))
            message, fds = recv_frame_fds(sock)
            assert message == b"take this" and len(fds) == 1
            assert recv_frame(sock) == b"and a plain reply"
            os.close(w)
            with os.fdopen(fds[0], "wb") as f:
                f.write(b"through the passed pipe")
            with os.fdopen(r, "rb") as f:
                assert f.read() == b"through the passed pipe"

    @pytest.mark.parametrize("framing", ["u32", "line", "raw"])
    def test_sent_fds_stay_with_their_message(self, serve, sock_path, framing):
        """Messages with descriptors among plain ones, all queued before the client reads:
        each send that carries descriptors ends with their message, so a pyuds client gives
        them to that message, not to one after it that came in the same read."""
        r, w = os.pipe()

        def handler(client, message):
            client.send(b"first with one", fds=[r])
            client.send(b"plain")
            client.send(b"second with two", fds=[r, w])
            return b"reply"

        serve(handler, framing=framing)
        try:
            for _ in range(20):
                with pyuds.connect(sock_path, framing, timeout=TIMEOUT) as conn:
                    conn.send(b"go")
                    time.sleep(0.02)  # all four wait in the client's socket before it reads
                    got = []
                    while sum(len(m) for m, _ in got) < len(b"first with oneplainsecond with tworeply"):
                        message, fds = conn.recv_fds()
                        got.append((message, len(fds)))
                        pyuds._client.close_fds(fds)
                    if framing != "raw":
                        assert got == [(b"first with one", 1), (b"plain", 0), (b"second with two", 2),
                                       (b"reply", 0)]
                        continue
                    # Raw: messages are reads. A read that brings descriptors ends with their
                    # message (earlier plain bytes may lead it), so the reply is never in it.
                    assert b"".join(m for m, _ in got) == b"first with oneplainsecond with tworeply"
                    (first, one), (second, two) = [(m, n) for m, n in got if n]
                    assert (first, one) == (b"first with one", 1)
                    assert second.endswith(b"second with two") and two == 2
        finally:
            os.close(r)
            os.close(w)

    def test_send_fds_from_another_thread(self, serve, sock_path):
        server = serve()
        with stream_client(sock_path) as sock:
            sock.sendall(frame(b"hello"))
            recv_frame(sock)
            client = next(iter(server.clients.values()))
            r, w = os.pipe()
            client.send(b"pushed", fds=[r])
            os.close(r)  # the caller's own copy: the server duplicated it
            message, fds = recv_frame_fds(sock)
            assert message == b"pushed" and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"
            os.close(fds[0])
            os.close(w)
            with pytest.raises(ValueError):
                client.send(b"x", fds=[0] * 254)

    def test_seqpacket_fds(self, serve, sock_path):
        def handler(client, message):
            fds = client.take_fds()
            for fd in fds:
                os.write(fd, message)
                os.close(fd)
            return b"%d" % len(fds)

        serve(handler, kind="seqpacket")
        r, w = os.pipe()
        with packet_client(sock_path) as sock:
            socket.send_fds(sock, [b""], [w])  # a packet of no bytes can carry fds
            assert sock.recv(10) == b"1"
            socket.send_fds(sock, [b"abc"], [w])
            assert sock.recv(10) == b"1"
            sock.send(b"none")
            assert sock.recv(10) == b"0"
        os.close(w)
        assert os.read(r, 10) == b"abc"
        os.close(r)


# ---- sockets handed to the server ------------------------------------------------------------


def bound_socket(path: str, kind: int = socket.SOCK_STREAM, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    if listen:
        sock.listen(16)
    return sock


class TestInherited:
    @pytest.mark.parametrize("as_fd", [False, True], ids=["socket", "fd"])
    def test_serves_and_survives_shutdown(self, sock_path, as_fd):
        own = bound_socket(sock_path)
        try:
            server = pyuds.Server(sock=own.fileno() if as_fd else own)
            assert server.path == sock_path
            server.start()
            with stream_client(sock_path) as sock:
                sock.sendall(frame(b"inherited"))
                assert recv_frame(sock) == b"inherited"
            server.shutdown()
            # Still the owner's: the file is there, and the socket still listens and blocks.
            assert is_socket(sock_path)
            assert own.gettimeout() is None and os.get_blocking(own.fileno())
            late = stream_client(sock_path)  # queued in the backlog of the socket that lives on
            # ... and a new server takes over where the last one stopped.
            with pyuds.Server(sock=own) as again:
                again.start()
                late.sendall(frame(b"again"))
                assert recv_frame(late) == b"again"
            late.close()
        finally:
            own.close()

    def test_bound_but_not_listening(self, sock_path):
        own = bound_socket(sock_path, listen=False)
        with own, pyuds.Server(sock=own) as server:
            server.start()
            with stream_client(sock_path) as sock:
                sock.sendall(frame(b"x"))
                assert recv_frame(sock) == b"x"

    def test_wrong_sockets_are_refused_clearly(self, sock_path, sockdir):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
            with pytest.raises(OSError, match="not bound"):
                pyuds.Server(sock=unbound)
        with bound_socket(sock_path, socket.SOCK_SEQPACKET) as packets:
            with pytest.raises(OSError, match="not a stream socket"):
                pyuds.Server(sock=packets)
            pyuds.Server(sock=packets, kind="seqpacket").shutdown()
        # An internet socket is served over TCP: it must be a bound TCP one.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
            with pytest.raises(OSError, match="not bound"):
                pyuds.Server(sock=inet)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            with pytest.raises(OSError, match="not a TCP socket"):
                pyuds.Server(sock=udp)
        with open(os.path.join(sockdir, "file"), "w") as f:
            with pytest.raises(OSError, match="not a socket"):
                pyuds.Server(sock=f.fileno())
        with pytest.raises(TypeError):
            pyuds.Server(sock_path, sock=3)
        # An accepted connection (what systemd passes with Accept=yes): bound, but connected.
        listening = bound_socket(os.path.join(sockdir, "l.sock"))
        with listening, stream_client(os.path.join(sockdir, "l.sock")):
            accepted, _ = listening.accept()
            with accepted, pytest.raises(OSError, match="connected socket"):
                pyuds.Server(sock=accepted)


# ---- systemd socket activation ---------------------------------------------------------------

NEUTRAL_CWD = os.path.dirname(os.path.abspath(__file__))


LAUNCH = """
import os, sys
fds, args = [int(fd) for fd in sys.argv[1].split(",")], sys.argv[2:]
high = [os.dup(fd) for fd in fds]  # out of the way of 3, 4, ... first
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)  # (dup2 onto itself keeps dup's close-on-exec)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, "-m", "pyuds", "serve", *args])
"""


def activated_serve(fds: list[int], env: dict[str, str], *args: str) -> subprocess.Popen:
    """`pyuds serve` as systemd starts it: the sockets as fds 3, 4, ... and LISTEN_PID set to the
    process's own pid (known only once it runs: a launcher sets it, then execs pyuds)."""
    return subprocess.Popen([sys.executable, "-c", LAUNCH, ",".join(map(str, fds)), *args], cwd=NEUTRAL_CWD,
                            pass_fds=fds, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return err


class TestSocketActivation:
    def test_one_socket(self, sock_path):
        with bound_socket(sock_path) as own:
            proc = activated_serve([own.fileno()], {"LISTEN_FDS": "1"})
            try:
                with stream_client(sock_path) as sock:
                    sock.sendall(frame(b"activated"))
                    assert recv_frame(sock) == b"activated"
            finally:
                err = stop(proc)
            assert proc.returncode == 0, err
            assert f"serving on {sock_path}" in err
            assert is_socket(sock_path)  # systemd's socket: never removed

    def test_named_seqpacket_socket_among_several(self, sockdir):
        paths = [os.path.join(sockdir, n) for n in ("a.sock", "b.sock")]
        with bound_socket(paths[0]) as first, bound_socket(paths[1], socket.SOCK_SEQPACKET) as second:
            env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:data"}
            proc = activated_serve([first.fileno(), second.fileno()], env, "--fd-name", "data")
            try:
                with packet_client(paths[1]) as sock:  # the kind comes from the socket
                    sock.send(b"packet")
                    assert sock.recv(100) == b"packet"
            finally:
                err = stop(proc)
            assert proc.returncode == 0, err

            proc = activated_serve([first.fileno(), second.fileno()], env)
            _out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 1 and "choose one with --fd-name" in err

    def test_meant_for_another_process(self, sock_path):
        env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "pyuds", "serve", sock_path], cwd=NEUTRAL_CWD, env=env,
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            with connect_when_listening(sock_path) as sock:  # it made its own socket at the path
                sock.sendall(frame(b"own"))
                assert recv_frame(sock) == b"own"
        finally:
            err = stop(proc)
        assert f"listening on {sock_path}" in err


# ---- DATAGRAM --------------------------------------------------------------------------------


def dgram_client(bind: str | None = "") -> socket.socket:
    """A datagram socket bound to an address of its own ("": one Linux makes up; None: none)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    if bind is not None:
        sock.bind(bind)
    return sock


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used (user + system), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TestDatagram:
    def test_hundred_clients_a_handle_per_address(self, serve, sock_path):
        addresses = {}

        def handler(client, message):
            addresses.setdefault(client.id, client.address)
            assert client.pid == os.getpid() and client.uid == os.getuid()
            return message.upper()

        server = serve(handler, kind="datagram")
        clients = [dgram_client() for _ in range(100)]
        try:
            for k in range(3):
                for i, sock in enumerate(clients):
                    sock.sendto(b"c%d-m%d" % (i, k), sock_path)
            for i, sock in enumerate(clients):
                assert [sock.recv(100) for _ in range(3)] == [b"C%d-M%d" % (i, k) for k in range(3)]
            assert len(server.clients) == 100
            names = {"@" + s.getsockname()[1:].decode() for s in clients}
            assert set(addresses.values()) == names
            assert {c.address for c in server.clients.values()} == names
        finally:
            for sock in clients:
                sock.close()
        assert server.stats()["messages_in"] == 300

    def test_sender_without_address_is_heard_not_answered(self, serve, sock_path):
        seen = []

        def handler(client, message):
            seen.append((client.id, client.address, client.pid))
            if client.id == 0:
                try:
                    client.send(b"push")
                except pyuds.ClientClosedError as exc:
                    seen.append(str(exc))
            return b"a reply that cannot arrive"

        server = serve(handler, kind="datagram")
        with dgram_client(bind=None) as anon, dgram_client() as named:
            anon.sendto(b"who am I", sock_path)
            named.sendto(b"ping", sock_path)
            assert named.recv(100) == b"a reply that cannot arrive"
        wait_until(lambda: len(seen) == 3)
        assert seen[0] == (0, None, os.getpid()) and "no address" in seen[1]
        assert server.stats()["replies_unroutable"] == 1
        assert len(server.clients) == 1  # the anonymous sender is not a client

    def test_truncated_datagrams_counted_and_dropped(self, serve, sock_path):
        server = serve(kind="datagram", max_message_size=1000)
        with dgram_client() as sock:
            sock.sendto(b"x" * 1001, sock_path)
            sock.sendto(b"y" * 1000, sock_path)
            assert sock.recv(2000) == b"y" * 1000
        assert server.stats()["datagrams_truncated"] == 1

    def test_large_datagram_spills_past_the_arena(self, serve, sock_path):
        serve(kind="datagram", max_message_size=4 << 20)
        with dgram_client() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            payload = os.urandom(150_000)
            sock.sendto(payload, sock_path)
            assert sock.recv(1 << 20) == payload

    def test_full_peer_waits_without_spinning_and_loses_nothing(self, serve, sock_path):
        """A client that does not read: its queue fills, replies wait on the server (the loop
        does not spin meanwhile), and every reply arrives, in order, once it reads."""
        server = serve(kind="datagram")
        count = 3000
        with dgram_client() as sock:
            for i in range(count):
                sock.sendto(b"%06d" % i, sock_path)
            wait_until(lambda: server.stats()["messages_in"] == count)
            cpu = process_cpu(os.getpid())
            time.sleep(1.0)
            assert process_cpu(os.getpid()) - cpu < 0.3  # the test process holds the server thread
            got = [sock.recv(100) for _ in range(count)]
        assert got == [b"%06d" % i for i in range(count)]

    def test_peer_gone_ends_its_handle(self, serve, sock_path):
        reasons = []
        release = threading.Event()

        def handler(client, message):
            release.wait(TIMEOUT)  # the client closes before the reply leaves
            return message

        server = serve(handler, kind="datagram", on_disconnect=lambda c, r: reasons.append(r))
        sock = dgram_client()
        sock.sendto(b"bye", sock_path)
        wait_until(lambda: len(server.clients) == 1)
        sock.close()
        release.set()
        wait_until(lambda: reasons == [pyuds.CloseReason.PEER])

    def test_idle_peers_expire_and_the_table_is_bounded(self, serve, sock_path):
        reasons = []
        server = serve(kind="datagram", idle_timeout=0.3, max_connections=10,
                       on_disconnect=lambda c, r: reasons.append(str(r)))
        clients = [dgram_client() for _ in range(20)]
        try:
            for sock in clients:
                sock.sendto(b"x", sock_path)
                assert sock.recv(10) == b"x"
            assert len(server.clients) == 10
            assert reasons.count("evicted") == 10
            wait_until(lambda: len(server.clients) == 0, timeout=3)
            assert reasons.count("idle_timeout") == 10
        finally:
            for sock in clients:
                sock.close()

    def test_fds_with_datagrams(self, serve, sock_path):
        def handler(client, message):
            for fd in client.take_fds():
                os.write(fd, message)
                os.close(fd)
            return b"ok"

        server = serve(handler, kind="datagram")
        baseline = open_fds()
        r, w = os.pipe()
        with dgram_client() as sock:
            socket.socket.sendmsg(sock, [b"through a pipe"],
                                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))], 0, sock_path)
            assert sock.recv(10) == b"ok"
        os.close(w)
        assert os.read(r, 100) == b"through a pipe"
        os.close(r)
        assert open_fds() == baseline  # the server closed its copy
        assert server.stats()["fds_received"] == 1

    def test_uid_policy_drops_datagrams(self, serve, sock_path):
        server = serve(kind="datagram", allow_uid=[os.getuid() + 1])
        with dgram_client() as sock:
            sock.sendto(b"refused", sock_path)
            wait_until(lambda: server.stats()["datagrams_refused"] == 1)
        assert server.clients == {}

    def test_authorize_refuses_a_peer_until_it_expires(self, serve, sock_path):
        calls = []
        server = serve(kind="datagram", authorize=lambda c: calls.append(c.address) or False)
        with dgram_client() as sock:
            sock.sendto(b"knock", sock_path)
            wait_until(lambda: server.stats()["closed"]["unauthorized"] == 1)
            for _ in range(4):
                sock.sendto(b"knock", sock_path)
            wait_until(lambda: server.stats()["datagrams_refused"] == 4)
        assert len(calls) == 1  # asked once; the rest dropped in C
        assert server.stats()["closed"]["unauthorized"] == 1

    def test_shutdown_answers_what_was_already_sent(self, sock_path):
        # As many as the server's queue holds before senders must wait (net.unix.max_dgram_qlen).
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            count = min(int(f.read()), 200)
        server = pyuds.Server(sock_path, kind="datagram")
        with dgram_client() as sock:
            for i in range(count):
                sock.sendto(b"%d" % i, sock_path)
            server.start()
            server.shutdown()
            assert [sock.recv(10) for _ in range(count)] == [b"%d" % i for i in range(count)]
        assert not os.path.exists(sock_path)


# ---- the client API against the server -------------------------------------------------------


class TestClientAgainstServer:
    @pytest.mark.parametrize("kind", ["stream", "seqpacket", "datagram"])
    def test_fds_both_ways(self, serve, sock_path, kind):
        def handler(client, message):
            fds = client.take_fds()
            r, w = os.pipe()
            client.send(message + b"!", fds=[r])
            os.close(r)
            os.write(w, b"from the server")
            os.close(w)
            for fd in fds:
                os.write(fd, b"from the handler")
                os.close(fd)

        serve(handler, kind=kind)
        r, w = os.pipe()
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            message, fds = conn.request_fds(b"hello", fds=[w])
            os.close(w)
            assert message == b"hello!" and len(fds) == 1
            with os.fdopen(fds[0], "rb") as f:
                assert f.read() == b"from the server"
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"from the handler"

    def test_abstract_seqpacket(self, serve):
        name = abstract_name()
        serve(path=name, kind="seqpacket")
        with pyuds.connect(name, kind="seqpacket", timeout=TIMEOUT) as conn:
            assert conn.request(b"") == b""
            assert conn.request(b"abstract") == b"abstract"


def test_datagram_with_the_smallest_batch(serve, sock_path):
    """A batch of one event must still hear datagrams (a new peer takes two events)."""
    serve(kind="datagram", batch_size=1)
    with dgram_client() as sock:
        for i in range(3):
            sock.sendto(b"%d" % i, sock_path)
            assert sock.recv(10) == b"%d" % i


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to send as another uid")
def test_datagram_address_taken_over_by_another_process_is_another_peer(serve, sockdir, sock_path):
    """A client's socket file reused by a process with other credentials: a new peer,
    authorized afresh, not the old one's handle."""
    authorized = []
    server = serve(kind="datagram", mode=0o666, authorize=lambda c: authorized.append((c.uid, c.address)) or True)
    os.chmod(sockdir, 0o777)
    client_path = os.path.join(sockdir, "client.sock")
    with dgram_client(client_path) as sock:
        sock.sendto(b"as root", sock_path)
        assert sock.recv(100) == b"as root"
    os.unlink(client_path)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with dgram_client(client_path) as sock:
                sock.sendto(b"as nobody", sock_path)
                code = 0 if sock.recv(100) == b"as nobody" else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert authorized == [(0, client_path), (65534, client_path)]
    wait_until(lambda: len(server.clients) == 1)
    assert next(iter(server.clients.values())).uid == 65534


def test_inherited_datagram_socket(sock_path):
    own = bound_socket(sock_path, socket.SOCK_DGRAM, listen=False)
    with own, pyuds.Server(sock=own, kind="datagram") as server:
        server.start()
        with dgram_client() as sock:
            sock.sendto(b"inherited datagram", sock_path)
            assert sock.recv(100) == b"inherited datagram"
    assert is_socket(sock_path)


def test_activation_with_a_datagram_socket(sock_path):
    with bound_socket(sock_path, socket.SOCK_DGRAM, listen=False) as own:
        proc = activated_serve([own.fileno()], {"LISTEN_FDS": "1"})
        try:
            with dgram_client() as sock:  # queued until the server reads: it may still start
                sock.sendto(b"activated datagram", sock_path)
                assert sock.recv(100) == b"activated datagram"
        finally:
            err = stop(proc)
        assert proc.returncode == 0, err
        assert "datagram, inherited socket" in err
