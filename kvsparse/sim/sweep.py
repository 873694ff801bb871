"""Budget cost modeling: vectorized sweeps over budgets x contexts x methods x GPUs.

One cost-model call per method prices the whole (budget, context) grid with NumPy broadcasting; one
timing pass per GPU turns it into seconds. On top: the break-even context from which a method is
faster than dense attention, the largest budget that meets a target time per token, and a plot with
a row of panels per swept GPU.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .hardware import gpu as get_gpu
from .latency import method_cost, simulate, step_kernels, time_step
from .models import model as get_model


@dataclass
class SweepResult:
    """``step_seconds[m, g, b, c]``: seconds per decode step (per token) of method ``methods[m]`` on
    ``gpus[g]`` with budget ``budgets[b]`` at context ``contexts[c]``; same axes for
    ``attention_seconds`` and ``hbm_bytes`` (``hbm_bytes`` has no GPU dependence but keeps the axis).
    NaN marks a budget the method's cost model refuses (as its oracle would), at every context."""

    model: str
    methods: list[str]
    gpus: list[str]
    budgets: np.ndarray
    contexts: np.ndarray
    step_seconds: np.ndarray
    attention_seconds: np.ndarray
    hbm_bytes: np.ndarray
    options: dict = field(default_factory=dict)

    @property
    def n_configs(self) -> int:
        return int(self.step_seconds.size)

    def rows(self):
        for m, meth in enumerate(self.methods):
            for g, gname in enumerate(self.gpus):
                for b, budget in enumerate(self.budgets):
                    for c, ctx in enumerate(self.contexts):
                        yield {"model": self.model, "method": meth, "gpu": gname, "budget": int(budget),
                               "context": int(ctx), "step_us": float(self.step_seconds[m, g, b, c] * 1e6),
                               "attention_us": float(self.attention_seconds[m, g, b, c] * 1e6),
                               "hbm_read_bytes": float(self.hbm_bytes[m, g, b, c])}

    def write_csv(self, path) -> None:
        with open(path, "w", newline="") as fh:
            rows = self.rows()
            first = next(rows)
            w = csv.DictWriter(fh, fieldnames=list(first))
            w.writeheader()
            w.writerow(first)
            w.writerows(rows)

    def break_even(self, baseline: str = "dense") -> np.ndarray:
        """``[m, g, b]``: the smallest swept context from which method ``m`` is strictly faster than
        ``baseline`` at every larger swept context (0 where it never is)."""
        if baseline not in self.methods:
            raise ValueError(f"baseline {baseline!r} is not among the swept methods {self.methods}")
        base = self.step_seconds[self.methods.index(baseline)][None]
        faster = self.step_seconds < base
        # from the last context backwards: still faster everywhere to the right
        tail = np.flip(np.logical_and.accumulate(np.flip(faster, axis=-1), axis=-1), axis=-1)
        first = np.argmax(tail, axis=-1)
        return np.where(tail.any(axis=-1), self.contexts[first], 0)


