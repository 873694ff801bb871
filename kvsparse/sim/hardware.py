"""GPU catalog and the size-dependent HBM efficiency curve eta(bytes).

The built-in catalog is ``kvsparse/sim/data/gpus.toml``; every figure there names its source.
A user TOML file with the same layout adds GPUs or overrides figures (``load_catalog(path)``):

    [gpus.my-h100]            # a new entry: `base` copies an existing one, then fields override
    base = "h100-sxm"
    hbm_gbps = 3000
    [gpus.my-h100.sources]
    hbm_gbps = "our nvbandwidth run, 2026-11-01"

Units: bandwidths in GB/s with GB = 1e9 bytes; FLOP/s are dense (no 2:4 sparsity) and count a
multiply-add as 2 FLOPs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None

GB = 1e9
TFLOP = 1e12
US = 1e-6


@dataclass(frozen=True)
class EfficiencyCurve:
    """Measured fraction of peak HBM bandwidth a memory-bound kernel reaches, by kernel size.

    Between measured points eta follows a power law in bytes (straight lines on log-log axes); below
    the first point the first segment's power law continues, above the last point eta stays at the
    last value. Time ``bytes / (eta(bytes) * BW)`` is then increasing in bytes, which ``__post_init__``
    checks (each segment must have eta growing more slowly than bytes).
    """

    name: str
    bytes: tuple[float, ...]
    utilization: tuple[float, ...]
    source: str

    def __post_init__(self):
        b = np.asarray(self.bytes, dtype=float)
        u = np.asarray(self.utilization, dtype=float)
        if b.ndim != 1 or b.shape != u.shape or b.size < 2:
            raise ValueError(f"curve {self.name!r}: bytes and utilization must be 1-D of equal length >= 2")
        if np.any(np.diff(b) <= 0) or b[0] <= 0:
            raise ValueError(f"curve {self.name!r}: bytes must be positive and strictly increasing")
        if np.any(u <= 0) or np.any(u > 1):
            raise ValueError(f"curve {self.name!r}: utilization must lie in (0, 1]")
        if np.any(np.diff(b / u) <= 0):
            raise ValueError(f"curve {self.name!r}: time bytes/utilization must increase with bytes")
        if u[1] < u[0]:
            raise ValueError(f"curve {self.name!r}: utilization must not fall on the first segment")
        object.__setattr__(self, "_logb", np.log(b))
        object.__setattr__(self, "_logu", np.log(u))
        object.__setattr__(self, "_slope0", (np.log(u[1]) - np.log(u[0])) / (np.log(b[1]) - np.log(b[0])))

    def __call__(self, nbytes) -> np.ndarray:
        """eta for a kernel moving ``nbytes`` (array); nbytes <= 0 gives eta of the first point."""
        x = np.log(np.maximum(np.asarray(nbytes, dtype=float), 1.0))
        logu = np.interp(x, self._logb, self._logu)
        below = x < self._logb[0]
        if np.any(below):
            logu = np.where(below, self._logu[0] + self._slope0 * (x - self._logb[0]), logu)
        return np.exp(logu)

    @classmethod
    def from_records(cls, name: str, records: Iterable[Mapping], peak_gbps: float,
                     kernels: tuple[str, ...] = ("sdpa_flash", "triton_dense")) -> "EfficiencyCurve":
        """A curve from our own GPU measurements (``benchmarks/gpu_decode.py`` JSON lines:
        ``kernel``, ``bytes``, ``seconds``, ``gpu``); for each size the fastest listed kernel counts.

        A record's ``seconds_graph`` (the kernel replayed from a CUDA graph) is used where present:
        the curve models the kernel's own time, and the simulator adds the launch overhead
        (``launch_us``) on top unless it prices CUDA graphs, so an eager timing, which holds the
        launch already, would count it twice."""
        best: dict[int, float] = {}
        gpus = set()
        for r in records:
            if r.get("kernel") in kernels:
                b, s = int(r["bytes"]), float(r.get("seconds_graph") or r["seconds"])
                best[b] = min(best.get(b, math.inf), s)
                gpus.add(r.get("gpu", "?"))
        if len(best) < 2:
            raise ValueError(f"records must hold at least two sizes of kernels {kernels}, got {len(best)}")
        sizes = sorted(best)
        util = [min(1.0, b / best[b] / (peak_gbps * GB)) for b in sizes]
        return cls(name, tuple(float(b) for b in sizes), tuple(util),
                   f"own measurement (benchmarks/gpu_decode.py) on {', '.join(sorted(gpus))}")


@dataclass(frozen=True)
class GPU:
    """One accelerator and its host. See the module docstring for units."""

    key: str
    name: str
    memory_gb: float
    hbm_gbps: float
    l2_mb: float
    fp16_tflops: float
    bf16_tflops: float
    fp8_tflops: float
    fp32_tflops: float
    link: str
    link_h2d_gbps: float
    link_d2h_gbps: float
    link_bidir_h2d_gbps: float
    link_latency_us: float
    host_mem_gbps: float
    host_tflops: float
    launch_us: float
    min_kernel_us: float
    gemv_efficiency: float
    efficiency: EfficiencyCurve
    device_names: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                      or not math.isfinite(v)):
                raise ValueError(f"GPU {self.key!r}: {f.name} must be a finite number >= 0, got {v!r}")
        for name in ("hbm_gbps", "fp16_tflops", "fp32_tflops", "link_h2d_gbps", "link_d2h_gbps",
                     "host_mem_gbps", "host_tflops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPU {self.key!r}: {name} must be > 0")
        if not 0 < self.gemv_efficiency <= 1:
            raise ValueError(f"GPU {self.key!r}: gemv_efficiency must lie in (0, 1], got {self.gemv_efficiency}")

    def tensor_flops(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for inputs of ``dtype`` (fp16, bf16, fp8, int8 uses fp8's rate)."""
        key = {"fp16": "fp16_tflops", "bf16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "fp8_tflops",
               "int4": "fp8_tflops", "fp32": "fp32_tflops"}.get(dtype)
        if key is None:
            raise ValueError(f"dtype must be one of fp16, bf16, fp8, int8, int4, fp32, got {dtype!r}")
        value = getattr(self, key) or self.fp16_tflops  # no fp8 tensor cores: dequantize and run fp16
        return value * TFLOP


