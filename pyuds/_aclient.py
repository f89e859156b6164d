"""The client side for asyncio: a stream connection whose requests may be pipelined.

Pure Python over asyncio streams (any loop: asyncio's own, uvloop); the framing is
pyuds._framing's, as for the blocking Connection.
"""
from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any

from ._client import _dup_socket
from ._endpoint import EndpointLike, parse_endpoint
from ._errors import ConnectionClosedError
from ._framing import Decoder, encode

_READ_SIZE = 256 * 1024  # a read takes at most this much


class AsyncConnection:
    """A connection to a pyuds stream server for asyncio (made by pyuds.open_connection()).

    ``await request(message)`` sends one message and returns the message received for it;
    send() and recv() do each half alone. Requests may be pipelined: many tasks may await
    request() on one connection at once (``asyncio.gather``), each gets the message that
    answers its own, since messages are matched to requests and recv() calls in the order
    those were made. A request cancelled after it was sent still has its answer taken off the
    stream (and dropped), so the ones after it stay matched. No file descriptors: use the
    blocking Connection for those."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framing: str,
                 max_message_size: int | None) -> None:
        self.framing = framing
        self._reader = reader
        self._writer = writer
        self._decoder = Decoder(framing, max_message_size)
        self._waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._inbox: collections.deque[bytes] = collections.deque()  # came while nobody waited
        self._error: BaseException | None = None  # why no more messages will come
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def send(self, message: bytes) -> None:
        """Sends one message (framed); waits while the socket's buffer is full."""
        self._writer.write(encode(self.framing, bytes(message)))
        await self._writer.drain()

    async def recv(self) -> bytes:
        """The next message received that no earlier request() or recv() is waiting for.
        Raises ConnectionClosedError once the server has closed the connection."""
        if self._inbox and not self._waiters:
            return self._inbox.popleft()
        future = self._wait()
        try:
            return await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                try:
                    self._waiters.remove(future)  # nothing was sent for it: it takes no message
                except ValueError:
                    pass
            raise

    async def request(self, message: bytes) -> bytes:
        """Sends message and returns the message received for it."""
        data = encode(self.framing, bytes(message))
        if self._inbox and not self._waiters:
            self._writer.write(data)
            await self._writer.drain()
            return self._inbox.popleft()
        future = self._wait()  # its place among the answers, taken before anything yields
        self._writer.write(data)
        await self._writer.drain()
        return await future  # cancelled: _deliver() still drops its answer

    def _wait(self) -> asyncio.Future[bytes]:
        if self._error is not None:
            raise self._error
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    async def _read(self) -> None:
        """Reads the stream, handing each message to whoever waits for it next."""
        decoder = self._decoder
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    part = f" in the middle of a message ({decoder.pending} bytes)" if decoder.pending else ""
                    raise ConnectionClosedError(f"the server closed the connection{part}")
                decoder.feed(data)
                while (message := decoder.next()) is not None:
                    self._deliver(message)
        except asyncio.CancelledError:
            self._fail(ConnectionClosedError("the connection is closed"))
            raise
        except Exception as exc:  # FramingError (too long), ConnectionResetError, the end
            if isinstance(exc, ConnectionResetError):
                exc = ConnectionClosedError("the server reset the connection")
            self._fail(exc)

    def _deliver(self, message: bytes) -> None:
        waiters = self._waiters
        if not waiters:
            self._inbox.append(message)
            return
        future = waiters.popleft()
        if not future.done():  # (a cancelled request's answer is dropped)
            future.set_result(message)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        """Closes the connection; requests still waiting raise ConnectionClosedError."""
        self._reading.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass  # (the peer had gone)
        try:
            await self._reading
        except (asyncio.CancelledError, Exception):
            pass

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def open_connection(endpoint: EndpointLike, framing: str = "u32", *,
                          max_message_size: int | None = None) -> AsyncConnection:
    """Connects to the stream server at endpoint and returns an AsyncConnection. endpoint is
    what pyuds.connect() takes: a socket file (or ``unix:PATH``), ``"@name"`` (or
    ``unix-abstract:NAME``), ``tcp://HOST:PORT``, or ``fd://N`` (a socket already connected,
    this process's descriptor N; the connection works on a duplicate). max_message_size bounds
    a received message (None: no limit); a longer one fails the connection with FramingError."""
    Decoder(framing, max_message_size)  # validates both before any socket exists
    target = parse_endpoint(endpoint)
    if target.scheme == "tcp":
        assert target.host is not None and target.port is not None
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=_READ_SIZE)
        return AsyncConnection(reader, writer, framing, max_message_size)
    if target.scheme == "fd":
        sock = socket.socket(fileno=_dup_socket(target.fd))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if target.scheme == "fd":
            open_stream = asyncio.open_connection if sock.family != socket.AF_UNIX else asyncio.open_unix_connection
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"{target}: the asyncio client speaks stream sockets only")
        else:
            await asyncio.get_running_loop().sock_connect(sock, target.sockaddr())
            open_stream = asyncio.open_unix_connection
        reader, writer = await open_stream(sock=sock, limit=_READ_SIZE)
    except BaseException:
        sock.close()
        raise
    return AsyncConnection(reader, writer, framing, max_message_size)
