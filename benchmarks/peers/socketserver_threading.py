"""u32 echo with the standard library's socketserver: ThreadingUnixStreamServer,
one thread per connection, a StreamRequestHandler reading rfile and writing wfile.

Run: python benchmarks/peers/socketserver_threading.py PATH   (until SIGTERM / SIGINT)
"""
from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys

from common import HEADER, HEADER_SIZE, handler, remove_socket, remove_stale_socket, socket_path


class EchoHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        rfile, wfile = self.rfile, self.wfile   # rfile buffered; wfile unbuffered (sendall)
        unpack = HEADER.unpack
        pack = HEADER.pack
        try:
            while True:
                head = rfile.read(HEADER_SIZE)
                if len(head) < HEADER_SIZE:
                    return  # the client went away
                (length,) = unpack(head)
                message = rfile.read(length)
                if len(message) < length:
                    return
                reply = handler(message)
                wfile.write(pack(len(reply)) + reply)
        except ConnectionError:
            return  # the client went away with replies still owed


class Server(socketserver.ThreadingUnixStreamServer):
    request_queue_size = socket.SOMAXCONN  # the default (5) refuses bursts of connects
    daemon_threads = True                  # do not wait for connected clients at exit
    block_on_close = False


class Stop(Exception):
    """Raised by the SIGTERM / SIGINT handler to leave serve_forever()."""


def main() -> None:
    path = socket_path()
    remove_stale_socket(path)
    server = Server(path, EchoHandler)

    def on_signal(signum, frame):
        raise Stop  # runs on the main thread, inside serve_forever()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.5)
    except Stop:
        pass
    finally:
        server.server_close()   # the listening socket; block_on_close=False: no join
        remove_socket(path)
    # With thousands of connection threads (the idle scenario), a normal interpreter exit
    # can take many seconds of GIL hand-offs as they wind down; the connections need no
    # goodbye (replies are written synchronously by their threads), so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
