"""pyuds with clients and tools it did not write: socat on every kind, `ss` and /proc/net/unix
naming the server by its own path, Python's multiprocessing.connection on the u32 framing, and
the plain datagram idiom of answering the address recvfrom() gave.

socat and ss are Debian packages that .ci/run installs; set PYUDS_REQUIRE_TOOLS=1 (as .ci/run
does) to make their absence a failure rather than a skip."""
from __future__ import annotations

import fcntl
import multiprocessing.connection as mpc
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

import pyuds
from conftest import umask, wait_until
from test_cli import ServeProcess, spawn  # noqa: F401  (spawn is a fixture)

TIMEOUT = 10.0
KINDS = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET, "datagram": socket.SOCK_DGRAM}


def tool(name: str) -> str:
    """The path of a command-line tool, or a skip (a failure under PYUDS_REQUIRE_TOOLS=1)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # (haproxy's home)
    if found is None:
        if os.environ.get("PYUDS_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (Debian: apt-get install {name})")
        pytest.skip(f"{name} is not installed")
    return found


def socat(*args: str, stdin: bytes) -> bytes:
    """Runs socat to completion (bounded) and returns what it printed."""
    done = subprocess.run([tool("socat"), *args], input=stdin, capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def proc_net_unix_paths() -> list[str]:
    """The Path column of /proc/net/unix: each bound socket's address as the kernel keeps it."""
    with open("/proc/net/unix") as f:
        next(f)
        return [fields[7] for fields in (line.split() for line in f) if len(fields) > 7]


