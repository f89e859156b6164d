"""Server configuration: one frozen dataclass, validated when it is made."""
from __future__ import annotations

import dataclasses
import socket

FRAMINGS = ("u32", "line", "raw")
MAX_U32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`pyuds.Server` listens and what it accepts.

    framing: how a byte stream is cut into messages: ``"u32"`` (4-byte big-endian length,
        then the payload), ``"line"`` (payload, then ``\\n``) or ``"raw"`` (each read is one
        message).
    mode: permission bits of the socket file. It never exists with a wider mode.
    backlog: how many connections may wait to be accepted.
    max_message_size: longest payload accepted from a client, in bytes. A client that sends a
        longer one is disconnected (the error is logged); its other messages are unaffected.
    flush_timeout: seconds a closing client (and every client at shutdown) may take to receive
        the replies still owed to it before they are given up.
    batch_size: events taken from the C loop per turn.
    """

    framing: str = "u32"
    mode: int = 0o600
    backlog: int = socket.SOMAXCONN
    max_message_size: int = 16 * 1024 * 1024
    flush_timeout: float = 5.0
    batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {self.framing!r}")
        _check_int("mode", self.mode, 0, 0o777)
        _check_int("backlog", self.backlog, 1, 2**31 - 1)
        _check_int("max_message_size", self.max_message_size, 1, MAX_U32)
        _check_int("batch_size", self.batch_size, 1, 1 << 20)
        if not isinstance(self.flush_timeout, (int, float)) or not 0 <= self.flush_timeout <= 86400:
            raise ValueError(f"flush_timeout must be between 0 and 86400 seconds, not {self.flush_timeout!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, not {value}")
