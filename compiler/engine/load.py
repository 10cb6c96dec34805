"""Read, check and run engine files: `read_manifest`, `check_compatible`, `load` -> `Engine`."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np
import torch

from qcompile.engine import device as devinfo
from qcompile.engine.manifest import FORMAT_VERSION, MANIFEST_NAME, PACKAGE_NAME, IOSpec, Manifest, dtype_name
from qcompile.engine.one_row import ONE_ROW_MODEL, at_one_row
from qcompile.errors import EngineError

logger = logging.getLogger(__name__)
_warned_preload = False


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the engine file at `path`, without loading its package."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"engine file {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if MANIFEST_NAME not in names or PACKAGE_NAME not in names:
                raise EngineError(f"{str(path)!r} is not a qcompile engine: it lacks {MANIFEST_NAME} or {PACKAGE_NAME}")
            data = json.loads(z.read(MANIFEST_NAME))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{str(path)!r} is not a readable qcompile engine file ({type(exc).__name__}: {exc})") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise EngineError(f"{str(path)!r}: engine format version {version!r}, this qcompile reads version "
                          f"{FORMAT_VERSION}; rebuild the engine with this qcompile")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, EngineError) as exc:
        raise EngineError(f"{str(path)!r}: invalid manifest ({type(exc).__name__}: {exc})") from exc


def read_member(path: str | os.PathLike, name: str) -> bytes | None:
    """The bytes of member `name` of the engine file at `path` (e.g. `QUANTIZED_ONNX_NAME`), None if absent."""
    read_manifest(path)  # a readable engine first (clear errors otherwise)
    with zipfile.ZipFile(path) as z:
        return z.read(name) if name in z.namelist() else None


def check_compatible(manifest: Manifest, device: str | torch.device | None = None) -> torch.device:
    """The device to run on; raises EngineError listing every way this machine does not match the engine."""
    dev = devinfo.parse_device(device or manifest.device)
    problems = []
    built, here = devinfo.torch_major_minor(manifest.torch_version), devinfo.torch_major_minor(torch.__version__)
    if built != here:
        problems.append(f"torch version: engine built with {manifest.torch_version}, this is {torch.__version__} "
                        f"(major.minor must match)")
    if dev.type != manifest.device:
        problems.append(f"device kind: engine built for {manifest.device}, asked to run on {dev.type}")
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"device kind: engine built for cuda ({manifest.device_name}, compute capability "
                            f"{manifest.compute_capability}) but CUDA is not available here")
        else:
            major, minor = torch.cuda.get_device_capability(dev)
            if f"{major}.{minor}" != manifest.compute_capability:
                problems.append(f"compute capability: engine built for {manifest.compute_capability} "
                                f"({manifest.device_name}), this GPU ({torch.cuda.get_device_name(dev)}) is {major}.{minor}")
    elif manifest.cpu_isa and manifest.cpu_isa != devinfo.cpu_isa():
        logger.warning("engine built for CPU ISA %r, this CPU is %r; it may fail or run slowly",
                       manifest.cpu_isa, devinfo.cpu_isa())
    if problems:
        raise EngineError("engine does not match this machine: " + "; ".join(problems))
    return dev


def load(path: str | os.PathLike, *, device: str | None = None, run_single_threaded: bool = False) -> Engine:
    """Check the engine file at `path` against this machine, then load it.

    Args:
        path: the engine file.
        device: "cpu", "cuda" or "cuda:N"; defaults to the device kind it was built for.
        run_single_threaded: load with AOTInductor's single-threaded runner (needed for CUDA graph capture).
    """
    path = Path(path)
    manifest = read_manifest(path)
    dev = check_compatible(manifest, device)
    _warn_preload(dev)
    tmp = tempfile.mkdtemp(prefix="qcompile-engine-")
    try:
        with zipfile.ZipFile(path) as z:
            package = z.extract(PACKAGE_NAME, tmp)
        kwargs = {"run_single_threaded": run_single_threaded}
        if dev.type == "cuda" and dev.index is not None:
            kwargs["device_index"] = dev.index
        if manifest.extra.get("one_row_model"):
            runner, one_row_runner = _load_with_one_row_model(package, dev, kwargs)
        else:
            runner, one_row_runner = torch._inductor.aoti_load_package(package, **kwargs), None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise EngineError(f"cannot load engine {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        raise
    logger.info("loaded engine %s on %s", path, dev)
    return Engine(path, manifest, runner, dev, tmp, single_threaded=run_single_threaded,
                  one_row_runner=one_row_runner)


def _load_with_one_row_model(package: str, dev: torch.device, kwargs: dict):
    """The package's two models (the engine's, its one-row model: `one_row.py`) with their constants loaded once
    onto `dev` and handed to both (the package stores a tensor both read once; `build._compile_with_one_row_model`)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, load_pt2
    from torch.export.pt2_archive.constants import AOTINDUCTOR_DIR, WEIGHTS_DIR

    runners = load_pt2(package, **kwargs).aoti_runners
    loaded: dict[str, torch.Tensor] = {}
    with PT2ArchiveReader(package) as archive:
        for name in ("model", ONE_ROW_MODEL):
            config = json.loads(archive.read_string(os.path.join(AOTINDUCTOR_DIR, name, "weights_config.json")))
            constants = {}
            for fqn, (file, shape, stride, offset) in config.items():
                if file not in loaded:
                    data = io.BytesIO(archive.read_bytes(os.path.join(WEIGHTS_DIR, file)))
                    loaded[file] = torch.load(data, map_location=dev, weights_only=True)
                constants[fqn] = loaded[file].as_strided(shape, stride, offset)
            # user-managed: the runner keeps these tensors instead of copying them, so both share one copy
            runners[name].load_constants(constants, check_full_update=True, user_managed=True)
    return runners["model"], runners[ONE_ROW_MODEL]


