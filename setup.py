# Everything else is in pyproject.toml; this file only wires the cffi extension in.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder", "build_ffi.py:loadgen"])
