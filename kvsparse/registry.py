"""Method name -> oracle, kernels, cost model, property suite.

Modules register themselves when imported; ``load_all`` imports every module of the five
subpackages so the table is computed from what exists, never written by hand. A method's pieces
share its file name: ``oracle/quest.py``, ``kernels/numba/quest.py``, ``kernels/triton/quest.py``,
``sim/costs/quest.py``. Modules that need torch must import it lazily (inside functions), so that
the registry loads without the optional extras.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

BACKENDS = ("numba", "triton")


@dataclass
class MethodEntry:
    name: str
    oracle: type | None = None
    kernels: dict[str, Callable] = field(default_factory=dict)
    cost: Callable | None = None
    suite: Callable | None = None


_ENTRIES: dict[str, MethodEntry] = {}
_LOADED = False


def _entry(name: str) -> MethodEntry:
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")
    return _ENTRIES.setdefault(name, MethodEntry(name))


def register_method(cls):
    """Class decorator for an oracle (a ``Method`` subclass with a ``name``)."""
    entry = _entry(cls.name)
    if entry.oracle is not None and entry.oracle is not cls:
        raise ValueError(f"method {cls.name!r} already has an oracle: {entry.oracle.__qualname__}")
    entry.oracle = cls
    return cls


def register_kernel(method: str, backend: str):
    """Decorator for a kernel of ``method`` on ``backend`` ('numba' or 'triton')."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _entry(method).kernels[backend] = fn
        return fn
    return deco


def register_cost(method: str):
    """Decorator for the simulator's cost model of ``method``."""
    def deco(fn):
        _entry(method).cost = fn
        return fn
    return deco


def register_suite(method: str):
    """Decorator for the property suite that checks a kernel of ``method`` against its oracle."""
    def deco(fn):
        _entry(method).suite = fn
        return fn
    return deco


# the pytest plugin needs pytest (an optional extra) and registers nothing
_NOT_REGISTERING = {"kvsparse.property_tests.plugin"}
_PACKAGES = ("kvsparse.oracle", "kvsparse.kernels.numba", "kvsparse.kernels.triton",
             "kvsparse.sim.costs", "kvsparse.property_tests")


def load_all() -> None:
    """Import every module of the registering subpackages (once)."""
    global _LOADED
    if _LOADED:
        return
    for pkg_name in _PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and f"{pkg_name}.{info.name}" not in _NOT_REGISTERING:
                importlib.import_module(f"{pkg_name}.{info.name}")
    _LOADED = True


def entries() -> dict[str, MethodEntry]:
    load_all()
    return dict(sorted(_ENTRIES.items()))


def get(name: str) -> MethodEntry:
    all_entries = entries()
    if name not in all_entries:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(all_entries)}")
    return all_entries[name]


def oracle(name: str, preset: str = "canonical"):
    """An instance of method ``name`` in the named preset."""
    entry = get(name)
    if entry.oracle is None:
        raise ValueError(f"method {name!r} has no oracle yet")
    presets = entry.oracle.presets()
    if preset not in presets:
        raise ValueError(f"method {name!r} has no preset {preset!r}; presets: {', '.join(presets)}")
    return presets[preset]


def coverage_rows() -> list[dict[str, str]]:
    """One row per registered method: which of oracle / kernels / cost model / suite exist."""
    rows = []
    for name, e in entries().items():
        rows.append({
            "method": name,
            "family": getattr(e.oracle, "family", "") if e.oracle else "",
            "oracle": "yes" if e.oracle else "",
            "numba": "yes" if "numba" in e.kernels else "",
            "triton": "yes" if "triton" in e.kernels else "",
            "sim cost": "yes" if e.cost else "",
            "suite": "yes" if e.suite else "",
            "presets": ", ".join(e.oracle.presets()) if e.oracle else "",
        })
    return rows
