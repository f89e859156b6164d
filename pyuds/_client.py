"""The client side: a blocking connection over a stream, seqpacket or datagram Unix socket,
which can pass file descriptors with its messages, or over TCP.

Pure Python over the socket module: the client never touches the compiled extension.
"""
from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import stat
from typing import Any, Iterable, Protocol, Union

from ._address import Address, from_sockaddr, is_abstract, to_sockaddr
from ._config import MAX_FDS, check_framing
from ._endpoint import EndpointLike, parse_endpoint
from ._errors import ConnectionClosedError, FramingError
from ._framing import BytesLike, Decoder, FdQueue, encode

log = logging.getLogger("pyuds")

KINDS = ("stream", "seqpacket", "datagram")
_SOCK_TYPES = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET, "datagram": socket.SOCK_DGRAM}
_KIND_OF_TYPE = {t: k for k, t in _SOCK_TYPES.items()}

_RECV_SIZE = 256 * 1024  # a stream read takes at most this much
# seqpacket/datagram: the receive buffer, and so the longest message, when max_message_size is
# None. The server's default limit too; more than Linux lets one Unix datagram carry unless
# net.core.wmem_max is raised past 8 MiB.
PACKET_MAX_DEFAULT = 16 * 1024 * 1024
_FD_SIZE = array.array("i").itemsize
# Room for a full batch of descriptors, and for credentials in case someone sets SO_PASSCRED
# on the socket: without it, they would crowd the descriptors out (MSG_CTRUNC).
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE) + socket.CMSG_SPACE(3 * _FD_SIZE)


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = Union[int, _HasFileno]


