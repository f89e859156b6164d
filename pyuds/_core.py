"""The one module that touches the C extension: the C server, its event batch and the loop.

Layering, bottom to top: a module imports only modules below it, never one above::

    _errors, _config, _version, _systemd  ->  _address  ->  _endpoint  ->  _framing  ->  _client
        ->  _aclient  ->  _handle  ->  _core  ->  _registry  ->  _aio, _workers  ->  _server  ->  _bench
        ->  _cli  ->  __main__

(``__init__`` imports the public names from below ``_cli``.) Nothing but this module imports
``ffi`` or ``lib``, and no cdata leaves it: everything above it sees ints, bytes and Python
objects. It never imports above itself: it calls the registry it is handed (the Registry
protocol below; pyuds._registry implements it) and reports to it what happens to clients, and
the handles it indexes talk to their server through pyuds._handle.Owner, not through here.
tests/test_layering.py checks these rules.

The C loop never calls into Python. ``Core.serve()`` pulls a batch of events with one
``uds_serve_one()`` call (cffi releases the GIL around it), then walks the batch, a
handler call per message. A batch of one message (a client with one request at a time) is
answered by the next of those calls, which writes the reply before it polls. A batch of small
messages only (the busy case) is taken whole: C copies their payloads back to back and
describes them as a struct layout, so one ``struct.unpack_from()`` makes every message's
bytes object, and the replies go back in one ``uds_reply_batch()`` call with their lengths
packed by one ``struct.pack_into()``, one send() per connection. Any other batch is taken
event by event, each reply queued with ``uds_reply()``, to leave at the next poll.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import deque
from struct import error as StructError, pack_into, unpack_from
from time import monotonic
from typing import Any, Callable, Protocol, Union, cast

from ._address import SUN_PATH_MAX, to_sockaddr
from ._config import DGRAM_IDLE_TIMEOUT, ServerConfig
from ._endpoint import format_tcp, parse_inet_name
from ._errors import (
    AddressInUseError,
    ClientClosedError,
    FramingError,
    NotASocketError,
    PathTooLongError,
)
from ._framing import BytesLike
from ._handle import ClientHandle, CloseReason
from ._systemd import Watchdog
try:
    from ._uds import ffi, lib
except ImportError as exc:  # e.g. imported from a source checkout that was never built
    raise ImportError(
        "pyuds's C extension (pyuds._uds) is not built here: install pyuds with "
        "`pip install .` and import it from the environment you installed it into "
        f"(imported from {__file__})"
    ) from exc

# What a handler may return: the reply (any of these bytes-like types), or None for none.
Reply = Union[BytesLike, None]
Handler = Callable[[ClientHandle, bytes], Reply]

FRAMING_CODES = {
    "u32": lib.UDS_FRAMING_U32,
    "line": lib.UDS_FRAMING_LINE,
    "raw": lib.UDS_FRAMING_RAW,
}

KIND_CODES = {
    "stream": lib.UDS_KIND_STREAM,
    "seqpacket": lib.UDS_KIND_SEQPACKET,
    "datagram": lib.UDS_KIND_DGRAM,
}

SOCK_TYPE_NAMES = {"stream": "SOCK_STREAM", "seqpacket": "SOCK_SEQPACKET", "datagram": "SOCK_DGRAM"}

# Close reasons: CloseReason is the one table; C names each code after its member
# (UDS_CLOSE_PEER for CloseReason.PEER, ...). By member for uds_close(), and by code as a list
# for the CLOSED events.
REASON_CODES = {reason: getattr(lib, "UDS_CLOSE_" + reason.name) for reason in CloseReason}
REASONS: list[CloseReason | None] = [None] * lib.UDS_CLOSE_REASONS
for _reason, _code in REASON_CODES.items():
    REASONS[_code] = _reason
del _reason, _code

EV_MESSAGE, EV_CONNECTED, EV_CLOSED = lib.UDS_EV_MESSAGE, lib.UDS_EV_CONNECTED, lib.UDS_EV_CLOSED
ONE_SHIFT = lib.UDS_ONE_SHIFT
_STOP = -2  # Core._rest_of_turn(): serve() is done

# The int64 fields C fills in a uds_batch, as indexes into the batch read as an int64 array.
(LAYOUT_LEN, RUNS, ALL_PACKED, ANY_FDS, ONE_LEN, ONE_SLOT, REPLY_RC, N_EVENTS) = (
    ffi.offsetof("uds_batch", field) // 8
    for field in ("layout_len", "runs", "all_packed", "any_fds", "one_len", "one_slot", "reply_rc", "n"))


# A batch this small takes the per-event path: the batch path's fixed cost per turn (a few
# list conversions, a join, one more crossing) would outweigh what it saves per message.
SMALL_BATCH = 2
PACK_BYTES = 512 * 1024  # room for small payloads copied back to back, per batch
COUNTS_PER_BLOCK = 64  # clients whose counters share one allocation (see Core.counters())
# Replies longer than this go out on their own, without being joined (no copy); those up to it
# go in one uds_reply_batch() call, their lengths as C int16_t (-1: no reply).
BIG_REPLY = 32767


def check(rc: int) -> int:
    """Turns a negated errno from C into OSError (Python picks the subclass)."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def send_error(rc: int, client_id: int) -> Exception:
    """The exception for a failed uds_send() / uds_frame_check()."""
    if rc == -errno.ENOTCONN:
        return ClientClosedError(f"client {client_id} is disconnected")
    if rc == -errno.ENOBUFS:
        return ClientClosedError(f"client {client_id} was disconnected as a slow consumer: its unsent "
                                 "output would have passed max_output_buffer")
    if rc == -errno.EINVAL:
        return FramingError("a line-framed message cannot contain b'\\n' (the peer would see two messages)")
    if rc == -errno.EMSGSIZE:
        return FramingError("message too long for a u32 length header (at most 4294967295 bytes)")
    return OSError(-rc, os.strerror(-rc))


