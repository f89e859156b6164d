"""Endpoint strings: where a server listens and a client connects, in the forms users of
gunicorn, gRPC and Twisted know::

    /run/app.sock  ./app.sock  unix:app.sock  unix:///run/app.sock    a Unix socket file
    @app  unix-abstract:app                                           Linux's abstract namespace
    tcp://127.0.0.1:8000  tcp://[::1]:8000  tcp://0.0.0.0:0            TCP (port 0: any free one)
    fd://3                                                            a socket already open as fd 3

Anything else with ``SCHEME://`` is an error rather than a file name. A path given as an
``os.PathLike`` or as bytes is always a path. Pure functions, no sockets but for name
resolution (:func:`resolve_listen`): the server, the blocking client and an asyncio client all
parse endpoints here.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from typing import Union

from ._address import to_sockaddr

EndpointLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SCHEMES = ("unix", "tcp", "fd")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint. scheme is "unix" (path: a file, or "@name" for an abstract name),
    "tcp" (host as written, without brackets, and port) or "fd" (fd: an open socket)."""

    scheme: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    fd: int | None = None

    @property
    def is_tcp(self) -> bool:
        return self.scheme == "tcp"

    def sockaddr(self) -> str | bytes:
        """A Unix endpoint's address as socket.connect() / bind() (and asyncio's
        open_unix_connection()) take it: the path, or b"\\0name" for an abstract name."""
        if self.scheme != "unix" or self.path is None:
            raise ValueError(f"{self} is not a Unix socket address")
        return to_sockaddr(self.path)

    def __str__(self) -> str:
        if self.scheme == "unix":
            return str(self.path)
        if self.scheme == "fd":
            return f"fd://{self.fd}"
        return format_tcp(str(self.host), int(self.port or 0))


def format_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_tcp(host: str, port: int) -> str:
    """``tcp://HOST:PORT``, an IPv6 host in brackets."""
    return "tcp://" + format_hostport(host, port)


def parse_endpoint(endpoint: EndpointLike) -> Endpoint:
    """Parses an endpoint string (see the module's docstring). Raises ValueError, saying what
    is wrong, for an endpoint that cannot be one (an unknown scheme, a TCP address without a
    port, a bad fd number, an empty path)."""
    if not isinstance(endpoint, str):
        raw = os.fspath(endpoint)  # a PathLike or bytes: a path, whatever it looks like
        if isinstance(raw, bytes):
            raw = os.fsdecode(raw)
        return _unix(raw, endpoint)
    if endpoint.startswith("unix-abstract:"):
        name = endpoint[len("unix-abstract:"):]
        if not name:
            raise ValueError(f"endpoint {endpoint!r}: an abstract name needs at least one byte")
        return _unix("@" + name, endpoint)
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(f"endpoint {endpoint!r}: unix:// takes an absolute path (unix:///run/app.sock); "
                             "write a relative one as unix:PATH")
        return _unix(path, endpoint)
    if endpoint.startswith("unix:"):
        return _unix(endpoint[len("unix:"):], endpoint)
    if endpoint.startswith("tcp://"):
        return _tcp(endpoint)
    if endpoint.startswith("fd://"):
        text = endpoint[len("fd://"):]
        if not text.isdigit() or not text.isascii():
            raise ValueError(f"endpoint {endpoint!r}: fd:// takes a file descriptor number, such as fd://3")
        return Endpoint("fd", fd=int(text))
    if _SCHEME.match(endpoint):
        scheme = endpoint.split("://", 1)[0]
        raise ValueError(f"endpoint {endpoint!r}: unknown scheme {scheme!r} (pyuds serves unix:, "
                         "unix-abstract:, tcp:// and fd://; a file name needs no scheme)")
    return _unix(endpoint, endpoint)


def _unix(path: str, given: object) -> Endpoint:
    if not path:
        raise ValueError(f"endpoint {given!r}: the socket path is empty")
    return Endpoint("unix", path=path)


def _tcp(endpoint: str) -> Endpoint:
    rest = endpoint[len("tcp://"):]
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"endpoint {endpoint!r}: write an IPv6 address as tcp://[ADDRESS]:PORT")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"endpoint {endpoint!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise ValueError(f"endpoint {endpoint!r}: a TCP endpoint needs a port: tcp://HOST:PORT "
                             "(port 0: any free one)")
        if ":" in host:
            raise ValueError(f"endpoint {endpoint!r}: write an IPv6 address in brackets: tcp://[{host}]:PORT")
    if not host:
        raise ValueError(f"endpoint {endpoint!r}: a TCP endpoint needs a host: 127.0.0.1 for this "
                         "machine only, 0.0.0.0 for every IPv4 interface, [::] for every interface")
    if not port_text.isdigit() or not port_text.isascii() or int(port_text) > 65535:
        raise ValueError(f"endpoint {endpoint!r}: the port must be a number from 0 to 65535, not {port_text!r}")
    return Endpoint("tcp", host=host, port=int(port_text))


def resolve_listen(host: str, port: int) -> str:
    """The numeric address a server listens on for host: host itself if it is one, else the
    first address the name resolves to (an IPv4 one if it has any: "localhost" is 127.0.0.1
    then). Raises OSError (socket.gaierror) if the name does not resolve."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # (getaddrinfo raises rather than return nothing, but be sure)
        raise socket.gaierror(socket.EAI_NONAME, f"{host!r} resolves to no address")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def parse_inet_name(name: str) -> tuple[str, int]:
    """("host", port) from "HOST:PORT" or "[HOST]:PORT", as the C core writes addresses."""
    host, _, port = name.rpartition(":")
    if host.startswith("["):
        host = host[1:-1]
    return host, int(port)
