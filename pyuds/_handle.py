"""A connected client as the application sees it, and why clients go away.

A ClientHandle never touches the C extension: it asks its owner (the Server, through the
Owner protocol below) to send, close and look up addresses, and reads its counters from four
integers of a memoryview that the core gave it, where C writes them.
"""
from __future__ import annotations

import enum
import time
from typing import Any, Iterable, NamedTuple, Protocol, Union

from ._client import FdLike, close_fds
from ._endpoint import format_hostport
from ._framing import BytesLike


class CloseReason(str, enum.Enum):
    """Why a client's connection ended (compares equal to its string value)."""

    PEER = "peer"                    #: the client closed its end or vanished
    ERROR = "error"                  #: a socket error
    TOO_LARGE = "too_large"          #: it sent a message over max_message_size
    SHUTDOWN = "shutdown"            #: the server shut down
    CLOSED = "closed"                #: the application called close()
    REJECTED = "rejected"            #: on_connect refused it
    HANDLER_ERROR = "handler_error"  #: a handler (or on_connect) raised on its behalf
    IDLE_TIMEOUT = "idle_timeout"    #: no traffic for idle_timeout seconds
    FRAME_TIMEOUT = "frame_timeout"  #: it began a frame and did not finish it in frame_timeout
    SLOW_CONSUMER = "slow_consumer"  #: it does not read: a push would have passed max_output_buffer,
                                     #: or replies past it waited flush_timeout untaken
    UNAUTHORIZED = "unauthorized"    #: authorize() refused it (allow_uid/allow_gid refusals
                                     #: never become clients; they are only counted)
    TOO_MANY_FDS = "too_many_fds"    #: it passed more file descriptors with a message than max_fds
    EVICTED = "evicted"              #: a datagram peer forgotten to make room (max_connections)
    PROXY_HEADER = "proxy_header"    #: proxy_protocol: no valid PROXY header came first, in time
                                     #: (never a client: such connections are only counted)
    MOVED = "moved"                  #: with workers: its worker was replaced or removed, and it
                                     #: went on, connected, to another worker (a new client there)

    def __str__(self) -> str:
        return self.value


class UnixPeer(NamedTuple):
    """A Unix-socket client: its process's credentials, taken by the kernel when it connected
    (SO_PEERCRED; for a datagram peer, SCM_CREDENTIALS)."""

    pid: int
    uid: int
    gid: int


class InetPeer(NamedTuple):
    """A TCP client: its address and port. With proxy_protocol, the original client's, as the
    balancer's PROXY header names it (the balancer's own address is not the peer)."""

    host: str
    port: int


Peer = Union[UnixPeer, InetPeer]


class Owner(Protocol):
    """What a ClientHandle asks of the server it belongs to (pyuds.Server). Any thread: the
    owner routes each request to its loop."""

    def _send(self, client: ClientHandle, message: BytesLike, fds: Iterable[FdLike]) -> None:
        """ClientHandle.send()."""

    def _close(self, client: ClientHandle) -> None:
        """ClientHandle.close()."""

    def _peer_address(self, client: ClientHandle) -> str | None:
        """The address the client's socket is bound to; None if it has none."""



