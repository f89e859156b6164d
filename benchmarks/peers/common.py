"""Shared by every Python peer: the one handler they all call, and the u32 framing helpers.

u32 framing: each message is a 4-byte unsigned big-endian payload length, then the payload.
Every peer calls handler() exactly once per message and sends back what it returns.
"""
from __future__ import annotations

import os
import stat
import struct
import sys

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size  # 4


def handler(message: bytes) -> bytes:
    """The Python work behind every server: echo."""
    return message


async def async_handler(message: bytes) -> bytes:
    """The same work as a coroutine, for the servers that await their handler."""
    return message


def frame(payload: bytes) -> bytes:
    """One u32 frame: length header then payload."""
    return HEADER.pack(len(payload)) + payload


def header(length: int) -> bytes:
    return HEADER.pack(length)


def parse_header(data, offset: int = 0) -> int:
    """The payload length in the 4-byte header at data[offset:offset+4]."""
    return HEADER.unpack_from(data, offset)[0]


def socket_path() -> str:
    """The Unix socket path given on the command line (the only argument), or tcp://HOST:PORT
    for the peers that serve TCP too (pyuds, asyncio_protocol, uvloop_protocol)."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {os.path.basename(sys.argv[0])} SOCKET_PATH")
    return sys.argv[1]


def remove_stale_socket(path: str) -> None:
    """Before binding: remove a leftover socket file (never a regular file or directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        sys.exit(f"{path} exists and is not a socket")
    os.unlink(path)


def remove_socket(path: str) -> None:
    """At exit: remove our socket file if it is still there."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_until_signalled(path: str, start) -> None:
    """For the asyncio peers: start(path) makes the server (an awaitable); serve until SIGTERM
    or SIGINT, then close it and remove the socket file."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    unix = not path.startswith("tcp://")  # (a TCP server has no socket file)
    if unix:
        remove_stale_socket(path)
    server = await start(path)
    try:
        await stop.wait()
    finally:
        server.close()
        if unix:
            remove_socket(path)


def serve_async_until_signalled(server) -> None:
    """For the pyuds peers that serve inside an event loop: server.serve_async() on uvloop until
    SIGTERM or SIGINT, then server.shutdown_async() (which removes the socket file)."""
    import asyncio
    import signal

    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.shutdown)
        await server.serve_async()

    uvloop.run(main())
