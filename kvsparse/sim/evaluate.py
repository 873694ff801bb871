"""Quality x cost: how wrong each method is at each budget on a real trace (exactly, from the oracle),
and what it costs (from the simulator), side by side.

For every layer of the trace and each of its last ``steps`` decode positions t, the cache holds tokens
``0..t`` (stateful methods are prefilled on tokens ``0..T-steps-1`` and then decode). Per method, budget
and step, against dense attention at the same step:

* ``rel_error``    ||o_method - o_dense||_2 / ||o_dense||_2 per query head, averaged over heads;
* ``mass``         the exact attention mass (dense softmax) of the tokens the head attended;
* ``topk_overlap`` |S ∩ TopK_|S|| / |S|: how many of the |S| attended tokens are among the |S|
                   highest-attention tokens (tie rule of the core);
averaged over steps (and layers for the overall row). The budget sets the oracle's hyper-parameter
that the method's cost model names (``budget_param``), so quality and cost refer to the same knob.
Double Sparsity, when uncalibrated, is calibrated (``qk`` statistic) on the layer's prompt tokens.

Bytes: ``oracle_{hbm,pcie,host}_bytes`` are the oracle's ``Traffic`` on the trace (reads of K/V,
metadata and auxiliary tensors), mean per decode step: of one layer in per-layer rows, summed over the
evaluated layers in the ``all`` row.

Cost: one decode step of ``model`` on each GPU of ``gpu`` (a key, a comma list or a sequence) at
``context`` tokens (default: the trace's length) with the budget scaled by ``context / T`` (the same
fraction of the context as on the trace). ``all`` rows carry the step: ``us_per_token``,
``attention_us`` (the method's kernels over all layers), ``sim_hbm_read_bytes`` (every kernel,
weights included), ``sim_attn_hbm_read_bytes``, ``sim_pcie_bytes``, ``sim_host_bytes``. Every row
carries the cost of ONE layer in which the method runs (``layer_attention_us``,
``layer_attn_hbm_read_bytes``, ``layer_attn_pcie_bytes``: its attention-method kernels; mean over
such layers when the cost model is layer-dependent); per-layer rows have no step columns (None), since
the simulator has no per-layer view of the weights and norms that a trace layer could own.

GQA union: a shared-KV kernel reads, per KV head, the union of its G query heads' selections. The
cost models estimate it as ``group_union`` x the per-head size (default G: disjoint sets, an upper
bound). Here it comes from the oracle's selections on the trace (``group_union_estimate``): per
(step, KV head) the incidence counts ``Q_k`` = tokens selected by exactly k of the group's G_t query
heads, and the union factor of a group of G heads is ``sum U(G) / sum U(1)`` over steps and KV heads
(``U(1)`` = the mean per-head size, so ``trace_group_union`` = ``U(G_t) / U(1)`` is the measured one):

* G = G_t: the measured union (``group_union_source`` ``trace``);
* G < G_t: the mean union over all G-head subsets of each group, exact from the counts,
  ``U(G) = sum_k Q_k (1 - C(G_t - k, G) / C(G_t, G))`` (``subsets``);
* G > G_t: an estimate, ``extrapolated``: the sample-based (incidence) extrapolation of species
  richness of Chao et al. (2014, Ecological Monographs 84:45-67; Colwell et al. 2012, J. Plant Ecol.
  5:3-21), heads as sampling units and tokens as species,
  ``U(G_t + m) = S_obs + Q0 (1 - (1 - Q1 / (G_t Q0 + Q1))^m)`` with the Chao2 estimate of the tokens no
  head selected, ``Q0 = (G_t - 1)/G_t Q1^2 / (2 Q2)`` (``Q1 (Q1 - 1) / 2`` in place of ``Q1^2 / (2 Q2)``
  when Q2 = 0), at most the cache. Assumption: the model's G query heads of a group are exchangeable
  draws like the trace's G_t (identical sets stay identical, disjoint ones stay about disjoint); Chao
  et al. advise extrapolating to at most twice the sample (G <= 2 G_t). Checked one size down on the
  shipped trace (3-head unions from 2-head subsets, ``benchmarks/bench_group_union.py``): a few percent
  low, where the linear map ``1 + (u - 1)(G - 1)/(G_t - 1)`` used before is a few percent high.

Per layer for per-layer rows; the mean over layers for ``all`` rows. ``group_union_source`` is one of
the three above, ``analytic`` (the cost model's default G: the trace has G_t = 1 or selected nothing)
or ``unused`` (the cost model's bytes do not depend on it at this budget, or G = 1).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import registry
from ..oracle import core, run_decode

DEFAULT_TRACE = Path(__file__).resolve().parents[1] / "traces" / "data" / "smollm2-135m_gpl3_2048.safetensors"
DEFAULT_METHODS = ("quest", "sparq", "double_sparsity", "streaming_llm", "h2o", "snapkv")
DEFAULT_BUDGETS = (64, 128, 256, 512, 1024)


def method_with_budget(name: str, budget: int, preset: str = "canonical"):
    """The oracle of ``name`` with its budget hyper-parameter set to ``budget`` tokens."""
    entry = registry.get(name)
    if entry.oracle is None:
        raise ValueError(f"method {name!r} has no oracle")
    method = registry.oracle(name, preset)
    param = getattr(entry.cost, "budget_param", None) if entry.cost is not None else None
    if not param:
        raise ValueError(f"method {name!r} has no budget hyper-parameter known to the simulator "
                         f"(its cost model names none); choose among: {', '.join(budget_methods())}")
    core.check_budget(budget)
    return dataclasses.replace(method, **{param: int(budget)})


def at_layer(method, layer: int, trace):
    """A method whose hyper-parameters name a layer (PyramidKV's per-layer budget) placed at the trace's
    layer of the trace's model; other methods unchanged."""
    fields = {f.name for f in dataclasses.fields(method)}
    if {"layer", "num_layers"} <= fields:
        return dataclasses.replace(method, layer=int(layer), num_layers=int(trace.metadata["config"]["n_layers"]))
    return method


def budget_methods() -> list[str]:
    return [n for n, e in registry.entries().items()
            if e.oracle is not None and e.cost is not None and getattr(e.cost, "budget_param", None)]


def calibrated(method, q_seq, k_seq, prefill_len: int):
    """Methods with an offline calibration (Double Sparsity's channels) are calibrated on the layer's
    own prompt tokens ``[0, prefill_len)`` when they come uncalibrated (optimistic: the paper calibrates
    on separate data; stated in the report)."""
    if getattr(method, "name", "") == "double_sparsity" and method.channels is None:
        from ..oracle.double_sparsity import calibrate_channels
        ranking = calibrate_channels(q_seq[:prefill_len], k_seq[:prefill_len], statistic="qk")
        return dataclasses.replace(method, channels=ranking)
    return method


def quality_rows(q_seq, k_seq, v_seq, method, steps: int) -> dict:
    """Average quality metrics of ``method`` over the last ``steps`` positions of one layer, with the
    oracle's bytes read per step and the measured GQA union factor (``trace_group_union``, NaN for an
    MHA trace or when nothing was selected); ``incidence`` and ``cache_len`` (one row per step and KV
    head) are what ``group_union_estimate`` needs for another group size."""
    T, h_kv = q_seq.shape[0], k_seq.shape[1]
    method = calibrated(method, q_seq, k_seq, T - steps)
    run = run_decode(method, q_seq, k_seq, v_seq, prefill_len=T - steps)
    errs, masses, overlaps, kept = [], [], [], []
    traffic = {"hbm": 0, "pcie": 0, "host": 0}
    g_trace = q_seq.shape[1] // h_kv
    incidence, cache_len = [], []
    for j, res in enumerate(run.steps):
        t = T - steps + j
        k = np.ascontiguousarray(k_seq[: t + 1].transpose(1, 0, 2))
        v = np.ascontiguousarray(v_seq[: t + 1].transpose(1, 0, 2))
        exact = core.attend_dense(q_seq[t], k, v)
        p = core.softmax(core.logits(q_seq[t], k))
        errs.append(np.mean(np.linalg.norm(res.output - exact, axis=1) / np.linalg.norm(exact, axis=1)))
        mass, overlap = [], []
        for h, idx in enumerate(res.selection.indices):
            mass.append(p[h, idx].sum())
            top = core.topk_indices(p[h], idx.size)
            overlap.append(np.intersect1d(top, idx).size / idx.size if idx.size else 1.0)
        masses.append(np.mean(mass))
        overlaps.append(np.mean(overlap))
        kept.append(res.selection.sizes.mean())
        for mem in traffic:
            traffic[mem] += res.traffic.by_memory(mem)
        incidence += [group_incidence(res.selection.indices[g * g_trace:(g + 1) * g_trace], res.selection.n)
                      for g in range(h_kv)]
        cache_len += [res.selection.n] * h_kv
    measured = group_union_estimate(incidence, cache_len, g_trace) if g_trace > 1 else None
    u = math.nan if measured is None else measured[0]
    return {"rel_error": float(np.mean(errs)), "mass": float(np.mean(masses)),
            "topk_overlap": float(np.mean(overlaps)), "tokens_kept": float(np.mean(kept)),
            **{f"oracle_{mem}_bytes": b / len(run.steps) for mem, b in traffic.items()},
            "trace_group_union": float(u),
            "incidence": np.array(incidence, dtype=np.int64), "cache_len": np.array(cache_len, dtype=np.int64)}


QUALITY = ("rel_error", "mass", "topk_overlap", "tokens_kept")
ORACLE_BYTES = ("oracle_hbm_bytes", "oracle_pcie_bytes", "oracle_host_bytes")
STEP_COST = ("us_per_token", "attention_us", "sim_hbm_read_bytes", "sim_attn_hbm_read_bytes", "sim_pcie_bytes",
             "sim_host_bytes")
LAYER_COST = ("layer_attention_us", "layer_attn_hbm_read_bytes", "layer_attn_pcie_bytes")


def group_incidence(sets, n: int) -> np.ndarray:
    """``Q[k - 1]`` = tokens selected by exactly ``k`` of the index ``sets`` (one KV group's query heads)."""
    counts = np.zeros(int(n), dtype=np.int64)
    for ix in sets:
        np.add.at(counts, np.unique(np.asarray(ix, dtype=np.int64)), 1)
    return np.bincount(counts, minlength=len(sets) + 1)[1:len(sets) + 1]


def group_union_estimate(incidence, cache_len, g_model: int):
    """``(union factor, source)`` of a KV group of ``g_model`` query heads from the trace's incidence
    counts (``incidence[i, k - 1]``: tokens selected by exactly k of the G_t heads of group i, one row
    per step and KV head; ``cache_len[i]``: the tokens in its cache): ``sum U(g_model) / sum U(1)``,
    clipped to [1, g_model]; ``U`` measured (``trace``), averaged over subsets (``subsets``) or
    extrapolated (``extrapolated``) as the module doc says. ``None`` when nothing can be said (G_t = 1
    with g_model > 1, or no head selected anything): the caller falls back to the analytic default."""
    Q = np.asarray(incidence, dtype=float)
    if Q.ndim != 2 or Q.shape[0] == 0:
        return None
    T = Q.shape[1]
    k = np.arange(1, T + 1)
    size1 = float((Q * k).sum()) / T                  # sum over groups of the mean per-head size, U(1)
    if size1 <= 0:
        return None
    if g_model <= T:
        unseen = np.array([math.comb(T - j, g_model) for j in k], dtype=float) / math.comb(T, g_model)
        total = float((Q * (1.0 - unseen)).sum())
        source = "trace" if g_model == T else "subsets"
    elif T == 1:
        return None
    else:
        q1, q2, s_obs = Q[:, 0], Q[:, 1], Q.sum(axis=1)
        q0 = (T - 1) / T * np.where(q2 > 0, q1 ** 2 / (2 * np.maximum(q2, 1)), q1 * (q1 - 1) / 2)
        step = np.divide(q1, T * q0 + q1, out=np.zeros_like(q1), where=q0 > 0)
        union = s_obs + q0 * (1.0 - (1.0 - step) ** (g_model - T))
        total = float(np.minimum(union, np.asarray(cache_len, dtype=float)).sum())
        source = "extrapolated"
    return min(float(g_model), max(1.0, total / size1)), source


def gpu_list(gpu) -> list:
    """GPUs from a key, a comma list of keys, a ``GPU`` or a sequence of these (each checked)."""
    from .hardware import GPU, gpu as get_gpu
    if isinstance(gpu, str):
        items = gpu.split(",")
    elif isinstance(gpu, GPU):
        items = [gpu]
    else:
        try:
            items = list(gpu)
        except TypeError:
            raise TypeError(f"gpu must be a GPU key, a comma list of keys, a GPU or a sequence of these, "
                            f"got {type(gpu).__name__}") from None
    out = [get_gpu(g.strip()) if isinstance(g, str) else g for g in items if not (isinstance(g, str) and not g.strip())]
    if not out:
        raise ValueError(f"gpu must name at least one GPU, got {gpu!r}")
    for g in out:
        if not isinstance(g, GPU):
            raise TypeError(f"gpu must be GPU keys or GPU objects, got {type(g).__name__}")
    return list({g.key: g for g in out}.values())


class _Pricer:
    """Prices one (method, scaled budget) on the model at ``context`` for a given ``group_union``,
    reusing the kernels of each union value across GPUs."""

    def __init__(self, spec, name: str, budget: int, context: int):
        from . import latency
        self.latency, self.spec, self.name, self.budget, self.context = latency, spec, name, budget, context
        fn = latency.method_cost(name)
        shape = spec.attention()
        self.group = shape.h_q // shape.h_kv
        dense_layers = latency.method_dense_layers(fn)
        reps, _ = latency.layer_classes(spec, dense_layers, fn.layer_dependent)
        self.active = (reps >= dense_layers).astype(float)
        self._kernels: dict = {}
        # does the cost model read more when a group's sets are disjoint than when identical?
        self.uses_union = self.group > 1 and not np.array_equal(*(
            self._attention_amount(self.kernels(u), lambda k: k.read()) for u in (1.0, float(self.group))))

    def kernels(self, union):
        key = None if union is None else float(union)
        if key not in self._kernels:
            params = None if key is None else {"group_union": key}
            self._kernels[key] = self.latency.step_kernels(self.spec, self.name, np.atleast_1d(self.context),
                                                           self.budget, params=params)
        return self._kernels[key]

    @staticmethod
    def _attention_amount(sk, amount) -> np.ndarray:
        """Per layer class, ``amount(kernel)`` summed over the attention-method kernels."""
        shape = (len(sk.layer_counts),) + sk.grid
        return sum((np.broadcast_to(np.asarray(amount(k), dtype=float), shape)
                    for k in sk.layer_kernels if k.name in sk.attention), np.zeros(shape))

    def union_for(self, estimate):
        """(group_union passed, what it is, source) for ``estimate`` = ``(u, source)`` of
        ``group_union_estimate`` at this model's G, or None."""
        if not self.uses_union:
            return None, math.nan, "unused"
        return (None, float(self.group), "analytic") if estimate is None else (estimate[0], estimate[0], estimate[1])

    def layer_cost(self, union, g) -> dict:
        """The attention-method kernels of one layer where the method runs (mean over such layers)."""
        sk = self.kernels(union)
        t = self.latency.time_step(sk, g)
        shape = (len(sk.layer_counts),) + sk.grid
        secs = sum((np.broadcast_to(s, shape) for k, s in zip(sk.layer_kernels, t.layer_kernel_seconds)
                    if k.name in sk.attention), np.zeros(shape))
        w = (sk.layer_counts * self.active).reshape((-1,) + (1,) * len(sk.grid))
        mean = (lambda a: float((a * w).sum() / w.sum())) if w.sum() else (lambda a: math.nan)
        return {"layer_attention_us": mean(secs) * 1e6,
                "layer_attn_hbm_read_bytes": mean(self._attention_amount(sk, lambda k: k.read("hbm"))),
                "layer_attn_pcie_bytes": mean(self._attention_amount(sk, lambda k: k.read("pcie")))}

    def step_cost(self, union, g) -> dict:
        sk = self.kernels(union)
        t = self.latency.time_step(sk, g)
        first = lambda a: float(np.asarray(a).ravel()[0])  # noqa: E731
        return {"us_per_token": first(t.step_seconds) * 1e6, "attention_us": first(t.attention_seconds) * 1e6,
                "sim_hbm_read_bytes": first(sk.hbm_read_bytes()),
                "sim_attn_hbm_read_bytes": first(sk.total(lambda k: k.read("hbm"), kernels=sk.attention)),
                "sim_pcie_bytes": first(sk.total(lambda k: k.read("pcie"))),
                "sim_host_bytes": first(sk.total(lambda k: k.read("host")))}


def evaluate(trace, methods: Sequence[str] = DEFAULT_METHODS, budgets: Sequence[int] = DEFAULT_BUDGETS, *,
             layers: Sequence[int] | None = None, steps: int = 4, model="smollm2-135m", gpu="h100-sxm",
             context: int | None = None) -> list[dict]:
    """Rows per (method, budget, GPU, layer) plus an ``all`` row per (method, budget, GPU); see the
    module doc. ``gpu``: a key, a comma list of keys, or a sequence (each GPU is priced)."""
    from ..traces.format import load_trace
    from .models import model as get_model
    if isinstance(trace, (str, Path)):
        trace = load_trace(trace)
    steps = core.check_positive_int(steps, "steps")
    if steps >= trace.n_tokens:
        raise ValueError(f"steps must be < the trace's {trace.n_tokens} tokens, got {steps}")
    layers = list(trace.layers if layers is None else layers)
    missing = [li for li in layers if li not in trace.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the trace (it has {list(trace.layers)})")
    context = trace.n_tokens if context is None else core.check_positive_int(context, "context")
    gpus = gpu_list(gpu)
    spec = get_model(model)
    seqs = {li: tuple(core.as_float64(a, "trace") for a in trace.layer(li).sequences()) for li in layers}
    rows = []
    for name in methods:
        for b in budgets:
            method = method_with_budget(name, b)
            per_layer = []
            for li in layers:
                t0 = time.perf_counter()
                row = {"method": name, "budget": int(b), "layer": li,
                       **quality_rows(*seqs[li], at_layer(method, li, trace), steps)}
                row["oracle_seconds"] = time.perf_counter() - t0
                per_layer.append(row)
            scaled = max(1, min(context, math.floor(b * context / trace.n_tokens)))
            pricer = _Pricer(spec, name, scaled, context)
            u_all = float(np.mean([r["trace_group_union"] for r in per_layer]))
            estimates = [group_union_estimate(r["incidence"], r["cache_len"], pricer.group) for r in per_layer]
            overall_estimate = None if any(e is None for e in estimates) else \
                (float(np.mean([e[0] for e in estimates])), estimates[0][1])
            overall = {"method": name, "budget": int(b), "layer": "all",
                       **{k: float(np.mean([r[k] for r in per_layer])) for k in QUALITY},
                       **{k: float(np.sum([r[k] for r in per_layer])) for k in ORACLE_BYTES},
                       "trace_group_union": u_all,
                       "oracle_seconds": float(np.sum([r["oracle_seconds"] for r in per_layer]))}
            for g in gpus:
                for row, estimate, step in [(r, e, False) for r, e in zip(per_layer, estimates)] + \
                        [(overall, overall_estimate, True)]:
                    passed, value, source = pricer.union_for(estimate)
                    cost = {"gpu": g.key, "context": context, "sim_budget": scaled, "group_union": value,
                            "group_union_source": source}
                    step_cost = pricer.step_cost(passed, g) if step else dict.fromkeys(STEP_COST)
                    out = {**row, **cost, **step_cost, **pricer.layer_cost(passed, g)}
                    rows.append({k: out[k] for k in COLUMNS})
    return rows


COLUMNS = ("method", "budget", "gpu", "layer", *QUALITY, *ORACLE_BYTES, "trace_group_union", "oracle_seconds",
           "context", "sim_budget", "group_union", "group_union_source", *STEP_COST, *LAYER_COST)


def write_csv(rows: list[dict], path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def table_rows(rows: list[dict]) -> list[dict]:
    """The ``all`` rows for a text table: bytes in MB (10^6), the union as value and source."""
    out = []
    for r in rows:
        if r["layer"] != "all":
            continue
        src = r["group_union_source"]
        union = "unused" if src == "unused" else f"{r['group_union']:.2f} {src}"
        out.append({**r, "group_union": union,
                    "oracle_hbm_MB": r["oracle_hbm_bytes"] / 1e6, "oracle_pcie_MB": r["oracle_pcie_bytes"] / 1e6,
                    "attn_hbm_MB": r["sim_attn_hbm_read_bytes"] / 1e6, "hbm_MB": r["sim_hbm_read_bytes"] / 1e6,
                    "pcie_MB": r["sim_pcie_bytes"] / 1e6})
    return out


NOTES = {
    "oracle_hbm_MB": "oracle_hbm_MB{pcie}: bytes the oracle read from HBM{pcie_mem} per decode step on the "
                     "trace (the evaluated layers summed; host-memory reads are in the CSV).",
    "attn_hbm_MB": "attn_hbm_MB: simulated HBM reads per decode step of the costed model's attention-method kernels.",
    "hbm_MB": "hbm_MB: simulated HBM reads per decode step, every kernel (weights included).",
    "pcie_MB": "pcie_MB: simulated PCIe bytes per decode step.",
    "group_union": "group_union: the GQA union factor priced (1 = a KV group's query heads select identical "
                   "tokens, G = disjoint), from the oracle's selections on the trace: {mapping}; 'analytic' = the "
                   "cost model's upper bound G, 'unused' = the cost model does not depend on it here.",
}


def table_note(columns, trace_group: int, model_group: int) -> str:
    """What the MB and group_union columns among ``columns`` mean (MB = 10^6 bytes)."""
    if trace_group == 1 and model_group > 1:
        mapping = "none here (the trace has one query head per KV head: no group to measure)"
    elif model_group == trace_group:
        mapping = f"'trace' = measured (the trace's G={trace_group} is the model's)"
    elif model_group < trace_group:
        mapping = (f"'subsets' = the mean union over every {model_group}-head subset of the trace's "
                   f"{trace_group}-head groups (exact)")
    else:
        mapping = (f"'extrapolated' = the trace's {trace_group}-head groups extrapolated to the model's "
                   f"G={model_group} (Chao et al. 2014 incidence extrapolation; an estimate that assumes the "
                   f"model's heads of a group are exchangeable with the trace's)")
    pcie, pcie_mem = (" / oracle_pcie_MB", " / over PCIe") if "oracle_pcie_MB" in columns else ("", "")
    text = " ".join(NOTES[c].format(mapping=mapping, pcie=pcie, pcie_mem=pcie_mem) for c in NOTES if c in columns)
    return textwrap.fill(text + " MB = 10^6 bytes.", width=110, break_on_hyphens=False)


def pareto_plot(rows: list[dict], path, title: str) -> int:
    """Error against simulated time per token of the ``all`` rows: one panel per GPU (one figure).
    Returns the number of panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gpus = list(dict.fromkeys(r["gpu"] for r in rows if r["layer"] == "all"))
    fig, axes = plt.subplots(1, len(gpus), figsize=(7 * len(gpus), 4.5), sharey=True, squeeze=False)
    for ax, gk in zip(axes[0], gpus):
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["us_per_token"], r["rel_error"]) for r in rows
                         if r["method"] == name and r["layer"] == "all" and r["gpu"] == gk)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("simulated time per token (us)")
        ax.set_yscale("log")
        ax.set_title(f"{title} on {gk}")
        ax.legend()
    axes[0][0].set_ylabel("relative L2 error of the attention output")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(gpus)


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


TABLE_COLUMNS = ["method", "budget", "tokens_kept", "rel_error", "mass", "topk_overlap", "oracle_hbm_MB",
                 "oracle_pcie_MB", "sim_budget", "group_union", "us_per_token", "attention_us", "attn_hbm_MB",
                 "hbm_MB", "pcie_MB"]


def gpus_argument(gpu: str | None, gpus: str | None) -> str:
    """``--gpu`` (one key or a comma list) or ``--gpus`` (a comma list); not both."""
    if gpu and gpus:
        raise ValueError("give --gpu or --gpus, not both (either takes a comma list)")
    return gpus or gpu or "h100-sxm"


def cmd_evaluate(args) -> int:
    from ..cli import format_table
    from .models import model as get_model
    from ..traces.format import load_trace
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = _ints(args.budgets)
    layers = _ints(args.layers) if args.layers else None
    context = _ints(args.context)[0] if args.context else None
    gpus = [g.key for g in gpu_list(gpus_argument(args.gpu, args.gpus))]
    trace = load_trace(args.trace)
    t0 = time.perf_counter()
    rows = evaluate(trace, methods, budgets, layers=layers, steps=args.steps, model=args.model, gpu=gpus,
                    context=context)
    overall = table_rows(rows)
    shape = get_model(args.model).attention()
    print(f"trace {args.trace}; cost of {args.model} on {', '.join(gpus)} at context {overall[0]['context']} "
          f"(budget scaled to the same fraction of the context)\n")
    columns = TABLE_COLUMNS[:2] + ["gpu"] * (len(gpus) > 1) + TABLE_COLUMNS[2:]
    print(format_table(overall, columns))
    print("\n" + table_note(columns, trace.h_q // trace.h_kv, shape.h_q // shape.h_kv))
    print(f"\n{len(methods)} methods x {len(budgets)} budgets x {len(gpus)} GPU(s) evaluated in "
          f"{time.perf_counter() - t0:.1f} s")
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv} (per layer and overall; per-layer rows carry one layer's attention cost, "
              f"not the step's)")
    if args.plot:
        try:
            panels = pareto_plot(rows, args.plot, args.model)
            print(f"wrote {args.plot} ({panels} panel(s), one per GPU)")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'kvsparse[plot]')")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="quality (exact, on a trace) and simulated cost of methods x budgets")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="attention trace (.safetensors); default: shipped SmolLM2 trace")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="token budgets on the trace")
    p.add_argument("--layers", default=None, help="comma list of trace layers (default: all in the trace)")
    p.add_argument("--steps", type=int, default=4, help="decode positions evaluated at the end of the trace")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--gpu", default=None, help="GPU key or a comma list, each priced (default: h100-sxm)")
    p.add_argument("--gpus", default=None, help="comma list of GPU keys (same as a comma list in --gpu)")
    p.add_argument("--context", default=None, help="context for the cost (default: the trace's length)")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None, help="Pareto plot PNG, one panel per GPU (needs the plot extra)")
    p.set_defaults(func=cmd_evaluate)