class Connection:
    """A blocking connection to a pyuds server (or any peer speaking the same protocol).

    request(message) sends one message and returns the next one received; send() and recv()
    do each half alone, e.g. to pipeline requests or receive pushed messages.

    kind says what a message is: on "stream" a frame cut by framing, on "seqpacket" and
    "datagram" one packet, with no framing bytes. Any message can carry file descriptors
    (send(..., fds=...), recv_fds()) over a Unix socket; a TCP connection (inet) is a stream
    without them. Not thread-safe: one thread at a time."""

    def __init__(self, sock: socket.socket, framing: str = "u32", max_message_size: int | None = None,
                 *, _owned_path: tuple[str, int, int] | None = None) -> None:
        self.inet = sock.family in (socket.AF_INET, socket.AF_INET6)  #: a TCP connection
        if self.inet and sock.type != socket.SOCK_STREAM:
            raise ValueError(f"a Connection over the internet needs a TCP (stream) socket, not {sock!r}")
        if not self.inet and (sock.family != socket.AF_UNIX or sock.type not in _KIND_OF_TYPE):
            raise ValueError(f"a Connection needs an AF_UNIX stream, seqpacket or datagram socket, "
                             f"or a TCP one, not {sock!r}")
        self.kind: str = _KIND_OF_TYPE[sock.type]
        check_framing(self.kind, framing)
        self._sock = sock
        if self.kind == "stream":
            self.framing: str | None = framing
            self._decoder: Decoder | None = Decoder(framing, max_message_size)
            self._fd_queue = FdQueue()
            self.max_message_size = max_message_size
            self._buf_size = _RECV_SIZE
        else:
            self.framing = None
            self._decoder = None
            self.max_message_size = _packet_max(max_message_size)
            self._buf_size = self.max_message_size
        # An anonymous mapping made at the first receive and reused: its pages become memory
        # only as messages fill them, so a 16 MiB limit costs nothing until 16 MiB arrive.
        self._buf: mmap.mmap | None = None
        self._view = memoryview(b"")  # of _buf, once there is one
        self._owned_path = _owned_path
        name = sock.getsockname()
        self._address = (name[0], name[1]) if self.inet else from_sockaddr(name)
        self._closed = False

    @property
    def address(self) -> str | tuple[str, int] | None:
        """This end's own address: ``"@name"`` if abstract (a datagram client's autobound name
        is one), a path, or None if the socket was never bound; over TCP its (host, port)."""
        return self._address

    def send(self, message: BytesLike, fds: Iterable[FdLike] = ()) -> None:
        """Sends one message (framed on a stream). fds, ints or objects with fileno(), travel with
        it (SCM_RIGHTS, at most 253); the peer gets duplicates and the caller keeps its own."""
        fd_list = fd_numbers(fds)
        if fd_list and self.inet:
            raise ValueError("file descriptors pass over Unix sockets only: this connection is TCP")
        if self.framing is not None:  # a stream
            data = encode(self.framing, bytes(message))
        else:
            data = bytes(message)
        if not fd_list:
            self._sock.sendall(data)
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fd_list))]
        # The descriptors go with the message's first byte, and the whole frame goes in the same
        # sendmsg(), so the peer's read that brings them ends inside this message. A stream
        # may take part of it: the rest follows without the descriptors. A packet goes whole.
        sent = self._sock.sendmsg([data], rights)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def recv(self) -> bytes:
        """Returns the next message, waiting for it. Descriptors that came with it are closed;
        use recv_fds() to keep them. Raises ConnectionClosedError if the server closes the
        connection first, FramingError if the message is longer than max_message_size,
        socket.timeout (TimeoutError) on timeout.

        A datagram "connection" never reports its end: a gone server shows as a timeout here,
        and as ConnectionRefusedError on send(). On seqpacket an empty message that the server
        sends just before it closes may read as the end (Linux reports both as zero bytes)."""
        message, fds, _ = self._recv_message()
        close_fds(fds)
        return message

    def recv_fds(self) -> tuple[bytes, list[int]]:
        """Returns the next message and the file descriptors that came with it, which the caller
        now owns (they are close-on-exec). Raises FramingError, after closing those that did
        arrive, if the kernel could not deliver them all (the process is out of descriptors);
        otherwise as recv()."""
        message, fds, incomplete = self._recv_message()
        if incomplete:
            close_fds(fds)
            raise FramingError("a message came with more file descriptors than this process could receive "
                               "(out of descriptors?); it was dropped, and those that arrived were closed")
        return message, fds

    def request(self, message: BytesLike, fds: Iterable[FdLike] = ()) -> bytes:
        """Sends message (with fds) and returns the reply; descriptors in the reply are closed."""
        self.send(message, fds)
        return self.recv()

    def request_fds(self, message: BytesLike, fds: Iterable[FdLike] = ()) -> tuple[bytes, list[int]]:
        """Sends message (with fds) and returns the reply and the descriptors that came with it."""
        self.send(message, fds)
        return self.recv_fds()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds each later send and receive may wait; None waits forever."""
        self._sock.settimeout(timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Closes the connection, descriptors received but not yet handed out, and removes the
        socket file this end was bound to (if it is still the one bound)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._decoder is not None:
                close_fds(self._fd_queue.drain())
            if self._owned_path is not None:
                # Before the socket closes: while it lives nobody else can bind the path, so
                # the file checked is not one that a newcomer has just created.
                _unlink_if_same(*self._owned_path)
        finally:
            self._sock.close()
            self._view.release()
            if self._buf is not None:
                self._buf.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- receiving -------------------------------------------------------------------------

    def _recv_message(self) -> tuple[bytes, list[int], bool]:
        """The next message, its descriptors, and whether the kernel dropped some of them."""
        if self._decoder is not None:
            return self._recv_stream()
        return self._recv_packet()

    def _recvmsg(self, flags: int = 0) -> tuple[int, list[int], int]:
        """One recvmsg() into the receive buffer: bytes received, descriptors, msg_flags."""
        if self._buf is None:
            self._buf = mmap.mmap(-1, self._buf_size)
            self._view = memoryview(self._buf)
        try:
            n, ancdata, msg_flags, _ = self._sock.recvmsg_into(
                [self._view], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC | flags)
        except ConnectionResetError as exc:
            raise ConnectionClosedError("the server reset the connection") from exc
        return n, _fds_in(ancdata), msg_flags

    def _recv_stream(self) -> tuple[bytes, list[int], bool]:
        decoder = self._decoder
        assert decoder is not None  # a stream has one
        while True:
            message = decoder.next()
            if message is not None:
                fds, incomplete = self._fd_queue.take(decoder.consumed)
                return message, fds, incomplete
            n, fds, flags = self._recvmsg()
            if not n:
                part = f" in the middle of a message ({decoder.pending} bytes)" if decoder.pending else ""
                raise ConnectionClosedError(f"the server closed the connection{part}")
            decoder.feed(self._view[:n])
            if fds or flags & socket.MSG_CTRUNC:
                self._fd_queue.add(decoder.received - 1, fds, bool(flags & socket.MSG_CTRUNC))

    def _recv_packet(self) -> tuple[bytes, list[int], bool]:
        # MSG_TRUNC asks for the packet's real length, so a too long one can be reported as such.
        n, fds, flags = self._recvmsg(socket.MSG_TRUNC)
        if flags & socket.MSG_TRUNC or n > self._buf_size:
            close_fds(fds)
            raise FramingError(f"a {self.kind} message of {n} bytes exceeds max_message_size "
                               f"({self._buf_size} bytes); it was dropped")
        if not n and not fds and self.kind == "seqpacket" and self._peer_shut_down():
            # Linux reads the end of a seqpacket connection as an empty packet; an empty
            # message from a peer still there is one.
            raise ConnectionClosedError("the server closed the connection")
        return bytes(self._view[:n]), fds, bool(flags & socket.MSG_CTRUNC)

    def _peer_shut_down(self) -> bool:
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP)
        return bool(poller.poll(0))


def connect(endpoint: EndpointLike, framing: str = "u32", *, kind: str = "stream",
            timeout: float | None = None, max_message_size: int | None = None,
            bind: Address | None = None) -> Connection:
    """Connects to the server at endpoint and returns a blocking Connection.

    endpoint is a socket file (or ``unix:PATH``), ``"@name"`` (or ``unix-abstract:NAME``) for a
    name in Linux's abstract namespace, ``tcp://HOST:PORT`` (``[v6]`` in brackets; a name is
    resolved and each of its addresses tried), or ``fd://N``, a socket already connected
    (this process's descriptor N; the Connection works on a duplicate). kind is "stream"
    (messages framed by framing), "seqpacket" or "datagram" (a message is one packet;
    framing does not apply; Unix sockets only). timeout applies to the connect and to every
    later send and receive. max_message_size bounds a received message: None means no limit
    on a stream, 16 MiB on the other kinds (their receive buffer; a longer packet raises
    FramingError).

    bind gives this end an address of its own (a path or ``"@name"``) before it connects. A
    datagram client needs one for replies to reach it: with bind=None, Linux picks a unique
    abstract name (Connection.address says which). A socket file bound here is removed by
    close()."""
    if kind not in _SOCK_TYPES:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_framing(kind, framing)
    if kind == "stream":
        Decoder(framing, max_message_size)  # validates both before any socket exists
    else:
        _packet_max(max_message_size)
    target = parse_endpoint(endpoint)
    if target.scheme != "unix":
        if bind is not None:
            raise ValueError(f"bind= applies to Unix sockets, not to {target}")
        if target.scheme == "fd":
            sock = socket.socket(fileno=_dup_socket(target.fd))
        else:
            if kind != "stream":
                raise ValueError(f"kind={kind!r} is a Unix socket's: a TCP connection is a stream")
            sock = socket.create_connection((target.host, target.port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests leave at once
        try:
            sock.settimeout(timeout)
            return Connection(sock, framing, max_message_size)
        except BaseException:
            sock.close()
            raise
    address = target.sockaddr()
    local = to_sockaddr(bind, "bind address") if bind is not None else None

    sock = socket.socket(socket.AF_UNIX, _SOCK_TYPES[kind])
    owned: tuple[str, int, int] | None = None
    try:
        sock.settimeout(timeout)
        if local is not None:
            sock.bind(local)
            if not is_abstract(local):
                st = os.lstat(local)
                owned = (os.path.abspath(os.fsdecode(local)), st.st_dev, st.st_ino)
        elif kind == "datagram":
            sock.bind("")  # autobind: the kernel picks a unique abstract name
        sock.connect(address)
        return Connection(sock, framing, max_message_size, _owned_path=owned)
    except BaseException:
        try:
            if owned is not None:
                _unlink_if_same(*owned)
        finally:
            sock.close()
        raise


def _dup_socket(fd: int | None) -> int:
    """A duplicate of descriptor fd, which must be a socket: OSError otherwise."""
    assert fd is not None
    dup = os.dup(fd)
    try:
        if not stat.S_ISSOCK(os.fstat(dup).st_mode):
            raise OSError(errno.ENOTSOCK, f"fd://{fd}: descriptor {fd} is not a socket")
    except BaseException:
        os.close(dup)
        raise
    return dup


def _packet_max(max_message_size: int | None) -> int:
    if max_message_size is None:
        return PACKET_MAX_DEFAULT
    if not isinstance(max_message_size, int) or max_message_size < 1:
        raise ValueError(f"max_message_size must be None or at least 1, not {max_message_size!r}")
    return max_message_size


def fd_numbers(fds: Iterable[FdLike]) -> list[int]:
    """File descriptors as ints (objects with fileno() allowed), at most 253 (SCM_MAX_FD):
    ValueError or TypeError otherwise. The server's send() checks its fds with it too."""
    numbers = []
    for f in fds:
        if isinstance(f, int):
            fd = f
        elif hasattr(f, "fileno"):
            fd = f.fileno()
        else:
            raise TypeError(f"fds holds ints or objects with fileno(), not {f!r}")
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"not a file descriptor: {f!r}")
        numbers.append(fd)
    if len(numbers) > MAX_FDS:
        raise ValueError(f"one message carries at most {MAX_FDS} file descriptors (Linux's SCM_MAX_FD), "
                         f"not {len(numbers)}")
    return numbers


def _fds_in(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, type_, data in ancdata:
        if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return fds.tolist()


def close_fds(fds: Iterable[int]) -> None:
    """Closes each descriptor; one already closed is passed over."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unlink_if_same(path: str, dev: int, ino: int) -> None:
    """Removes path if it is still the file (device, inode) this client bound."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the client socket file %s: %s", path, exc)
