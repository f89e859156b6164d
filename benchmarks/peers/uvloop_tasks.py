"""u32 echo on uvloop, a task per request: an asyncio.Protocol whose data_received() cuts the
frames and starts one task per message with asyncio's create_task(); the task awaits the same
`async def` echo as pyuds_async_coro.py and writes its reply. (Tasks start in the order they
were made, and the echo finishes in its first step, so the replies keep request order.)

Run: python benchmarks/peers/uvloop_tasks.py PATH   (until SIGTERM / SIGINT)
"""
from __future__ import annotations

import asyncio
import socket

import uvloop

from asyncio_protocol import EchoProtocol
from common import HEADER, HEADER_SIZE, async_handler, serve_until_signalled, socket_path


class TaskPerRequest(EchoProtocol):
    """EchoProtocol (its buffer, back-pressure) with a task per message instead of a call."""

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        start = asyncio.get_running_loop().create_task
        pos, size = 0, len(buf)
        while pos + HEADER_SIZE <= size:
            length = HEADER.unpack_from(buf, pos)[0]
            if pos + HEADER_SIZE + length > size:
                break
            start(self.respond(bytes(buf[pos + HEADER_SIZE:pos + HEADER_SIZE + length])))
            pos += HEADER_SIZE + length
        del buf[:pos]

    async def respond(self, message: bytes) -> None:
        reply = await async_handler(message)
        self.transport.write(HEADER.pack(len(reply)) + reply)


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    await serve_until_signalled(
        path, lambda p: loop.create_unix_server(TaskPerRequest, p, backlog=socket.SOMAXCONN))


if __name__ == "__main__":
    uvloop.run(serve(socket_path()))
