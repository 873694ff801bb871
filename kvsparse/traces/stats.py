"""Statistics of an attention trace, per layer and query head (``kvsparse traces stats TRACE``).

All of them are computed on the float64 attention ``p_t = softmax(q_t K[0..t]^T * scale)`` (from
``kvsparse.oracle.core``) of the *last* ``queries`` query positions ``t`` of the trace (decode-like:
each sees a long causal context), and averaged over those queries:

* ``sink``      mass on the first ``sink_tokens`` tokens (the attention sink).
* ``entropy``   Shannon entropy of ``p_t`` in nats (``log(t+1)`` would be uniform attention).
* ``f90``/``f95``/``f99``  the fewest tokens holding 90/95/99 % of the mass, as a fraction of ``t+1``.
* ``local``     mass on the last ``local_window`` tokens ``(t-window, t]``.
* ``heavy``     mass on the ``heavy`` keys with the largest mean attention over the query set, chosen
                among keys older than every query's local window and not in the sink (persistent
                heavy hitters, as H2O keeps them).
* ``k_outliers``/``q_outliers``  channels whose RMS over all tokens exceeds ``outlier_factor`` times
                the median channel RMS of that (KV or query) head; ``k_peak``/``q_peak`` the largest
                RMS / median RMS ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..oracle import core


@dataclass(frozen=True)
class TraceStats:
    layers: tuple[int, ...]
    metrics: dict[str, np.ndarray]      # name -> [len(layers), H_q]
    distance_profile: np.ndarray        # [len(layers), H_q, len(distance_edges) - 1] mean mass per distance bin
    distance_edges: np.ndarray          # bin edges in tokens (distance t - i), half-open [a, b)
    settings: dict

    METRICS = ("sink", "entropy", "f90", "f95", "f99", "local", "heavy", "k_outliers", "k_peak", "q_outliers", "q_peak")

    def rows(self) -> list[dict]:
        """One row per (layer, query head), for ``kvsparse.cli.format_table``."""
        h_q = next(iter(self.metrics.values())).shape[1]
        g = h_q // self.settings["h_kv"]
        out = []
        for li, layer in enumerate(self.layers):
            for h in range(h_q):
                row = {"layer": layer, "head": h, "kv": h // g}
                for m in self.METRICS:
                    v = self.metrics[m][li, h]
                    row[m] = int(v) if m.endswith("outliers") else float(v)
                out.append(row)
        return out

    def layer_means(self) -> list[dict]:
        """One row per layer: each metric averaged over query heads."""
        return [{"layer": layer, **{m: float(self.metrics[m][li].mean()) for m in self.METRICS}}
                for li, layer in enumerate(self.layers)]


def channel_outliers(x: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """For ``x [T, H, d]``: per head the number of channels with RMS > ``factor`` x median RMS, and the peak ratio."""
    rms = np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2, axis=0))     # [H, d]
    med = np.median(rms, axis=1, keepdims=True)
    ratio = rms / np.where(med > 0, med, 1.0)
    return (ratio > factor).sum(axis=1), ratio.max(axis=1)


def layer_stats(q, k, v=None, *, scale: float | None = None, queries: int = 256, sink_tokens: int = 1,
                local_window: int = 64, heavy: int = 16, outlier_factor: float = 4.0,
                distance_edges=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Metrics of one layer (``q [T, H_q, d]``, ``k [T, H_kv, d]``): ``(metrics [H_q] each, profile, edges)``."""
    q = core.as_float64(q, "q", ndim=3)
    k = core.as_float64(k, "k", ndim=3)
    T, h_q, d = q.shape
    h_kv = k.shape[1]
    core.group_size(h_q, h_kv)
    if k.shape != (T, h_kv, d):
        raise ValueError(f"k must have shape (T, H_kv, d) = ({T}, H_kv, {d}), got {k.shape}")
    for value, name in ((queries, "queries"), (sink_tokens, "sink_tokens"), (local_window, "local_window")):
        core.check_positive_int(value, name)
    core.check_positive_int(heavy, "heavy", allow_zero=True)
    queries = min(queries, T)
    ts = np.arange(T - queries, T)
    if distance_edges is None:
        distance_edges = np.unique(np.concatenate([[0, 1, 2, 4], np.geomspace(8, max(T, 9), 12).astype(int)]))
    edges = np.asarray(distance_edges, dtype=np.int64)
    kt = np.ascontiguousarray(k.transpose(1, 0, 2))                  # [H_kv, T, d]
    acc = {m: np.zeros(h_q) for m in ("sink", "entropy", "f90", "f95", "f99", "local")}
    key_mass = np.zeros((h_q, T))                                     # summed attention per key
    probs = []                                                        # kept only for the heavy-hitter mass
    profile = np.zeros((h_q, edges.size - 1))
    for t in ts:
        p = core.softmax(core.logits(q[t], kt[:, : t + 1], scale), axis=-1)      # [H_q, t+1]
        n = t + 1
        acc["sink"] += p[:, :sink_tokens].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc["entropy"] += -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        cum = np.cumsum(np.sort(p, axis=1)[:, ::-1], axis=1)
        for m, level in (("f90", 0.90), ("f95", 0.95), ("f99", 0.99)):
            # fewest tokens whose mass reaches the level (float round-off may leave the total at 1 - 1e-16)
            need = np.minimum((cum < level * cum[:, -1:]).sum(axis=1) + 1, n)
            acc[m] += need / n
        acc["local"] += p[:, max(0, n - local_window):].sum(axis=1)
        key_mass[:, :n] += p
        dist = t - np.arange(n)
        bins = np.searchsorted(edges, dist, side="right") - 1
        ok = (bins >= 0) & (bins < edges.size - 1)
        np.add.at(profile.T, bins[ok], p[:, ok].T)
        if heavy:
            probs.append(p[:, : max(0, T - queries - local_window + 1)])
    metrics = {m: acc[m] / queries for m in acc}
    # persistent heavy hitters: older than every query's local window, not a sink token
    old = max(0, T - queries - local_window + 1)
    hh = np.zeros(h_q)
    if heavy and old > sink_tokens:
        cand = key_mass[:, sink_tokens:old]
        top = core.topk_indices(cand, heavy, axis=-1) + sink_tokens    # [H_q, heavy]
        for p in probs:
            hh += np.take_along_axis(p, top, axis=1).sum(axis=1)
        hh /= queries
    metrics["heavy"] = hh
    g = h_q // h_kv
    k_out, k_peak = channel_outliers(k, outlier_factor)
    q_out, q_peak = channel_outliers(q, outlier_factor)
    metrics.update(k_outliers=np.repeat(k_out, g), k_peak=np.repeat(k_peak, g), q_outliers=q_out, q_peak=q_peak)
    width = np.diff(edges).astype(np.float64)
    return metrics, profile / queries / width, edges       # mass per token of distance, per bin