class ClientHandle:
    """One connected client (a data socket of the server), kept in ``server.clients``.

    id: unique for the server's lifetime. peer: who it is, a :class:`UnixPeer` (pid, uid,
    gid) or, over TCP, an :class:`InetPeer` (host, port). pid, uid, gid: the peer process's
    credentials, taken by the kernel when it connected (SO_PEERCRED; for a datagram peer,
    those its datagrams come with: datagrams from the same address with other credentials
    make another client); a TCP client has none, and asking for them raises AttributeError,
    which says so. connected_at: time.time() then. For a datagram server, a client is
    a sender address; a datagram from a sender with no address gets a handle of its own (id
    0, not in the registry) that can read but not be answered.
    data: a dict for the application's per-client state.
    """

    __slots__ = ("id", "_pid", "_uid", "_gid", "_inet", "connected_at", "close_reason", "_data",
                 "_owner", "_slot", "_counts", "_counts_at", "_closed", "_admitted", "_fds", "_address")

    def __init__(self, owner: Owner, slot: int, cid: int, pid: int, uid: int, gid: int,
                 counts: memoryview | None, counts_at: int) -> None:
        self.id = cid
        self._pid = pid
        self._uid = uid
        self._gid = gid
        self._inet: InetPeer | None = None  # a TCP client's address (then no credentials)
        self.connected_at = time.time()
        self.close_reason: CloseReason | None = None  #: set once disconnected
        self._data: dict[Any, Any] | None = None  # made on first use: most clients need none
        self._owner = owner
        self._slot = slot
        # Its counters: messages in, bytes in, messages out, bytes out at counts[counts_at:
        # counts_at + 4] (uint64, written by C until it disconnected). None: a datagram sender
        # with no address, never counted.
        self._counts = counts
        self._counts_at = counts_at
        self._closed = False     # close() was called or the connection is gone
        self._admitted = False   # on_connect accepted it: it is (or was) in the registry
        self._fds: list[int] | None = None  # descriptors that came with the message in hand
        self._address: str | InetPeer | None | bool = False  # False: not asked yet

    def send(self, message: BytesLike, fds: Iterable[FdLike] = ()) -> None:
        """Pushes a message to this client, framed like replies. Any thread. From a handler it
        goes out after the replies to the messages handled before, so it can serve as the
        reply (return None then).

        fds: file descriptors (ints or objects with fileno()) passed along with the message
        (SCM_RIGHTS). They are duplicated at once, so the caller may close its own as soon as
        send() returns.

        Raises ClientClosedError if the client is closed or disconnected, FramingError if the
        message cannot be framed, ValueError for more than 253 fds (or fds with an empty
        message on a stream, which cannot carry them), OSError(EBADF) for a descriptor that is
        not open."""
        self._owner._send(self, message, fds)

    def take_fds(self) -> list[int]:
        """The file descriptors that came with the message being handled (SCM_RIGHTS),
        close-on-exec; empty if none. Call it from the handler: the caller owns them from then
        on and must close them. Those the handler does not take are closed when it returns."""
        fds, self._fds = self._fds, None
        return fds or []

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, None
        if fds:
            close_fds(fds)

    def close(self) -> None:
        """Disconnects this client once the replies already queued for it are sent. No more
        messages from it reach the handler. Any thread; closing twice is harmless."""
        self._owner._close(self)

    @property
    def peer(self) -> Peer:
        """Who the client is: UnixPeer(pid, uid, gid), or InetPeer(host, port) over TCP."""
        return self._inet if self._inet is not None else UnixPeer(self._pid, self._uid, self._gid)

    def _credential(self, value: int, name: str) -> int:
        if self._inet is None:
            return value
        raise AttributeError(f"client {self.id} is a TCP client ({self._inet.host} port {self._inet.port}): "
                             f"{name} and the other peer credentials exist for Unix-socket clients only; "
                             "client.peer says who it is")

    @property
    def pid(self) -> int:
        """The client process's pid (Unix sockets only)."""
        return self._credential(self._pid, "pid")

    @property
    def uid(self) -> int:
        """The client process's uid (Unix sockets only)."""
        return self._credential(self._uid, "uid")

    @property
    def gid(self) -> int:
        """The client process's primary gid (Unix sockets only)."""
        return self._credential(self._gid, "gid")

    def _describe(self) -> str:
        """Who the client is, for the log: "pid 12, uid 1000, gid 1000" or "192.0.2.7:51234"."""
        if self._inet is not None:
            return format_hostport(*self._inet)
        return f"pid {self._pid}, uid {self._uid}, gid {self._gid}"

    @property
    def address(self) -> str | tuple[str, int] | None:
        """The address the client's socket is bound to: a path, or "@name" for an abstract
        name (a datagram client's, where replies go); None if it has none; over TCP, its
        (host, port), as in peer. Known while the client is connected (and afterwards, once
        asked)."""
        if self._address is False:
            self._address = None if self._closed or self._slot < 0 else self._owner._peer_address(self)
        return self._address  # type: ignore[return-value]

    @property
    def data(self) -> dict[Any, Any]:
        """A dict for the application's per-client state (empty until used)."""
        if self._data is None:
            self._data = {}
        return self._data

    @data.setter
    def data(self, value: dict[Any, Any]) -> None:
        self._data = value

    @property
    def closed(self) -> bool:
        """True once close() was called or the client disconnected."""
        return self._closed

    def _counter(self, index: int) -> int:
        """The client's counter at index (see _counts)."""
        counts = self._counts
        return counts[self._counts_at + index] if counts is not None else 0

    @property
    def messages_received(self) -> int:
        """Messages received from this client."""
        return self._counter(0)

    @property
    def bytes_received(self) -> int:
        """Payload bytes received (framing not counted)."""
        return self._counter(1)

    @property
    def messages_sent(self) -> int:
        """Replies and pushed messages queued for this client."""
        return self._counter(2)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes queued for this client (framing not counted)."""
        return self._counter(3)

    def __repr__(self) -> str:
        state = f"closed ({self.close_reason})" if self.close_reason else "closing" if self._closed else "open"
        return f"<ClientHandle id={self.id} {self._describe()} {state}>"