def _tcp_listen_error(err: int, host: str, port: int) -> OSError:
    """A clear error for a TCP address that cannot be listened on."""
    where = format_tcp(host, port)
    if err == errno.EADDRINUSE:
        return AddressInUseError(err, f"port {port} is in use on {host}", where)
    if err == errno.EACCES:
        return PermissionError(err, f"permission denied: port {port} needs privileges (ports below 1024)", where)
    if err == errno.EADDRNOTAVAIL:
        return OSError(err, f"{host} is not an address of this machine", where)
    return OSError(err, os.strerror(err), where)


def _listen_error(err: int, path: str) -> OSError:
    """A clear error for a socket path that cannot be served on."""
    if err == errno.EADDRINUSE:
        return AddressInUseError(err, "a server is already listening on this socket; it was left alone", path)
    if err == errno.ENOTSOCK:
        try:
            mode = os.lstat(path).st_mode
            kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a regular file" if stat.S_ISREG(mode) else "not a socket")
        except OSError:
            kind = "not a socket"
        return NotASocketError(err, f"the path exists and is {kind}; pyuds only replaces stale sockets", path)
    if err == errno.ENAMETOOLONG:
        n = len(os.fsencode(path))
        return PathTooLongError(err, f"socket path is {n} bytes; AF_UNIX allows at most {SUN_PATH_MAX}", path)
    if err == errno.EACCES:
        return PermissionError(err, "permission denied (cannot create the socket, or cannot tell whether a server answers on it)", path)
    return OSError(err, os.strerror(err), path)


def _adopt_error(err: int, fd: int, kind: str, inet: bool) -> OSError:
    """A clear error for a socket handed to the server that it cannot serve on."""
    why = {
        errno.ENOTSOCK: "is not a socket",
        errno.EBADF: "is not an open file descriptor",
        errno.EAFNOSUPPORT: "is not a TCP socket" if inet else "is not an AF_UNIX socket",
        errno.EPROTOTYPE: "is not a TCP socket" if inet else f"is not a {kind} socket ({SOCK_TYPE_NAMES[kind]})",
        errno.EDESTADDRREQ: "is not bound to an address",
        # listen() refuses a connected socket (systemd's Accept=yes passes those).
        errno.EINVAL: "is a connected socket, not one to accept on (with systemd: Accept=no)",
    }.get(err)
    if why is None:
        return OSError(err, f"cannot serve on file descriptor {fd}: {os.strerror(err)}")
    return OSError(err, f"cannot serve on file descriptor {fd}: it {why}")



