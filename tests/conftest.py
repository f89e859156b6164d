"""Shared fixtures. Socket paths must fit in sun_path (107 bytes), so sockets live in a short
temporary directory rather than pytest's deep tmp_path."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import shutil
import tempfile
import threading
import time
from typing import Callable, Iterator

import pytest

import pyuds


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pyuds-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sockdir: str) -> str:
    return os.path.join(sockdir, "s.sock")


@pytest.fixture
def serve(sock_path: str) -> Iterator[Callable[..., pyuds.Server]]:
    """serve(handler=None, **options) -> a started Server on sock_path, shut down afterwards."""
    servers: list[pyuds.Server] = []

    def start(handler=None, path: str | None = None, **options) -> pyuds.Server:
        server = pyuds.Server(path or sock_path, handler, **options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.shutdown(timeout=10)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.005) -> None:
    """Waits until predicate() is true; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def connect_when_listening(path: str, timeout: float = 20.0) -> socket.socket:
    """A stream socket connected to path once a server listens there. The socket file appears
    at bind(), a moment before listen(): a connect in between is refused, so refusals (and a
    file not there yet) are retried until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def pyuds_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pyuds ")]


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Sets the process umask for the block (tests run one at a time)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Reads n bytes; fails if the peer closes first."""
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"the server closed the connection after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


# Set by .ci/run for its pass with the extension built under ASan + UBSan: there, a process's
# RSS measures the sanitizer's shadow memory and quarantine, not pyuds.
measures_memory = pytest.mark.skipif(
    bool(os.environ.get("PYUDS_SANITIZED")),
    reason="RSS under AddressSanitizer measures the sanitizer, not pyuds (runs in the plain pass)")
