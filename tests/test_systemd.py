"""systemd's Type=notify, with this test playing systemd: a datagram socket whose address is
NOTIFY_SOCKET (a path, or an abstract name), and `pyuds serve` as the service. READY=1 comes
once the server answers, WATCHDOG=1 every half of WATCHDOG_USEC from the loop (and stops while
a handler is stuck), STOPPING=1 at shutdown."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest

import pyuds
from pyuds._systemd import Notifier
from conftest import wait_until
from test_cli import START_TIMEOUT, spawn  # noqa: F401  (spawn is a fixture)

WATCHDOG_USEC = 600_000  # systemd's period: pings every 0.3 s

STUCK_HANDLER = '''
import time

def handle(client, message):
    if message == b"stuck":
        time.sleep(2.0)
    return message
'''


class FakeSystemd:
    """The notification socket: every datagram received, with when it came (monotonic)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sent each, as systemd asks
        self.sock.settimeout(0.05)
        self.address = address
        self.received: list[tuple[float, str]] = []
        self.senders: list[tuple[str, int]] = []  # (datagram, sender's pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            pid = next((struct.unpack("iII", cdata[:12])[0] for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            self.received.append((time.monotonic(), data.decode()))
            self.senders.append((data.decode(), pid))

    def states(self, name: str) -> list[float]:
        """When each datagram holding the assignment name came."""
        return [at for at, text in list(self.received) if name in text.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def systemd(sockdir):
    made = []

    def make(abstract: bool = False) -> FakeSystemd:
        address = f"@pyuds-notify-{os.getpid()}-{len(made)}" if abstract else os.path.join(sockdir, "notify")
        fake = FakeSystemd(address)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def serve_env(notify: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, NOTIFY_SOCKET=notify, **extra)
    return env


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_and_stopping(spawn, systemd, sock_path, abstract):
    fake = systemd(abstract)
    server = spawn([sock_path], env=serve_env(fake.address))
    wait_until(lambda: fake.states("READY=1"), timeout=START_TIMEOUT)
    # Ready means serving: a request is answered right away.
    with pyuds.connect(sock_path, timeout=5) as conn:
        assert conn.request(b"ping") == b"ping"
    assert not fake.states("WATCHDOG=1")  # no WATCHDOG_USEC, no pings
    assert not fake.states("STOPPING=1")
    assert server.signal(signal.SIGTERM) == 0
    wait_until(lambda: fake.states("STOPPING=1"))
    assert fake.states("READY=1")[0] < fake.states("STOPPING=1")[0]


def test_watchdog_from_the_loop_stops_while_a_handler_is_stuck(spawn, systemd, sockdir, sock_path):
    with open(os.path.join(sockdir, "stuck.py"), "w") as f:
        f.write(STUCK_HANDLER)
    fake = systemd()
    server = spawn([sock_path, "--handler", "stuck:handle"], cwd=sockdir,
                   env=serve_env(fake.address, WATCHDOG_USEC=str(WATCHDOG_USEC)))
    wait_until(lambda: fake.states("READY=1"), timeout=START_TIMEOUT)
    time.sleep(1.5)
    pings = fake.states("WATCHDOG=1")
    assert len(pings) >= 3, pings
    period = WATCHDOG_USEC / 1e6
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < period, gaps  # every half period, give or take the loop's wait

    # A handler that does not return: the loop is stuck, so the pings stop (systemd would kill
    # the service here), and resume once it returns.
    with pyuds.connect(sock_path, timeout=10) as conn:
        stuck_at = time.monotonic()
        assert conn.request(b"stuck") == b"stuck"
        returned_at = time.monotonic()
    wait_until(lambda: any(at > returned_at for at in fake.states("WATCHDOG=1")), timeout=5)
    during = [at for at in fake.states("WATCHDOG=1") if stuck_at + period < at < returned_at - 0.1]
    assert during == [], "the loop pinged while a handler was stuck"
    assert server.signal(signal.SIGTERM) == 0


def test_watchdog_for_another_pid_is_not_ours(spawn, systemd, sock_path):
    fake = systemd()
    spawn([sock_path], env=serve_env(fake.address, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1"))
    wait_until(lambda: fake.states("READY=1"), timeout=START_TIMEOUT)
    time.sleep(0.8)
    assert not fake.states("WATCHDOG=1")


def test_notifier_reads_the_environment():
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@x"}).enabled
    assert Notifier({"NOTIFY_SOCKET": "relative"}).enabled is False  # neither a path nor @name
    n = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_interval == 1.0 and n.watchdog().poll_ms == 500
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog() is None  # nowhere to send it
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).notify("READY=1")  # logged, not raised


def test_with_workers_systemd_hears_from_the_supervisor_only(spawn, systemd, sock_path):
    """pyuds serve --workers 2 under Type=notify: READY=1, the watchdog pings and STOPPING=1 come
    from the supervisor (the service's main process); the workers send nothing."""
    fake = systemd()
    server = spawn([sock_path, "--workers", "2"], env=serve_env(fake.address, WATCHDOG_USEC=str(WATCHDOG_USEC)))
    wait_until(lambda: fake.states("READY=1"), timeout=START_TIMEOUT)
    for _ in range(4):  # served (by the workers)
        with pyuds.connect(sock_path, timeout=5) as conn:
            assert conn.request(b"x") == b"x"
    time.sleep(0.8)
    assert server.signal(signal.SIGTERM) == 0
    wait_until(lambda: fake.states("STOPPING=1"))
    senders = {pid for _text, pid in fake.senders}
    assert senders == {server.pid}, (senders, server.pid)
    assert len(fake.states("READY=1")) == 1 and len(fake.states("WATCHDOG=1")) >= 2


def test_serve_async_notifies_too(systemd, sock_path, monkeypatch):
    """serve_async() tells systemd as serve_forever() does: READY=1 once serving, WATCHDOG=1
    from a timer of the loop itself, STOPPING=1 at shutdown."""
    import asyncio

    fake = systemd()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))

    async def main() -> None:
        async with pyuds.Server(sock_path) as server:
            serving = asyncio.create_task(server.serve_async())
            while not fake.states("READY=1"):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.8)
            assert not fake.states("STOPPING=1")
        await serving

    asyncio.run(asyncio.wait_for(main(), 20))
    wait_until(lambda: fake.states("STOPPING=1"))
    assert len(fake.states("WATCHDOG=1")) >= 2
    assert {pid for _text, pid in fake.senders} == {os.getpid()}
