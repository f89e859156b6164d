"""systemd's readiness protocol (``Type=notify``), spoken by pyuds itself with no dependency:
datagrams such as ``READY=1`` sent to the socket named by ``NOTIFY_SOCKET`` (a path, or
``@name`` for an abstract one), as sd_notify(3) sends them.

A server says ``READY=1`` once it listens and serves, ``STOPPING=1`` when it begins to shut
down, and, when systemd asks for a watchdog (``WATCHDOG_USEC``, and ``WATCHDOG_PID`` if set
naming this process), ``WATCHDOG=1`` every half of that period from its loop itself: a loop
stuck in a handler stops sending, and systemd restarts the service. Without ``NOTIFY_SOCKET``
nothing is sent and nothing costs anything. Pure standard library, no pyuds import.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

log = logging.getLogger("pyuds")


class Notifier:
    """The notification socket of this process, if systemd gave one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        target = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if target.startswith("@"):
            self._address = b"\0" + os.fsencode(target[1:])
        elif target.startswith("/"):
            self._address = target
        elif target:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an @abstract name: not notifying systemd", target)
        self._sock: socket.socket | None = None
        self.watchdog_interval: float | None = None  #: seconds between WATCHDOG=1, or None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if self._address is not None and usec.isdigit() and int(usec) > 0 and \
                (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Sends state (e.g. "READY=1", several assignments one per line). Returns whether it
        was sent; a failure is logged, never raised: systemd's absence must not stop a server."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(state.encode(), self._address)
            return True
        except OSError as exc:
            log.warning("could not notify systemd (%s) of %s: %s", self._address, state.split("\n")[0], exc)
            return False

    def watchdog(self) -> Watchdog | None:
        """The watchdog the loop keeps fed, if systemd asked for one."""
        if self.watchdog_interval is None:
            return None
        return Watchdog(self, self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """WATCHDOG=1 at most every interval seconds, sent when the loop calls tick(). The loop
    waits at most poll_ms between turns, so a loop that turns pings on time."""

    def __init__(self, notifier: Notifier, interval: float) -> None:
        self._notifier = notifier
        self.interval = interval
        # A quarter of systemd's period: a ping due just after a wait began is at most this late.
        self.poll_ms = max(1, int(interval * 500))
        self._next = 0.0

    def tick(self) -> None:
        """Pings if it is due. Loop thread, once per turn."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self._notifier.notify("WATCHDOG=1")
