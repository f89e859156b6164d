"""Endpoints and TCP: every endpoint form from the API and from the command line, with real
sockets; TCP servers with the stream's framings, limits, counters and shutdown; the peer on the
handle; Unix-only features refused clearly over TCP; and the PROXY protocol, v1 and v2 headers
whole, byte by byte, malformed, cut short and absent, each malformed one costing only its own
connection."""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest

import pyuds
from pyuds._endpoint import Endpoint, parse_endpoint
from conftest import wait_until
from test_cli import START_TIMEOUT, assert_clean_error, run, spawn  # noqa: F401  (spawn: a fixture)

TIMEOUT = 10.0


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def tcp_client(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (end-of-file or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def v2_header(src: tuple[str, int], dst: tuple[str, int], command: int = 1) -> bytes:
    """A PROXY protocol v2 header for TCP over IPv4 or IPv6, with a TLV to skip."""
    family = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    fam = 0x21 if family == socket.AF_INET6 else 0x11
    body = (socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0])
            + struct.pack(">HH", src[1], dst[1]) + b"\x04\x00\x02ab")  # a NOOP TLV
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, fam]) + struct.pack(">H", len(body)) + body


# ---- endpoint strings ------------------------------------------------------------------------


class TestParse:
    @pytest.mark.parametrize("text, want", [
        ("/run/app.sock", Endpoint("unix", path="/run/app.sock")),
        ("app.sock", Endpoint("unix", path="app.sock")),
        ("my:app.sock", Endpoint("unix", path="my:app.sock")),       # a colon is no scheme
        ("unix:app.sock", Endpoint("unix", path="app.sock")),
        ("unix:///run/app.sock", Endpoint("unix", path="/run/app.sock")),
        ("@app", Endpoint("unix", path="@app")),
        ("unix-abstract:app", Endpoint("unix", path="@app")),
        ("tcp://127.0.0.1:8000", Endpoint("tcp", host="127.0.0.1", port=8000)),
        ("tcp://[::1]:0", Endpoint("tcp", host="::1", port=0)),
        ("tcp://localhost:65535", Endpoint("tcp", host="localhost", port=65535)),
        ("fd://3", Endpoint("fd", fd=3)),
    ])
    def test_forms(self, text, want):
        assert parse_endpoint(text) == want

    def test_paths_are_paths(self):
        import pathlib
        assert parse_endpoint(pathlib.Path("tcp://x:1")) == Endpoint("unix", path="tcp:/x:1")
        assert parse_endpoint(b"/tmp/a.sock") == Endpoint("unix", path="/tmp/a.sock")

    @pytest.mark.parametrize("text, says", [
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://:8000", "needs a host"),
        ("tcp://::1:8000", "in brackets"),
        ("tcp://[::1]8000", "tcp://[ADDRESS]:PORT"),
        ("tcp://[nope]:1", "not an IPv6 address"),
        ("tcp://127.0.0.1:65536", "0 to 65535"),
        ("tcp://127.0.0.1:http", "0 to 65535"),
        ("fd://x", "file descriptor number"),
        ("fd://-1", "file descriptor number"),
        ("udp://127.0.0.1:53", "unknown scheme 'udp'"),
        ("unix://relative", "absolute path"),
        ("unix:", "empty"),
        ("unix-abstract:", "at least one byte"),
        ("", "empty"),
    ])
    def test_errors_say_what_is_wrong(self, text, says):
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_endpoint(text)

    def test_str_is_the_endpoint(self):
        for text in ("/a.sock", "@a", "tcp://127.0.0.1:1", "tcp://[::1]:2", "fd://7"):
            assert str(parse_endpoint(text)) == text


# ---- every endpoint form, API and CLI ------------------------------------------------------------


def unix_forms(sockdir: str) -> list[tuple[str, str]]:
    """(endpoint given to the server, address clients may use) for each Unix form."""
    name = f"pyuds-ep-{os.getpid()}-{time.monotonic_ns()}"
    return [
        (os.path.join(sockdir, "plain.sock"), os.path.join(sockdir, "plain.sock")),
        ("unix:" + os.path.join(sockdir, "u.sock"), os.path.join(sockdir, "u.sock")),
        ("unix://" + os.path.join(sockdir, "uu.sock"), "unix:" + os.path.join(sockdir, "uu.sock")),
        ("@" + name, "unix-abstract:" + name),
        ("unix-abstract:" + name + "-2", "@" + name + "-2"),
    ]


