"""u32 echo on asyncio with a low-level asyncio.Protocol.

Run: python benchmarks/peers/asyncio_protocol.py PATH   (until SIGTERM / SIGINT)

data_received() appends to a buffer, cuts every complete frame, calls the handler once per
message, and writes all the replies of that data_received() with one transport.write().
uvloop_protocol.py runs this same Protocol on uvloop.
"""
from __future__ import annotations

import asyncio
import socket

from common import HEADER, HEADER_SIZE, handler, serve_until_signalled, socket_path


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport", "buf")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = len(buf)
        pos = 0
        replies = []
        unpack_from = HEADER.unpack_from
        pack = HEADER.pack
        while size - pos >= HEADER_SIZE:
            end = pos + HEADER_SIZE + unpack_from(buf, pos)[0]
            if end > size:
                break
            reply = handler(bytes(buf[pos + HEADER_SIZE:end]))
            replies.append(pack(len(reply)))
            replies.append(reply)
            pos = end
        if pos:
            del buf[:pos]
        if replies:
            self.transport.write(b"".join(replies))

    # Back-pressure: a client that does not read its replies stops being read.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.buf = bytearray()


async def serve(path: str) -> None:
    """Serve u32 echo on path until SIGTERM or SIGINT; remove the socket file at the end.
    path may be tcp://HOST:PORT instead: TCP (asyncio and uvloop set TCP_NODELAY themselves)."""
    loop = asyncio.get_running_loop()
    if path.startswith("tcp://"):
        host, _, port = path[len("tcp://"):].rpartition(":")
        await serve_until_signalled(
            path, lambda p: loop.create_server(EchoProtocol, host, int(port), backlog=socket.SOMAXCONN))
        return
    await serve_until_signalled(
        path, lambda p: loop.create_unix_server(EchoProtocol, p, backlog=socket.SOMAXCONN))


def main() -> None:
    asyncio.run(serve(socket_path()))


if __name__ == "__main__":
    main()
