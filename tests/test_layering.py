"""The layering rules stated in pyuds/_core.py's docstring and csrc/README.md, checked on the
source files themselves (nothing is imported or built).

Python (pyuds/*.py): no import cycle among the modules; every import goes down the layers
that _core.py's docstring lists; only _core imports a compiled extension. Every import
counts, wherever it stands: inside functions and under ``if TYPE_CHECKING:`` too.

C (csrc/*.c): csrc/README.md lists every file of the core once, bottom first; no file calls a
function defined in a file listed after its own; the leaves know no server, connection or
peer; no C file reaches 600 lines, and no function 80.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyuds"

# Bottom to top, as _core.py's docstring gives them: a module imports only from layers below
# its own.
PYTHON_LAYERS = (
    {"_errors", "_config", "_version", "_systemd"},
    {"_address"},
    {"_endpoint"},
    {"_framing"},
    {"_client"},
    {"_aclient"},
    {"_handle"},
    {"_core"},
    {"_registry"},
    {"_aio", "_workers"},
    {"_server"},
    {"_bench"},
    {"_cli", "__init__"},
    {"__main__"},
)


def imported_modules(source: str, package_modules: set[str]) -> set[str]:
    """The modules of the pyuds package that source (a module directly in pyuds/) imports,
    relative imports resolved: "__init__" for the package itself, and the names of compiled
    extensions (pyuds._uds) as they are."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pyuds":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if not parts or parts[0] != "pyuds":
                    continue  # another package
                parts = parts[1:]
            else:
                assert node.level == 1, f"line {node.lineno}: an import from above the package"
            if parts:
                found.add(parts[0])  # from ._core import x / from pyuds._core import x
            else:  # from . import x / from pyuds import x: a module, or a name of __init__
                found.update(alias.name if alias.name in package_modules else "__init__" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module name -> the pyuds modules it imports (extensions included)."""
    paths = sorted(PACKAGE.glob("*.py"))
    modules = {path.stem for path in paths}
    return {path.stem: imported_modules(path.read_text(encoding="utf-8"), modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of graph as [a, b, ..., a], or None if there is none."""
    done: set[str] = set()
    path: list[str] = []  # the modules being visited, each importing the next

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in done:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_import_graph_counts_every_form_of_import():
    source = """
import os
import pyuds._errors
from . import _client, Server
from ._core import Core
from pyuds._handle import ClientHandle
from pyuds import connect
if TYPE_CHECKING:
    from ._server import Server
def f():
    from ._registry import Registry
    import pyuds
"""
    modules = {"_errors", "_client", "_core", "_handle", "_server", "_registry", "__init__"}
    assert imported_modules(source, modules) == modules
    assert find_cycle({"a": {"b"}, "b": {"c", "os"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_pyuds_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among pyuds modules: " + " -> ".join(cycle)


def test_pyuds_modules_import_only_from_layers_below_their_own():
    graph = import_graph()
    layer = {module: rank for rank, modules in enumerate(PYTHON_LAYERS) for module in modules}
    upward = [f"{module} imports {dep}" for module, deps in sorted(graph.items()) for dep in sorted(deps)
              if module in layer and dep in layer and layer[dep] >= layer[module]]
    assert not upward, "imports that do not go down the layers: " + "; ".join(upward)
    assert set(graph) == set(layer), "every module of pyuds/ has its place in _core.py's layering"


def test_only_core_imports_the_compiled_extensions():
    graph = import_graph()
    importers = {module for module, deps in graph.items() if deps - set(graph)}
    assert importers == {"_core"}, f"modules importing a compiled extension: {sorted(importers)}"


# ---- C ---------------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _layers() -> list[str]:
    """The core's files, bottom first, as csrc/README.md lists them."""
    text = (CSRC / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layering", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `(\w+\.c)`", section, flags=re.M)


def _code(path: Path) -> str:
    """The file without its comments and string literals (a name in them is no call)."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def _functions(code: str) -> list[tuple[str, bool, int]]:
    """(name, static, body lines) of each function defined at file level: a signature that
    starts in column 0, its body from a "{" line in column 0 to the next "}" in column 0."""
    found = []
    lines = code.split("\n")
    signature: list[str] = []
    for i, line in enumerate(lines):
        if line == "{" and signature:
            head = " ".join(signature)
            name = re.search(r"(\w+)\s*\(", head)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("}"))
            if name:
                found.append((name.group(1), head.lstrip().startswith("static"), end - i - 1))
            signature = []
        elif re.match(r"[a-z].*\b(\w+)\([^;]*\)\s*\{.*\}\s*$", line):  # one line: f(...) { ... }
            found.append((re.search(r"(\w+)\s*\(", line).group(1), line.startswith("static"), 1))
            signature = []
        elif line[:1].isalpha() and "(" in line and not line.rstrip().endswith(";"):
            signature = [line]
        elif signature and line[:1] == " " and not line.rstrip().endswith(";"):
            signature.append(line)
        else:
            signature = []
    return found


def _core_files() -> list[Path]:
    return sorted(p for p in CSRC.glob("*.c") if not p.name.startswith("test_"))


def test_readme_lists_every_c_file_of_the_core_once():
    layers = _layers()
    assert len(layers) == len(set(layers))
    assert sorted(layers) == [p.name for p in _core_files()]


def test_no_c_file_calls_a_function_of_a_file_above_it():
    rank = {name: i for i, name in enumerate(_layers())}
    defined_in = {}
    for path in _core_files():
        for name, static, _ in _functions(_code(path)):
            if not static:
                defined_in[name] = path.name
    upward = []
    for path in _core_files():
        for called in sorted(set(re.findall(r"\b(uds_\w+)\s*\(", _code(path)))):
            home = defined_in.get(called)
            if home is not None and rank[home] > rank[path.name]:
                upward.append(f"{path.name} calls {called}() of {home}")
    assert defined_in.get("uds_poll") == "server.c"  # the parser sees definitions at all
    assert upward == []


def test_the_leaves_know_no_server_connection_or_peer():
    leaves = _layers()[:_layers().index("scratch.c") + 1]
    knowing = [f"{name}: {word}" for name in leaves
               for word in sorted(set(re.findall(r"\buds_(?:server|conn|peer|event)\b", _code(CSRC / name))))]
    assert knowing == []


def test_c_files_and_functions_stay_small():
    too_long = []
    for path in sorted(CSRC.glob("*.[ch]")):
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines >= MAX_FILE_LINES:
            too_long.append(f"{path.name}: {lines} lines")
        for name, _, body in _functions(_code(path)):
            if body > MAX_FUNCTION_LINES:
                too_long.append(f"{path.name}: {name}() has {body} lines")
    assert too_long == []
