"""The client: pyuds.connect() over stream, seqpacket and datagram sockets, abstract names,
bound addresses, and file descriptors passed both ways.

The peers are small Python socket servers in a thread (never the pyuds server), so these tests
say what the client puts on the wire and what it makes of what it reads. Every socket has a
timeout and every thread is joined."""
from __future__ import annotations

import array
import contextlib
import fcntl
import itertools
import os
import secrets
import socket
import subprocess
import sys
import threading
from typing import Callable, Iterator

import pytest

import pyuds
from conftest import is_socket, open_fds, recv_exactly
from pyuds._framing import Decoder, FdQueue, encode

TIMEOUT = 10.0
TYPES = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET, "datagram": socket.SOCK_DGRAM}
KINDS = list(TYPES)
NEUTRAL_CWD = os.path.dirname(os.path.abspath(__file__))  # never the repo root (see test_cli.py)


# ---- peers ------------------------------------------------------------------------------------

class Endpoint:
    """The peer's side of one conversation, for any kind: messages in and out, with descriptors.
    On a stream it speaks u32 and reads exactly one frame at a time (never past it)."""

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.kind = kind
        self.client: object = None  # a datagram peer replies to whoever spoke last

    def recv(self) -> tuple[bytes, list[int]]:
        if self.kind != "stream":
            data, fds, flags, addr = socket.recv_fds(self.sock, 1 << 20, 253)
            assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), flags
            self.client = addr
            return data, fds
        data, fds, need = bytearray(), [], 4
        while len(data) < need:
            chunk, got, _, _ = socket.recv_fds(self.sock, need - len(data), 253)
            if not chunk:
                raise EOFError("the client closed the connection")
            data += chunk
            fds += got
            if len(data) >= 4:
                need = 4 + int.from_bytes(data[:4], "big")
        return bytes(data[4:]), fds

    def send(self, payload: bytes, fds: list[int] = ()) -> None:
        data = len(payload).to_bytes(4, "big") + payload if self.kind == "stream" else payload
        address = self.client if self.kind == "datagram" else None
        if fds:
            # Not socket.send_fds(): before Python 3.12 it ignores its address argument.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            assert self.sock.sendmsg([data], rights, 0, *([address] if address else [])) == len(data)
        elif address is not None:
            self.sock.sendto(data, address)
        else:
            self.sock.sendall(data)


