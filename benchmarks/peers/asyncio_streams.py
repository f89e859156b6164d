"""u32 echo the idiomatic asyncio way: start_unix_server, one task per client,
StreamReader.readexactly() and StreamWriter.write() + drain().

Run: python benchmarks/peers/asyncio_streams.py PATH   (until SIGTERM / SIGINT)
"""
from __future__ import annotations

import asyncio
import socket

from common import HEADER, HEADER_SIZE, handler, serve_until_signalled, socket_path


async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    unpack = HEADER.unpack
    pack = HEADER.pack
    try:
        while True:
            (length,) = unpack(await reader.readexactly(HEADER_SIZE))
            reply = handler(await reader.readexactly(length))
            writer.write(pack(len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    finally:
        writer.close()


async def serve(path: str) -> None:
    await serve_until_signalled(
        path, lambda p: asyncio.start_unix_server(client, p, backlog=socket.SOMAXCONN))


if __name__ == "__main__":
    asyncio.run(serve(socket_path()))
