"""u32 echo: the asyncio.Protocol of asyncio_protocol.py, run on uvloop.

Run: python benchmarks/peers/uvloop_protocol.py PATH   (until SIGTERM / SIGINT)
"""
import uvloop

from asyncio_protocol import serve
from common import socket_path

if __name__ == "__main__":
    uvloop.run(serve(socket_path()))
