"""The wheel holds every subpackage of every mapped folder, and the recipe files."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"compiler": "qcompile", "passes": "qcompile/passes", "plugins": "qcompile/plugins"}


@pytest.mark.slow
def test_wheel_contains_every_subpackage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheel = next(tmp_path.glob("qcompile-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = []
    for folder, prefix in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            expected.append(f"{prefix}/{rel}")
    assert len(expected) >= 6
    missing = [e for e in expected if e not in names]
    assert not missing, f"subpackages missing from the wheel: {missing}"
    assert "qcompile/recipes/builtin/int8.toml" in names
    assert not any(n.startswith(("compiler/", "passes/", "plugins/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qcompile = qcompile.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
