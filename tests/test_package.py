"""The package itself: its public surface and the platforms it refuses."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import pyuds


def test_public_names_are_all_exported():
    for name in pyuds.__all__:
        assert hasattr(pyuds, name), name


def test_import_on_another_os_raises_a_clear_error(tmp_path):
    """pyuds is Linux-only: importing it elsewhere says so, rather than failing somewhere deep."""
    code = "import sys; sys.platform = 'darwin'; import pyuds"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert "ImportError: pyuds runs on Linux only" in result.stderr
    assert "darwin" in result.stderr


def test_the_library_prints_nothing(capfd, caplog, sock_path):
    """A server's whole life, a client's round trip and a failing handler print nothing: the
    library logs (on the "pyuds" logger), and only the command prints."""
    caplog.set_level(logging.INFO, logger="pyuds")

    def handler(client: pyuds.ClientHandle, message: bytes) -> bytes:
        if message == b"fail":
            raise RuntimeError("a handler's error")
        return message

    with pyuds.Server(sock_path, handler) as server:
        server.start()
        with pyuds.connect(sock_path, timeout=10) as conn:
            assert conn.request(b"hi") == b"hi"
        with pyuds.connect(sock_path, timeout=10) as conn:
            conn.send(b"fail")
            with pytest.raises(pyuds.ConnectionClosedError):
                conn.recv()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    logged = [r for r in caplog.records if r.name == "pyuds"]
    assert any(r.exc_info and "a handler's error" in str(r.exc_info[1]) for r in logged)
    assert any("listening on" in r.getMessage() for r in logged)