_FLOAT_FIELDS = [f.name for f in fields(GPU) if f.type == "float"]
_KNOWN = set(_FLOAT_FIELDS) | {"name", "link", "device_names", "sources", "efficiency_curve", "base"}


def _read_toml(source) -> dict:
    if tomllib is None:
        raise RuntimeError("reading TOML needs Python >= 3.11 (tomllib) or the tomli package")
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            return tomllib.load(fh)
    text = source if isinstance(source, (bytes, str)) else source.read()
    return tomllib.loads(text.decode() if isinstance(text, bytes) else text)


def _builtin() -> dict:
    return tomllib.loads(resources.files("kvsparse.sim").joinpath("data/gpus.toml").read_text())


def _curve(name: str, table: Mapping) -> EfficiencyCurve:
    missing = {"tokens", "bytes_per_token", "utilization", "source"} - set(table)
    if missing and not {"bytes", "utilization", "source"} <= set(table):
        raise ValueError(f"curve {name!r} needs tokens, bytes_per_token, utilization, source (or bytes, ...)")
    if "bytes" in table:
        sizes = tuple(float(b) for b in table["bytes"])
    else:
        sizes = tuple(float(t) * float(table["bytes_per_token"]) for t in table["tokens"])
    return EfficiencyCurve(name, sizes, tuple(float(u) for u in table["utilization"]), str(table["source"]))


