"""The ``pyuds`` command, run as real processes: ``pyuds serve`` and ``pyuds send`` talking to
each other, signals, options, and the errors a user sees.

Every process is bounded by a timeout and, if still running when its test ends, killed by
its own pid."""
from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Iterator, Sequence

import pytest

import pyuds
from conftest import is_socket, umask, wait_until

MODULE = [sys.executable, "-m", "pyuds"]
# Child processes never start in the repository root: `python -m` puts its working directory
# first on sys.path, where the source tree's pyuds/ (no compiled extension) would shadow the
# installed package.
NEUTRAL_CWD = os.path.dirname(os.path.abspath(__file__))
SCRIPT_PATH = shutil.which("pyuds", path=os.path.dirname(sys.executable))
SCRIPT = [SCRIPT_PATH] if SCRIPT_PATH else None

START_TIMEOUT = 20.0  # interpreter start and import, on a loaded machine
EXIT_TIMEOUT = 10.0
RUN_TIMEOUT = 30.0

LAUNCHERS = [
    pytest.param(MODULE, id="python-m-pyuds"),
    pytest.param(SCRIPT, id="pyuds-script",
                 marks=pytest.mark.skipif(SCRIPT is None, reason="no pyuds console script next to python")),
]


# ---- helpers ----------------------------------------------------------------------------------



