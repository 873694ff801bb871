"""Twilight (Lin et al., arXiv 2502.02770): select with a generous base budget, then prune by top-p.

One decode step, for query head ``h``:

1. candidates ``C`` = the base selector's selection (Quest or Double Sparsity, budget ~8192);
2. estimated logits ``s_j = q . k~_j / sqrt(d)`` for ``j in C``, with ``k~`` the key fake-quantized per
   token over its ``d`` channels to ``quant_bits`` (``fake_quantize_per_token``; ``None``: exact keys);
   ``p_hat = softmax(s)`` normalised over ``C`` only (the reference fills non-candidates with
   ``finfo.min``, which gives them probability 0);
3. keep the smallest set of candidates whose estimated mass reaches ``p``; exact attention over it.

"Smallest set" (``top_p_sort``, the definition): order the candidates by the core tie rule (higher
``p_hat`` first, the lower token index first among equal ones) and keep the shortest prefix whose
sum reaches ``p``. So the kept mass is ``>= p`` and dropping the last kept token (the lowest-ranked)
brings it below ``p``; among equal probabilities at the cut the lower indices are kept. Sums are
exactly rounded (``math.fsum``), so the result does not depend on summation order. ``p >= 1`` keeps
every candidate and skips the estimate (also tokens whose ``p_hat`` underflows to 0).

``top_p_search`` is the algorithm of the reference kernel (``csrc/include/sampling.cuh``,
``TopPReturnMaskKernel``, from FlashInfer): with ``f(x) = sum_{p_i > x} p_i``, bisect a threshold,
``low = 0`` and ``high`` = the bracket; each iteration computes ``mid = (low + high) / 2``,
``min_gt_low = min(high, min{p_i > low})``, ``max_le_high = max(low, max{p_i <= high})``, then
``low = mid`` if ``f(mid) >= p`` else ``high = min(mid, max_le_high)``; it stops when
``max_le_high - min_gt_low <= epsilon`` (checked after the update, values from before it) and keeps
``{p_i > low}`` (strict). With the bracket at the row maximum and ``epsilon = 0`` the invariant
``f(low) >= p > f(high)`` holds and the search ends when ``(low, high]`` holds one distinct value
``v``: the kept set is ``{p_i >= v}``, which equals ``top_p_sort`` unless ``v`` is tied (then every
tied token is kept). The reference brackets with ``high = p_0`` (the attention sink's probability)
and ``epsilon = 1e-5``: if ``p_0`` is not the maximum the result is a valid but larger set, and values
within ``epsilon`` of the threshold are all kept.

Traffic (exact, one step; all HBM): the base selector's metadata reads (Quest min/max or DS labels,
its ``metadata_traffic``), the estimate's key reads of the candidates (tensor ``"auxiliary"``: per
candidate row ``d * quant_bits / 8`` bytes plus a per-token scale and zero of ``quant_scale_bits``
each; tensor ``"keys"``, ``row_bytes(d)`` per row, when ``quant_bits`` is None), counted on the union
of the group's candidates per KV head under ``layout.share_kv_heads`` and per query head otherwise,
and the K/V rows of the kept set (``kv_traffic``). The base's own K/V reads are not made (it only
selects). A dense layer reads only K/V. ``traffic`` therefore needs the candidates: ``step`` passes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .double_sparsity import DoubleSparsity, _fake_quantize
from .method import Method, check_positions
from .quest import Quest, attend_selection
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

TOP_P_RULES = ("sort", "search")
BRACKETS = ("max", "first")


def _check_probs(probs, p) -> tuple[np.ndarray, float]:
    probs = core.as_float64(probs, "probs", ndim=1)
    if (probs < 0).any():
        raise ValueError("probs must be non-negative")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")
    return probs, float(p)


def top_p_sort(probs, p: float) -> np.ndarray:
    """Boolean mask of the smallest set reaching mass ``p`` (sort and accumulate; see the module doc).

    If no prefix reaches ``p`` (only possible through rounding when ``p`` is within a few ulps of the
    total), every entry is kept.
    """
    probs, p = _check_probs(probs, p)
    m = probs.size
    order = core.topk_indices(probs, m)
    ranked = probs[order]
    # smallest prefix length whose exactly rounded sum reaches p (monotone in the length): a running
    # sum brackets it within its rounding bound m * u * total, fsum decides inside the bracket
    running = np.cumsum(ranked)
    slack = 4 * m * np.finfo(float).eps * (running[-1] if m else 0.0)
    lo = int(np.searchsorted(running, p - slack, side="left")) + 1
    hi = min(m, int(np.searchsorted(running, p + slack, side="left")) + 1)
    lo = min(lo, hi)
    if m == 0 or math.fsum(ranked[:hi]) < p:
        lo = hi = m
    while lo < hi:
        mid = (lo + hi) // 2
        if math.fsum(ranked[:mid]) >= p:
            hi = mid
        else:
            lo = mid + 1
    mask = np.zeros(m, dtype=bool)
    mask[order[:lo]] = True
    return mask


def top_p_search(probs, p: float, *, high: float | None = None, epsilon: float = 0.0,
                 max_iterations: int = 100_000) -> np.ndarray:
    """Boolean mask ``{p_i > low}`` from the reference kernel's threshold bisection (module doc).

    ``high`` is the initial upper bracket (default: the maximum of ``probs``; the reference uses the
    first entry). ``epsilon`` is the stopping width in probability units (reference: 1e-5).
    """
    probs, p = _check_probs(probs, p)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if probs.size == 0:
        return np.zeros(0, dtype=bool)
    low = 0.0
    high = float(probs.max()) if high is None else float(high)
    for _ in range(max_iterations):
        mid = (low + high) / 2
        above_low = probs[probs > low]
        below_high = probs[probs <= high]
        min_gt_low = min(high, float(above_low.min())) if above_low.size else high
        max_le_high = max(low, float(below_high.max())) if below_high.size else low
        if math.fsum(probs[probs > mid]) >= p:
            low = mid
        else:
            high = min(mid, max_le_high)
        if not max_le_high - min_gt_low > epsilon:
            return probs > low
    raise RuntimeError(f"top_p_search did not stop within {max_iterations} iterations")


@register_method
@dataclass(frozen=True)
class Twilight(Method):
    """Twilight select-then-prune; see the module docstring for every convention."""

    name: ClassVar[str] = "twilight"
    family: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "base selector (Quest/DS) -> 4-bit key re-scoring -> smallest set with mass >= p"

    base: Method = field(default_factory=lambda: Quest(token_budget=8192))
    p: float = 0.85
    quant_bits: int | None = 4
    quant_scale_bits: int = 16
    top_p: str = "sort"
    bracket: str = "max"
    epsilon: float = 0.0
    dense_layers: int = 2
    layer: int | None = None

    def __post_init__(self):
        if not isinstance(self.base, (Quest, DoubleSparsity)):
            raise TypeError(f"base must be a Quest or DoubleSparsity instance, got {type(self.base).__name__}")
        _check_probs(np.zeros(0), self.p)
        if self.quant_bits is not None and self.quant_bits not in (1, 2, 4, 8):
            raise ValueError(f"quant_bits must be None or one of 1, 2, 4, 8, got {self.quant_bits!r}")
        if self.quant_scale_bits not in (8, 16, 32):
            raise ValueError(f"quant_scale_bits must be 8, 16 or 32, got {self.quant_scale_bits!r}")
        if self.top_p not in TOP_P_RULES:
            raise ValueError(f"top_p must be one of {TOP_P_RULES}, got {self.top_p!r}")
        if self.bracket not in BRACKETS:
            raise ValueError(f"bracket must be one of {BRACKETS}, got {self.bracket!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        core.check_positive_int(self.dense_layers, "dense_layers", allow_zero=True)
        if self.layer is not None:
            core.check_positive_int(self.layer, "layer", allow_zero=True)

    @property
    def dense_layer(self) -> bool:
        return self.layer is not None and self.layer < self.dense_layers

    # --- the pipeline -------------------------------------------------------------------------
    def candidates(self, q, k, v) -> Selection:
        """The base selector's selection (everything on a dense layer)."""
        if self.dense_layer:
            return Selection.full(q.shape[0], k.shape[1])
        return self.base.select(q, k, v)

    def estimated_probabilities(self, q, k, candidates: Selection) -> list[np.ndarray]:
        """Per query head, ``p_hat`` over its candidates (in the candidates' sorted order)."""
        h_q, d = q.shape
        h_kv = k.shape[0]
        g = core.group_size(h_q, h_kv)
        scale = core.default_scale(d)
        out = []
        for j, union in enumerate(candidates.kv_union(h_kv)):
            # per-token quantization is row by row: quantize the group's union once
            rows = k[j, union]
            if self.quant_bits is not None and union.size:
                rows = _fake_quantize(rows, self.quant_bits)
            # einsum sums every row the same way (BLAS need not): identical keys get identical estimates
            group_logits = np.einsum("ud,gd->ug", rows, q[j * g:(j + 1) * g]) * scale   # [|union|, G]
            for i in range(g):
                idx = candidates.indices[j * g + i]
                out.append(core.softmax(group_logits[np.searchsorted(union, idx), i]))
        return out

    def prune(self, probs: np.ndarray, candidate_indices: np.ndarray) -> np.ndarray:
        """The kept candidates of one head (sorted token indices)."""
        if self.top_p == "sort":
            keep = top_p_sort(probs, self.p)
        else:
            if self.bracket == "max" or probs.size == 0:
                high = None
            else:  # the reference reads the row's first entry: token 0, probability 0 unless a candidate
                high = float(probs[0]) if candidate_indices[0] == 0 else 0.0
            keep = top_p_search(probs, self.p, high=high, epsilon=self.epsilon)
        return candidate_indices[keep]

    def select_with_candidates(self, q, k, v) -> tuple[Selection, Selection]:
        """``(candidates, kept)`` for validated float64 inputs."""
        cand = self.candidates(q, k, v)
        if self.dense_layer or self.p >= 1:
            return cand, cand
        probs = self.estimated_probabilities(q, k, cand)
        kept = tuple(self.prune(pr, ix) for pr, ix in zip(probs, cand.indices))
        return cand, Selection(kept, k.shape[1])

    def select(self, q, k, v, *, positions=None) -> Selection:
        return self.select_with_candidates(q, k, v)[1]

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return attend_selection(q, k, v, selection, scale=scale)

    def step(self, q, k, v, *, positions=None, scale: float | None = None,
             layout: Layout = Layout()) -> StepResult:
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        if positions is not None:
            check_positions(positions, sh.n)
        cand, kept = self.select_with_candidates(q, k, v)
        output = self.attend(q, k, v, kept, scale=scale)
        return StepResult(kept, output, self.traffic(kept, h_kv=sh.h_kv, d=sh.d, layout=layout, candidates=cand))

    # --- traffic ------------------------------------------------------------------------------
    def estimate_traffic(self, candidates: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the candidate key reads of the estimate (none when ``p >= 1``)."""
        if self.p >= 1 or self.dense_layer:
            return Traffic({}, layout)
        sets = candidates.kv_union(h_kv) if layout.share_kv_heads else candidates.indices
        rows = sum(ix.size for ix in sets)
        if self.quant_bits is None:
            return Traffic({("hbm", "keys"): rows * layout.row_bytes(d)}, layout)
        if (d * self.quant_bits) % 8:
            raise ValueError(f"d={d} at {self.quant_bits} bits is not a whole number of bytes")
        per_row = d * self.quant_bits // 8 + 2 * self.quant_scale_bits // 8
        return Traffic({("hbm", "auxiliary"): rows * per_row}, layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout,
                candidates: Selection | None = None) -> Traffic:
        kv = kv_traffic(selection, h_kv, d, layout)
        if self.dense_layer:
            return kv
        if candidates is None:
            raise ValueError("Twilight's traffic needs candidates= (the base selection); step() passes it")
        base = self.base.metadata_traffic(selection.n, h_q=selection.h_q, h_kv=h_kv, d=d, layout=layout)
        return kv + base + self.estimate_traffic(candidates, h_kv=h_kv, d=d, layout=layout)

    @classmethod
    def presets(cls) -> dict[str, "Twilight"]:
        reference = dict(top_p="search", bracket="first", epsilon=1e-5)
        return {
            "canonical": cls(),
            # the same definition computed by exact bisection (bracket at the row maximum, epsilon 0)
            "search": cls(top_p="search"),
            # benchmark/configs/config_quest_twi.json + TopPReturnMaskKernel: Quest (budget 8192, page
            # 16, Twilight's page rounding), 4-bit keys, p = 0.85, bracket p_0, epsilon 1e-5
            "twilight-quest": cls(base=Quest.presets()["twilight-quest"], **reference),
            # benchmark/configs/config_ds_twi.json: DS (r 64, 2-bit key labels, budget 8192); pass the
            # calibrated channels with dataclasses.replace(preset.base, channels=...)
            "twilight-ds": cls(base=DoubleSparsity.presets()["twilight-ds"], **reference),
        }
