"""Server configuration: one frozen dataclass, validated when it is made."""
from __future__ import annotations

import dataclasses
import os
import resource
import socket
from typing import Optional, Sequence, TypedDict, Union

FRAMINGS = ("u32", "line", "raw")
KINDS = ("stream", "seqpacket", "datagram")
RELOAD_CLIENTS = ("move", "close")  # what a worker replaced does with its clients
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
    max_in_flight: requests of one client handled at once, at most, by a coroutine handler or
        an executor's (1: one at a time). A client with that many in hand is not read until
        one finishes (the kernel holds what it sends); its replies leave in the order of its
        requests whatever order its handlers finish in. A plain handler without an executor
        handles one message at a time anyway.
    max_in_flight_total: handlers running at once across every client, at most, for a
        coroutine handler or an executor's. An asyncio loop runs every ready task in each pass,
        so this bounds how long one pass, and with it another task of the application, waits
        behind the handlers; a client whose request finds no room is not read until room
        frees up, first come first served.
    threads: run a plain handler in a pool of this many threads made by the server (as
        ``executor=`` does with one of yours), so that a handler may block; None: on the loop's
        thread.

    For a TCP endpoint (``tcp://HOST:PORT``), where ``kind`` is "stream" and ``mode``,
    ``allow_uid``, ``allow_gid`` and ``max_fds`` do not apply (TCP has no socket file, no
    credentials, no descriptor passing):

    tcp_nodelay: TCP_NODELAY on every connection (replies leave at once). On by default.
    tcp_keepalive: seconds a connection may be idle before keepalive probes start (then every
        third of it, at least 1 s; three unanswered close it as an ``error``), so that clients
        that vanished without a word are found; None (the default): no probes.
    proxy_protocol: every connection must begin with a PROXY protocol header, v1 or v2 (as a
        load balancer such as HAProxy sends it with ``send-proxy`` / ``send-proxy-v2``), and
        ``client.peer`` is the client it names. A connection that sends anything else, ends
        before its header does, or takes longer than frame_timeout (10 s if None) to send it
        is closed before any hook or handler runs, counted as ``proxy_header``. Enable it only
        behind a balancer: whoever can connect can write a header.
    workers: processes that run handlers (see pyuds._workers): 1 (the default) serves in this
        process alone; N > 1 makes this process a supervisor that owns the socket and forks N
        worker processes; ``"auto"``: one per CPU this process may run on. Always an int once
        the config is made.
    worker_timeout: seconds a worker's loop may go without a turn (a handler stuck, a loop
        blocked) before the supervisor kills the worker and starts another.
    reload_clients: what a worker that is replaced (SIGHUP) or removed (SIGTTOU) does with its
        clients: ``"move"`` (the default) hands each one back to the supervisor, which hands it
        to a worker that serves on, once nothing is owed to it (no frame half read, no handler
        running, every reply written; what the client sends meanwhile waits in the socket), so
        that no request is lost and no client sees its connection end; the new worker sees a
        new client (authorize and on_connect run there, and what the application kept on the
        old ClientHandle stays behind; the old worker's on_disconnect gets CloseReason.MOVED).
        ``"close"``: it answers what it was sent and closes its clients, which must connect
        again. A client not handed back within flush_timeout is closed either way. SIGTERM,
        SIGINT and shutdown() always close clients: the whole server stops.
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
    allow_uid: Sequence[int] = ()  # kept as a tuple, whatever sequence was given
    allow_gid: Sequence[int] = ()
    max_fds: int = 16
    busy_poll_us: int = 0
    max_in_flight: int = 16
    max_in_flight_total: int = 256
    threads: Optional[int] = None
    tcp_nodelay: bool = True
    tcp_keepalive: Optional[float] = None
    proxy_protocol: bool = False
    workers: Union[int, str] = 1
    worker_timeout: float = 30.0
    reload_clients: str = "move"

    @property
    def worker_count(self) -> int:
        """workers as a number: ``"auto"`` is resolved when the config is made."""
        assert isinstance(self.workers, int)
        return self.workers

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
        if self.reload_clients not in RELOAD_CLIENTS:
            raise ValueError(f"reload_clients must be one of {', '.join(RELOAD_CLIENTS)}, not {self.reload_clients!r}")
        _check_int("max_fds", self.max_fds, 0, MAX_FDS)
        for name in ("tcp_nodelay", "proxy_protocol"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if self.tcp_keepalive is not None:
            _check_seconds("tcp_keepalive", self.tcp_keepalive)
            if not 1 <= self.tcp_keepalive <= 32767:
                raise ValueError(f"tcp_keepalive must be between 1 and 32767 seconds, or None, "
                                 f"not {self.tcp_keepalive!r}")
        _check_int("busy_poll_us", self.busy_poll_us, 0, 1_000_000)
        _check_int("max_in_flight", self.max_in_flight, 1, 1 << 20)
        _check_int("max_in_flight_total", self.max_in_flight_total, 1, 1 << 20)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, 4096)
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


class ServerOptions(TypedDict, total=False):
    """The options pyuds.Server takes as keywords: ServerConfig's fields, by name and type.
    Type checkers check Server(...)'s keywords against it."""

    framing: str
    mode: int
    backlog: int
    max_message_size: int
    max_connections: Optional[int]
    max_output_buffer: int
    idle_timeout: Optional[float]
    frame_timeout: Optional[float]
    flush_timeout: float
    batch_size: int
    kind: str
    allow_uid: Sequence[int]
    allow_gid: Sequence[int]
    max_fds: int
    busy_poll_us: int
    max_in_flight: int
    max_in_flight_total: int
    threads: Optional[int]
    tcp_nodelay: bool
    tcp_keepalive: Optional[float]
    proxy_protocol: bool
    workers: Union[int, str]
    worker_timeout: float
    reload_clients: str


def _check_seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 2_000_000:
        raise ValueError(f"{name} must be a number of seconds between 0 and 2000000, not {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")


def check_transport(config: ServerConfig, tcp: bool) -> None:
    """Options of one transport asked of the other are mistakes, said clearly (ValueError):
    TCP has no socket file (mode), no credentials (allow_uid, allow_gid), no descriptor
    passing (max_fds) and no socket kinds but the stream; the tcp_* options and
    proxy_protocol are TCP's. (A default value cannot be told from an explicit one, so it is
    let through: mode 0o600, max_fds 16, tcp_nodelay True.)"""
    default = ServerConfig()
    if tcp:
        unix_only = [name for name, given in (("mode", config.mode != default.mode),
                                              ("allow_uid", bool(config.allow_uid)),
                                              ("allow_gid", bool(config.allow_gid)),
                                              ("max_fds", config.max_fds not in (0, default.max_fds)))
                     if given]
        if config.kind != "stream":
            raise ValueError(f"kind={config.kind!r} is a Unix socket's: a TCP endpoint is a stream "
                             "(leave kind at its default)")
        if unix_only:
            raise ValueError(f"{', '.join(unix_only)} {'applies' if len(unix_only) == 1 else 'apply'} to Unix "
                             "sockets only: a TCP connection has no socket file, no peer credentials and no "
                             "file-descriptor passing")
        return
    tcp_only = [name for name, given in (("tcp_nodelay", not config.tcp_nodelay),
                                         ("tcp_keepalive", config.tcp_keepalive is not None),
                                         ("proxy_protocol", config.proxy_protocol)) if given]
    if tcp_only:
        raise ValueError(f"{', '.join(tcp_only)} {'applies' if len(tcp_only) == 1 else 'apply'} to TCP "
                         "endpoints (tcp://HOST:PORT) only")


def check_framing(kind: str, framing: str) -> None:
    """A framing other than the default given with a socket kind that keeps message boundaries
    is a mistake: ValueError. ("u32" is the default, so it cannot tell an explicit choice
    apart: it is let through.)"""
    if kind != "stream" and framing != "u32":
        raise ValueError(f"framing applies to kind='stream' only: a {kind} message is one packet, "
                         f"with no framing bytes (leave framing at its default, not {framing!r})")