class TestEveryForm:
    def test_unix_forms(self, sockdir):
        for served, client_side in unix_forms(sockdir):
            with pyuds.Server(served, lambda c, m: m.upper()) as server:
                server.start()
                assert server.address == server.path
                with pyuds.connect(client_side, timeout=TIMEOUT) as conn:
                    assert conn.request(b"hi") == b"HI"

    def test_tcp_port_zero_gives_the_bound_port(self):
        with pyuds.Server("tcp://127.0.0.1:0", lambda c, m: m.upper()) as server:
            server.start()
            host, port = server.address
            assert host == "127.0.0.1" and port > 0
            with pytest.raises(AttributeError, match="a TCP server has no path"):
                server.path
            with pyuds.connect(f"tcp://127.0.0.1:{port}", timeout=TIMEOUT) as conn:
                assert conn.request(b"hi") == b"HI"
                assert conn.inet and conn.address[0] == "127.0.0.1"
            with pyuds.connect(f"tcp://localhost:{port}", timeout=TIMEOUT) as conn:  # a name, resolved
                assert conn.request(b"there") == b"THERE"

    def test_tcp_name_resolved_to_ipv4(self):
        with pyuds.Server("tcp://localhost:0") as server:
            server.start()
            assert server.address[0] == "127.0.0.1"

    @pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
    def test_tcp_ipv6(self):
        seen = []
        with pyuds.Server("tcp://[::1]:0", lambda c, m: seen.append(c.peer) or m) as server:
            server.start()
            host, port = server.address
            assert host == "::1"
            with pyuds.connect(f"tcp://[::1]:{port}", timeout=TIMEOUT) as conn:
                assert conn.request(b"six") == b"six"
                assert seen == [pyuds.InetPeer("::1", conn.address[1])]

    def test_fd_forms(self, sockdir):
        path = os.path.join(sockdir, "fd.sock")
        with socket.socket(socket.AF_UNIX) as unix, socket.socket(socket.AF_INET) as inet:
            unix.bind(path)
            inet.bind(("127.0.0.1", 0))
            for sock, target in ((unix, path), (inet, "tcp://127.0.0.1:%d" % inet.getsockname()[1])):
                with pyuds.Server(f"fd://{sock.fileno()}") as server:
                    server.start()
                    with pyuds.connect(target, timeout=TIMEOUT) as conn:
                        assert conn.request(b"via fd") == b"via fd"
                    assert server.address == (path if sock is unix else inet.getsockname())
            # A client can take an already connected socket as fd://N too.
            a, b = socket.socketpair()
            with a, b, pyuds.connect(f"fd://{a.fileno()}", timeout=TIMEOUT) as conn:
                b.sendall(frame(b"pushed"))
                assert conn.recv() == b"pushed"

    def test_errors(self, sockdir):
        with pytest.raises(ValueError, match="unknown scheme"):
            pyuds.Server("http://127.0.0.1:80")
        with pytest.raises(OSError):
            pyuds.Server("tcp://no-such-host.invalid:0")
        with pyuds.Server("tcp://127.0.0.1:0") as server:
            with pytest.raises(pyuds.AddressInUseError, match="in use"):
                pyuds.Server("tcp://127.0.0.1:%d" % server.address[1])
        directory = os.open("/", os.O_RDONLY)
        try:
            with pytest.raises(OSError, match="not a socket"):
                pyuds.connect(f"fd://{directory}")
        finally:
            os.close(directory)


def wait_tcp_listening(server, pattern: str = r"listening on tcp://([0-9.]+):(\d+)") -> tuple[str, int]:
    """The (host, port) a `pyuds serve tcp://...` logs once it listens."""
    found: list[tuple[str, int]] = []

    def logged() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"pyuds serve exited with {server.proc.returncode}:\n{server.stderr}")
        m = re.search(pattern, server.stderr)
        if m:
            found.append((m.group(1), int(m.group(2))))
        return bool(m)

    wait_until(logged, timeout=START_TIMEOUT)
    return found[0]


class TestCommandLine:
    def test_tcp_serve_and_send(self, spawn):
        server = spawn(["tcp://127.0.0.1:0", "--framing", "line"])
        host, port = wait_tcp_listening(server)
        done = run(["send", "--framing", "line", f"tcp://{host}:{port}", "hello", "world"])
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello\nworld\n"

    def test_unix_forms(self, spawn, sockdir):
        for served, client_side in unix_forms(sockdir)[1:4]:
            server = spawn([served])
            wait_until(lambda: run(["send", client_side, "ping"]).stdout == "ping\n", timeout=START_TIMEOUT,
                       interval=0.1)
            server.kill()

    def test_fd(self, spawn):
        with socket.socket(socket.AF_INET) as inet:
            inet.bind(("127.0.0.1", 0))
            inet.set_inheritable(True)
            port = inet.getsockname()[1]
            spawn([f"fd://{inet.fileno()}"], pass_fds=[inet.fileno()])
            wait_until(lambda: run(["send", f"tcp://127.0.0.1:{port}", "ping"]).stdout == "ping\n",
                       timeout=START_TIMEOUT, interval=0.1)

    def test_clear_errors(self):
        done = run(["serve", "tcp://127.0.0.1:0", "--mode", "0660"])
        assert done.returncode == 1
        assert_clean_error(done.stderr, "mode applies to Unix sockets only")
        done = run(["serve", "tcp://127.0.0.1"])
        assert done.returncode == 1
        assert_clean_error(done.stderr, "needs a port")
        done = run(["send", "tcp://127.0.0.1:1", "x"])  # nothing listens on port 1
        assert done.returncode == 1
        assert_clean_error(done.stderr, "pyuds send: tcp://127.0.0.1:1:")


