"""Calibration data: load, check and stream input samples.

A *sample* is one feed of the model: a dict input name -> array of the full input shape
(e.g. ``input_ids`` [batch, seq]). Calibration runs the model once per sample.

Accepted specs (`load_calibration_data`):

- ``data.npz``: one array per input. Either of two layouts, chosen per file by the array rank:
    * rank = input rank + 1: a stack of samples; sample ``i`` is ``arr[i]`` (each keeps its own
      batch dim). This is what ``qcompile sample-inputs --samples N`` writes.
    * rank = input rank: a batch of rows; sample ``i`` is ``arr[i:i+1]`` (batch 1 each).
  Every array of one file must give the same number of samples.
- a directory: every ``*.npz`` in it (sorted by name), each in the format above; files are
  opened one at a time while streaming, never all at once.
- ``file.py:fn``: ``fn()`` returns an iterable of samples (dicts name -> numpy array or torch
  tensor, full input shape). ``fn`` is called again for each pass over the data.
- ``random``: seeded random samples from ``source.random_inputs`` (explicit opt-in; reports
  say the data is not representative).

Names, ranks and dtype kinds are checked when the data is loaded (for .npz files from the array
headers only); NaN/Inf, dim sizes and integer value ranges are checked per sample while
streaming. Every problem is a `CalibrationError` naming the input and the file.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from qcompile.errors import CalibrationError

logger = logging.getLogger(__name__)

HOW_TO_PASS = ("pass real inputs with --calib data.npz (write a template with `qcompile sample-inputs`), "
               "a directory of .npz files, or file.py:fn; or --calib random to calibrate on random data")


# --------------------------------------------------------------------------- sample checks


def check_input_names(present, specs: list, where: str, has: str = "") -> None:
    """Every model input is among `present` (array names) and nothing else is; errors name the array."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in present]
    if missing:
        raise CalibrationError(f"input {missing[0]!r} is missing from {where}; {has}the model's inputs are "
                               f"{', '.join(names)}")
    extra = sorted(set(present) - set(names))
    if extra:
        raise CalibrationError(f"{where} has an array {extra[0]!r} that is not a model input; the model's inputs "
                               f"are {', '.join(names)}")


def check_sample(sample: dict[str, Any], specs: list, where: str) -> dict[str, np.ndarray]:
    """Check one sample against the input specs; returns it converted to the input dtypes.

    `where` names the sample in messages, e.g. "calib.npz sample 3".
    """
    if not isinstance(sample, dict):
        raise CalibrationError(f"{where} is a {type(sample).__name__}; expected a dict input name -> array")
    check_input_names(sample, specs, where)
    out: dict[str, np.ndarray] = {}
    dims: dict[str, tuple[int, str]] = {}
    for spec in specs:
        arr = _to_numpy(sample[spec.name])
        _check_kind(arr.dtype, arr.ndim, spec, f"in {where}", rank_ok=(spec.rank,))
        for axis, want in enumerate(spec.shape):
            got = int(arr.shape[axis])
            if isinstance(want, int):
                if got != want:
                    raise CalibrationError(f"input {spec.name!r} in {where} has shape {list(arr.shape)}; axis {axis} "
                                           f"must be {want} (model shape {spec.shape})")
                continue
            lo, hi = spec.dim_ranges.get(want, (1, None))
            if got < lo or (hi is not None and got > hi):
                raise CalibrationError(f"input {spec.name!r} in {where}: dim {want!r} = {got} is outside its range "
                                       f"[{lo}, {hi}]")
            if want in dims and dims[want][0] != got:
                raise CalibrationError(f"input {spec.name!r} in {where}: dim {want!r} = {got}, but input "
                                       f"{dims[want][1]!r} has {want!r} = {dims[want][0]}")
            dims.setdefault(want, (got, spec.name))
        arr = arr.astype(spec.dtype, copy=False)
        if arr.dtype.kind == "f":
            if np.isnan(arr).any():
                raise CalibrationError(f"input {spec.name!r} in {where} contains NaN")
            if np.isinf(arr).any():
                raise CalibrationError(f"input {spec.name!r} in {where} contains Inf")
        elif spec.value_range is not None and arr.size and arr.dtype.kind in "iu":
            lo, hi = spec.value_range
            if arr.min() < lo or arr.max() >= hi:
                raise CalibrationError(f"input {spec.name!r} in {where} has values in [{arr.min()}, {arr.max()}]; "
                                       f"valid values are [{lo}, {hi})")
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _kind_ok(dtype: np.dtype, want: np.dtype) -> bool:
    if want.kind == "f":
        return dtype.kind == "f"
    if want.kind in "iu":
        return dtype.kind in "iu"
    if want.kind == "b":
        return dtype.kind in "biu"
    return dtype == want


