"""The package itself: its public surface and the platforms it refuses."""
from __future__ import annotations

import subprocess
import sys

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