# ---- TCP servers --------------------------------------------------------------------------------


class TestTCP:
    def test_peer_and_credentials(self, sock_path):
        seen = {}

        def handle(client, message):
            seen["peer"] = client.peer
            seen["address"] = client.address
            with pytest.raises(AttributeError, match="TCP client.*Unix-socket clients only"):
                client.pid
            return b"ok"

        def handle_unix(client, message):
            seen["unix"] = client.peer
            return b"%d" % client.pid

        with pyuds.Server("tcp://127.0.0.1:0", handle) as server, pyuds.Server(sock_path, handle_unix) as unix:
            server.start()
            unix.start()
            with pyuds.connect("tcp://127.0.0.1:%d" % server.address[1], timeout=TIMEOUT) as conn:
                assert conn.request(b"who") == b"ok"
                assert seen["peer"] == pyuds.InetPeer("127.0.0.1", conn.address[1]) == seen["address"]
            with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
                assert conn.request(b"pid") == b"%d" % os.getpid()
            assert seen["unix"] == pyuds.UnixPeer(os.getpid(), os.getuid(), os.getgid())

    def test_unix_only_options_refused(self, sock_path):
        for options, says in (({"mode": 0o660}, "mode"), ({"allow_uid": [0]}, "allow_uid"),
                              ({"max_fds": 4}, "max_fds"), ({"kind": "seqpacket"}, "kind='seqpacket'")):
            with pytest.raises(ValueError, match=re.escape(says)):
                pyuds.Server("tcp://127.0.0.1:0", **options)
        for options in ({"proxy_protocol": True}, {"tcp_keepalive": 10}, {"tcp_nodelay": False}):
            with pytest.raises(ValueError, match="TCP endpoints"):
                pyuds.Server(sock_path, **options)

    def test_fds_refused_over_tcp(self):
        clients = []
        with pyuds.Server("tcp://127.0.0.1:0", lambda c, m: clients.append(c) or m) as server:
            server.start()
            with pyuds.connect("tcp://127.0.0.1:%d" % server.address[1], timeout=TIMEOUT) as conn:
                with pytest.raises(ValueError, match="Unix sockets only"):
                    conn.send(b"x", fds=[0])
                conn.request(b"x")
                with pytest.raises(ValueError, match="Unix sockets only"):
                    clients[0].send(b"y", fds=[0])

    def test_limits_framing_counters_and_shutdown(self):
        """The stream's machinery as it is: a line framing, a message over the limit costing only
        its connection, pipelined requests answered in order, counters, and a shutdown that
        answers what was sent before it."""
        with pyuds.Server("tcp://127.0.0.1:0", lambda c, m: m[::-1], framing="line",
                          max_message_size=100) as server:
            server.start()
            address = server.address
            with tcp_client(address) as good, tcp_client(address) as bad:
                bad.sendall(b"x" * 200 + b"\n")
                good.sendall(b"".join(b"%d\n" % i for i in range(500)))
                want = b"".join((b"%d" % i)[::-1] + b"\n" for i in range(500))
                assert recv_exactly(good, len(want)) == want
                assert closed_by_server(bad)
                wait_until(lambda: server.stats()["closed"]["too_large"] == 1)
                good.sendall(b"last\n")
                server.shutdown(timeout=TIMEOUT)
                assert recv_exactly(good, 5) == b"tsal\n"
                assert closed_by_server(good)
            stats = server.stats()
            assert stats["messages_in"] == 501 and stats["connections_accepted"] == 2
            assert stats["closed"]["shutdown"] == 1

    def test_keepalive_is_on_the_connections(self):
        if shutil.which("ss") is None:
            pytest.skip("ss is not installed")
        with pyuds.Server("tcp://127.0.0.1:0", tcp_keepalive=30) as server:
            server.start()
            with pyuds.connect("tcp://127.0.0.1:%d" % server.address[1], timeout=TIMEOUT) as conn:
                conn.request(b"x")
                out = subprocess.run(["ss", "-tnoH", "state", "established", "sport", "=",
                                      f":{server.address[1]}"], capture_output=True, text=True,
                                     timeout=TIMEOUT).stdout
                assert "keepalive" in out, out


