"""pyuds: fast, correct Unix-domain-socket servers for Python.

A C epoll loop accepts clients, cuts frames and writes replies; your Python handler is called
once per message::

    import pyuds

    def handle(client: pyuds.ClientHandle, message: bytes) -> bytes | None:
        return message

    pyuds.Server("/tmp/app.sock", handle).serve_forever()
"""
import sys

if not sys.platform.startswith("linux"):
    raise ImportError(f"pyuds runs on Linux only (it is built on epoll and SO_PEERCRED); this is {sys.platform}")

from ._client import Connection, connect
from ._config import ServerConfig
from ._errors import (
    AddressInUseError,
    ClientClosedError,
    ConnectionClosedError,
    FramingError,
    NotASocketError,
    PathTooLongError,
    PyudsError,
    SocketPathError,
    WorkerError,
)
from ._handle import ClientHandle, CloseReason
from ._server import Server, echo

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "ClientClosedError",
    "ClientHandle",
    "CloseReason",
    "Connection",
    "ConnectionClosedError",
    "FramingError",
    "NotASocketError",
    "PathTooLongError",
    "PyudsError",
    "Server",
    "ServerConfig",
    "SocketPathError",
    "WorkerError",
    "connect",
    "echo",
]