def _ms(seconds: float | None) -> int:
    """Seconds as whole milliseconds for C (0: none), rounded up so a limit never shrinks to 0."""
    if seconds is None:
        return 0
    return min(2**31 - 1, max(1, int(-(-seconds * 1000 // 1)))) if seconds > 0 else 0


def _name(get: Any, *args: Any) -> str | None:
    """A socket address from C (uds_server_address, uds_peer_address) as pyuds spells it: a
    path, or "@name"; None if there is none."""
    name, length = ffi.new("char[]", 112), ffi.new("size_t *")
    if get(*args, name, length) < 0 or length[0] == 0:
        return None
    return os.fsdecode(ffi.unpack(name, length[0]))


class Registry(Protocol):
    """The client registry the loop is handed (pyuds._registry.Registry implements it): the
    loop indexes its handles and tells it what happens to clients. Loop thread only."""

    #: The ClientHandle in each slot (None: no client there); one list for the registry's
    #: whole life, which the loop keeps in a local.
    handles: list[ClientHandle | None]

    def connected(self, slot: int, cid: int, pid: int, uid: int, gid: int) -> None:
        """A client connected: admits it, or refuses it (closes it)."""

    def disconnected(self, slot: int, reason: CloseReason, err: int, discarded: int) -> None:
        """The client in slot is gone. err: the errno of an ERROR; discarded: output bytes
        given up."""

    def refused(self, reason: CloseReason, pid: int, uid: int, gid: int) -> None:
        """A client was closed before it became one: reason UNAUTHORIZED, the uid/gid policy
        refused it at accept (pid, uid, gid: who); PROXY_HEADER, it sent no valid PROXY header
        in time."""

    def anonymous(self, pid: int, uid: int, gid: int) -> ClientHandle:
        """A handle for one datagram from a sender with no address."""

    def handler_failed(self, client: ClientHandle, exc: Exception) -> None:
        """The handler raised exc on a message from client (or returned no bytes). Returns
        None, which the loop takes as the reply."""

    def reply_failed(self, client: ClientHandle, exc: Exception) -> None:
        """A reply to client could not be queued, for the reason exc gives."""


def _live(registry: Registry) -> list[ClientHandle]:
    """registry.handles, for a loop that indexes it only by the slot of an event: such a slot
    holds a client."""
    return cast("list[ClientHandle]", registry.handles)


class Core:
    """One C server, its event batch, the loop that dispatches it, and the loop's own state:
    whether to stop, and the requests other threads posted to it."""

    def __init__(self, path: str | tuple[str, int] | None, config: ServerConfig, sock_fd: int | None = None,
                 inet: bool = False, handoff: bool = False) -> None:
        """Binds path (a file, or "@name" in the abstract namespace; with inet, a numeric
        (host, port) to listen on with TCP), or serves on the bound socket sock_fd (a Unix
        socket, or with inet a TCP one; a duplicate of it: the caller's descriptor stays the
        caller's). handoff: sock_fd is instead the end of a SOCK_SEQPACKET pair over which
        another process hands over the clients it accepted (UDS_ADOPT_HANDOFF); path then only
        names the server."""
        raw_path = b""
        self.inet = inet  #: a TCP server
        if sock_fd is None and inet:
            assert isinstance(path, tuple)
            raw_path = path[0].encode("ascii")
        elif sock_fd is None:
            assert isinstance(path, str)
            to_sockaddr(path)  # fits in sun_path, no NUL byte, not empty: or a clear error
            raw_path = os.fsencode(path)
        cfg = ffi.new("uds_config *")
        cfg.framing = FRAMING_CODES[config.framing]
        cfg.max_message = config.max_message_size
        cfg.backlog = config.backlog
        cfg.mode = config.mode
        cfg.flush_timeout_ms = _ms(config.flush_timeout)
        cfg.max_connections = config.connection_limit()
        cfg.max_output = config.max_output_buffer
        idle = config.idle_timeout
        if idle is None and config.kind == "datagram":
            idle = DGRAM_IDLE_TIMEOUT  # datagram peers must be forgotten some time
        cfg.idle_timeout_ms = _ms(idle)
        cfg.frame_timeout_ms = _ms(config.frame_timeout)
        cfg.kind = lib.UDS_KIND_TCP if inet else KIND_CODES[config.kind]
        cfg.max_fds = config.max_fds
        cfg.busy_poll_us = config.busy_poll_us
        if inet:
            cfg.mode = 0  # (no socket file)
            cfg.tcp_port = path[1] if isinstance(path, tuple) else 0
            cfg.tcp_nodelay = int(config.tcp_nodelay)
            cfg.tcp_keepalive_s = int(-(-config.tcp_keepalive // 1)) if config.tcp_keepalive else 0
            cfg.proxy_protocol = int(config.proxy_protocol)
        allow_uid = ffi.new("uint32_t[]", list(config.allow_uid))  # alive until C copied them
        allow_gid = ffi.new("uint32_t[]", list(config.allow_gid))
        cfg.allow_uid, cfg.n_allow_uid = allow_uid, len(config.allow_uid)
        cfg.allow_gid, cfg.n_allow_gid = allow_gid, len(config.allow_gid)
        if sock_fd is not None:
            cfg.adopt = lib.UDS_ADOPT_HANDOFF if handoff else lib.UDS_ADOPT_LISTENER
            cfg.adopt_fd = sock_fd
        out = ffi.new("uds_server **")
        rc = lib.uds_server_new(out, raw_path, cfg)
        if rc < 0:
            if sock_fd is not None:
                raise _adopt_error(-rc, sock_fd, config.kind, inet)
            if isinstance(path, tuple):
                raise _tcp_listen_error(-rc, *path)
            raise _listen_error(-rc, path or "")
        self._srv = out[0]
        # The address clients use: a path or "@name"; for TCP the bound (host, port), whose
        # port is the one the kernel picked for port 0. (The kernel's name for a socket file
        # made here is the path, except in the rare case sock.c's bind_renamed() describes.)
        self.address: str | tuple[str, int] = path if isinstance(path, str) else ""
        if (sock_fd is not None and not handoff) or inet:
            name = _name(lib.uds_server_address, self._srv) or ""
            self.address = parse_inet_name(name) if inet else name
        # At least 4: a datagram may need three events (a peer forgotten, one new, its message).
        self._cap = cap = max(config.batch_size, 4)
        self._events = ffi.new("uds_event[]", cap)
        self._framing = cfg.framing
        # The batch as arrays C fills and Python reads whole: the payloads back to back in
        # pack, their layout (one struct.unpack_from() call makes every bytes object), and
        # the runs of events per connection (one tolist() each).
        self._pack = ffi.new("char[]", PACK_BYTES)
        self._layout = ffi.new("char[]", cap * lib.UDS_LAYOUT_ITEM_MAX)
        self._run_slot = ffi.new("int32_t[]", cap)
        self._run_end = ffi.new("uint32_t[]", cap)
        self._rcs = ffi.new("int[]", cap)
        self._reply_lens = ffi.new("int16_t[]", cap)
        self._reply_lens_buf = ffi.buffer(self._reply_lens)
        batch = self._batch = ffi.new("uds_batch *")
        batch.ev, batch.cap, batch.srv = self._events, cap, self._srv
        batch.pack, batch.pack_cap = self._pack, PACK_BYTES
        batch.layout, batch.run_slot, batch.run_end = self._layout, self._run_slot, self._run_end
        self._pack_buf = ffi.buffer(self._pack)
        self._batch_out = memoryview(ffi.buffer(batch)).cast("q")  # its fields, by index
        self._run_slot_mv = memoryview(ffi.buffer(self._run_slot)).cast("i")
        self._run_end_mv = memoryview(ffi.buffer(self._run_end)).cast("I")
        # Replies of the batch being dispatched, sent with one uds_reply_batch() call: the
        # reply to event first + i, as bytes, or None for none.
        self._replies: list[bytes | None] = []
        self._first = 0
        self._registry: Registry  # those serve() was given, set by it
        self._handler: Handler
        self._stopping = False
        self._counts_block: Any = None  # where the next clients' counters go (see counters())
        self._counts_view = memoryview(b"")  # that block's counters, as uint64 (none yet)
        self._counts_left = 0
        # Requests from other threads: (function, arguments, descriptors they own).
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...], list[int]]] = deque()
        #: After retire(): takes the socket of each client handed back (and with it the duty to
        #: close it); None: they are closed.
        self.on_moved: Callable[[int], None] | None = None

    # ---- requests from the server; on the loop's thread unless they say otherwise ----

    def send(self, slot: int, cid: int, data: bytes, fds: list[int] | None = None) -> int:
        """Queues data for the client, with descriptors fds (C duplicates them at once: the
        caller keeps its own); returns 0 or a negated errno (see send_error). Replies collected
        so far in this batch go first, so that output keeps the order it was made in."""
        if self._replies:
            self.flush_replies()
        if fds:
            return lib.uds_send_fds(self._srv, slot, cid, data, len(data), fds, len(fds))
        return lib.uds_send(self._srv, slot, cid, data, len(data))

    def flush_replies(self) -> None:
        """Sends the replies collected for this batch so far, in one call."""
        replies = self._replies
        if not replies:
            return
        first, count = self._first, len(replies)
        self._first = first + count
        try:
            # The common case, checked in bulk and in C: no None (len() raises TypeError), none
            # big ("h" raises struct.error past BIG_REPLY).
            pack_into("%dh" % count, self._reply_lens_buf, 0, *map(len, replies))  # type: ignore[arg-type]
        except (TypeError, StructError):
            each = replies[:]
            replies.clear()
            self._flush_each(first, each)
            return
        data = b"".join(cast("list[bytes]", replies))  # none is None: len() above took them all
        replies.clear()
        self._reply_batch(first, count, data)

    def _reply_batch(self, first: int, count: int, data: bytes) -> None:
        """Queues replies to events first .. first + count (their lengths in _reply_lens, their
        bytes back to back in data) in one call, and reports those that failed."""
        if not count:
            return
        if lib.uds_reply_batch(self._srv, self._events, first, count, data, self._reply_lens, self._rcs):
            rcs, events = self._rcs, self._events
            for k in range(count):
                if rcs[k]:
                    self._reply_failed_at(events[first + k], rcs[k])

    def _reply_failed_at(self, ev: Any, rc: int) -> None:
        """Reports a reply to event ev that failed, if its client still holds that slot."""
        client = self._registry.handles[ev.slot]
        if client is not None and client.id == ev.id:
            self._registry.reply_failed(client, send_error(rc, client.id))

    def _flush_each(self, first: int, replies: list[bytes | None]) -> None:
        """The replies of a batch with some None (no reply) or a big one, in order: the others
        in one call per stretch between big ones, each big one on its own, without a copy."""
        events, lens = self._events, self._reply_lens
        parts: list[bytes] = []
        start = first  # of the stretch
        for k, reply in enumerate(replies, first):
            if reply is None:
                lens[k - start] = -1
            elif len(reply) <= BIG_REPLY:
                lens[k - start] = len(reply)
                parts.append(reply)
            else:
                self._reply_batch(start, k - start, b"".join(parts))  # those before it first
                parts.clear()
                start = k + 1
                ev = events[k]
                rc = lib.uds_reply(self._srv, ev.slot, ev.id, reply, len(reply))
                if rc:
                    self._reply_failed_at(ev, rc)
        self._reply_batch(start, first + len(replies) - start, b"".join(parts))

    def _as_reply(self, client: ClientHandle, reply: Any) -> bytes | None:
        """A handler's return value that is not bytes, made a reply at once (a buffer that the
        handler reuses must be copied before it changes): None stays None, any bytes-like object
        becomes bytes, anything else is the handler's error (None)."""
        if reply is None:
            return None
        try:
            return bytes(memoryview(reply))
        except TypeError:
            self._registry.handler_failed(
                client, TypeError(f"handler returned {type(reply).__name__}; it must return bytes or None"))
            return None

    def reply(self, slot: int, cid: int, data: bytes) -> int:
        """Queues data as a reply to the client (bounded as uds_reply() says), to leave at the
        next poll; returns 0 or a negated errno (see send_error). For replies made after their
        batch (deferred handlers)."""
        return lib.uds_reply(self._srv, slot, cid, data, len(data))

    def hold(self, slot: int, cid: int, read: bool, owed: bool) -> int:
        """Holds the client from being read (read) and from being finished while replies are
        owed (owed), or releases it: uds_hold(). Returns 0 or a negated errno (-ENOTCONN:
        gone; -EOPNOTSUPP: a datagram server, which cannot stop reading one peer)."""
        return lib.uds_hold(self._srv, slot, cid, (lib.UDS_HOLD_READ if read else 0) |
                            (lib.UDS_HOLD_OPEN if owed else 0))

    def epoll_fd(self) -> int:
        """The descriptor to wait on instead of serve() (asyncio's add_reader): readable when a
        turn would find something."""
        return lib.uds_epoll_fd(self._srv)

    def timeout(self) -> int:
        """Milliseconds until serve_ready() must run again whatever the epoll descriptor says:
        0 for at once, -1 for no deadline."""
        return lib.uds_timeout(self._srv)

    def close(self, slot: int, cid: int, reason: CloseReason) -> None:
        lib.uds_close(self._srv, slot, cid, REASON_CODES[reason])  # -ENOTCONN: already gone

    def check_frame(self, data: bytes) -> int:
        """Whether data can be sent as one message (pure, any thread): 0 or a negated errno."""
        return lib.uds_frame_check(self._framing, data, len(data))

    def peer_address(self, slot: int, cid: int) -> str | None:
        """The address the client bound (a datagram peer's, where replies go); None if none.
        For TCP, the client's as "HOST:PORT" (the one its PROXY header named, with
        proxy_protocol)."""
        return _name(lib.uds_peer_address, self._srv, slot, cid)

    def counters(self, slot: int, cid: int) -> tuple[memoryview, int]:
        """Moves the client's counters to memory Python owns, where C writes them until the
        client disconnects and never after: returns a uint64 memoryview and the index of the
        first of the client's four. The memory comes in blocks for COUNTS_PER_BLOCK clients,
        freed once the handles of all of them are gone (so a client costs 32 bytes here, not
        an object of its own)."""
        if self._counts_left == 0:
            self._counts_block = ffi.new("uds_stats[]", COUNTS_PER_BLOCK)
            self._counts_view = memoryview(ffi.buffer(self._counts_block)).cast("Q")
            self._counts_left = COUNTS_PER_BLOCK
        i = COUNTS_PER_BLOCK - self._counts_left
        self._counts_left -= 1
        lib.uds_conn_set_stats(self._srv, slot, cid, self._counts_block + i)
        return self._counts_view, 4 * i

    def shutdown(self) -> int:
        """Stops accepting, removes the socket file, starts closing every client."""
        return lib.uds_shutdown(self._srv)

    def retire(self) -> int:
        """shutdown(), except that each client is handed back instead of closed, once nothing
        is owed to it: its disconnection (CloseReason.MOVED) comes with its socket, which goes
        to on_moved (uds_retire()). Returns the clients still to hand back or close."""
        return check(lib.uds_retire(self._srv))

    def _moved(self, fd: int) -> None:
        """A client handed back: its socket to on_moved, or closed."""
        if self.on_moved is None:
            os.close(fd)
        else:
            self.on_moved(fd)

    def live(self) -> int:
        return lib.uds_live(self._srv)

    def stats(self) -> dict[str, Any]:
        """The C server's counters under the names pyuds.Server.stats() gives them, in its order
        (it adds handler_errors). Any thread, while the server exists."""
        st = ffi.new("uds_server_stats *")
        lib.uds_server_stats_get(self._srv, st)
        return {
            "connections_accepted": st.accepted,
            "connections_rejected": st.closed[REASON_CODES[CloseReason.REJECTED]],
            "connections_current": st.current,
            "messages_in": st.msgs_in,
            "bytes_in": st.bytes_in,
            "messages_out": st.msgs_out,
            "bytes_out": st.bytes_out,
            "accept_pauses": st.accept_pauses,
            "fds_received": st.fds_in,
            "fds_sent": st.fds_out,
            "datagrams_truncated": st.dgrams_truncated,
            "datagrams_refused": st.dgrams_refused,
            "replies_unroutable": st.replies_unroutable,
            "closed": {reason.value: st.closed[code] for reason, code in REASON_CODES.items()},
        }

    def wakeup(self) -> None:
        """Makes the loop's current or next poll return. Any thread."""
        check(lib.uds_wakeup(self._srv))

    def wakeup_fd(self) -> int:
        return lib.uds_wakeup_fd(self._srv)

    def is_open(self) -> bool:
        return self._srv is not None

    def listen_fd(self) -> int:
        """The master socket's descriptor (the C server's own: not to be closed), -1 if none."""
        return lib.uds_listen_fd(self._srv) if self._srv is not None else -1

    def forget(self) -> None:
        """In a process forked from the one that made this server: lets go of the C server
        without freeing it. Freeing it would close the parent's sockets here (harmless) and
        remove the parent's socket file (not harmless): a child never does either."""
        self._srv, self._batch.srv = None, ffi.NULL
        self._pending.clear()

    def free(self) -> None:
        """Closes everything (no events), removes the socket file if it is still ours, and
        discards the requests still posted (closing their descriptors)."""
        if self._srv is not None:
            lib.uds_server_free(self._srv)
            self._srv, self._batch.srv = None, ffi.NULL
        for _fn, _args, fds in self._pending:
            for fd in fds:
                os.close(fd)
        self._pending.clear()

    def stop(self) -> None:
        """Makes serve() return after the batch in hand. Any thread, and signal handlers: it
        only sets flags (a signal wakes the poll through the wakeup fd; from another thread,
        call wakeup() too)."""
        self._stopping = True
        self._batch.interrupt = 1

    def post(self, fn: Callable[..., Any], args: tuple[Any, ...], fds: list[int]) -> None:
        """Queues fn(*args) for the loop's thread, which runs it after the batch in hand, and
        wakes the loop. fds: descriptors the request owns, closed once it ran (or by free()).
        Any thread, while the C server exists (pyuds.Server posts under the lock it frees it
        under)."""
        self._pending.append((fn, args, fds))
        self._batch.interrupt = 1  # after the append: the loop clears it before it takes them
        self.wakeup()

    def run_posted(self) -> None:
        """Runs the requests posted so far, in order. Loop thread."""
        pending = self._pending
        while pending:
            fn, args, fds = pending.popleft()
            try:
                fn(*args)
            finally:
                for fd in fds:  # the request's own duplicates: C made its own
                    os.close(fd)

    # ---- the loop ----

    def serve(self, registry: Registry, handler: Handler, draining: bool,
              watchdog: Watchdog | None = None) -> None:
        """Polls and dispatches until stop(), or, when draining, until every client is closed.
        watchdog: ticked every turn, and no wait is longer than its poll_ms, so that systemd's
        watchdog hears from the loop itself (a handler that never returns silences it)."""
        self._registry, self._handler = registry, handler
        # The per-request path: a client with one request at a time makes batches of one
        # message, taken here without a walk, its reply queued by the next step, so one
        # crossing into C per request. Where the time goes (latency benchmark, 1 x 1 x 64 B,
        # server pinned to one core, CPU wake-up latency held at 0): the kernel's recv, send,
        # epoll and task switches take about 80% of the server's CPU (perf record). Of the
        # 4,600 instructions per request in user space (callgrind): the interpreter 2,050 (this
        # loop and the handler 1,200 of them, the GIL's release and return 400), the C core
        # 1,400, cffi's argument conversions 450, libc 300. Locals, not attribute chains: this
        # loop runs once per request.
        batch = self._batch
        step, pack, shift, mask = lib.uds_serve_one, self._pack_buf, ONE_SHIFT, (1 << ONE_SHIFT) - 1
        handles, failed, other, bytes_ = _live(registry), registry.handler_failed, self._as_reply, bytes
        # The reply to a batch of one message goes with the next step: (client, reply, length),
        # length -1 for none (reply then b"": C takes bytes, not None, for a char *).
        reply: Any = b""  # a Reply from the handler; bytes by the time it goes to C
        length = -1
        client: ClientHandle  # set whenever length >= 0
        batch.timeout_ms = -1 if watchdog is None else watchdog.poll_ms
        batch.draining = draining
        batch.last_slot = -1  # client is unset
        # Whether to stop and whether other threads posted requests are C's to check (stop()
        # and post() set batch.interrupt): a step that finds either queues the reply and
        # returns at once, and this loop only tests what the step returned. (while True, not
        # while <condition>: on 3.11 only an unconditional jump back warms a loop up for the
        # specializing interpreter, and this function is called once, so a loop that jumps
        # back on a condition would run unspecialized for the server's life.)
        while True:
            # One message: its length if it came from client, else (slot + 1) << shift |
            # length; its reply (if any) queued. Else -1.
            one = step(batch, reply, length)
            if watchdog is not None:
                watchdog.tick()
            if one < 0:
                one = self._rest_of_turn(client if length >= 0 else None, draining)
                if one < 0:
                    if one == _STOP:
                        break
                    length = -1
                    continue
            if one > mask:
                client = handles[(one >> shift) - 1]
                one &= mask
            try:
                reply = handler(client, pack[:one]) if not client._closed else None
            except Exception as exc:
                reply = failed(client, exc)
            if type(reply) is bytes_:
                length = len(reply)
            else:
                reply = other(client, reply)
                reply, length = (b"", -1) if reply is None else (reply, len(reply))

    def _rest_of_turn(self, replied: ClientHandle | None, draining: bool) -> int:
        """serve()'s turn when uds_serve_one() did not return one message: the reply to
        replied (the last batch's one message, if it was answered) failed, or the poll did, or
        the batch is another (dispatched here), or there was none, or the step was interrupted.
        Returns what uds_serve_one() returns for one message; else runs what other threads
        posted and returns _STOP if serve() is done, else -1."""
        out = self._batch_out
        if replied is not None and out[REPLY_RC]:
            self._registry.reply_failed(replied, send_error(out[REPLY_RC], replied.id))
        n = out[N_EVENTS]
        if n < 0:
            check(n)
        if out[ONE_LEN] >= 0:  # (a batch.interrupt set meanwhile stops the next step)
            return (out[ONE_SLOT] + 1) << ONE_SHIFT | out[ONE_LEN]
        if n > 0:
            self._dispatch(n)
        self._batch.interrupt = 0  # before the requests are taken: a post from now on sets it again
        if self._pending:
            self.run_posted()
        if (lib.uds_live(self._srv) <= 0) if draining else self._stopping:
            return _STOP
        return -1

    def serve_ready(self, registry: Registry, handler: Handler, turns: int, seconds: float) -> None:
        """Serves what is ready without waiting: turns polled with timeout 0, each dispatched as
        serve() does, until one finds less than a full batch, or turns are done, or seconds have
        passed by the end of one (the first always runs; then timeout() is 0 if more waits). For
        a caller that waits in an event loop of its own on epoll_fd(), whose other work must not
        wait long. Small replies leave as they are queued; the others with the next call, which
        timeout() then asks for at once."""
        self._registry, self._handler = registry, handler
        srv, events, cap, batch = self._srv, self._events, self._cap, self._batch
        until = monotonic() + seconds
        for _ in range(turns):
            n = lib.uds_poll_batch(srv, events, cap, 0, batch)
            if n <= 0:
                check(n)
                break
            self._dispatch(n)
            if self._pending:
                self.run_posted()
            if n < cap or monotonic() > until:
                # Less than a full batch: epoll had nothing more at that moment. Another poll
                # now would most likely find nothing and cost a system call per wake-up; what
                # the turn left to do (output queued, frames unparsed) makes timeout() 0, and new
                # readiness wakes the caller's loop. Or the time is up: the same holds for what
                # is left, served by the caller's next call.
                break
        if self._pending:
            self.run_posted()

    def _dispatch(self, n: int) -> None:
        """A batch of n events that is not one message alone: packed small messages taken
        whole, anything else event by event."""
        out = self._batch_out
        if n <= SMALL_BATCH or not out[ALL_PACKED]:
            self._first = 0
            self._dispatch_events(n, out[ANY_FDS])
        else:
            self._serve_packed(n)

    def _serve_packed(self, n: int) -> None:
        """A batch of n small messages, their payloads packed back to back: the per-message
        path of a busy server. One call makes every message's bytes object, one reply (or None)
        per message is kept, and flush_replies() checks and queues them in bulk. A client closed
        earlier in the batch gets no more calls; failed() closes the client and returns None.
        Where the time goes (pipelined benchmark, 64 conns x depth 16 x 64 B, about 400 ns of
        server CPU per message): the poll ~42%, nearly all of it the kernel's recv, send and
        epoll; unpack_from() ~5%; the walk below ~22% (the handler call, the closed check, the
        append); flush_replies() ~30%: packing the lengths 14%, the join 4%, uds_reply_batch()
        11%. (Both loops write the body out: a function call per message would cost more than
        the body itself.)"""
        self._first = 0
        handles, handler, failed = _live(self._registry), self._handler, self._registry.handler_failed
        replies, other, kind, out = self._replies, self._as_reply, type, self._batch_out
        messages = unpack_from(ffi.unpack(self._layout, out[LAYOUT_LEN]), self._pack_buf)
        runs = out[RUNS]
        slots = self._run_slot_mv[:runs].tolist()
        # (The ignores below: kind is type, which mypy does not follow, so it cannot tell that
        # reply is then bytes.)
        if runs == n:  # a message per connection: no runs to walk, they would cost more
            for slot, message in zip(slots, messages):
                client = handles[slot]
                try:
                    reply = handler(client, message) if not client._closed else None
                except Exception as exc:
                    reply = failed(client, exc)
                replies.append(reply if kind(reply) is bytes else other(client, reply))  # type: ignore[arg-type]
        else:
            start = 0
            for slot, end in zip(slots, self._run_end_mv[:runs].tolist()):
                client = handles[slot]
                for message in messages[start:end]:
                    try:
                        reply = handler(client, message) if not client._closed else None
                    except Exception as exc:
                        reply = failed(client, exc)
                    replies.append(reply if kind(reply) is bytes else other(client, reply))  # type: ignore[arg-type]
                start = end
        self.flush_replies()

    def _dispatch_events(self, n: int, any_fds: int) -> None:
        """The per-event path: small batches, and those with connects, closes or payloads too
        big to pack. Replies go out one call each (large ones without an extra copy)."""
        srv, events, unpack, send = self._srv, self._events, ffi.unpack, lib.uds_reply
        registry, handler = self._registry, self._handler
        handles = _live(registry)
        for i in range(n):
            ev = events[i]
            kind = ev.type
            if kind == EV_MESSAGE:
                slot = ev.slot
                # slot -1: a datagram from a sender with no address, heard but unanswerable.
                client = handles[slot] if slot >= 0 else registry.anonymous(ev.pid, ev.uid, ev.gid)
                nfds = ev.nfds if any_fds else 0  # (a field read less per message when none has)
                if nfds:
                    # Ours now: the handler may take them; the rest are closed after it.
                    client._fds = unpack(ev.fds, nfds)
                if client._closed:
                    client._close_fds()
                    continue
                try:
                    reply = handler(client, unpack(ev.data, ev.len))
                except Exception as exc:
                    registry.handler_failed(client, exc)
                    continue
                finally:
                    if nfds:
                        client._close_fds()
                if reply is not None:
                    try:
                        rc = send(srv, slot, ev.id, reply, len(reply))  # type: ignore[arg-type]  # else TypeError
                    except TypeError:
                        data = self._as_reply(client, reply)
                        rc = 0 if data is None else send(srv, slot, ev.id, data, len(data))
                    if rc:
                        registry.reply_failed(client, send_error(rc, client.id))
            elif kind == EV_CONNECTED:
                registry.connected(ev.slot, ev.id, ev.pid, ev.uid, ev.gid)
            elif kind == EV_CLOSED:
                if ev.nfds:  # handed back (retire()), with its socket: on its way first
                    self._moved(ev.fds[0])
                registry.disconnected(ev.slot, REASONS[ev.reason], ev.err, ev.len)
            else:
                registry.refused(REASONS[ev.reason], ev.pid, ev.uid, ev.gid)


def run_loadgen(argv: list[str]) -> int:
    """Runs the C load generator (benchmarks/loadgen.c, built in as pyuds._loadgen) with this
    command line, in this process: it may exit() it. For `pyuds bench`'s child process."""
    from ._loadgen import ffi as lg_ffi, lib as lg_lib

    args = [lg_ffi.new("char[]", os.fsencode(a)) for a in argv]
    return lg_lib.uds_loadgen_main(len(args), lg_ffi.new("char *[]", [*args, lg_ffi.NULL]))


def decode_all(framing: str, data: bytes, max_message_size: int) -> tuple[list[bytes], int]:
    """Runs the C decoder over data as the server does: (messages, bytes left over).
    Raises FramingError where the server would close the connection. For tests."""
    buf = ffi.from_buffer(data)
    scan, off, plen = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("size_t *")
    code = FRAMING_CODES[framing]
    messages: list[bytes] = []
    pos = 0
    while pos < len(data):
        rc = lib.uds_frame_next(code, buf + pos, len(data) - pos, max_message_size, scan, off, plen)
        if rc == 0:
            break
        if rc < 0:
            raise FramingError(os.strerror(-rc))
        messages.append(ffi.unpack(buf + pos + off[0], plen[0]))
        pos += rc
        scan[0] = 0
    return messages, len(data) - pos
