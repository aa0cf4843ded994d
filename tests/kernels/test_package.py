"""Package boundaries: ``plrd_kernels`` stands alone, and a mis-ordered import fails loudly."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plrd_kernels

PACKAGE = Path(plrd_kernels.__file__).parent
ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .mod import y
                names.add("plrd_kernels" + (f".{node.module}" if node.module else ""))
            elif node.module:
                names.add(node.module)
    return names


def test_kernels_never_import_plrd():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) >= 8  # the scan sees the package
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name for name in _imported_modules(path) if name == "plrd" or name.startswith("plrd.")
        )
        for path in modules
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_scan_sees_an_import_of_plrd(tmp_path):
    """The scan above can fail: every import form of plrd is caught."""
    source = tmp_path / "mod.py"
    source.write_text("import os\ndef f():\n    from plrd.layer import X\n    import plrd\n")
    assert {"plrd.layer", "plrd", "os"} <= _imported_modules(source)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are right")
def test_kernels_loaded_before_the_interpreter_stop_the_session():
    """Kernel modules imported before tests/kernels/conftest.py sets TRITON_INTERPRET=1: the
    session errors out at collection (it must never quietly skip every kernel test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import sys, pytest\n"
        "import plrd_kernels.tuning\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
        "'tests/kernels/test_grads.py::test_no_rows_gives_zeros']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 5), output  # 0: passed or skipped; 5: nothing ran
    assert "imported before tests/kernels/conftest.py" in output
