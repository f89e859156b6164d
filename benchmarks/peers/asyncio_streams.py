"""u32 echo the idiomatic asyncio way: start_unix_server, one task per client,
StreamReader.readexactly() and StreamWriter.write() + drain().

Run: python benchmarks/peers/asyncio_streams.py PATH   (until SIGTERM / SIGINT)
"""
from __future__ import annotations

import asyncio
import signal
import socket

from common import HEADER, HEADER_SIZE, handler, remove_socket, remove_stale_socket, socket_path


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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    remove_stale_socket(path)
    server = await asyncio.start_unix_server(client, path, backlog=socket.SOMAXCONN)
    try:
        await stop.wait()
    finally:
        server.close()
        remove_socket(path)


if __name__ == "__main__":
    asyncio.run(serve(socket_path()))
