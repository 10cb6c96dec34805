"""Reading and writing input/output tensors as .npz files (the CLI's exchange format)."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from qcompile.errors import QCompileError


def load_npz_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of an .npz file; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise QCompileError(f"inputs file {path} does not exist; write one with `qcompile sample-inputs`")
    if not zipfile.is_zipfile(path):
        raise QCompileError(f"inputs file {path} is not an .npz file (a zip archive of .npy arrays, as numpy.savez "
                            "writes); write one with `qcompile sample-inputs`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise QCompileError(f"inputs file {path} is not a readable .npz file: {exc}") from None


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays to `path` (.npz) through a temp file + rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise QCompileError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_dim_sizes(items: list[str]) -> dict[str, int]:
    """Parse `NAME=SIZE` strings (e.g. from `--dim batch=4`)."""
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise QCompileError(f"bad --dim {item!r}; expected NAME=SIZE with a positive size, e.g. --dim batch=4")
        sizes[name] = int(value)
    return sizes