def trace_stats(trace, *, layers=None, queries: int = 256, sink_tokens: int = 1, local_window: int = 64,
                heavy: int = 16, outlier_factor: float = 4.0) -> TraceStats:
    """``layer_stats`` for every layer of an ``AttentionTrace`` (or the given subset)."""
    layers = tuple(trace.layers if layers is None else layers)
    scale = float(trace.config["attention_scale"])
    per, profiles, edges = {}, [], None
    for i in layers:
        lay = trace.layer(i)
        m, prof, edges = layer_stats(lay.q, lay.k, scale=scale, queries=queries, sink_tokens=sink_tokens,
                                     local_window=local_window, heavy=heavy, outlier_factor=outlier_factor)
        for key, val in m.items():
            per.setdefault(key, []).append(val)
        profiles.append(prof)
    settings = dict(queries=min(queries, trace.n_tokens), sink_tokens=sink_tokens, local_window=local_window,
                    heavy=heavy, outlier_factor=outlier_factor, h_kv=trace.h_kv, n_tokens=trace.n_tokens)
    return TraceStats(layers, {k: np.stack(v) for k, v in per.items()}, np.stack(profiles), edges, settings)


def plot_stats(stats: TraceStats, path, title: str = "") -> None:
    """Heat maps (layer x head) of sink, entropy, f95, local and heavy mass, and attention vs distance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("sink", "entropy", "f95", "local", "heavy")
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.2 + 0.25 * len(stats.layers)))
    for ax, name in zip(axes, names):
        im = ax.imshow(stats.metrics[name], aspect="auto", cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("query head")
        ax.set_yticks(range(len(stats.layers)), [str(i) for i in stats.layers])
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    ax = axes[-1]
    centres = np.maximum(0.5 * (stats.distance_edges[:-1] + stats.distance_edges[1:] - 1), 0.5)
    for li, layer in enumerate(stats.layers):
        ax.loglog(centres, stats.distance_profile[li].mean(axis=0), marker=".", label=f"layer {layer}")
    ax.set_xlabel("distance t - i (tokens)")
    ax.set_ylabel("mean attention per token")
    ax.set_title("attention vs distance")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