class Peer:
    """A server socket of one kind on address, running handler(Endpoint) in a thread for one
    client (a datagram peer: for whatever arrives). Leaving the block joins the thread and
    re-raises what it raised."""

    def __init__(self, kind: str, address: str | bytes, handler: Callable[[Endpoint], None]) -> None:
        self.kind = kind
        self.handler = handler
        self.sock = socket.socket(socket.AF_UNIX, TYPES[kind])
        self.sock.settimeout(TIMEOUT)
        self.sock.bind(address)
        if kind != "datagram":
            self.sock.listen()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test peer", daemon=True)

    def _run(self) -> None:
        try:
            if self.kind == "datagram":
                self.handler(Endpoint(self.sock, self.kind))
                return
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                self.handler(Endpoint(conn, self.kind))
        except BaseException as exc:  # handed to the test in __exit__
            self.error = exc

    def __enter__(self) -> Peer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.thread.join(TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive(), "the peer thread did not finish"
        if self.error is not None and exc_info[0] is None:
            raise self.error


def echo(count: int) -> Callable[[Endpoint], None]:
    """A handler that answers count messages with themselves (closing descriptors that came)."""
    def handler(ep: Endpoint) -> None:
        for _ in range(count):
            data, fds = ep.recv()
            for fd in fds:
                os.close(fd)
            ep.send(data)
    return handler


def abstract_name() -> str:
    return f"@pyuds-test-{os.getpid()}-{secrets.token_hex(6)}"


def is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def read_pipe(fd: int, n: int) -> bytes:
    """Reads n bytes from a pipe, failing rather than blocking if they are not there."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, n)
    except BlockingIOError:
        raise AssertionError("nothing was written to the pipe") from None


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


# ---- every kind: round trips ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, sock_path):
    """Each kind carries messages both ways, byte for byte: an empty one, binary, and a large
    one (100 KiB: packets must fit Linux's default socket buffer)."""
    payloads = [b"hello", b"", b"\x00\n\r\xff" * 10, os.urandom(100 * 1024), b"end"]
    with Peer(kind, sock_path, echo(len(payloads))):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            assert conn.kind == kind
            for payload in payloads:
                assert conn.request(payload) == payload


def test_stream_keeps_its_framings(sock_path):
    """kind="stream" with line framing: the wire carries payload + newline, as before."""
    def handler(ep: Endpoint) -> None:
        assert recv_exactly(ep.sock, 6) == b"hello\n"
        ep.sock.sendall(b"back\n")

    with Peer("stream", sock_path, handler):
        with pyuds.connect(sock_path, "line", kind="stream", timeout=TIMEOUT) as conn:
            assert conn.request(b"hello") == b"back"


@pytest.mark.parametrize("kind", ["seqpacket", "datagram"])
def test_packets_have_no_framing_bytes(kind, sock_path):
    """A seqpacket or datagram message is the packet itself: no length header, no newline."""
    def handler(ep: Endpoint) -> None:
        data, _ = ep.recv()
        assert data == b"abc"
        ep.send(b"\x00\x00\x00\x05xyz")  # would be a u32 header on a stream; here just bytes

    with Peer(kind, sock_path, handler):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            assert conn.request(b"abc") == b"\x00\x00\x00\x05xyz"


def test_seqpacket_end_of_connection(sock_path):
    """An empty packet from a peer that is still there is an empty message; the peer closing
    is ConnectionClosedError (Linux reads both as zero bytes)."""
    def handler(ep: Endpoint) -> None:
        ep.recv()
        ep.send(b"")
        ep.recv()  # then returns: the connection closes

    with Peer("seqpacket", sock_path, handler):
        with pyuds.connect(sock_path, kind="seqpacket", timeout=TIMEOUT) as conn:
            assert conn.request(b"one") == b""
            conn.send(b"two")
            with pytest.raises(pyuds.ConnectionClosedError):
                conn.recv()


@pytest.mark.parametrize("kind", KINDS)
def test_unbound_address(kind, sock_path):
    """A stream or seqpacket client binds nothing (address None); a datagram one autobinds."""
    with Peer(kind, sock_path, echo(1)):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            conn.request(b"x")
            if kind == "datagram":
                assert conn.address.startswith("@")
            else:
                assert conn.address is None


# ---- abstract names ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_abstract_name(kind, sockdir, monkeypatch):
    """connect("@name") reaches a peer bound to b"\\0name"; no file appears anywhere (not even
    one called "@name" in the working directory)."""
    monkeypatch.chdir(sockdir)
    name = abstract_name()
    with Peer(kind, b"\0" + name[1:].encode(), echo(1)):
        with pyuds.connect(name, kind=kind, timeout=TIMEOUT) as conn:
            assert conn.request(b"abstract") == b"abstract"
    assert os.listdir(sockdir) == []


def test_abstract_name_longest(sockdir):
    """107 bytes after the '@' fit (sun_path is 108, the leading NUL takes one); 108 do not."""
    name = abstract_name()
    name += "x" * (108 - len(name))
    assert len(name.encode()) == 108
    with Peer("stream", b"\0" + name[1:].encode(), echo(1)):
        with pyuds.connect(name, timeout=TIMEOUT) as conn:
            assert conn.request(b"long") == b"long"
    with pytest.raises(pyuds.PathTooLongError, match="at most 107"):
        pyuds.connect(name + "x")


@pytest.mark.parametrize("address, match", [
    ("@", "at least one byte"),
    ("@a\0b", "NUL"),
    ("/tmp/a\0b", "NUL"),
    ("", "empty"),
])
def test_bad_addresses(address, match):
    with pytest.raises(ValueError, match=match):
        pyuds.connect(address)
    with pytest.raises(ValueError, match=match):
        pyuds.connect("@unused", kind="datagram", bind=address)


def test_path_too_long(sockdir):
    path = os.path.join(sockdir, "x" * (108 - len(sockdir)))
    with pytest.raises(pyuds.PathTooLongError):
        pyuds.connect(path)


# ---- datagram addresses -----------------------------------------------------------------------

def test_datagram_autobind_gets_replies(sock_path):
    """With bind=None a datagram client gets a unique abstract name from the kernel; the peer
    sees that name as the sender, and replies sent there reach the client."""
    seen = []

    def handler(ep: Endpoint) -> None:
        for _ in range(2):
            data, _ = ep.recv()
            seen.append(ep.client)
            ep.send(data.upper())

    with Peer("datagram", sock_path, handler):
        with pyuds.connect(sock_path, kind="datagram", timeout=TIMEOUT) as a, \
                pyuds.connect(sock_path, kind="datagram", timeout=TIMEOUT) as b:
            assert a.request(b"from a") == b"FROM A"
            assert b.request(b"from b") == b"FROM B"
            assert a.address.startswith("@") and b.address.startswith("@")
            assert a.address != b.address
    assert seen == [b"\0" + a.address[1:].encode(), b"\0" + b.address[1:].encode()]


def test_datagram_bind_abstract(sock_path):
    name = abstract_name()
    with Peer("datagram", sock_path, echo(1)):
        with pyuds.connect(sock_path, kind="datagram", bind=name, timeout=TIMEOUT) as conn:
            assert conn.address == name
            assert conn.request(b"hi") == b"hi"


def test_datagram_bind_path_removed_on_close(sockdir, sock_path):
    """bind=PATH creates a socket file there, which close() removes."""
    mine = os.path.join(sockdir, "client.sock")
    with Peer("datagram", sock_path, echo(1)):
        conn = pyuds.connect(sock_path, kind="datagram", bind=mine, timeout=TIMEOUT)
        with conn:
            assert conn.address == mine
            assert is_socket(mine)
            assert conn.request(b"hi") == b"hi"
    assert not os.path.exists(mine)
    conn.close()  # twice is harmless


def test_bind_path_replaced_is_left_alone(sockdir, sock_path):
    """If the bound socket file was replaced by another file, close() leaves that one alone."""
    mine = os.path.join(sockdir, "client.sock")
    with Peer("datagram", sock_path, lambda ep: None):
        with pyuds.connect(sock_path, kind="datagram", bind=mine, timeout=TIMEOUT):
            os.unlink(mine)
            with open(mine, "w") as f:
                f.write("someone else's")
    with open(mine) as f:
        assert f.read() == "someone else's"


def test_bind_path_removed_when_connect_fails(sockdir):
    """A failed connect does not leave the client's socket file behind."""
    mine = os.path.join(sockdir, "client.sock")
    with pytest.raises(FileNotFoundError):
        pyuds.connect(os.path.join(sockdir, "nobody"), kind="datagram", bind=mine)
    assert os.listdir(sockdir) == []


def test_stream_bind(sockdir, sock_path):
    """A stream client may bind too: the peer sees its address."""
    mine = os.path.join(sockdir, "client.sock")
    peers = []

    def handler(ep: Endpoint) -> None:
        peers.append(ep.sock.getpeername())
        echo(1)(ep)

    with Peer("stream", sock_path, handler):
        with pyuds.connect(sock_path, bind=mine, timeout=TIMEOUT) as conn:
            assert conn.request(b"x") == b"x"
            assert conn.address == mine
    assert peers == [mine]
    assert not os.path.exists(mine)


# ---- bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "bogus"}, "kind must be one of"),
    ({"kind": "seqpacket", "framing": "line"}, "framing applies to kind='stream' only"),
    ({"kind": "datagram", "framing": "raw"}, "framing applies to kind='stream' only"),
    ({"kind": "stream", "framing": "json"}, "framing must be one of"),
    ({"kind": "datagram", "max_message_size": 0}, "at least 1"),
])
def test_bad_kind_and_framing(kwargs, match, sock_path):
    """Refused before any socket exists: the path need not exist."""
    before = open_fds()
    with pytest.raises(ValueError, match=match):
        pyuds.connect(sock_path, **kwargs)
    assert open_fds() == before


