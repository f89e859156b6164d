"""u32 echo on pyuds inside a running event loop (uvloop): Server.serve_async() puts pyuds's C
epoll loop into the asyncio loop, and the same plain handler as pyuds_server.py is called once
per message.

Run: python benchmarks/peers/pyuds_async.py PATH   (until SIGTERM / SIGINT)
"""
import pyuds

from common import serve_async_until_signalled, socket_path


def handler(client, message):
    return message


if __name__ == "__main__":
    serve_async_until_signalled(pyuds.Server(socket_path(), handler))