def sweep(model, gpus: Sequence, methods: Sequence[str], budgets, contexts, *, kv="fp16",
          weights="fp16", page_size: int = 1, share_kv_heads: bool = True, batch: int = 1,
          params: Mapping[str, Mapping] | None = None, dense_layers: Mapping[str, int] | None = None,
          cuda_graphs: bool = False) -> SweepResult:
    """Every combination; ``batch`` identical requests per step. ``params[method]`` overrides a
    method's hyper-parameters, ``dense_layers[method]`` its number of dense first layers."""
    spec = get_model(model)
    budgets = np.asarray(budgets, dtype=np.int64).reshape(-1)
    contexts = np.asarray(contexts, dtype=np.int64).reshape(-1)
    if budgets.size == 0 or contexts.size == 0:
        raise ValueError("budgets and contexts must not be empty")
    gpu_objs = [get_gpu(g) for g in gpus]
    shape = (len(methods), len(gpu_objs), budgets.size, contexts.size)
    step = np.empty(shape)
    attn = np.empty(shape)
    hbm = np.empty((len(methods),) + shape[2:])     # no GPU axis until the end
    def price(m, name, bi, ci):
        """Fill the (budget, context) block ``[bi, ci]`` of method ``m``; False if the cost model refuses it."""
        n = np.broadcast_to(contexts[ci][None, :, None], (1, contexts[ci].size, batch))
        try:
            sk = step_kernels(spec, name, n, budgets[bi][:, None, None], kv=kv, weights=weights,
                              page_size=page_size, share_kv_heads=share_kv_heads,
                              params=(params or {}).get(name), dense_layers=(dense_layers or {}).get(name))
        except ValueError:
            return False
        block = (bi.size, ci.size)
        hbm[m][np.ix_(bi, ci)] = np.broadcast_to(sk.hbm_read_bytes(), block)
        for g, gobj in enumerate(gpu_objs):
            t = time_step(sk, gobj, cuda_graphs=cuda_graphs)
            step[m, g][np.ix_(bi, ci)] = np.broadcast_to(t.step_seconds, block)
            attn[m, g][np.ix_(bi, ci)] = np.broadcast_to(t.attention_seconds, block)
        return True

    def price_split(m, name, bi):
        """Price the budgets ``bi``; where refused, halve until the refused budgets are isolated."""
        if price(m, name, bi, all_c) or bi.size == 1:
            return
        half = bi.size // 2
        price_split(m, name, bi[:half])
        price_split(m, name, bi[half:])

    all_b, all_c = np.arange(budgets.size), np.arange(contexts.size)
    step[:] = attn[:] = hbm[:] = np.nan      # budgets a method refuses (e.g. SnapKV capacity <= window)
    for m, name in enumerate(methods):
        method_cost(name)
        price_split(m, name, all_b)
    hbm = np.broadcast_to(hbm[:, None], shape)
    return SweepResult(spec.key, list(methods), [g.key for g in gpu_objs], budgets, contexts, step, attn, hbm,
                       dict(kv=kv, weights=weights, page_size=page_size, share_kv_heads=share_kv_heads,
                            batch=batch, cuda_graphs=cuda_graphs))


def budget_for_target(model, gpu, method: str, context: int, target_seconds: float, **kw) -> int | None:
    """The largest token budget (at most ``context``) whose decode step takes at most
    ``target_seconds``; None if even a budget of 1 is too slow. Relies on time being non-decreasing
    in the budget (a tested property of every cost model)."""
    if target_seconds <= 0:
        raise ValueError(f"target_seconds must be > 0, got {target_seconds}")
    if not method_cost(method).uses_budget:
        raise ValueError(f"method {method!r} has no token budget")

    def t(b: int) -> float:
        return float(simulate(model, gpu, method, b, [context], **dict(kw)).step_seconds)
    if t(1) > target_seconds:
        return None
    lo, hi = 1, int(context)
    if t(hi) <= target_seconds:
        return hi
    while hi - lo > 1:       # invariant: t(lo) <= target < t(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t(mid) <= target_seconds else (lo, mid)
    return lo


def _draw_gpu(ax_budget, ax_context, result: SweepResult, g: int) -> None:
    """GPU ``g``'s row: time per token against budget (at the largest context) and against context
    (at the median budget), one line per method."""
    c, b = result.contexts.size - 1, result.budgets.size // 2
    for m, name in enumerate(result.methods):
        ax_budget.plot(result.budgets, result.step_seconds[m, g, :, c] * 1e3, marker=".", label=name)
        ax_context.plot(result.contexts, result.step_seconds[m, g, b, :] * 1e3, marker=".", label=name)
    ax_budget.set(xscale="log", xlabel="budget (tokens)", ylabel="ms per token",
                  title=f"{result.model} on {result.gpus[g]}, context {result.contexts[c]}")
    ax_context.set(xscale="log", xlabel="context (tokens)", ylabel="ms per token",
                   title=f"{result.gpus[g]}, budget {result.budgets[b]}")
    ax_budget.legend(fontsize=8)


def figure(result: SweepResult, gpus: Sequence[str] | None = None):
    """A matplotlib Figure with one row of two panels per GPU (``gpus``: keys to draw, default every
    swept GPU, in sweep order). Each row has its own y axis: GPUs differ by orders of magnitude."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(result.gpus) if gpus is None else [str(k) for k in gpus]
    unknown = [k for k in keys if k not in result.gpus]
    if unknown or not keys:
        raise ValueError(f"gpus must name swept GPUs ({', '.join(result.gpus)}), got {gpus!r}")
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        _draw_gpu(row[0], row[1], result, result.gpus.index(key))
    fig.tight_layout()
    return fig


def plot(result: SweepResult, path, *, gpus: Sequence[str] | None = None) -> None:
    """Write :func:`figure` (a row of panels per GPU) to ``path``. Needs matplotlib (the ``plot`` extra)."""
    import matplotlib.pyplot as plt
    fig = figure(result, gpus)
    fig.savefig(path, dpi=120)
    plt.close(fig)