# ---- oversized packets ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["seqpacket", "datagram"])
def test_packet_longer_than_max_message_size(kind, sock_path, pipe):
    """A packet longer than max_message_size raises FramingError saying its size; descriptors
    that came with it are closed; the next packet is received as usual."""
    def handler(ep: Endpoint) -> None:
        ep.recv()
        ep.send(b"x" * 101, [pipe[1]])
        ep.send(b"y" * 100)

    before = open_fds()
    with Peer(kind, sock_path, handler):
        with pyuds.connect(sock_path, kind=kind, max_message_size=100, timeout=TIMEOUT) as conn:
            conn.send(b"go")
            with pytest.raises(pyuds.FramingError, match="101 bytes exceeds max_message_size"):
                conn.recv_fds()
            assert conn.recv_fds() == (b"y" * 100, [])
    assert open_fds() == before


# ---- descriptors: client to peer --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_send_fds(kind, sock_path, pipe):
    """Descriptors sent with a message arrive with it and work (the peer writes into the pipe
    the test reads); the caller's own descriptors stay open. Ints and fileno() objects both do."""
    r, w = pipe

    def handler(ep: Endpoint) -> None:
        data, fds = ep.recv()
        assert data == b"take these" and len(fds) == 2
        os.write(fds[0], b"written by the peer")
        for fd in fds:
            os.close(fd)
        ep.send(b"done")

    with Peer(kind, sock_path, handler), open(os.devnull, "rb") as devnull:
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            assert conn.request(b"take these", fds=[w, devnull]) == b"done"
            os.fstat(w)  # still ours
            devnull.fileno()
    assert read_pipe(r, 100) == b"written by the peer"


