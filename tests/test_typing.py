"""pyuds as a type checker sees it: a user program type-checks with mypy --strict against the
installed package (py.typed), a wrong call is flagged, and the hand-written stubs of the compiled
extensions say what the extensions hold."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest

import pyuds
from pyuds import _config

pytest.importorskip("mypy", reason="mypy comes with pyuds's test extra: pip install '.[test]'")

PACKAGE = Path(pyuds.__file__).resolve().parent
MYPY_TIMEOUT = 120.0

# A user's program, typed throughout; it also runs (argv[1]: a socket path).
CORRECT = '''\
import os
import sys

import pyuds


def handle(client: pyuds.ClientHandle, message: bytes) -> bytes | None:
    if message == b"quiet":
        return None
    return b"%d: %s" % (client.messages_received, message.upper())


def gone(client: pyuds.ClientHandle, reason: pyuds.CloseReason) -> None:
    print("gone", client.id, reason.value)


server = pyuds.Server(sys.argv[1], handle, mode=0o660, max_connections=10, idle_timeout=None,
                      allow_uid=[os.getuid()], on_disconnect=gone)
server.start()
with pyuds.connect(server.path, timeout=10.0) as conn:
    reply: bytes = conn.request(b"hi")
    conn.send(bytearray(b"quiet"))
    print(reply.decode(), conn.request(memoryview(b"again")).decode())
server.shutdown()
config: pyuds.ServerConfig = pyuds.ServerConfig(framing="line", allow_gid=(0,))
version: str = pyuds.__version__
'''

# Each wrong line, and what mypy must say about it.
WRONG = {
    "pyuds.Server(sys.argv[1], shout)":
        'Argument 2 to "Server" has incompatible type "Callable[[ClientHandle, bytes], str]"',
    'pyuds.Server(sys.argv[1], max_connections="10")':
        'Argument "max_connections" to "Server" has incompatible type "str"; expected "int | None"',
    "pyuds.Server(sys.argv[1], frame_timeout=[1.0])":
        'Argument "frame_timeout" to "Server" has incompatible type "list[float]"; expected "float | None"',
    "pyuds.Server(sys.argv[1], max_conections=10)":
        'Unexpected keyword argument "max_conections" for "Server"',
    'pyuds.connect(sys.argv[1]).request("text")':
        'Argument 1 to "request" of "Connection" has incompatible type "str"',
}
WRONG_HEAD = '''\
import sys

import pyuds


def shout(client: pyuds.ClientHandle, message: bytes) -> str:
    return message.decode().upper()


'''


def mypy(directory: str, *args: str) -> subprocess.CompletedProcess[str]:
    """python -m mypy --strict on files of directory, run there, against the installed pyuds.
    (LD_PRELOAD dropped: under the sanitizer run it would preload ASan into mypy too; mypy never
    loads pyuds's extension.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MYPYPATH")}
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-color-output",
                           "--cache-dir", os.path.join(directory, ".mypy_cache"), *args],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=MYPY_TIMEOUT)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="pyuds-typing-", dir="/tmp") as d:
        yield d


def test_a_correct_program_passes_and_runs(workdir):
    """mypy --strict, and --disallow-any-expr: nothing of pyuds's API it uses is Any. Then the
    program runs against a real server."""
    Path(workdir, "correct.py").write_text(CORRECT)
    result = mypy(workdir, "--disallow-any-expr", "correct.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout

    ran = subprocess.run([sys.executable, "correct.py", os.path.join(workdir, "t.sock")], cwd=workdir,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[0] == "1: HI 3: AGAIN"


def test_wrong_calls_are_flagged(workdir):
    """A handler returning str, options of the wrong type or name, a str message: each line is
    flagged, with the error a user would read, and nothing else is."""
    lines = list(WRONG)
    Path(workdir, "wrong.py").write_text(WRONG_HEAD + "\n".join(lines) + "\n")
    first = WRONG_HEAD.count("\n") + 1
    result = mypy(workdir, "wrong.py")
    assert result.returncode == 1, result.stdout + result.stderr
    errors: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"wrong\.py:(\d+): error: (.*)", line)
        if match:
            errors.setdefault(int(match.group(1)), []).append(match.group(2))
    expected = {first + i: WRONG[code] for i, code in enumerate(lines)}
    assert sorted(errors) == sorted(expected), result.stdout
    for lineno, message in expected.items():
        assert any(message in e for e in errors[lineno]), (lineno, message, errors[lineno])


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
    for stub in ("_uds.pyi", "_loadgen.pyi"):
        assert (PACKAGE / stub).is_file(), stub


def _stub_lib(stub: str) -> tuple[dict[str, tuple[int, str]], set[str]]:
    """From a stub's `class Lib`: its functions (name -> (argument count, result type)) and its
    constants."""
    tree = ast.parse((PACKAGE / stub).read_text(encoding="utf-8"))
    lib = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Lib")
    functions: dict[str, tuple[int, str]] = {}
    constants: set[str] = set()
    for node in lib.body:
        if isinstance(node, ast.FunctionDef):
            assert [ast.unparse(d) for d in node.decorator_list] == ["staticmethod"], node.name
            assert node.returns is not None, node.name
            functions[node.name] = (len(node.args.args), ast.unparse(node.returns))
        elif isinstance(node, ast.AnnAssign):
            assert ast.unparse(node.annotation) == "int", ast.unparse(node)
            constants.add(ast.unparse(node.target))
    return functions, constants


# C results as the stubs give them.
C_RESULTS = {"int": "int", "int64_t": "int", "size_t": "int", "ssize_t": "int", "void": "None"}


@pytest.mark.parametrize("module, stub", [("_uds", "_uds.pyi"), ("_loadgen", "_loadgen.pyi")])
def test_stub_matches_the_extension(module, stub):
    """Every name of the extension's lib is in its stub and the other way round; every function
    takes as many arguments as C does, and returns int where C returns an integer, None where
    void."""
    ext = __import__(f"pyuds.{module}", fromlist=["ffi", "lib"])
    functions, constants = _stub_lib(stub)
    assert set(dir(ext.lib)) == set(functions) | constants
    for name in constants:
        assert isinstance(getattr(ext.lib, name), int), name
    for name, (nargs, result) in functions.items():
        ctype = ext.ffi.typeof(getattr(ext.lib, name))
        assert (len(ctype.args), result) == (nargs, C_RESULTS[ctype.result.cname]), name


def test_server_options_are_the_config_fields():
    """Server(**options) is typed by ServerOptions: the same names and types as ServerConfig."""
    options = typing.get_type_hints(_config.ServerOptions)
    fields = typing.get_type_hints(pyuds.ServerConfig)
    assert options == {f.name: fields[f.name] for f in dataclasses.fields(pyuds.ServerConfig)}
