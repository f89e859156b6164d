"""u32 echo on pyuds inside a running event loop (uvloop), with a coroutine handler: Server.
serve_async(), and `async def` echo called once per message (up to max_in_flight, 16, of a
client at once; replies in request order).

Run: python benchmarks/peers/pyuds_async_coro.py PATH   (until SIGTERM / SIGINT)
"""
import pyuds

from common import async_handler, serve_async_until_signalled, socket_path


async def handler(client, message):
    return await async_handler(message)


if __name__ == "__main__":
    serve_async_until_signalled(pyuds.Server(socket_path(), handler))
