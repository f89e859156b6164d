"""pyuds: fast, correct Unix-domain-socket (and TCP) servers for Python.

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

from ._aclient import AsyncConnection, open_connection
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
from ._handle import ClientHandle, CloseReason, InetPeer, UnixPeer
from ._server import Server, echo
from ._version import __version__ as __version__

__all__ = [
    "AddressInUseError",
    "AsyncConnection",
    "ClientClosedError",
    "ClientHandle",
    "CloseReason",
    "Connection",
    "ConnectionClosedError",
    "FramingError",
    "InetPeer",
    "NotASocketError",
    "PathTooLongError",
    "PyudsError",
    "Server",
    "ServerConfig",
    "SocketPathError",
    "UnixPeer",
    "WorkerError",
    "connect",
    "echo",
    "open_connection",
]
