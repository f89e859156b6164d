"""Server configuration: one frozen dataclass, validated when it is made."""
from __future__ import annotations

import dataclasses
import os
import resource
import socket
from typing import Optional, Tuple, Union

FRAMINGS = ("u32", "line", "raw")
KINDS = ("stream", "seqpacket", "datagram")
DGRAM_PEERS = 65536        # datagram peers remembered at most, by default
DGRAM_IDLE_TIMEOUT = 60.0  # seconds after which a silent datagram peer is forgotten, by default
MAX_FDS = 253  # the most descriptors Linux passes with one message (SCM_MAX_FD)
MAX_U32 = 0xFFFFFFFF
MAX_WORKERS = 1024  # worker processes at most
FD_RESERVE = 64  # descriptors kept for the server itself and the application by default


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`pyuds.Server` listens and what it accepts.

    kind: the socket type: ``"stream"`` (SOCK_STREAM, messages cut by ``framing``),
        ``"seqpacket"`` (SOCK_SEQPACKET: connections whose messages the kernel keeps apart)
        or ``"datagram"`` (SOCK_DGRAM: no connections; each datagram is a message and each
        sender address a client, remembered up to max_connections (default 65536) and until
        idle for idle_timeout (default 60 s)). ``framing`` applies to streams only.
    framing: how a byte stream is cut into messages: ``"u32"`` (4-byte big-endian length,
        then the payload), ``"line"`` (payload, then ``\\n``) or ``"raw"`` (each read is one
        message).
    mode: permission bits of the socket file. It never exists with a wider mode.
    backlog: how many connections may wait to be accepted.
    max_message_size: longest payload accepted from a client, in bytes. A client that sends a
        longer one is disconnected (the error is logged); its other messages are unaffected.
    max_connections: clients connected at once, at most; a connection over it is accepted and
        closed at once (counted as rejected), established clients are unaffected. None: the
        process's file-descriptor limit minus FD_RESERVE.
    max_output_buffer: unsent output per client, in bytes. Reading from a client pauses
        while its unsent output is at or above min(max_output_buffer / 2, 1 MiB) (its
        pipeline waits; the kernel holds what it sends) and resumes below half of that. A
        pushed message (ClientHandle.send(), broadcast()) that would take the output past
        max_output_buffer disconnects the client as a slow consumer, so the limit must exceed
        the largest message you push. Replies never do: the replies to one turn's requests
        (at most 128) may take the output past it, and the client is then disconnected only
        if it takes none of its output for flush_timeout.
    idle_timeout: seconds without traffic either way after which a client is closed; None:
        never.
    frame_timeout: seconds a client may take to complete a frame it has begun (time the
        server spends not reading it does not count); None: no limit.
    flush_timeout: seconds a closing client (and every client at shutdown) may take to receive
        the replies still owed to it before they are given up; also how long a client with
        replies past max_output_buffer waiting may go without taking any of its output.
    batch_size: events taken from the C loop per turn.
    allow_uid, allow_gid: if either is not empty, only clients whose uid is in allow_uid, or
        whose gid or one of whose supplementary groups is in allow_gid, are accepted (the
        kernel's SO_PEERCRED / SO_PEERGROUPS, taken at accept); the others are closed before
        any handler runs and counted as ``unauthorized``.
    max_fds: file descriptors a client may pass with one message (SCM_RIGHTS), at most; a
        client that passes more is disconnected (``too_many_fds``). 0: none are taken (the
        kernel discards any that are sent), and stream reads are a little cheaper.
    busy_poll_us: microseconds the loop keeps polling, without sleeping, for the next request
        before it sleeps (at most 1000000). A request that arrives meanwhile is taken without
        the time the kernel takes to wake a sleeping thread: lower latency for a client with
        one request at a time, paid for with a core kept busy. 0 (the default): never.
    workers: processes that run handlers (see pyuds._workers): 1 (the default) serves in this
        process alone; N > 1 makes this process a supervisor that owns the socket and forks N
        worker processes; ``"auto"``: one per CPU this process may run on. Always an int once
        the config is made.
    worker_timeout: seconds a worker's loop may go without a turn (a handler stuck, a loop
        blocked) before the supervisor kills the worker and starts another.
    """

    framing: str = "u32"
    mode: int = 0o600
    backlog: int = socket.SOMAXCONN
    max_message_size: int = 16 * 1024 * 1024
    max_connections: Optional[int] = None
    max_output_buffer: int = 64 * 1024 * 1024
    idle_timeout: Optional[float] = None
    frame_timeout: Optional[float] = 30.0
    flush_timeout: float = 5.0
    batch_size: int = 1024
    kind: str = "stream"
    allow_uid: Tuple[int, ...] = ()
    allow_gid: Tuple[int, ...] = ()
    max_fds: int = 16
    busy_poll_us: int = 0
    workers: Union[int, str] = 1
    worker_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {self.framing!r}")
        check_framing(self.kind, self.framing)
        for name in ("allow_uid", "allow_gid"):
            ids = getattr(self, name)
            if isinstance(ids, (int, str, bytes)):
                raise TypeError(f"{name} must be a sequence of ints, not {type(ids).__name__}")
            ids = tuple(ids)
            for value in ids:
                _check_int(name, value, 0, 2**32 - 2)
            object.__setattr__(self, name, ids)  # frozen: a tuple whatever was given
        if self.workers == "auto":
            object.__setattr__(self, "workers", max(1, len(os.sched_getaffinity(0))))
        elif isinstance(self.workers, str):
            raise ValueError(f"workers must be a number of processes or 'auto', not {self.workers!r}")
        _check_int("workers", self.workers, 1, MAX_WORKERS)
        _check_seconds("worker_timeout", self.worker_timeout)
        if self.worker_timeout < 0.1:
            raise ValueError(f"worker_timeout must be at least 0.1 seconds, not {self.worker_timeout!r}")
        _check_int("max_fds", self.max_fds, 0, MAX_FDS)
        _check_int("busy_poll_us", self.busy_poll_us, 0, 1_000_000)
        _check_int("mode", self.mode, 0, 0o777)
        _check_int("backlog", self.backlog, 1, 2**31 - 1)
        _check_int("max_message_size", self.max_message_size, 1, MAX_U32)
        if self.max_connections is not None:
            _check_int("max_connections", self.max_connections, 1, 2**31 - 1)
        _check_int("max_output_buffer", self.max_output_buffer, 2, 2**62)
        _check_int("batch_size", self.batch_size, 1, 1 << 20)
        _check_seconds("flush_timeout", self.flush_timeout)
        for name in ("idle_timeout", "frame_timeout"):
            value = getattr(self, name)
            if value is not None:
                _check_seconds(name, value)
                if value == 0:
                    raise ValueError(f"{name} must be positive, or None for no limit")

    def connection_limit(self) -> int:
        """max_connections, or the default it stands for."""
        if self.max_connections is not None:
            return self.max_connections
        if self.kind == "datagram":
            return DGRAM_PEERS
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 2**31 - 1
        return max(1, soft - FD_RESERVE)


def _check_seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 2_000_000:
        raise ValueError(f"{name} must be a number of seconds between 0 and 2000000, not {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")


def check_framing(kind: str, framing: str) -> None:
    """A framing other than the default given with a socket kind that keeps message boundaries
    is a mistake: ValueError. ("u32" is the default, so it cannot tell an explicit choice
    apart: it is let through.)"""
    if kind != "stream" and framing != "u32":
        raise ValueError(f"framing applies to kind='stream' only: a {kind} message is one packet, "
                         f"with no framing bytes (leave framing at its default, not {framing!r})")
