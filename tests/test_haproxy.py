"""A real load balancer in front of pyuds: HAProxy (Debian's haproxy package, which .ci/run
installs), started here with the configuration README.md shows (its ports changed to free
ones), in front of two pyuds TCP servers with proxy_protocol. Both backends serve, each handler
sees the client's real address and port (not HAProxy's), with PROXY v2 (``send-proxy-v2``) and
v1 (``send-proxy``), and HAProxy's health checks, which carry a header too, are not refused.

Set PYUDS_REQUIRE_TOOLS=1 (as .ci/run does) to make haproxy's absence a failure, not a skip."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile

import pytest

import pyuds
from conftest import wait_until
from test_interop import tool

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TIMEOUT = 10.0


def readme_config() -> str:
    """The HAProxy configuration README.md shows (the ```haproxy block)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"```haproxy\n(.*?)```", text, re.S)
    assert match, "README.md shows no HAProxy configuration (a ```haproxy block)"
    return match.group(1)


def free_port() -> int:
    """A port nothing listens on now (HAProxy cannot bind port 0 and tell which it got)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HAProxy:
    """haproxy -db (foreground) with a configuration file of its own, stopped by its own pid."""

    def __init__(self, config: str, workdir: str) -> None:
        path = os.path.join(workdir, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(config)
        check = subprocess.run([tool("haproxy"), "-c", "-f", path], capture_output=True, text=True,
                               timeout=TIMEOUT)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(os.path.join(workdir, "haproxy.log"), "w+")
        self.proc = subprocess.Popen([tool("haproxy"), "-db", "-f", path], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        self.log.close()


def balanced(send_proxy: str):
    """Two pyuds servers behind HAProxy: yields (frontend port, servers); each server's handler
    replies "NAME HOST PORT" with the peer it sees."""
    workdir = tempfile.mkdtemp(prefix="pyuds-haproxy-")
    servers = []
    for name in (b"one", b"two"):
        server = pyuds.Server("tcp://127.0.0.1:0", lambda c, m, name=name: b"%s %s %d" % (
            name, c.peer.host.encode(), c.peer.port), proxy_protocol=True)
        server.start()
        servers.append(server)
    front = free_port()
    config = readme_config().replace("127.0.0.1:8000", f"127.0.0.1:{front}")
    config = config.replace("127.0.0.1:9001", f"127.0.0.1:{servers[0].address[1]}")
    config = config.replace("127.0.0.1:9002", f"127.0.0.1:{servers[1].address[1]}")
    if send_proxy != "send-proxy-v2":
        config = config.replace("send-proxy-v2", send_proxy)
    config = config.replace("inter 2s", "inter 100ms")  # health checks within the test's time
    haproxy = HAProxy(config, workdir)
    return front, servers, haproxy, workdir


@pytest.fixture(params=["send-proxy-v2", "send-proxy"])
def behind_haproxy(request):
    front, servers, haproxy, workdir = balanced(request.param)
    try:
        def listening() -> bool:
            assert haproxy.proc.poll() is None, f"haproxy exited:\n{haproxy.output()}"
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, timeout=TIMEOUT, interval=0.05)
        yield front, servers, haproxy
    finally:
        haproxy.stop()
        for server in servers:
            server.shutdown(timeout=TIMEOUT)
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


def test_both_backends_serve_and_see_the_real_client(behind_haproxy):
    front, servers, haproxy = behind_haproxy
    # HAProxy's health checks are connections with a header too (v2 LOCAL; in v1 one naming the
    # check's own addresses): admitted, never refused. Once each server has had two (HAProxy's
    # "rise"), both are up for the round robin.
    wait_until(lambda: all(s.stats()["connections_accepted"] >= 2 for s in servers), timeout=TIMEOUT)
    checks = [s.stats()["connections_accepted"] for s in servers]
    seen = {}
    # Round robin: each new connection goes to the next server.
    for _ in range(6):
        with pyuds.connect(f"tcp://127.0.0.1:{front}", timeout=TIMEOUT) as conn:
            for _ in range(3):  # several requests on one connection, one balanced connection
                name, host, port = conn.request(b"who am I").split()
                assert (host.decode(), int(port)) == conn.address, "the handler must see the client, not HAProxy"
                seen[name] = seen.get(name, 0) + 1
    assert set(seen) == {b"one", b"two"} and sum(seen.values()) == 18, seen  # both backends served
    for server, count in zip(servers, checks):
        stats = server.stats()
        assert stats["messages_in"] == seen[b"one" if server is servers[0] else b"two"]
        assert stats["connections_accepted"] >= count + stats["messages_in"] // 3
        assert stats["closed"]["proxy_header"] == 0, "every connection, health checks too, had its header"
    assert "is DOWN" not in haproxy.output(), haproxy.output()
