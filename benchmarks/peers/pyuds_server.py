"""u32 echo on pyuds: its C epoll loop cuts frames and calls one Python function per message.

Run: python benchmarks/peers/pyuds_server.py PATH   (until SIGTERM / SIGINT: pyuds handles
both, closes every client and removes the socket file); or with tcp://HOST:PORT for TCP

pyuds calls handler(client, message); to keep the Python work per message the same as the
other peers' (one call of common.handler, which echoes), the handler here is that echo itself.
"""
import pyuds

from common import socket_path


def handler(client, message):
    return message


if __name__ == "__main__":
    pyuds.Server(socket_path(), handler).serve_forever()
