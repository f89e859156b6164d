"""The ``pyuds`` command: ``pyuds serve`` runs a server, ``pyuds send`` talks to one. Both take
an endpoint: a socket path, @NAME, unix:PATH, unix-abstract:NAME, tcp://HOST:PORT or fd://N."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
from typing import Any, Callable, Sequence

from ._client import KINDS as CLIENT_KINDS
from ._config import FRAMINGS, KINDS, RELOAD_CLIENTS, ServerConfig
from ._endpoint import format_tcp
from ._errors import PyudsError
from ._version import __version__

DEFAULT_PATH = "./pyuds.sock"


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0000 to 0777)")
    return mode


def _load_callable(spec: str, option: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise argparse.ArgumentTypeError(f"{option} wants MODULE:FUNCTION, not {spec!r}")
    # Like `python -m`, let modules in the current directory be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise argparse.ArgumentTypeError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise argparse.ArgumentTypeError(f"{module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise argparse.ArgumentTypeError(f"{spec} is not callable")
    return target


def _load_handler(spec: str) -> Callable[..., Any]:
    return _load_callable(spec, "--handler")


def _load_authorize(spec: str) -> Callable[..., Any]:
    return _load_callable(spec, "--authorize")


def _load_worker_start(spec: str) -> Callable[..., Any]:
    return _load_callable(spec, "--on-worker-start")


def _fd_number(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    try:
        os.fstat(fd)
    except OSError:
        raise argparse.ArgumentTypeError(f"{fd} is not an open file descriptor") from None
    return fd


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers, nor auto") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"at least 1 worker, not {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyuds", description="Unix-domain-socket and TCP servers with Python handlers.")
    parser.add_argument("--version", action="version", version=f"pyuds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a server until Ctrl-C or SIGTERM",
                           description="Run a server until Ctrl-C or SIGTERM; then it closes every client "
                                       "and removes its socket file.")
    serve.add_argument("endpoint", nargs="?", default=None, metavar="ENDPOINT",
                       help="socket file (or unix:PATH), @NAME (or unix-abstract:NAME) for Linux's abstract "
                            "namespace, tcp://HOST:PORT (port 0: any free one), or fd://N "
                            f"(default: {DEFAULT_PATH}, or the socket systemd passes by socket activation)")
    serve.add_argument("--kind", choices=KINDS, default=None,
                       help="socket type (default: stream; with socket activation, the passed socket's type)")
    serve.add_argument("--handler", metavar="MODULE:FUNCTION", type=_load_handler,
                       help="handler(client, message) -> bytes | None (default: echo)")
    serve.add_argument("--framing", choices=FRAMINGS, default="u32", help="default: u32")
    serve.add_argument("--mode", type=_octal_mode, default=ServerConfig.mode,
                       help="socket file permissions, octal (default: 0600)")
    serve.add_argument("--backlog", type=int, default=ServerConfig.backlog)
    serve.add_argument("--max-message-size", type=int, default=ServerConfig.max_message_size, metavar="BYTES",
                       help="longest message accepted; a client sending a longer one is disconnected "
                            "(default: 16 MiB)")
    serve.add_argument("--max-connections", type=int, default=None, metavar="N",
                       help="clients at once; more are accepted and closed at once "
                            "(default: the file-descriptor limit minus 64)")
    serve.add_argument("--max-output-buffer", type=int, default=ServerConfig.max_output_buffer, metavar="BYTES",
                       help="unsent output per client; reading from a client pauses at min(half of it, "
                            "1 MiB), a push that would pass it disconnects the client, and replies past "
                            "it must be taken within the flush timeout (default: 64 MiB)")
    serve.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                       help="close clients idle this long (default: never)")
    serve.add_argument("--frame-timeout", type=float, default=ServerConfig.frame_timeout, metavar="SECONDS",
                       help="close a client that begins a message and does not finish it in time "
                            "(default: 30)")
    serve.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID",
                       help="accept only clients running as this uid (or one of --allow-gid); repeatable")
    serve.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID",
                       help="accept only clients with this group, primary or supplementary (or one of "
                            "--allow-uid); repeatable")
    serve.add_argument("--authorize", metavar="MODULE:FUNCTION", type=_load_authorize,
                       help="authorize(client) -> bool, run before the handler sees a client, with its "
                            "credentials in client.pid / uid / gid; false refuses it")
    serve.add_argument("--max-fds", type=int, default=ServerConfig.max_fds, metavar="N",
                       help="file descriptors a client may pass with one message (default: 16)")
    serve.add_argument("--busy-poll-us", type=int, default=ServerConfig.busy_poll_us, metavar="MICROSECONDS",
                       help="keep polling this long for the next request before sleeping: lower "
                            "latency for a core kept busy (default: 0, never)")
    serve.add_argument("--proxy-protocol", action="store_true",
                       help="TCP: every connection begins with a PROXY protocol header (v1 or v2) naming the "
                            "client, as a load balancer sends it; connections without one are closed")
    serve.add_argument("--tcp-keepalive", type=float, default=None, metavar="SECONDS",
                       help="TCP: probe connections idle this long, closing those whose peer is gone "
                            "(default: no probes)")
    serve.add_argument("--fd-name", metavar="NAME",
                       help="with socket activation passing several sockets: serve the one systemd "
                            "names NAME (FileDescriptorName=)")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="worker processes running the handler, under a supervisor that owns the "
                            "socket; auto: one per usable CPU (default: 1, this process alone)")
    serve.add_argument("--on-worker-start", metavar="MODULE:FUNCTION", type=_load_worker_start,
                       help="on_worker_start(worker_id), run in each worker process before it serves")
    serve.add_argument("--worker-timeout", type=float, default=ServerConfig.worker_timeout, metavar="SECONDS",
                       help="kill and replace a worker whose loop is stuck this long (default: 30)")
    serve.add_argument("--reload-clients", choices=RELOAD_CLIENTS, default=ServerConfig.reload_clients,
                       help="what a worker replaced (SIGHUP) or removed (SIGTTOU) does with its clients: move "
                            "them, connected, to the workers that serve on, or close them (default: move)")
    serve.add_argument("--flush-timeout", type=float, default=ServerConfig.flush_timeout, metavar="SECONDS",
                       help="how long a client that is closed, or moved to another worker, may take to "
                            "receive what it is owed (default: 5)")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every client's connect and disconnect")

    send = sub.add_parser("send", help="send messages to a server and print each reply",
                          description="Send each MESSAGE to the server at ENDPOINT and print each reply on its "
                                      "own line.")
    send.add_argument("endpoint", metavar="ENDPOINT",
                      help="socket file, @NAME for a name in the abstract namespace, tcp://HOST:PORT, ...")
    send.add_argument("messages", nargs="+", metavar="MESSAGE")
    send.add_argument("--kind", choices=CLIENT_KINDS, default="stream",
                      help="socket type; a seqpacket or datagram message is one packet (default: stream)")
    send.add_argument("--framing", choices=FRAMINGS, default=None, help="stream only (default: u32)")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each reply (default: 10)")
    send.add_argument("--fd", type=_fd_number, action="append", default=[], metavar="FD", dest="fds",
                      help="pass this open file descriptor with each message (SCM_RIGHTS), e.g. 1 for "
                           "this terminal; repeatable")

    bench = sub.add_parser("bench", help="measure a handler under load",
                           description="Start a server with the handler and drive it with pyuds's C load "
                                       "generator (u32 framing); print throughput, latency and server CPU.")
    bench.add_argument("--handler", metavar="MODULE:FUNCTION",
                       help="handler(client, message) -> bytes | None (default: echo, whose replies are "
                            "checked byte for byte)")
    bench.add_argument("--conns", type=int, default=64, help="connections (default: 64)")
    bench.add_argument("--depth", type=int, default=16, help="requests in flight on each (default: 16)")
    bench.add_argument("--size", type=int, default=64, help="payload bytes per request (default: 64)")
    bench.add_argument("--duration", type=float, default=5.0, help="seconds measured (default: 5)")
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default: 1)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from ._server import Server

    # With workers, several processes log: each line says which.
    which = " [%(process)d]" if args.workers != 1 else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s %(name)s{which} %(levelname)s %(message)s")
    # SIGTERM or Ctrl-C must stop the server cleanly from the moment its socket file exists,
    # which is before serve_forever() runs: catch them first, and hand them to the server as
    # soon as there is one. (serve_forever() leaves handlers that are not the defaults alone.)
    early: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    try:
        inherited = _activation_socket(args.fd_name)
        kind = args.kind or "stream"
        if inherited is not None:
            fd, kind_found, address = inherited
            kind = args.kind or kind_found
            if args.endpoint is not None and args.endpoint != address:
                raise ValueError(f"socket activation passed a socket on {address!r}, not on {args.endpoint!r}")
            where: dict[str, Any] = {"sock": fd}
        else:
            where = {"endpoint": args.endpoint or DEFAULT_PATH}
        tcp_options = {name: value for name, value in (("proxy_protocol", args.proxy_protocol),
                                                       ("tcp_keepalive", args.tcp_keepalive)) if value}
        server = Server(**where, handler=args.handler, kind=kind, framing=args.framing, mode=args.mode,
                        backlog=args.backlog, max_message_size=args.max_message_size,
                        max_connections=args.max_connections, max_output_buffer=args.max_output_buffer,
                        idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                        allow_uid=args.allow_uid, allow_gid=args.allow_gid, max_fds=args.max_fds,
                        busy_poll_us=args.busy_poll_us, authorize=args.authorize, workers=args.workers,
                        on_worker_start=args.on_worker_start, worker_timeout=args.worker_timeout,
                        reload_clients=args.reload_clients, flush_timeout=args.flush_timeout,
                        **tcp_options)
    except (PyudsError, OSError, ValueError, TypeError) as exc:
        print(f"pyuds serve: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server._on_signal)
    if early:
        server._on_signal(early[0], None)  # serve_forever() then only shuts down
    else:
        bound = server.address
        _say_ready(format_tcp(*bound) if isinstance(bound, tuple) else bound, kind, args.framing, args.handler)
    try:
        server.serve_forever()
    except PyudsError as exc:  # workers that keep dying at start-up
        print(f"pyuds serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _say_ready(path: str, kind: str, framing: str, handler: Callable[..., Any] | None) -> None:
    """The one line on stdout saying that clients may connect: where, and to which handler.
    (The library itself only logs; this is the command's.)"""
    socket_kind = f"stream, framing {framing}" if kind == "stream" else kind
    name = "echo (the default)" if handler is None else _callable_name(handler)
    with contextlib.suppress(OSError):  # no stdout (closed, or a reader gone): serve all the same
        print(f"ready on {path} ({socket_kind}), handler {name}", flush=True)


def _callable_name(fn: Callable[..., Any]) -> str:
    """MODULE:QUALNAME, as --handler takes it."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}:{qualname}" if module and qualname else repr(fn)


SD_LISTEN_FDS_START = 3
_SOCK_KINDS = {socket.SOCK_STREAM: "stream", socket.SOCK_SEQPACKET: "seqpacket", socket.SOCK_DGRAM: "datagram"}


def _activation_socket(fd_name: str | None) -> tuple[int, str, str] | None:
    """The socket systemd passed by socket activation (LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES), as (fd, kind, address); None without socket activation. The variables are
    removed from the environment, as sd_listen_fds() does, so that children do not take them
    for their own; every passed descriptor is made close-on-exec."""
    env = os.environ
    if "LISTEN_FDS" not in env:
        if fd_name is not None:
            raise ValueError("--fd-name given, but there is no socket activation (LISTEN_FDS is not set)")
        return None
    try:
        pid, count = int(env.get("LISTEN_PID", "")), int(env["LISTEN_FDS"])
    except ValueError:
        raise ValueError("socket activation: LISTEN_PID and LISTEN_FDS must be numbers") from None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if pid != os.getpid():
        return None  # meant for another process (e.g. our parent)
    if count < 1:
        raise ValueError("socket activation passed no sockets (LISTEN_FDS=0)")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    if fd_name is not None:
        if fd_name not in names:
            raise ValueError(f"socket activation passed no socket named {fd_name!r} "
                             f"(names: {', '.join(names) or 'none'})")
        fd = fds[names.index(fd_name)]
    elif count > 1:
        raise ValueError(f"socket activation passed {count} sockets ({', '.join(names) or 'unnamed'}); "
                         "choose one with --fd-name")
    else:
        fd = fds[0]
    probe = socket.socket(fileno=os.dup(fd))
    try:
        kind = _SOCK_KINDS.get(probe.type, "stream")  # another type: the server says what is wrong
        address = probe.getsockname()
        inet = probe.family in (socket.AF_INET, socket.AF_INET6)
    finally:
        probe.close()
    if inet:  # a TCP socket: its endpoint as written on the command line
        address = format_tcp(address[0], address[1])
    elif isinstance(address, bytes):  # abstract: b"\0name"
        address = "@" + os.fsdecode(address[1:])
    return fd, kind, address


def _send(args: argparse.Namespace) -> int:
    from ._client import close_fds, connect

    if args.framing is not None and args.kind != "stream":
        print(f"pyuds send: --framing applies to --kind stream only: a {args.kind} message is one packet",
              file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        with connect(args.endpoint, args.framing or "u32", kind=args.kind, timeout=args.timeout) as conn:
            for message in args.messages:
                reply, fds = conn.request_fds(os.fsencode(message), args.fds)
                close_fds(fds)
                out.write(reply + b"\n")
                out.flush()
                if fds:
                    print(f"pyuds send: the reply came with {len(fds)} file descriptor(s); closed them",
                          file=sys.stderr)
    except (PyudsError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"pyuds send: {args.endpoint}: {reason}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an address that cannot be one (a NUL byte, an empty name)
        print(f"pyuds send: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        if args.handler:
            try:
                _load_handler(args.handler)  # a bad spec is a usage error here, not in the child
            except argparse.ArgumentTypeError as exc:
                parser.error(str(exc))
        from ._bench import bench

        return bench(args)
    return _serve(args) if args.command == "serve" else _send(args)