def _check_kind(dtype: np.dtype, ndim: int, spec, where: str, rank_ok: tuple[int, ...]) -> None:
    if not _kind_ok(np.dtype(dtype), np.dtype(spec.dtype)):
        raise CalibrationError(f"input {spec.name!r} {where} has dtype {np.dtype(dtype).name}; the model expects "
                               f"{spec.dtype}")
    if ndim not in rank_ok:
        want = " or ".join(str(r) for r in rank_ok)
        raise CalibrationError(f"input {spec.name!r} {where} has rank {ndim}; expected rank {want} "
                               f"(model shape {spec.shape})")


# --------------------------------------------------------------------------- .npz files


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the .npy headers only."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        arr = np.lib.format.read_array(f, allow_pickle=False)
                        shape, dtype = arr.shape, arr.dtype
                headers[info.filename[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"calibration file {path} is not a readable .npz file ({exc}); write it with "
                               "numpy.savez or `qcompile sample-inputs`") from None
    return headers


@dataclass
class _NpzFile:
    """One .npz file of samples: its layout per input, checked from the headers."""

    path: Path
    label: str
    count: int
    stacked: dict[str, bool]  # input -> True: sample = arr[i]; False: sample = arr[i:i+1]

    @classmethod
    def open(cls, path: Path, specs: list, label: str) -> "_NpzFile":
        headers = _npz_headers(path)
        check_input_names(headers, specs, f"calibration file {label}",
                          has=f"it has {', '.join(headers) or 'no arrays'}, ")
        stacked, counts = {}, {}
        for spec in specs:
            shape, dtype = headers[spec.name]
            ranks = (spec.rank + 1, spec.rank) if spec.rank > 0 else (1,)
            _check_kind(dtype, len(shape), spec, f"in {label}", rank_ok=ranks)
            stacked[spec.name] = len(shape) == spec.rank + 1
            counts[spec.name] = shape[0]
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise CalibrationError(f"the arrays in calibration file {label} hold different numbers of samples ({desc})"
                                   "; the first axis is the sample index and must agree")
        count = next(iter(counts.values()))
        return cls(path, label, int(count), stacked)

    def samples(self, specs: list) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {s.name: data[s.name] for s in specs}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"calibration file {self.label} cannot be read: {exc}") from None
        for i in range(self.count):
            sample = {n: (a[i] if self.stacked[n] else a[i:i + 1]) for n, a in arrays.items()}
            where = f"{self.label} sample {i}"
            yield where, check_sample(sample, specs, where)


