"""Types of pyuds._loadgen, the cffi extension build_ffi.py compiles from benchmarks/loadgen.c,
for type checkers (see _uds.pyi; tests/test_typing.py checks both)."""
from ._uds import FFI, CData

class Lib:
    @staticmethod
    def uds_loadgen_main(argc: int, argv: CData) -> int: ...

ffi: FFI
lib: Lib