# ---- the PROXY protocol ------------------------------------------------------------------------


@pytest.fixture
def proxied():
    """A TCP echo server with proxy_protocol, recording (peer, message) per handler call and
    the clients that connected."""
    calls: list[tuple[pyuds.InetPeer, bytes]] = []
    connected: list[pyuds.InetPeer] = []
    server = pyuds.Server("tcp://127.0.0.1:0", lambda c, m: calls.append((c.peer, m)) or m,
                          proxy_protocol=True, frame_timeout=0.5,
                          on_connect=lambda c: connected.append(c.peer))
    server.start()
    server.calls, server.connected = calls, connected
    yield server
    server.shutdown(timeout=TIMEOUT)


class TestProxyProtocol:
    @pytest.mark.parametrize("header, peer", [
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8000\r\n", ("203.0.113.7", 51234)),
        (b"PROXY TCP6 2001:db8::7 ::1 443 8000\r\n", ("2001:db8::7", 443)),
        (v2_header(("198.51.100.9", 50000), ("127.0.0.1", 8000)), ("198.51.100.9", 50000)),
        (v2_header(("2001:db8::9", 1), ("::1", 8000)), ("2001:db8::9", 1)),
    ], ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"])
    @pytest.mark.parametrize("split", ["whole", "bytewise"])
    def test_header_names_the_client(self, proxied, header, peer, split):
        with tcp_client(proxied.address) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = header + frame(b"hello")
            if split == "whole":
                sock.sendall(data)
            else:
                for i in range(len(header)):
                    sock.sendall(data[i:i + 1])
                    time.sleep(0.001)
                sock.sendall(data[len(header):])
            assert recv_exactly(sock, 9) == frame(b"hello")
        assert proxied.calls == [(pyuds.InetPeer(*peer), b"hello")]
        assert proxied.connected == [pyuds.InetPeer(*peer)]

    def test_local_and_unknown_keep_the_real_peer(self, proxied):
        for header in (b"PROXY UNKNOWN\r\n", v2_header(("0.0.0.0", 0), ("0.0.0.0", 0), command=0)):
            with tcp_client(proxied.address) as sock:
                sock.sendall(header + frame(b"x"))
                assert recv_exactly(sock, 5) == frame(b"x")
                assert proxied.calls[-1] == (pyuds.InetPeer("127.0.0.1", sock.getsockname()[1]), b"x")

    @pytest.mark.parametrize("sent, shut", [
        (frame(b"no header at all"), False),                           # absent: a frame
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),                  # absent: another protocol
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n" + frame(b"x"), False),  # malformed v1
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", False),                  # LF without CR
        (b"PROXY " + b"x" * 200, False),                               # v1 line too long
        (v2_header(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x31", False),  # v2 version 3
        (b"PROXY TCP4 1.2.3.4 5.6", True),                             # cut short: ends first
        (v2_header(("1.2.3.4", 1), ("5.6.7.8", 2))[:20], True),         # v2 cut short
        (b"PROXY TCP4 1.2.3.4 5.6", False),                            # cut short: too slow
        (b"", False),                                                  # silent
    ], ids=["frame", "http", "bad-port", "lf", "too-long", "v2-version", "v1-cut", "v2-cut",
            "v1-slow", "silent"])
    def test_bad_headers_cost_only_their_connection(self, proxied, sent, shut):
        with tcp_client(proxied.address) as good:
            good.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 2000\r\n")
            with tcp_client(proxied.address) as bad:
                if sent:
                    bad.sendall(sent)
                if shut:
                    bad.shutdown(socket.SHUT_WR)
                assert closed_by_server(bad)  # (the slow and silent ones: after frame_timeout)
            good.sendall(frame(b"still served"))
            assert recv_exactly(good, 16) == frame(b"still served")
        wait_until(lambda: proxied.stats()["closed"]["proxy_header"] == 1)
        stats = proxied.stats()
        # Never a client: no hook, no handler ran for it.
        assert stats["connections_accepted"] == 1 and proxied.connected == [pyuds.InetPeer("192.0.2.1", 1000)]
        assert proxied.calls == [(pyuds.InetPeer("192.0.2.1", 1000), b"still served")]

    def test_refusals_are_logged(self, proxied, caplog):
        with caplog.at_level("WARNING", logger="pyuds"):
            with tcp_client(proxied.address) as bad:
                bad.sendall(b"nope")
                assert closed_by_server(bad)
            wait_until(lambda: "no valid PROXY protocol header" in caplog.text)
