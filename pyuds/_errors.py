"""The exceptions pyuds raises itself: one base class, and an OSError subclass wherever an
errno says what went wrong, so ``except OSError`` keeps working for callers that use it."""
from __future__ import annotations


class PyudsError(Exception):
    """Base class of every error pyuds raises itself."""


class SocketPathError(PyudsError, OSError):
    """The socket path cannot be used for a server (see the subclasses)."""


class AddressInUseError(SocketPathError):
    """A live server answers on the socket path; its socket file was left alone."""


class NotASocketError(SocketPathError):
    """The socket path exists and is not a socket (a file, directory or symlink); it was left alone."""


class PathTooLongError(SocketPathError, ValueError):
    """The socket path does not fit in ``sun_path`` (107 bytes and a terminating NUL)."""


class ClientClosedError(PyudsError, ConnectionError):
    """The client handle is closed or disconnected: nothing can be sent to it."""


class ConnectionClosedError(PyudsError, ConnectionError):
    """The server closed the connection (client side)."""


class FramingError(PyudsError, ValueError):
    """A message cannot be framed (a newline inside a line-framed message, a message too long
    for its header), or a peer sent a frame larger than allowed, or a message arrived cut short
    (a packet longer than the receive limit, or more file descriptors than could be received)."""


class WorkerError(PyudsError):
    """The worker processes of a server with workers could not be kept running: they died at
    start-up again and again (an ``on_worker_start`` that raises, say). The supervisor stopped
    and removed its socket file."""