def _hash_files(paths: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for path in paths:
        if root is not None:
            h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the data object


class CalibrationData:
    """An iterable of checked samples (dict name -> np.ndarray), streamed one at a time.

    Attributes:
        description: human-readable, e.g. "calib.npz (32 samples)".
        is_random: True for ``--calib random``.
        num_samples: the number of samples when known up front (None for ``file.py:fn``).
    """

    def __init__(self, produce: Callable[[], Iterable[tuple[str, dict[str, np.ndarray]]]], *, description: str,
                 is_random: bool, num_samples: int | None, hash_fn: Callable[[], str], label: str,
                 keep: Callable[[int], bool] | None = None):
        self._produce = produce
        self._hash_fn = hash_fn
        self._keep = keep
        self._label = label
        self.description = description
        self.is_random = is_random
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        produced = 0
        for index, (_, sample) in enumerate(self._produce()):
            produced += 1
            if self._keep is None or self._keep(index):
                yield sample
        if produced == 0:
            raise CalibrationError(f"calibration data {self._label} holds no samples; {HOW_TO_PASS}")

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"the number of samples of {self._label} is not known before iterating it")
        return self.num_samples

    def content_hash(self) -> str:
        """sha256 of the data files' bytes (of spec + seed for random data)."""
        return self._hash_fn()

    def split(self, holdout_fraction: float) -> tuple["CalibrationData", "CalibrationData"]:
        """Split into (calibration, held-out) parts; the held-out part is every ~1/fraction-th sample.

        Sample ``i`` is held out when ``floor((i + 1) * f) > floor(i * f)``: exactly
        ``floor(n * f)`` samples, spread evenly, decided while streaming (no count needed).
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise CalibrationError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
        frac = Fraction(holdout_fraction).limit_denominator(10_000)
        outer = self._keep or (lambda i: True)

        def held(i: int) -> bool:
            return (i + 1) * frac.numerator // frac.denominator > i * frac.numerator // frac.denominator

        # indices below are positions in this view's own stream
        def view(select: Callable[[int], bool]) -> Callable[[], Iterable]:
            def produce():
                pos = 0
                for index, item in enumerate(self._produce()):
                    if outer(index):
                        if select(pos):
                            yield item
                        pos += 1
            return produce

        n = self.num_samples
        n_hold = None if n is None else n * frac.numerator // frac.denominator
        if n is not None and (n_hold == 0 or n_hold == n):
            raise CalibrationError(f"cannot hold out {holdout_fraction:.0%} of {n} calibration samples; "
                                   "pass more samples or change the fraction")
        calib = CalibrationData(view(lambda i: not held(i)), description=self._part_desc("calibration", n, n_hold),
                                is_random=self.is_random, num_samples=None if n is None else n - n_hold,
                                hash_fn=self._hash_fn, label=self._label)
        hold = CalibrationData(view(held), description=self._part_desc("held-out", n, n_hold),
                               is_random=self.is_random, num_samples=n_hold, hash_fn=self._hash_fn,
                               label=self._label)
        return calib, hold

    def _part_desc(self, part: str, n: int | None, n_hold: int | None) -> str:
        if n is None:
            return f"{self.description}, {part} part"
        k = n_hold if part == "held-out" else n - n_hold
        return f"{self.description}, {part} part ({k} of {n})"

    def __repr__(self) -> str:
        return f"CalibrationData({self.description!r})"


# --------------------------------------------------------------------------- loaders


RANDOM_SAMPLES = 16  # samples `random` makes unless the caller asks for another count


def load_calibration_data(spec: str | None, inputs: list, *, source=None, random_samples: int = RANDOM_SAMPLES,
                          seed: int = 0) -> CalibrationData:
    """Load calibration data for a model with `inputs` (a list of IOSpec); see the module docstring.

    Raises:
        CalibrationError: no spec, a missing/unreadable file, names/ranks/dtypes that do not
            match the inputs, or no samples.
    """
    kind, path, fn_name = _parse_spec(spec)
    if kind == "random":
        return _random_data(inputs, source, random_samples, seed)
    if kind == "python":
        return _python_data(path, fn_name, inputs)
    if kind == "directory":
        return _directory_data(path, inputs)
    return _npz_data(path, inputs)


def check_calibration_spec(spec: str) -> None:
    """Fail fast on a `--calib` that names no data (a missing path, a file that is not an .npz archive, a folder
    without .npz files), before the model is exported; the inputs' names and shapes are checked when it loads."""
    _parse_spec(spec)


