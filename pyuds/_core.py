"""The one module that touches the C extension.

Rule: nothing else in pyuds imports ``ffi`` or ``lib``, and nothing cdata leaves this module
except as an opaque token (the per-client counters). Everything above it sees ints, bytes and
Python objects.

The C loop never calls into Python. ``Core.serve()`` pulls a batch of events with one
``uds_poll()`` call (cffi releases the GIL around it), then walks the batch: a handler call
per message, its reply queued with ``uds_send()``; the replies leave at the next poll, one
send() per connection.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any

from ._config import ServerConfig
from ._errors import (
    AddressInUseError,
    ClientClosedError,
    FramingError,
    NotASocketError,
    PathTooLongError,
)
try:
    from ._uds import ffi, lib
except ImportError as exc:  # e.g. imported from a source checkout that was never built
    raise ImportError(
        "pyuds's C extension (pyuds._uds) is not built here: install pyuds with "
        "`pip install .` and import it from the environment you installed it into "
        f"(imported from {__file__})"
    ) from exc

if TYPE_CHECKING:
    from ._server import Server

FRAMING_CODES = {
    "u32": lib.UDS_FRAMING_U32,
    "line": lib.UDS_FRAMING_LINE,
    "raw": lib.UDS_FRAMING_RAW,
}

# C close reasons, by code, as the names pyuds.CloseReason uses.
REASON_NAMES = {
    lib.UDS_CLOSE_PEER: "peer",
    lib.UDS_CLOSE_ERROR: "error",
    lib.UDS_CLOSE_TOO_LARGE: "too_large",
    lib.UDS_CLOSE_SHUTDOWN: "shutdown",
    lib.UDS_CLOSE_LOCAL: "closed",
    lib.UDS_CLOSE_REJECTED: "rejected",
    lib.UDS_CLOSE_HANDLER_ERROR: "handler_error",
    lib.UDS_CLOSE_IDLE_TIMEOUT: "idle_timeout",
    lib.UDS_CLOSE_FRAME_TIMEOUT: "frame_timeout",
    lib.UDS_CLOSE_SLOW_CONSUMER: "slow_consumer",
}
REASON_CODES = {name: code for code, name in REASON_NAMES.items()}

SUN_PATH_MAX = 107  # bytes of a path name, leaving room for the terminating NUL


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


def _ms(seconds: float | None) -> int:
    """Seconds as whole milliseconds for C (0: none), rounded up so a limit never shrinks to 0."""
    if seconds is None:
        return 0
    return min(2**31 - 1, max(1, int(-(-seconds * 1000 // 1)))) if seconds > 0 else 0


class Core:
    """One C server, its event batch and the loop that dispatches it."""

    def __init__(self, path: str, config: ServerConfig) -> None:
        raw_path = os.fsencode(path)
        if len(raw_path) > SUN_PATH_MAX:
            raise _listen_error(errno.ENAMETOOLONG, path)
        if b"\0" in raw_path:
            raise ValueError("socket path contains a NUL byte")
        cfg = ffi.new("uds_config *")
        cfg.framing = FRAMING_CODES[config.framing]
        cfg.max_message = config.max_message_size
        cfg.backlog = config.backlog
        cfg.mode = config.mode
        cfg.flush_timeout_ms = _ms(config.flush_timeout)
        cfg.max_connections = config.connection_limit()
        cfg.max_output = config.max_output_buffer
        cfg.idle_timeout_ms = _ms(config.idle_timeout)
        cfg.frame_timeout_ms = _ms(config.frame_timeout)
        out = ffi.new("uds_server **")
        rc = lib.uds_server_new(out, raw_path, cfg)
        if rc < 0:
            raise _listen_error(-rc, path)
        self._srv = out[0]
        self._cap = config.batch_size
        self._events = ffi.new("uds_event[]", self._cap)
        self._framing = cfg.framing

    # ---- requests from the server; all but wakeup() on the loop's thread ----

    def send(self, slot: int, cid: int, data: bytes) -> int:
        """Queues data for the client; returns 0 or a negated errno (see send_error)."""
        return lib.uds_send(self._srv, slot, cid, data, len(data))

    def close(self, slot: int, cid: int, reason: str) -> None:
        lib.uds_close(self._srv, slot, cid, REASON_CODES[reason])  # -ENOTCONN: already gone

    def check_frame(self, data: bytes) -> int:
        """Whether data can be sent as one message (pure, any thread): 0 or a negated errno."""
        return lib.uds_frame_check(self._framing, data, len(data))

    def bind_stats(self, slot: int, cid: int) -> Any:
        """Moves the client's counters to memory this object owns; returns it (opaque)."""
        stats = ffi.new("uds_stats *")
        lib.uds_conn_set_stats(self._srv, slot, cid, stats)
        return stats

    def shutdown(self) -> int:
        """Stops accepting, removes the socket file, starts closing every client."""
        return lib.uds_shutdown(self._srv)

    def live(self) -> int:
        return lib.uds_live(self._srv)

    def stats(self) -> dict[str, Any]:
        """The C server's counters (any thread, while the server exists)."""
        st = ffi.new("uds_server_stats *")
        lib.uds_server_stats_get(self._srv, st)
        return {
            "accepted": st.accepted,
            "current": st.current,
            "messages_in": st.msgs_in,
            "bytes_in": st.bytes_in,
            "messages_out": st.msgs_out,
            "bytes_out": st.bytes_out,
            "accept_pauses": st.accept_pauses,
            "closed": {name: st.closed[code] for code, name in REASON_NAMES.items()},
        }

    def wakeup(self) -> None:
        """Makes the loop's current or next poll return. Any thread."""
        check(lib.uds_wakeup(self._srv))

    def wakeup_fd(self) -> int:
        return lib.uds_wakeup_fd(self._srv)

    def is_open(self) -> bool:
        return self._srv is not None

    def free(self) -> None:
        """Closes everything (no events), removes the socket file if it is still ours."""
        if self._srv is not None:
            lib.uds_server_free(self._srv)
            self._srv = None

    # ---- the loop ----

    def serve(self, server: Server, draining: bool) -> None:
        """Polls and dispatches until server._stopping is set, or, when draining, until every
        client is closed."""
        # Locals, not attribute chains: this loop runs once per message.
        srv, events, cap = self._srv, self._events, self._cap
        poll, send, live, unpack = lib.uds_poll, lib.uds_send, lib.uds_live, ffi.unpack
        MESSAGE, CONNECTED = lib.UDS_EV_MESSAGE, lib.UDS_EV_CONNECTED
        handler = server._handler
        handles = server._handles
        pending = server._pending
        while (live(srv) > 0) if draining else not server._stopping:
            n = poll(srv, events, cap, -1)
            if n < 0:
                check(n)
            for i in range(n):
                ev = events[i]
                kind = ev.type
                if kind == MESSAGE:
                    slot = ev.slot
                    client = handles[slot]
                    if client._closed:
                        continue  # closed earlier in this batch: no more handler calls
                    try:
                        reply = handler(client, unpack(ev.data, ev.len))
                    except Exception as exc:
                        server._handler_failed(client, exc)
                        continue
                    if reply is not None:
                        try:
                            rc = send(srv, slot, ev.id, reply, len(reply))
                        except TypeError:
                            rc = server._reply_other(client, reply)
                        if rc:
                            server._reply_failed(client, rc)
                elif kind == CONNECTED:
                    server._connected(ev.slot, ev.id, ev.pid, ev.uid, ev.gid)
                else:
                    server._disconnected(ev.slot, REASON_NAMES[ev.reason], ev.err, ev.len)
            if pending:
                server._run_pending()


def read_stats(stats: Any) -> tuple[int, int, int, int]:
    """(messages in, bytes in, messages out, bytes out) from a bind_stats() token."""
    return stats.msgs_in, stats.bytes_in, stats.msgs_out, stats.bytes_out


def decode_all(framing: str, data: bytes, max_message_size: int) -> tuple[list[bytes], int]:
    """Runs the C decoder over data as the server does: (messages, bytes left over).
    Raises FramingError where the server would close the connection. For tests."""
    buf = ffi.from_buffer(data)
    scan, off, plen = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("size_t *")
    code = FRAMING_CODES[framing]
    messages, pos = [], 0
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
