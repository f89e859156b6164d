"""The version of pyuds: its one source. pyproject.toml reads it when the package is built
(setuptools' dynamic version, read from this file without importing pyuds), and
``pyuds.__version__`` and ``pyuds --version`` show it. CHANGELOG.md says what each version
added."""

__version__ = "0.2.0"