def _parse_spec(spec: str | None) -> tuple[str, Path | None, str]:
    """(kind, path, function name) of a calibration spec: kind "random" | "python" | "directory" | "npz"; the
    path exists (an .npz path is a zip archive, a directory holds .npz files), else a `CalibrationError` saying
    how to pass data."""
    if spec is None or str(spec).strip() == "":
        raise CalibrationError(f"calibration data is required for this recipe; {HOW_TO_PASS}")
    spec = str(spec)
    if spec == "random":
        return "random", None, ""
    path_part, sep, fn_name = spec.rpartition(":")
    if sep and path_part.endswith(".py"):
        if not Path(path_part).is_file():
            raise CalibrationError(f"calibration file {path_part} does not exist; {HOW_TO_PASS}")
        return "python", Path(path_part), fn_name
    path = Path(spec)
    if path.is_dir():
        if not _npz_files(path):
            raise CalibrationError(f"calibration directory {path} has no .npz files; {HOW_TO_PASS}")
        return "directory", path, ""
    if path.suffix == ".npz" or path.is_file():
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist; {HOW_TO_PASS}")
        if path.suffix != ".npz" or not zipfile.is_zipfile(path):
            raise CalibrationError(f"calibration file {path} is not an .npz file (a zip archive of .npy arrays, "
                                   f"as numpy.savez writes); {HOW_TO_PASS}")
        return "npz", path, ""
    raise CalibrationError(f"calibration data {spec!r} not found: not an .npz file, a directory, file.py:fn or "
                           f"'random'; {HOW_TO_PASS}")


def _npz_data(path: Path, inputs: list) -> CalibrationData:
    f = _NpzFile.open(path, inputs, path.name)
    if f.count == 0:
        raise CalibrationError(f"calibration file {path.name} holds no samples (first axis has size 0)")
    return CalibrationData(lambda: f.samples(inputs), description=f"{path.name} ({f.count} samples)",
                           is_random=False, num_samples=f.count, hash_fn=lambda: _hash_files([path]),
                           label=path.name)


def _npz_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file())


def _directory_data(folder: Path, inputs: list) -> CalibrationData:
    paths = _npz_files(folder)
    files = [_NpzFile.open(p, inputs, f"{folder.name}/{p.name}") for p in paths]
    total = sum(f.count for f in files)
    if total == 0:
        raise CalibrationError(f"calibration directory {folder} holds no samples")

    def produce():
        for f in files:
            yield from f.samples(inputs)

    return CalibrationData(produce, description=f"{folder.name}/ ({len(files)} files, {total} samples)",
                           is_random=False, num_samples=total, hash_fn=lambda: _hash_files(paths, folder),
                           label=f"{folder.name}/")


def _python_data(path: Path, fn_name: str, inputs: list) -> CalibrationData:
    from qcompile.frontend.source import import_file

    label = f"{path.name}:{fn_name}"
    module = import_file(path, "calibration data", error=CalibrationError)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CalibrationError(f"calibration file {path} has no function {fn_name!r}")

    def produce():
        try:
            items = fn()
            iterator = iter(items)
        except Exception as exc:  # noqa: BLE001 - user code
            raise CalibrationError(f"calibration function {label} raised {type(exc).__name__}: {exc}") from exc
        index = 0
        while True:
            try:
                sample = next(iterator)
            except StopIteration:
                return
            except CalibrationError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CalibrationError(f"calibration function {label} raised {type(exc).__name__} at sample "
                                       f"{index}: {exc}") from exc
            where = f"{label} sample {index}"
            yield where, check_sample(sample, inputs, where)
            index += 1

    def content_hash():
        return hashlib.sha256(f"{fn_name}\0".encode() + path.read_bytes()).hexdigest()

    return CalibrationData(produce, description=label, is_random=False, num_samples=None, hash_fn=content_hash,
                           label=label)


def _random_data(inputs: list, source, n: int, seed: int) -> CalibrationData:
    if source is None:
        raise CalibrationError("random calibration data needs the model source (its inputs' shapes and value ranges)")
    if n < 1:
        raise CalibrationError(f"random calibration needs at least 1 sample, got {n}")

    def produce():
        for i in range(n):
            where = f"random sample {i}"
            yield where, check_sample(source.random_inputs(np.random.default_rng([seed, i])), inputs, where)

    def content_hash():
        return hashlib.sha256(f"random\0{seed}\0{n}".encode()).hexdigest()

    return CalibrationData(produce, description=f"random ({n} samples, seed {seed}) — not representative data",
                           is_random=True, num_samples=n, hash_fn=content_hash, label="random")
