"""The client side: a blocking connection that speaks the server's framing."""
from __future__ import annotations

import os
import socket
from typing import Any

from ._errors import ConnectionClosedError
from ._framing import Decoder, encode

_RECV_SIZE = 256 * 1024


class Connection:
    """A blocking connection to a pyuds server (or any peer speaking the same framing).

    request(message) sends one message and returns the next one received; send() and recv()
    do each half alone, e.g. to pipeline requests or receive pushed messages."""

    def __init__(self, sock: socket.socket, framing: str = "u32",
                 max_message_size: int | None = None) -> None:
        self._sock = sock
        self.framing = framing
        self._decoder = Decoder(framing, max_message_size)

    def send(self, message: bytes) -> None:
        """Sends one message, framed."""
        self._sock.sendall(encode(self.framing, bytes(message)))

    def recv(self) -> bytes:
        """Returns the next message, waiting for it. Raises ConnectionClosedError if the server
        closes the connection first, socket.timeout (TimeoutError) on timeout."""
        decoder = self._decoder
        while True:
            message = decoder.next()
            if message is not None:
                return message
            try:
                chunk = self._sock.recv(_RECV_SIZE)
            except ConnectionResetError as exc:
                raise ConnectionClosedError("the server reset the connection") from exc
            if not chunk:
                part = f" in the middle of a message ({decoder.pending} bytes)" if decoder.pending else ""
                raise ConnectionClosedError(f"the server closed the connection{part}")
            decoder.feed(chunk)

    def request(self, message: bytes) -> bytes:
        """Sends message and returns the reply."""
        self.send(message)
        return self.recv()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def connect(path: str | os.PathLike[str], framing: str = "u32", *, timeout: float | None = None,
            max_message_size: int | None = None) -> Connection:
    """Connects to the server listening on path and returns a blocking Connection.
    timeout applies to the connect and to every later send and receive."""
    Decoder(framing, max_message_size)  # validates both before any socket exists
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return Connection(sock, framing, max_message_size)