def test_send_fds_large_stream_message(sock_path, pipe):
    """A stream message too big for one sendmsg(): its descriptors arrive once, with the first
    bytes, and the rest of the frame follows intact."""
    payload = os.urandom(4 * 1024 * 1024)
    got = {}

    def handler(ep: Endpoint) -> None:
        got["message"] = ep.recv()
        ep.send(b"ok")

    with Peer("stream", sock_path, handler):
        with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
            assert conn.request(payload, fds=[pipe[1]]) == b"ok"
    data, fds = got["message"]
    assert data == payload
    assert len(fds) == 1
    os.close(fds[0])


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_fds(kind, sock_path):
    """More than 253 descriptors (SCM_MAX_FD) is a ValueError before anything is sent."""
    def handler(ep: Endpoint) -> None:
        data, fds = ep.recv()
        assert (data, fds) == (b"first thing sent", [])
        ep.send(b"ok")

    with Peer(kind, sock_path, handler):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            fd = conn.fileno()
            with pytest.raises(ValueError, match="at most 253"):
                conn.send(b"never sent", fds=[fd] * 254)
            assert conn.request(b"first thing sent") == b"ok"


@pytest.mark.parametrize("bad, error", [(-1, ValueError), ("3", TypeError), (None, TypeError)])
def test_bad_fds(bad, error, sock_path):
    with Peer("stream", sock_path, echo(1)):
        with pyuds.connect(sock_path, timeout=TIMEOUT) as conn:
            with pytest.raises(error):
                conn.send(b"x", fds=[bad])
            assert conn.request(b"still fine") == b"still fine"


# ---- descriptors: peer to client --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_recv_fds(kind, sock_path, pipe):
    """recv_fds() returns the descriptors that came with the message: close-on-exec, usable,
    and the caller's to close."""
    r, w = pipe

    def handler(ep: Endpoint) -> None:
        ep.recv()
        ep.send(b"here", [w, w])

    with Peer(kind, sock_path, handler):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            message, fds = conn.request_fds(b"send me some")
    assert message == b"here" and len(fds) == 2
    try:
        assert all(is_cloexec(fd) for fd in fds)
        os.write(fds[1], b"through the copy")
    finally:
        for fd in fds:
            os.close(fd)
    assert read_pipe(r, 100) == b"through the copy"