def _warn_preload(dev: torch.device) -> None:
    global _warned_preload
    if torch.version.cuda and "libstdc++" not in os.environ.get("LD_PRELOAD", "") and not _warned_preload:
        _warned_preload = True
        logger.warning("loading an AOTInductor package on this CUDA torch build; if Python segfaults, start it with "
                       "LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)")


class Engine:
    """A loaded engine: checks feeds against the manifest, then runs the AOTInductor package."""

    def __init__(self, path: Path, manifest: Manifest, runner, device: torch.device, tmpdir: str,
                 single_threaded: bool = False, one_row_runner=None):
        self.path = path
        self.manifest = manifest
        self.device = device
        self.single_threaded = single_threaded  # loaded with the runner that CUDA graph capture needs
        self._runner = runner
        self._one_row_runner = one_row_runner  # runs calls with every dynamic dim at 1 (`one_row.py`), or None
        self._cleanup = weakref.finalize(self, shutil.rmtree, tmpdir, True)

    @property
    def input_names(self) -> list[str]:
        return self.manifest.input_names

    @property
    def output_names(self) -> list[str]:
        return self.manifest.output_names

    def check_inputs(self, feeds: dict) -> list[torch.Tensor]:
        """Feeds (numpy or torch) -> contiguous tensors on the engine device, in input order; raises EngineError."""
        names = set(feeds)
        missing = [n for n in self.input_names if n not in names]
        extra = sorted(names - set(self.input_names))
        if missing or extra:
            raise EngineError(f"engine inputs are {self.input_names}; missing {missing}, unexpected {extra}")
        seen: dict[str, tuple[int, str]] = {}
        return [self._check_one(spec, feeds[spec.name], seen) for spec in self.manifest.inputs]

    def _check_one(self, spec: IOSpec, value, seen: dict) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            got_dtype = dtype_name(value.dtype)
        elif isinstance(value, torch.Tensor):
            got_dtype = dtype_name(value.dtype)
        else:
            raise EngineError(f"input {spec.name!r}: expected a numpy array or torch tensor, got {type(value).__name__}")
        if got_dtype != spec.dtype:
            raise EngineError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {got_dtype}")
        shape = tuple(value.shape)
        if len(shape) != len(spec.shape):
            raise EngineError(f"input {spec.name!r}: expected rank {len(spec.shape)} (shape {spec.shape}), "
                              f"got rank {len(shape)} (shape {list(shape)})")
        for axis, (dim, size) in enumerate(zip(spec.shape, shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise EngineError(f"input {spec.name!r}: expected dim {axis} = {dim} (shape {spec.shape}), "
                                      f"got {size} (shape {list(shape)})")
                continue
            lo, hi = self.manifest.dim_ranges[dim]
            if not lo <= size <= hi:
                raise EngineError(f"input {spec.name!r}: dim {axis} ({dim!r}) must be in [{lo}, {hi}], got {size}")
            if dim in seen and seen[dim][0] != size:
                raise EngineError(f"input {spec.name!r}: dim {axis} ({dim!r}) is {size}, but input {seen[dim][1]!r} "
                                  f"has {dim!r} = {seen[dim][0]}")
            seen.setdefault(dim, (size, spec.name))
        return to_torch(value).to(self.device).contiguous()

    def run_torch(self, feeds: dict) -> dict[str, torch.Tensor]:
        """Run on checked feeds; results are torch tensors on the engine device."""
        args = self.check_inputs(feeds)
        runner = self._runner
        if self._one_row_runner is not None and at_one_row(args, self.manifest.inputs):
            runner = self._one_row_runner
        with torch.inference_mode():
            outs = torch.utils._pytree.tree_leaves(runner(*args))
        if len(outs) != len(self.output_names):
            raise EngineError(f"engine returned {len(outs)} outputs, manifest names {self.output_names}")
        return dict(zip(self.output_names, outs))

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run on checked feeds (numpy arrays or torch tensors); results are numpy arrays."""
        return {name: to_numpy(t) for name, t in self.run_torch(feeds).items()}

    __call__ = run

    def close(self) -> None:
        """Drop the loaded package and its extracted files."""
        self._runner = self._one_row_runner = None
        self._cleanup()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, device={self.device}, inputs={self.input_names}, outputs={self.output_names})"


_VIEW_AS = {torch.bfloat16: (np.int16, torch.int16), torch.float8_e4m3fn: (np.uint8, torch.uint8)}


def to_torch(value) -> torch.Tensor:
    """A torch tensor for a numpy array or tensor (bfloat16 / float8 numpy arrays via ml_dtypes views)."""
    if isinstance(value, torch.Tensor):
        return value
    name = dtype_name(value.dtype)
    if name in ("bfloat16", "float8_e4m3fn"):
        from qcompile.iospec import TORCH_DTYPES

        np_view, _ = _VIEW_AS[TORCH_DTYPES[name]]
        return torch.from_numpy(np.require(value, requirements="CW").view(np_view)).view(TORCH_DTYPES[name])
    return torch.from_numpy(np.require(value, requirements="CW"))  # a read-only array (np.frombuffer) is copied


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array for a tensor on any device (bfloat16 / float8 as ml_dtypes arrays)."""
    t = t.detach().cpu()
    if t.dtype in _VIEW_AS:
        import ml_dtypes

        np_view, torch_view = _VIEW_AS[t.dtype]
        target = ml_dtypes.bfloat16 if t.dtype == torch.bfloat16 else ml_dtypes.float8_e4m3fn
        return t.view(torch_view).numpy().view(target)
    return t.numpy()
