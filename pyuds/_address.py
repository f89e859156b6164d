"""Unix-domain socket addresses as pyuds spells them, and as Python's socket module takes them.

A filesystem path is itself. A name that starts with ``@`` is in Linux's abstract namespace:
``"@name"`` is ``sun_path = b"\\0name"``; it has no file, and it vanishes with the last socket
bound to it. Pure functions, no sockets: the client and the server side both use them.
"""
from __future__ import annotations

import errno
import os
from typing import Union

from ._errors import PathTooLongError

# What an address may be given as: "@name", or a path as str, bytes or a path object.
Address = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# sun_path holds 108 bytes. A path keeps one for its terminating NUL (as the server does); an
# abstract name has no terminator, but its leading NUL takes that byte.
SUN_PATH_MAX = 107


def to_sockaddr(address: Address, what: str = "socket path") -> str | bytes:
    """Returns address in the form socket.bind()/connect() take: a path unchanged, ``"@name"``
    as ``b"\\0name"``. Raises ValueError if it is empty or holds a NUL byte (the kernel would
    cut the name there), PathTooLongError if it does not fit in sun_path."""
    raw = os.fspath(address)
    data = os.fsencode(raw)
    if not data:
        raise ValueError(f"{what} is empty")
    if data.startswith(b"@"):
        name = data[1:]
        if not name:
            raise ValueError(f"{what} {raw!r}: an abstract name needs at least one byte after '@'")
        if b"\0" in name:
            raise ValueError(f"{what} {raw!r}: an abstract name cannot contain NUL bytes")
        if len(name) > SUN_PATH_MAX:
            raise PathTooLongError(errno.ENAMETOOLONG, f"abstract name is {len(name)} bytes after the '@'; "
                                   f"AF_UNIX allows at most {SUN_PATH_MAX}", os.fsdecode(raw))
        return b"\0" + name
    if b"\0" in data:
        raise ValueError(f"{what} {raw!r} contains a NUL byte (write an abstract name as '@name')")
    if len(data) > SUN_PATH_MAX:
        raise PathTooLongError(errno.ENAMETOOLONG, f"socket path is {len(data)} bytes; "
                               f"AF_UNIX allows at most {SUN_PATH_MAX}", os.fsdecode(raw))
    return raw


def from_sockaddr(sockaddr: str | bytes) -> str | None:
    """The pyuds spelling of an address from getsockname()/recvfrom(): ``"@name"`` for an
    abstract name, the path for a file, None for an unbound socket."""
    if isinstance(sockaddr, bytes):
        if sockaddr.startswith(b"\0"):
            return "@" + os.fsdecode(sockaddr[1:])
        sockaddr = os.fsdecode(sockaddr)
    return sockaddr or None


def is_abstract(sockaddr: str | bytes) -> bool:
    """True for an address from to_sockaddr() that names no file."""
    return isinstance(sockaddr, bytes) and sockaddr.startswith(b"\0")