def run(args: Sequence[str], launcher: Sequence[str] = MODULE, cwd: str | None = None,
        pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess:
    """Runs a pyuds command to completion (bounded); returns its result, output as text."""
    return subprocess.run([*launcher, *args], cwd=cwd or NEUTRAL_CWD, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def send(path: str, *messages: str, framing: str | None = None, cwd: str | None = None,
         launcher: Sequence[str] = MODULE) -> subprocess.CompletedProcess:
    """`pyuds send [--framing F] PATH MESSAGE...`"""
    args = ["send", path, *messages]
    if framing is not None:
        args[1:1] = ["--framing", framing]
    return run(args, launcher, cwd)


class ServeProcess:
    """A running `pyuds serve`, its stderr going to a file that can be read at any time."""

    def __init__(self, args: Sequence[str], stderr_path: str, launcher: Sequence[str] = MODULE,
                 cwd: str | None = None, env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.stderr_path = stderr_path
        self.stdout_path = stderr_path + ".stdout"
        with open(stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen([*launcher, "serve", *args], cwd=cwd or NEUTRAL_CWD, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=env, pass_fds=pass_fds)
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    @property
    def stdout(self) -> str:
        """What it printed so far (a file, not a terminal: only what it flushed)."""
        with open(self.stdout_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_listening(self, path: str, framing: str = "u32", kind: str = "stream") -> None:
        """Waits until the server answers a request on path: its loop runs, so its signal
        handlers are in place. (The socket file appears at bind(), a moment before listen():
        a connect in between is refused, so refusals are retried.)"""
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyuds serve exited with {self.proc.returncode}:\n{self.stderr}")
            if not path.startswith("@") and not is_socket(path):
                return False
            try:
                with pyuds.connect(path, framing, kind=kind, timeout=START_TIMEOUT) as conn:
                    conn.request(b"ready")
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            return True

        wait_until(answers, timeout=START_TIMEOUT, interval=0.01)

    def signal(self, sig: int) -> int:
        """Sends sig to the process (by its pid); returns its exit status."""
        os.kill(self.pid, sig)
        return self.proc.wait(EXIT_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(EXIT_TIMEOUT)


@pytest.fixture
def spawn(tmp_path) -> Iterator:
    """spawn(args, launcher=MODULE, cwd=None, env=None, pass_fds=()) -> a started ServeProcess,
    killed at the end of the test if it is still running."""
    procs: list[ServeProcess] = []

    def start(args: Sequence[str], launcher: Sequence[str] = MODULE, cwd: str | None = None,
              env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()) -> ServeProcess:
        p = ServeProcess(args, str(tmp_path / f"serve{len(procs)}.stderr"), launcher, cwd, env, pass_fds)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()



def assert_clean_error(stderr: str, prefix: str) -> None:
    """A user-facing error: one message from pyuds, no Python traceback."""
    assert prefix in stderr, stderr
    assert "Traceback" not in stderr, stderr


# ---- serve and send ---------------------------------------------------------------------------


class TestServeAndSend:
    @pytest.mark.parametrize("launcher", LAUNCHERS)
    def test_round_trip_then_sigterm(self, spawn, sock_path, launcher):
        """serve logs "listening on PATH"; send prints each reply on its own line and exits 0;
        SIGTERM makes serve exit 0 and remove its socket file."""
        server = spawn([sock_path], launcher)
        server.wait_listening(sock_path)

        result = send(sock_path, "hello", "world", launcher=launcher)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello\nworld\n"
        assert result.stderr == ""
        assert f"listening on {sock_path}" in server.stderr

        assert server.signal(signal.SIGTERM) == 0
        assert not os.path.lexists(sock_path)
        assert "SIGTERM" in server.stderr
        assert "Traceback" not in server.stderr

    @pytest.mark.parametrize("args, handler", [([], "echo (the default)"),
                                               (["--handler", "upper:handle"], "upper:handle"),
                                               (["--kind", "seqpacket"], "echo (the default)")])
    def test_one_line_on_stdout_when_ready(self, spawn, sockdir, tmp_path, args, handler):
        """serve prints one line on stdout, flushed at once (stdout is a file here), once
        clients can connect: the endpoint and the handler. Its logging goes to stderr."""
        (tmp_path / "upper.py").write_text("def handle(client, message):\n    return message.upper()\n")
        path = os.path.join(sockdir, "r.sock")
        server = spawn([path, *args], cwd=str(tmp_path))
        kind = "seqpacket" if "seqpacket" in args else "stream"
        server.wait_listening(path, kind=kind)
        socket_kind = "stream, framing u32" if kind == "stream" else kind
        assert server.stdout == f"ready on {path} ({socket_kind}), handler {handler}\n"
        assert "ready on" not in server.stderr
        assert server.signal(signal.SIGTERM) == 0
        assert server.stdout.count("\n") == 1

    def test_sigint_stops_cleanly(self, spawn, sock_path):
        """SIGINT (Ctrl-C) does the same as SIGTERM: exit 0, socket file gone, no traceback."""
        server = spawn([sock_path])
        server.wait_listening(sock_path)
        assert send(sock_path, "ping").stdout == "ping\n"

        assert server.signal(signal.SIGINT) == 0
        assert not os.path.lexists(sock_path)
        assert "Traceback" not in server.stderr
        assert "KeyboardInterrupt" not in server.stderr

    def test_sigterm_with_a_client_connected(self, spawn, sock_path):
        """A client still connected when SIGTERM arrives sees the connection end; the
        server still exits 0 promptly."""
        server = spawn([sock_path])
        server.wait_listening(sock_path)
        with pyuds.connect(sock_path, timeout=EXIT_TIMEOUT) as conn:
            assert conn.request(b"before") == b"before"
            t0 = time.monotonic()
            assert server.signal(signal.SIGTERM) == 0
            assert time.monotonic() - t0 < 5.0
            with pytest.raises(pyuds.ConnectionClosedError):
                conn.recv()
        assert not os.path.lexists(sock_path)

    def test_many_messages_one_send(self, spawn, sock_path):
        """send keeps one connection for all its messages, replies in order."""
        server = spawn([sock_path])
        server.wait_listening(sock_path)
        words = [f"m{i}" for i in range(50)]
        result = send(sock_path, *words)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == words
        assert server.signal(signal.SIGTERM) == 0

    @pytest.mark.parametrize("framing", ["line", "raw", "u32"])
    def test_framing(self, spawn, sock_path, framing):
        """--framing on both sides: the round trip works in each framing."""
        server = spawn(["--framing", framing, sock_path])
        server.wait_listening(sock_path, framing)
        result = send(sock_path, "hello", "world", framing=framing)
        assert result.returncode == 0, result.stderr + server.stderr
        assert result.stdout == "hello\nworld\n"
        assert f"framing {framing}" in server.stderr
        assert server.signal(signal.SIGTERM) == 0
        assert not os.path.lexists(sock_path)

    def test_line_framing_seen_by_a_plain_client(self, spawn, sock_path):
        """A line server answers a plain socket client speaking newline-ended lines."""
        server = spawn(["--framing", "line", sock_path])
        server.wait_listening(sock_path, "line")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(EXIT_TIMEOUT)
            s.connect(sock_path)
            s.sendall(b"one\ntwo\n")
            data = b""
            while data.count(b"\n") < 2:
                chunk = s.recv(100)
                assert chunk, f"EOF after {data!r}"
                data += chunk
        assert data == b"one\ntwo\n"
        assert server.signal(signal.SIGTERM) == 0


# ---- options ------------------------------------------------------------------------------------


class TestServeOptions:
    @pytest.mark.parametrize("mode_arg, expected", [("0660", 0o660), ("660", 0o660), ("0600", 0o600),
                                                     ("0640", 0o640), ("0666", 0o666)])
    def test_mode(self, spawn, sock_path, mode_arg, expected):
        """--mode gives the socket file exactly that mode, even under a strict umask."""
        with umask(0o077):  # inherited by the child
            server = spawn(["--mode", mode_arg, sock_path])
        server.wait_listening(sock_path)
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == expected
        assert f"mode {expected:04o}" in server.stderr
        assert server.signal(signal.SIGTERM) == 0

    def test_default_mode_is_0600(self, spawn, sock_path):
        with umask(0o000):
            server = spawn([sock_path])
        server.wait_listening(sock_path)
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
        assert server.signal(signal.SIGTERM) == 0

    @pytest.mark.parametrize("spec", ["upper:handle", "upper:Handlers.shout"])
    def test_handler_from_a_module_in_cwd(self, spawn, sockdir, tmp_path, spec):
        """--handler MODULE:FUNCTION imports a module from the current directory (dotted
        attributes work too); send gets that handler's replies."""
        (tmp_path / "upper.py").write_text(
            "def handle(client, message):\n"
            "    return message.upper()\n"
            "\n"
            "class Handlers:\n"
            "    @staticmethod\n"
            "    def shout(client, message):\n"
            "        return message.upper() + b'!'\n"
        )
        path = os.path.join(sockdir, "h.sock")
        server = spawn(["--handler", spec, path], cwd=str(tmp_path))
        server.wait_listening(path)
        result = send(path, "hello", "world")
        assert result.returncode == 0, result.stderr + server.stderr
        bang = "!" if "shout" in spec else ""
        assert result.stdout == f"HELLO{bang}\nWORLD{bang}\n"
        assert server.signal(signal.SIGTERM) == 0

    def test_default_path_is_pyuds_sock_in_cwd(self, spawn, sockdir):
        """With no PATH, serve listens on ./pyuds.sock; send reaches it by that relative
        path; the file is removed at exit."""
        path = os.path.join(sockdir, "pyuds.sock")
        server = spawn([], cwd=sockdir)
        server.wait_listening(path)
        result = send("pyuds.sock", "here", cwd=sockdir)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "here\n"
        assert "listening on ./pyuds.sock" in server.stderr
        assert server.signal(signal.SIGTERM) == 0
        assert not os.path.lexists(path)
        assert os.listdir(sockdir) == []

    def test_verbose_logs_clients(self, spawn, sock_path):
        """-v logs each client's connect and disconnect."""
        server = spawn(["-v", sock_path])
        server.wait_listening(sock_path)
        assert send(sock_path, "x").returncode == 0
        wait_until(lambda: "disconnected" in server.stderr, timeout=EXIT_TIMEOUT)
        assert "connected (pid" in server.stderr
        assert server.signal(signal.SIGTERM) == 0


# ---- errors -------------------------------------------------------------------------------------


class TestErrors:
    def test_serve_on_a_regular_file(self, sockdir):
        """serve on a path that is a regular file: non-zero exit, a message naming the
        problem and the path, and the file untouched."""
        path = os.path.join(sockdir, "data.txt")
        with open(path, "w") as f:
            f.write("keep me\n")
        result = run(["serve", path])
        assert result.returncode != 0
        assert_clean_error(result.stderr, "pyuds serve:")
        assert "regular file" in result.stderr
        assert path in result.stderr
        with open(path) as f:
            assert f.read() == "keep me\n"

    def test_serve_on_a_directory(self, sockdir):
        path = os.path.join(sockdir, "d")
        os.mkdir(path)
        result = run(["serve", path])
        assert result.returncode != 0
        assert_clean_error(result.stderr, "pyuds serve:")
        assert "directory" in result.stderr
        assert os.path.isdir(path)

    def test_serve_where_a_server_already_listens(self, spawn, sock_path):
        """A second serve on a live server's path fails with a clear message; the first keeps
        serving."""
        first = spawn([sock_path])
        first.wait_listening(sock_path)
        result = run(["serve", sock_path])
        assert result.returncode != 0
        assert_clean_error(result.stderr, "pyuds serve:")
        assert "already listening" in result.stderr
        assert send(sock_path, "still").stdout == "still\n"
        assert first.signal(signal.SIGTERM) == 0

    def test_serve_path_too_long(self, sockdir):
        path = os.path.join(sockdir, "x" * 120)
        result = run(["serve", path])
        assert result.returncode != 0
        assert_clean_error(result.stderr, "pyuds serve:")
        assert "107" in result.stderr
        assert os.listdir(sockdir) == []

    def test_send_to_missing_socket(self, sockdir):
        """send to a path where nothing exists: non-zero exit and a message, nothing printed."""
        path = os.path.join(sockdir, "missing.sock")
        result = send(path, "hello")
        assert result.returncode != 0
        assert result.stdout == ""
        assert_clean_error(result.stderr, "pyuds send:")
        assert "No such file" in result.stderr

    def test_send_to_stale_socket(self, sockdir):
        """send to a socket file nobody listens on: non-zero exit, connection refused."""
        path = os.path.join(sockdir, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()
        result = send(path, "hello")
        assert result.returncode != 0
        assert_clean_error(result.stderr, "pyuds send:")
        assert "refused" in result.stderr.lower()

    @pytest.mark.parametrize("spec", ["nocolon", ":handle", "upper:", "no_such_module_pyuds:handle",
                                      "os:no_such_function", "os:sep"])
    def test_bad_handler_spec_is_a_usage_error(self, sockdir, spec):
        """A --handler that is malformed, not importable, missing or not callable: exit 2
        with argparse's usage message, and no socket file."""
        path = os.path.join(sockdir, "s.sock")
        result = run(["serve", "--handler", spec, path], cwd=sockdir)
        assert result.returncode == 2, result.stderr
        assert "usage:" in result.stderr
        assert "--handler" in result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.lexists(path)

    @pytest.mark.parametrize("args", [["serve", "--mode", "rw-rw----"], ["serve", "--mode", "1777"],
                                      ["serve", "--framing", "json"], ["send"], ["send", "/tmp/x.sock"],
                                      ["bogus"], []])
    def test_bad_arguments_are_usage_errors(self, args):
        result = run(args)
        assert result.returncode == 2, result.stderr
        assert "usage:" in result.stderr
        assert "Traceback" not in result.stderr

    def test_help(self):
        result = run(["--help"])
        assert result.returncode == 0
        assert "serve" in result.stdout and "send" in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_version(launcher):
    """`pyuds --version` prints the one version there is: pyuds.__version__, which the installed
    package's metadata (made from pyproject.toml) has too."""
    from importlib.metadata import version

    result = run(["--version"], launcher)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"pyuds {pyuds.__version__}\n", "")
    assert version("pyuds") == pyuds.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyuds.__version__)


# ---- a signal at the earliest moment ------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_as_soon_as_the_socket_exists(sock_path, sig):
    """A supervisor that stops `pyuds serve` as soon as its socket file exists (the natural
    readiness sign) should still get a clean exit and no leftover file.

    Deterministic reproduction: the child's stderr is a pipe we filled beforehand, so the
    child blocks writing its "listening on" log line, which comes after bind() and before
    serve_forever() installs the signal handlers. Without the pipe trick the same happens by
    chance (most of the time, on the machine this was written on)."""
    rd, wr = os.pipe()
    os.set_blocking(wr, False)
    filled = 0
    try:
        while True:
            filled += os.write(wr, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(wr, True)
    proc = subprocess.Popen([*MODULE, "serve", sock_path], cwd=NEUTRAL_CWD, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=wr)
    os.close(wr)
    try:
        wait_until(lambda: is_socket(sock_path) or proc.poll() is not None, timeout=START_TIMEOUT)
        time.sleep(0.2)  # well past bind(): the child now waits on its stderr
        os.kill(proc.pid, sig)
        # Drain the pipe so that a fixed pyuds could log and finish its shutdown.
        os.set_blocking(rd, False)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                os.read(rd, 65536)
            except BlockingIOError:
                time.sleep(0.01)
        status = proc.wait(EXIT_TIMEOUT)
        leftover = os.path.lexists(sock_path)
        assert (status, leftover) == (0, False), f"exit status {status}, socket file left behind: {leftover}"
    finally:
        os.close(rd)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(EXIT_TIMEOUT)


# ---- pyuds bench ----------------------------------------------------------------------------------


class TestBench:
    """`pyuds bench` drives a real server with the C load generator and reports what it saw."""

    ARGS = ["bench", "--duration", "0.5", "--warmup", "0.2", "--conns", "4", "--depth", "2"]

    def test_echo_every_reply_checked(self):
        result = run(self.ARGS)
        assert result.returncode == 0, result.stderr
        assert "msgs/s" in result.stdout and "p99" in result.stdout
        assert "every reply checked byte for byte; errors 0, lost 0" in result.stdout

    def test_a_handler_of_ones_own(self, tmp_path):
        (tmp_path / "shout.py").write_text("def handle(client, message):\n    return message.upper()\n")
        result = run([*self.ARGS, "--handler", "shout:handle"], cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "shout:handle" in result.stdout
        assert "counted and their framing checked; errors 0, lost 0" in result.stdout

    def test_a_failing_handler_fails_the_bench(self, tmp_path):
        (tmp_path / "broken.py").write_text("def handle(client, message):\n    raise RuntimeError('no')\n")
        result = run([*self.ARGS, "--handler", "broken:handle"], cwd=str(tmp_path))
        assert result.returncode == 1
        assert "pyuds bench:" in result.stderr

    def test_runs_from_a_directory_that_holds_another_pyuds(self, tmp_path):
        """Run from a source checkout (a pyuds/ without its compiled extension), the server
        still uses the installed pyuds."""
        if SCRIPT is None:
            pytest.skip("no pyuds console script next to python")
        (tmp_path / "pyuds").mkdir()
        (tmp_path / "pyuds" / "__init__.py").write_text("raise ImportError('the wrong pyuds')\n")
        result = run(self.ARGS, launcher=SCRIPT, cwd=str(tmp_path))  # as a user types it
        assert result.returncode == 0, result.stderr
        assert "errors 0, lost 0" in result.stdout

    def test_a_bad_handler_spec_is_a_usage_error(self):
        result = run([*self.ARGS, "--handler", "no_such_module_here:handle"])
        assert result.returncode == 2 and "cannot import" in result.stderr

    PROGRESS_ARGS = ["bench", "--duration", "1.6", "--warmup", "0.3", "--conns", "4", "--depth", "2"]

    def test_progress_as_plain_lines_when_not_a_terminal(self):
        """Piped, progress comes as whole lines on stderr, about one a second, from the warm-up
        on; no carriage return; the figures go to stdout alone."""
        result = run(self.PROGRESS_ARGS)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) >= 2, result.stderr
        assert "\r" not in result.stderr
        assert lines[0].startswith("pyuds bench: warm-up 0.0/1.9 s, server CPU ")
        for line in lines:
            assert re.fullmatch(r"pyuds bench: (warm-up|measuring) \d+\.\d/1\.9 s, server CPU \d+%", line), line
        assert any("measuring" in line for line in lines)
        assert "pyuds bench" not in result.stdout and "msgs/s" in result.stdout

    def test_progress_redrawn_on_a_terminal(self):
        """On a terminal (a pty here), progress is one line redrawn with carriage returns, each
        drawing further along, and wiped at the end; the figures still go to stdout."""
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([*MODULE, *self.PROGRESS_ARGS], cwd=NEUTRAL_CWD, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=slave)
        finally:
            os.close(slave)
        shown = b""
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while time.monotonic() < deadline:
                if select.select([master], [], [], 1.0)[0]:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:  # EIO: the last holder of the terminal closed it
                        break
                    if not chunk:
                        break
                    shown += chunk
            stdout, _ = proc.communicate(timeout=EXIT_TIMEOUT)
        finally:
            os.close(master)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(EXIT_TIMEOUT)
        assert proc.returncode == 0, shown
        text = shown.decode()
        assert "\n" not in text.replace("\r\n", "")  # the terminal only ever sees one line
        draws = [d for d in text.split("\r") if d.strip()]
        assert len(draws) >= 3, text
        assert "warm-up" in draws[0] and any("measuring" in d for d in draws)
        done = [float(m.group(1)) for m in (re.search(r"(\d+\.\d)/1\.9 s", d) for d in draws) if m]
        assert len(done) == len(draws) and done == sorted(done) and done[-1] > done[0], text
        assert text.endswith("\r"), text  # wiped: what comes next starts on a clean line
        assert b"every reply checked byte for byte; errors 0, lost 0" in stdout


# ---- socket kinds, abstract names, credentials -----------------------------------------------


class TestKinds:
    @pytest.mark.parametrize("kind", ["seqpacket", "datagram"])
    def test_kind_round_trip(self, spawn, sock_path, kind):
        server = spawn([sock_path, "--kind", kind])
        server.wait_listening(sock_path, kind=kind)
        result = run(["send", "--kind", kind, sock_path, "one", "", "three"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == "one\n\nthree\n"
        assert f"listening on {sock_path} ({kind}" in server.stderr
        assert server.signal(signal.SIGTERM) == 0
        assert not os.path.exists(sock_path)

    def test_abstract_name(self, spawn, sockdir):
        name = f"@pyuds-cli-{os.getpid()}-{time.monotonic_ns()}"
        server = spawn([name])
        server.wait_listening(name)
        result = run(["send", name, "abstract"])
        assert (result.returncode, result.stdout) == (0, "abstract\n"), result.stderr
        assert "abstract namespace" in server.stderr
        assert server.signal(signal.SIGTERM) == 0

    def test_allow_uid_refuses_others(self, spawn, sock_path):
        server = spawn([sock_path, "--allow-uid", str(os.getuid() + 1), "--allow-gid", str(os.getgid() + 1)])
        wait_until(lambda: "listening on" in server.stderr, timeout=START_TIMEOUT)
        result = run(["send", sock_path, "let me in"])
        assert result.returncode == 1
        assert_clean_error(result.stderr, "pyuds send: ")
        wait_until(lambda: "not in allow_uid / allow_gid" in server.stderr)
        assert server.signal(signal.SIGTERM) == 0

    def test_authorize_from_a_module(self, spawn, sockdir, tmp_path):
        """--authorize MODULE:FUNCTION sees each client's credentials; it fails closed, so a
        function that returns nothing refuses everyone."""
        (tmp_path / "policy.py").write_text(
            "import os\n"
            "def same_user(client):\n"
            "    return client.uid == os.getuid() and client.pid > 0\n"
            "def forgets_to_return(client):\n"
            "    client.uid == os.getuid()\n"
        )
        for function, served in (("same_user", True), ("forgets_to_return", False)):
            path = os.path.join(sockdir, f"{function}.sock")
            server = spawn(["--authorize", f"policy:{function}", path], cwd=str(tmp_path))
            wait_until(lambda: "listening on" in server.stderr, timeout=START_TIMEOUT)
            result = send(path, "knock")
            if served:
                assert (result.returncode, result.stdout) == (0, "knock\n"), result.stderr + server.stderr
            else:
                assert result.returncode == 1
                assert_clean_error(result.stderr, "pyuds send: ")
                wait_until(lambda: "refused by authorize()" in server.stderr)
            assert server.signal(signal.SIGTERM) == 0
        result = run(["serve", os.path.join(sockdir, "x.sock"), "--authorize", "no_such_module_here:f"])
        assert result.returncode == 2 and "--authorize" in result.stderr and "cannot import" in result.stderr

    def test_send_passes_fds(self, spawn, sockdir, tmp_path):
        """send --fd N passes descriptor N with each message; a handler given with --handler
        writes into it. A reply that brings descriptors is printed, and they are closed."""
        (tmp_path / "scribe.py").write_text(
            "import os\n"
            "def handle(client, message):\n"
            "    if message == b'give':\n"
            "        client.send(b'given', fds=[0, 0])\n"
            "        return None\n"
            "    fds = client.take_fds()\n"
            "    for fd in fds:\n"
            "        os.write(fd, b'server wrote: ' + message + b'\\n')\n"
            "        os.close(fd)\n"
            "    return b'%d fds' % len(fds)\n"
        )
        path = os.path.join(sockdir, "scribe.sock")
        server = spawn(["--handler", "scribe:handle", path], cwd=str(tmp_path))
        server.wait_listening(path)
        r, w = os.pipe()
        try:
            result = run(["send", "--fd", str(w), "--fd", str(w), path, "one", "two"], pass_fds=[w])
            os.close(w)
            w = -1
            assert result.returncode == 0, result.stderr + server.stderr
            assert result.stdout == "2 fds\n2 fds\n"
            with os.fdopen(r, "rb") as pipe:
                r = -1
                assert pipe.read() == b"server wrote: one\n" * 2 + b"server wrote: two\n" * 2  # EOF: all closed
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
        result = send(path, "give")
        assert (result.returncode, result.stdout) == (0, "given\n"), result.stderr
        assert "the reply came with 2 file descriptor(s); closed them" in result.stderr
        for bad in ("x", "999"):
            result = run(["send", "--fd", bad, path, "m"])
            assert result.returncode == 2 and "file descriptor" in result.stderr
        assert server.signal(signal.SIGTERM) == 0

    def test_bad_kind_and_fd_name(self, sock_path):
        result = run(["serve", sock_path, "--kind", "carrier-pigeon"])
        assert result.returncode == 2 and "invalid choice" in result.stderr
        result = run(["serve", sock_path, "--kind", "seqpacket", "--framing", "line"])
        assert result.returncode == 1
        assert_clean_error(result.stderr, "framing applies to kind='stream' only")
        assert not os.path.exists(sock_path)
        result = run(["serve", sock_path, "--fd-name", "web"])
        assert result.returncode == 1
        assert_clean_error(result.stderr, "no socket activation")