@pytest.mark.parametrize("kind", KINDS)
def test_recv_closes_fds(kind, sock_path, pipe):
    """recv() returns the message alone and closes the descriptors that came with it."""
    def handler(ep: Endpoint) -> None:
        ep.recv()
        ep.send(b"with fds", [pipe[0], pipe[1], pipe[1]])
        ep.send(b"without")

    before = open_fds()
    with Peer(kind, sock_path, handler):
        with pyuds.connect(sock_path, kind=kind, timeout=TIMEOUT) as conn:
            conn.send(b"go")
            assert conn.recv() == b"with fds"
            assert conn.recv() == b"without"
    assert open_fds() == before  # every socket here is closed: what is left leaked


def test_close_closes_fds_of_an_unfinished_message(sock_path, pipe):
    """Descriptors that came with the start of a message that never completes are closed by
    close()."""
    sent = threading.Event()

    def handler(ep: Endpoint) -> None:
        ep.recv()
        socket.send_fds(ep.sock, [(100).to_bytes(4, "big") + b"only ten b"], [pipe[1]])
        sent.set()
        with contextlib.suppress(EOFError):
            ep.recv()  # until the client closes

    before = open_fds()
    with Peer("stream", sock_path, handler):
        conn = pyuds.connect(sock_path, timeout=TIMEOUT)
        conn.send(b"go")
        assert sent.wait(TIMEOUT)
        conn.settimeout(0.2)
        with pytest.raises(TimeoutError):
            conn.recv()
        conn.close()
    assert open_fds() == before


# ---- which message stream descriptors belong to -----------------------------------------------

@pytest.mark.parametrize("framing", ["u32", "line"])
@pytest.mark.parametrize("b_size", [10, 300 * 1024])
def test_stream_fds_go_with_their_message(framing, b_size, sock_path, pipe):
    """The peer sends A (no descriptors), B (descriptors, on its first byte), C (none) back to
    back before the client reads, so Linux may glue A to B in one read: the descriptors still
    come with B, and only with B. (B larger than one read too.)"""
    payloads = [b"A" * 10, b"B" * b_size, b"C" * 10]
    frames = [encode(framing, p) for p in payloads]
    queued = threading.Event()

    def handler(ep: Endpoint) -> None:
        ep.sock.sendall(frames[0])
        n = socket.send_fds(ep.sock, [frames[1]], [pipe[1]])
        if n == len(frames[1]):
            ep.sock.sendall(frames[2])
            queued.set()  # all three wait in the socket
        else:
            queued.set()  # B does not fit in the socket buffer: the client reads the rest
            ep.sock.sendall(frames[1][n:] + frames[2])

    with Peer("stream", sock_path, handler):
        with pyuds.connect(sock_path, framing, timeout=TIMEOUT) as conn:
            assert queued.wait(TIMEOUT)
            a, b, c = conn.recv_fds(), conn.recv_fds(), conn.recv_fds()
    assert a == (payloads[0], [])
    assert c == (payloads[2], [])
    assert b[0] == payloads[1] and len(b[1]) == 1
    os.close(b[1][0])


def reads_consistent_with_linux(frames: list[bytes], carrier: int) -> Iterator[tuple[list[bytes], int]]:
    """Every way of cutting the stream of frames into up to three reads that Linux could
    produce when frames[carrier] was sent with descriptors: the read that brings them is the
    one holding the carrier's first byte, and it ends inside the carrier. Yields (reads, index
    of the read with the descriptors)."""
    data = b"".join(frames)
    start = sum(len(f) for f in frames[:carrier])
    end = start + len(frames[carrier])
    for i, j in itertools.combinations_with_replacement(range(1, len(data)), 2):
        bounds = [0, i, j, len(data)]
        reads = [data[a:b] for a, b in zip(bounds, bounds[1:])]
        offset = 0
        for k, r in enumerate(reads):
            if r and offset <= start < offset + len(r):
                if offset + len(r) <= end:
                    yield reads, k
                break
            offset += len(r)