def load_catalog(*user_files) -> dict[str, GPU]:
    """The built-in catalog, then each user TOML file (path or file object) applied on top."""
    raw_gpus: dict[str, dict] = {}
    raw_curves: dict[str, dict] = {}
    for data in [_builtin(), *(_read_toml(f) for f in user_files)]:
        unknown = set(data) - {"gpus", "curves", "sources"}
        if unknown:
            raise ValueError(f"unknown top-level tables {sorted(unknown)}; expected gpus, curves, sources")
        raw_curves.update(data.get("curves", {}))
        for key, table in data.get("gpus", {}).items():
            bad = set(table) - _KNOWN
            if bad:
                raise ValueError(f"GPU {key!r}: unknown fields {sorted(bad)}; known: {sorted(_KNOWN)}")
            base_key = table.get("base", key if key in raw_gpus else None)
            if base_key is not None and base_key not in raw_gpus:
                raise ValueError(f"GPU {key!r}: base {base_key!r} is not in the catalog")
            merged = dict(raw_gpus[base_key]) if base_key is not None else {}
            merged_sources = dict(merged.get("sources", {}))
            merged.update({k: v for k, v in table.items() if k != "base"})
            merged_sources.update(table.get("sources", {}))
            merged["sources"] = merged_sources
            raw_gpus[key] = merged
    curves = {name: _curve(name, t) for name, t in raw_curves.items()}
    catalog = {}
    for key, t in raw_gpus.items():
        missing = (set(_FLOAT_FIELDS) | {"name", "link", "efficiency_curve"}) - set(t)
        if missing:
            raise ValueError(f"GPU {key!r}: missing fields {sorted(missing)}")
        unsourced = [f for f in _FLOAT_FIELDS + ["link", "efficiency_curve"] if f not in t["sources"]]
        if unsourced:
            raise ValueError(f"GPU {key!r}: fields without a source: {unsourced}")
        if t["efficiency_curve"] not in curves:
            raise ValueError(f"GPU {key!r}: efficiency_curve {t['efficiency_curve']!r} is not a known curve")
        catalog[key] = GPU(key=key, name=str(t["name"]), link=str(t["link"]),
                           efficiency=curves[t["efficiency_curve"]],
                           device_names=tuple(t.get("device_names", ())),
                           sources=dict(t["sources"]),
                           **{f: float(t[f]) for f in _FLOAT_FIELDS})
    return catalog


_CATALOG: dict[str, GPU] | None = None


def catalog() -> dict[str, GPU]:
    global _CATALOG
    if _CATALOG is None:
        _CATALOG = load_catalog()
    return dict(_CATALOG)


def gpu(key, *user_files) -> GPU:
    """A GPU by catalog key (``h100-sxm``), or a ``GPU`` passed through."""
    if isinstance(key, GPU):
        return key
    cat = load_catalog(*user_files) if user_files else catalog()
    if key not in cat:
        raise ValueError(f"unknown GPU {key!r}; known: {', '.join(sorted(cat))}")
    return cat[key]


def source_notes() -> dict[str, str]:
    """The named sources of the built-in catalog (``flashinfer_blog`` -> full citation)."""
    return dict(_builtin().get("sources", {}))


def for_device_name(device_name: str) -> GPU:
    """The catalog entry for a CUDA device name such as ``NVIDIA H100 80GB HBM3``."""
    text = device_name.lower()
    hits = [g for g in catalog().values() if any(p.lower() in text for p in g.device_names)]
    if len(hits) != 1:
        raise ValueError(f"device name {device_name!r} matches {len(hits)} catalog entries")
    return hits[0]


def peak_hbm_gbps_for_device_name(device_name: str) -> float:
    """Peak HBM bandwidth (GB/s) of the catalog GPU whose ``device_names`` match (used by benchmarks)."""
    return for_device_name(device_name).hbm_gbps


def calibrated(g: GPU, records: Iterable[Mapping] | str | Path) -> GPU:
    """``g`` with its efficiency curve replaced by one fitted to our own measurements
    (a JSON-lines file or records from ``benchmarks/gpu_decode.py``)."""
    if isinstance(records, (str, Path)):
        with open(records) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    curve = EfficiencyCurve.from_records(f"{g.key}-measured", records, g.hbm_gbps)
    return replace(g, efficiency=curve, sources={**g.sources, "efficiency_curve": curve.source})
