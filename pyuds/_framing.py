"""Framing in pure Python, for the client side (the server cuts frames in C).

Same rules as csrc/framing.c: u32 = 4-byte big-endian payload length, then the payload;
line = payload, then b"\\n" (a b"\\r" before it belongs to the payload); raw = whatever
arrives is one message.

File descriptors received on a byte stream belong to the message that holds the last byte of
the read that brought them. Linux may glue bytes of earlier sends in front of a read, but a read
that brings descriptors stops within the send that carried them, and a sender puts them on its
message's first byte (in one sendmsg() with the whole frame). FdQueue applies that rule.
"""
from __future__ import annotations

from collections import deque
from typing import Union

from ._config import FRAMINGS, MAX_U32
from ._errors import FramingError

# What a message may be given as (it is sent as bytes(memoryview(message))).
BytesLike = Union[bytes, bytearray, memoryview]


def encode(framing: str, payload: bytes) -> bytes:
    """Returns payload framed for sending; raises FramingError if it cannot be."""
    if framing == "u32":
        if len(payload) > MAX_U32:
            raise FramingError(f"a u32-framed message holds at most {MAX_U32} bytes, not {len(payload)}")
        return len(payload).to_bytes(4, "big") + payload
    if framing == "line":
        if b"\n" in payload:
            raise FramingError("a line-framed message cannot contain b'\\n' (the peer would see two messages)")
        return payload + b"\n"
    if framing == "raw":
        if not payload:
            raise FramingError("raw framing cannot carry an empty message")
        return payload
    raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")


class Decoder:
    """Cuts a byte stream into messages: feed() what arrives, next() each message."""

    def __init__(self, framing: str, max_message_size: int | None = None) -> None:
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
        if max_message_size is not None and (
                not isinstance(max_message_size, int) or max_message_size < 1):
            raise ValueError(f"max_message_size must be None or at least 1, not {max_message_size!r}")
        self.framing = framing
        self.max = max_message_size
        self._buf = bytearray()
        self._scan = 0  # line framing: bytes already known to hold no newline
        self.consumed = 0  # stream offset just past the last message next() returned

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self._buf)

    @property
    def received(self) -> int:
        """Bytes fed so far: the stream offset just past the last byte received."""
        return self.consumed + len(self._buf)

    def next(self) -> bytes | None:
        """The next complete message, or None until more bytes arrive."""
        buf = self._buf
        if self.framing == "u32":
            if len(buf) < 4:
                return None
            n = int.from_bytes(buf[:4], "big")
            self._check_size(n)
            if len(buf) < 4 + n:
                return None
            msg = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            self.consumed += 4 + n
            return msg
        if self.framing == "line":
            i = buf.find(b"\n", self._scan)
            if i < 0:
                self._scan = len(buf)
                if self.max is not None and len(buf) > self.max:
                    self._check_size(len(buf))
                return None
            self._check_size(i)
            msg = bytes(buf[:i])
            del buf[: i + 1]
            self._scan = 0
            self.consumed += i + 1
            return msg
        if not buf:
            return None
        n = len(buf) if self.max is None else min(len(buf), self.max)
        msg = bytes(buf[:n])
        del buf[:n]
        self.consumed += n
        return msg

    def _check_size(self, n: int) -> None:
        if self.max is not None and n > self.max:
            raise FramingError(f"message of {n}+ bytes exceeds the limit of {self.max} bytes")


class FdQueue:
    """File descriptors received on a byte stream, waiting for the message they belong to.

    add() each batch with the stream offset of the last byte of the read that brought it;
    take(end) hands a message that ends at offset end (exclusive) every batch before that. The
    queue never closes anything: whoever takes or drains descriptors owns them."""

    def __init__(self) -> None:
        # (offset of the read's last byte, descriptors, True if the kernel dropped some)
        self._batches: deque[tuple[int, list[int], bool]] = deque()

    def add(self, last_offset: int, fds: list[int], incomplete: bool = False) -> None:
        self._batches.append((last_offset, list(fds), incomplete))

    def take(self, end: int) -> tuple[list[int], bool]:
        """The descriptors of the message ending before offset end, and whether any batch of
        them arrived incomplete."""
        fds: list[int] = []
        incomplete = False
        batches = self._batches
        while batches and batches[0][0] < end:
            _, batch, lost = batches.popleft()
            fds += batch
            incomplete |= lost
        return fds, incomplete

    def drain(self) -> list[int]:
        """Every descriptor still waiting (their message never came whole)."""
        fds = [fd for _, batch, _ in self._batches for fd in batch]
        self._batches.clear()
        return fds
