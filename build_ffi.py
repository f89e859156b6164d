"""Builds pyuds._uds, the cffi extension (out-of-line API mode) around the C core in csrc/.

setuptools runs this through setup.py's ``cffi_modules``; it must not import pyuds. The
declarations come from the marked part of csrc/uds.h, so the header is their one source.
Extra compiler and linker flags (e.g. sanitizers) come from the environment variable
PYUDS_CFLAGS.
"""
import os
import re
import shlex

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# Every C file of the core (the C tests' files excepted); csrc/README.md gives their layering.
SOURCES = sorted(f for f in os.listdir(CSRC) if f.endswith(".c") and not f.startswith("test_"))


def _cdef() -> str:
    with open(os.path.join(CSRC, "uds.h"), encoding="utf-8") as f:
        header = f.read()
    match = re.search(r"/\* cffi-begin \*/(.*)/\* cffi-end \*/", header, re.S)
    if match is None:
        raise RuntimeError("csrc/uds.h has no cffi-begin/cffi-end section")
    # Comments go first (a #define's may run over several lines); then "#define NAME 3":
    # let the compiler supply the value.
    text = re.sub(r"/\*.*?\*/", " ", match.group(1), flags=re.S)
    return re.sub(r"^#define (\w+) .*$", r"#define \1 ...", text, flags=re.M)


extra = shlex.split(os.environ.get("PYUDS_CFLAGS", ""))

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "pyuds._uds",
    '#include "uds.h"',
    sources=[os.path.relpath(os.path.join(CSRC, s), HERE) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC, HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", *extra],
    extra_link_args=extra,
)

# The C load generator of benchmarks/, built in so that `pyuds bench` works wherever pyuds is
# installed; its main() becomes uds_loadgen_main(), run in a process of its own.
loadgen = FFI()
loadgen.cdef("int uds_loadgen_main(int argc, char **argv);")
loadgen.set_source(
    "pyuds._loadgen",
    "int uds_loadgen_main(int argc, char **argv);",
    sources=[os.path.relpath(os.path.join(HERE, "benchmarks", "loadgen.c"), HERE)],
    define_macros=[("UDS_LOADGEN_ENTRY", "uds_loadgen_main")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", *extra],
    extra_link_args=extra,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    loadgen.compile(verbose=True)