@pytest.mark.parametrize("framing", ["u32", "line"])
@pytest.mark.parametrize("carrier", [0, 1, 2])
def test_fd_queue_every_split(framing, carrier):
    """Decoder + FdQueue, fed every cut of a stream that Linux could produce, give the
    descriptors to the frame that carried them and to no other."""
    payloads = [b"first", b"", b"third one"]
    frames = [encode(framing, p) for p in payloads]
    cases = 0
    for reads, k in reads_consistent_with_linux(frames, carrier):
        decoder, queue = Decoder(framing), FdQueue()
        got = []
        for n, r in enumerate(reads):
            decoder.feed(r)
            if n == k:
                queue.add(decoder.received - 1, [42])
            while (message := decoder.next()) is not None:
                got.append((message, queue.take(decoder.consumed)))
        expected = [(p, ([42], False) if i == carrier else ([], False)) for i, p in enumerate(payloads)]
        assert got == expected, reads
        cases += 1
    assert cases >= 10


def test_fd_queue_incomplete_and_drain():
    """A batch the kernel truncated marks its message; drain() returns what never found one."""
    queue = FdQueue()
    queue.add(3, [10], incomplete=True)
    queue.add(9, [11, 12])
    assert queue.take(4) == ([10], True)
    assert queue.take(9) == ([], False)
    assert queue.drain() == [11, 12]
    assert queue.take(100) == ([], False)


def test_decoder_offsets():
    decoder = Decoder("u32")
    decoder.feed(encode("u32", b"abc") + b"\x00")
    assert (decoder.consumed, decoder.received) == (0, 8)
    assert decoder.next() == b"abc"
    assert (decoder.consumed, decoder.received, decoder.pending) == (7, 8, 1)


# ---- descriptors the process cannot take ------------------------------------------------------

CTRUNC_CHILD = r"""
import os, resource, socket, sys
import pyuds

kind = sys.argv[1]
a, b = socket.socketpair(socket.AF_UNIX, {"stream": socket.SOCK_STREAM,
                                           "seqpacket": socket.SOCK_SEQPACKET}[kind])
conn = pyuds.Connection(b)
frame = (lambda p: len(p).to_bytes(4, "big") + p) if kind == "stream" else (lambda p: p)
r, w = os.pipe()
socket.send_fds(a, [frame(b"eight fds")], [w] * 8)
socket.send_fds(a, [frame(b"eight more")], [w] * 8)
socket.send_fds(a, [frame(b"after")], [w])
# Room for two more descriptors, no more: the lowest free numbers go first.
free = [fd for fd in range(4096) if not os.path.lexists(f"/proc/self/fd/{fd}")]
before = len(os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (free[2], hard))
try:
    conn.recv_fds()
except pyuds.FramingError as exc:
    print("FramingError:", exc)
assert len(os.listdir("/proc/self/fd")) == before, "descriptors leaked"
print("recv:", conn.recv())
assert len(os.listdir("/proc/self/fd")) == before, "descriptors leaked"
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
message, fds = conn.recv_fds()
print("recv_fds:", message, len(fds))
"""


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_more_fds_than_the_process_can_take(kind):
    """When the kernel can install only some of a message's descriptors (MSG_CTRUNC, here from
    RLIMIT_NOFILE), recv_fds() closes those that arrived and raises FramingError; recv() just
    returns the next message; the connection goes on. Runs in a child process (it lowers its
    own descriptor limit)."""
    result = subprocess.run([sys.executable, "-c", CTRUNC_CHILD, kind], cwd=NEUTRAL_CWD,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("FramingError: a message came with more file descriptors"), lines
    assert lines[1:] == ["recv: b'eight more'", "recv_fds: b'after' 1"]


# ---- pyuds send ------------------------------------------------------------------------------

def run_send(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyuds", "send", *args], cwd=NEUTRAL_CWD,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_send_kinds(kind, sock_path):
    with Peer(kind, sock_path, echo(2)):
        result = run_send("--kind", kind, sock_path, "hello", "world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\nworld\n"


def test_cli_send_abstract():
    name = abstract_name()
    with Peer("seqpacket", b"\0" + name[1:].encode(), echo(1)):
        result = run_send("--kind", "seqpacket", name, "abstract")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "abstract\n"


def test_cli_send_framing_needs_stream():
    result = run_send("--kind", "datagram", "--framing", "line", "@nobody", "x")
    assert result.returncode == 2
    assert "--framing applies to --kind stream only" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_send_bad_abstract_name():
    result = run_send("@", "x")
    assert result.returncode == 1
    assert "abstract name" in result.stderr and "Traceback" not in result.stderr