def ss_listing(kind: str) -> str:
    """`ss -xl` (stream and seqpacket listeners) or `ss -xa` (datagram sockets do not listen)."""
    done = subprocess.run([tool("ss"), "-xa" if kind == "datagram" else "-xl"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- the address the kernel reports ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_tools_see_the_server_by_its_own_path(sock_path, serve, kind):
    """Under the usual umask 022 and the default mode: /proc/net/unix and `ss` list the server's
    socket under the path it was given, and no temporary name of it exists anywhere."""
    with umask(0o022):
        serve(kind=kind)
    assert sock_path in proc_net_unix_paths()
    listing = ss_listing(kind)
    assert f" {sock_path} " in listing, listing
    sockdir = os.path.dirname(sock_path)
    strays = [p for p in proc_net_unix_paths() if p.startswith(sockdir + "/") and p != sock_path]
    assert not strays, strays
    assert os.listdir(sockdir) == ["s.sock"]


@pytest.mark.parametrize("mode,mask", [(0o600, 0o022), (0o660, 0o022), (0o666, 0o077), (0o600, 0o000)],
                         ids=["0600-022", "0660-022", "0666-077", "0600-000"])
@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_connected_client_sees_the_path_as_its_peer(sock_path, serve, kind, mode, mask):
    """A client's getpeername() is the server's path, whatever the mode and umask (the mode is
    exact in every case too)."""
    with umask(mask):
        serve(kind=kind, mode=mode)
    assert os.stat(sock_path).st_mode & 0o777 == mode
    with socket.socket(socket.AF_UNIX, KINDS[kind]) as c:
        c.settimeout(TIMEOUT)
        c.connect(sock_path)
        assert c.getpeername() == sock_path


def test_datagram_reply_comes_from_the_path_it_was_sent_to(sock_path, serve, sockdir):
    """The datagram idiom: bind, sendto the server, recvfrom the reply. The reply comes from the
    server's path, so answering the address recvfrom() gave reaches the server again."""
    with umask(0o022):
        serve(kind="datagram")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.settimeout(TIMEOUT)
        c.bind(os.path.join(sockdir, "c.sock"))
        c.sendto(b"ping", sock_path)
        data, sender = c.recvfrom(100)
        assert (data, sender) == (b"ping", sock_path)
        c.sendto(b"again", sender)
        assert c.recvfrom(100) == (b"again", sock_path)


def test_directory_lock_held_elsewhere_costs_a_second_and_the_true_name(sock_path, sockdir):
    """Servers starting in one directory take turns through a lock on it. When something else
    holds that lock for long, the server still starts, after about a second, under a temporary
    name renamed into place: the path works and the mode is exact; only the kernel's name for
    the socket (what ss shows, where datagram replies come from) is the temporary one."""
    fd = os.open(sockdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with umask(0o022), pyuds.Server(sock_path, pyuds.echo, mode=0o660) as server:
            waited = time.monotonic() - started
            server.start()
            assert 0.9 < waited < 5.0, waited
            assert os.stat(sock_path).st_mode & 0o777 == 0o660
            with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
                assert conn.request(b"still served") == b"still served"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(sock_path)
                name = c.getpeername()
            assert name != sock_path and os.path.basename(name).startswith(".pyuds-"), name
            assert not os.path.lexists(name)  # renamed away: nothing left behind in the directory
        assert not os.path.lexists(sock_path)
    finally:
        os.close(fd)


# ---- socat ------------------------------------------------------------------------------------


def test_socat_line(spawn, sock_path):
    server = spawn(["--framing", "line", sock_path])
    server.wait_listening(sock_path, "line")
    assert socat("-t", "2", "-", f"UNIX-CONNECT:{sock_path}", stdin=b"hello\nworld\n") == b"hello\nworld\n"


def test_socat_raw(spawn, sock_path):
    server = spawn(["--framing", "raw", sock_path])
    server.wait_listening(sock_path, "raw")
    assert socat("-t", "2", "-", f"UNIX-CONNECT:{sock_path}", stdin=b"raw bytes") == b"raw bytes"


def test_socat_seqpacket(spawn, sock_path):
    server = spawn(["--kind", "seqpacket", sock_path])
    server.wait_listening(sock_path, kind="seqpacket")
    assert socat("-t", "2", "-", f"UNIX-CONNECT:{sock_path},socktype=5", stdin=b"one packet") == b"one packet"


def test_socat_datagram(spawn, sock_path, sockdir):
    """socat accepts only replies from the address it sent to: it prints the echo."""
    server = spawn(["--kind", "datagram", sock_path])
    server.wait_listening(sock_path, kind="datagram")
    client = os.path.join(sockdir, "c.sock")
    assert socat("-t", "2", "-", f"UNIX-SENDTO:{sock_path},bind={client}", stdin=b"ping") == b"ping"


# ---- multiprocessing.connection: 4-byte big-endian length frames, like u32 -----------------------


def test_multiprocessing_client_against_a_pyuds_server(sock_path, serve):
    """multiprocessing.connection.Client speaks u32: bytes, pickled objects and a 3 MiB message
    round-trip through a pyuds echo server."""
    serve(max_message_size=4 << 20)
    conn = mpc.Client(sock_path, family="AF_UNIX")
    try:
        conn.send_bytes(b"plain bytes")
        assert conn.recv_bytes() == b"plain bytes"
        conn.send({"an": ["object", 1, 2.5]})
        assert conn.recv() == {"an": ["object", 1, 2.5]}
        big = os.urandom(3 << 20)
        conn.send_bytes(big)
        assert conn.recv_bytes() == big
    finally:
        conn.close()


def test_pyuds_client_against_a_multiprocessing_listener(sockdir):
    """pyuds.connect (u32) talks to a multiprocessing.connection.Listener: requests, a pickled
    object sent by the listener, and a 3 MiB message."""
    import pickle

    path = os.path.join(sockdir, "mp.sock")
    listener = mpc.Listener(path, family="AF_UNIX")
    big = os.urandom(3 << 20)

    def peer() -> None:
        with listener.accept() as c:
            c.send_bytes(c.recv_bytes().upper())
            c.send(("pickled", 42))
            c.send_bytes(c.recv_bytes())

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    try:
        with pyuds.connect(path, "u32", timeout=TIMEOUT, max_message_size=4 << 20) as conn:
            assert conn.request(b"hello") == b"HELLO"
            assert pickle.loads(conn.recv()) == ("pickled", 42)
            assert conn.request(big) == big
        t.join(TIMEOUT)
        assert not t.is_alive()
    finally:
        listener.close()
    wait_until(lambda: not os.path.lexists(path))
