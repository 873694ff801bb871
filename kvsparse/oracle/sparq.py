"""SparQ Attention (Ribar et al., ICML 2024): approximate scores from the r largest query components.

One decode step, for query head ``h`` (``s`` = approximate logits, ``p_hat`` = their softmax):

1. channels ``i1`` = the ``r`` largest ``|q_i|`` (core tie rule: the lower channel wins ties);
2. ``s_j = q[i1] . k_j[i1] / tau`` with ``tau = sqrt(d * ||q[i1]||_1 / ||q||_1)`` (``tau = sqrt(d)`` when
   ``q = 0``: the ratio is then defined as 1), ``p_hat = softmax(s)`` over all ``n`` tokens;
3. ``i2`` = the ``k`` tokens with the largest ``s`` (core tie rule), exact attention ``y`` over them;
4. ``alpha = sum_{j in i2} p_hat_j`` and the output ``alpha * y + (1 - alpha) * mean(V)`` (the mean over
   all ``n`` cached values of the head's KV head); ``reallocate=False`` outputs ``y``.

With ``r = d`` the approximate logits are the exact ones, so the selection is the exact top-k and
``alpha`` the exact softmax mass of it. When the selection covers all ``n`` tokens the step is dense:
``alpha = 1`` and no approximate pass is needed (nor counted in the traffic).

Conventions that differ between the two official versions (fields of ``SparQ``):

* ``gqa="per_head"`` (sparq-gpt-fast, ``repeat_interleave``): every query head picks its own channels
  and tokens. ``gqa="group"`` (llm-inference-research ``ann_attention.py``): ``|q|`` is summed over the
  group before the top-r, the approximate logits ``s`` are summed over the group before the top-k, so
  the group shares channels and tokens; ``tau`` and ``alpha`` stay per query head.
* ``forced_recent``: the last ``forced_recent`` tokens (the current one included) are always
  selected (research code: ``local_k + 1``, the current token even with ``local_k = 0``). They count
  inside the ``k`` selected tokens; ties among them follow the core rule.
* ``extra_token``: research code selects ``k + 1`` tokens ("the current token's k comes for free").
* Budgets: ``r`` and ``k`` given, or derived from ``compression_ratio`` rho: ``r = d / rho`` and
  ``k = L / (2 rho)`` with ``rounding`` ``"floor"`` (canonical) or ``"round"`` (gpt-fast, Python's
  half-to-even like torch), each at least 1, ``k`` capped at ``n``. ``L = n`` (canonical) or
  ``allocated_len`` (gpt-fast uses the allocated cache length ``S_max``, not the current length).

Traffic (one step, exact): the selected K/V rows (``kv_traffic``); unless the step is dense, the
approximate pass reads ``r`` elements of every one of the ``n`` keys per reader, into tensor
``"keys"``, or ``"auxiliary"`` when ``transposed_keys`` (gpt-fast's default ``store_twice`` keeps a
``K^T`` copy and gathers the r rows of it); readers are the KV heads when the group shares channels
(``gqa="group"``) and ``layout.share_kv_heads``, the query heads otherwise. With ``reallocate`` the
running mean of V (``d`` elements of ``mean_value_bits``, gpt-fast keeps it in float32) is read
once per KV head (``share_kv_heads``) or per query head, tensor ``"auxiliary"``. Element width of
the key reads: ``layout.element_bits``. All in HBM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method, check_positions
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

GQA_MODES = ("per_head", "group")
ROUNDINGS = ("floor", "round")


@dataclass(frozen=True)
class Approximation:
    """The approximate pass of one step: channels per query head, ``tau``, logits, softmax, selection."""

    channels: np.ndarray      # [H_q, r] sorted channel indices (equal within a group for gqa="group")
    tau: np.ndarray           # [H_q]
    logits: np.ndarray        # [H_q, n] approximate logits s
    probs: np.ndarray         # [H_q, n] softmax(s)
    selected: list            # per query head, sorted token indices
    dense: bool


@register_method
@dataclass(frozen=True)
class SparQ(Method):
    """SparQ Attention; see the module docstring for every convention."""

    name: ClassVar[str] = "sparq"
    family: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "top-r |q| channels score all keys; exact attention on the top-k; alpha-mix with mean(V)"

    r: int | None = None
    k: int | None = None
    compression_ratio: int = 8
    rounding: str = "floor"
    allocated_len: int | None = None
    gqa: str = "per_head"
    forced_recent: int = 0
    extra_token: bool = False
    reallocate: bool = True
    transposed_keys: bool = False
    mean_value_bits: int | None = None

    def __post_init__(self):
        for f in ("r", "k", "allocated_len"):
            if getattr(self, f) is not None:
                core.check_positive_int(getattr(self, f), f)
        core.check_positive_int(self.compression_ratio, "compression_ratio")
        core.check_positive_int(self.forced_recent, "forced_recent", allow_zero=True)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        for f in ("extra_token", "reallocate", "transposed_keys"):
            if not isinstance(getattr(self, f), bool):
                raise TypeError(f"{f} must be a bool, got {type(getattr(self, f)).__name__}")
        if self.mean_value_bits is not None and self.mean_value_bits not in (8, 16, 32, 64):
            raise ValueError(f"mean_value_bits must be None or one of 8, 16, 32, 64, got {self.mean_value_bits!r}")

    # --- budgets ------------------------------------------------------------------------------
    def _divide(self, a: int, b: int) -> int:
        return a // b if self.rounding == "floor" else round(a / b)

    def rank(self, d: int) -> int:
        """Channels ``r`` used for a head dim ``d`` (at most ``d``)."""
        r = self.r if self.r is not None else max(1, self._divide(d, self.compression_ratio))
        return min(r, d)

    def tokens(self, n: int) -> int:
        """Tokens selected in an ``n``-token cache (at most ``n``)."""
        if self.k is not None:
            k = self.k
        else:
            length = n if self.allocated_len is None else self.allocated_len
            k = max(1, self._divide(length, 2 * self.compression_ratio))
        return min(n, k + int(self.extra_token))

    # --- the approximate pass -----------------------------------------------------------------
    def approximate(self, q, k) -> Approximation:
        """Steps 1-3 on validated float64 ``q [H_q, d]``, ``k [H_kv, n, d]``."""
        h_q, d = q.shape
        h_kv, n, _ = k.shape
        g = core.group_size(h_q, h_kv)
        r, k_sel = self.rank(d), self.tokens(n)
        magnitude = np.abs(q)
        if self.gqa == "group":
            magnitude = np.repeat(magnitude.reshape(h_kv, g, d).sum(axis=1), g, axis=0)
        channels = np.sort(core.topk_indices(magnitude, r), axis=1)
        chosen = np.zeros((h_q, d), dtype=bool)
        np.put_along_axis(chosen, channels, True, axis=1)
        # L1 coverage summed over all channels in the same order for both norms, so r = d gives 1 exactly
        l1_all = np.abs(q).sum(axis=1)
        l1_chosen = np.where(chosen, np.abs(q), 0.0).sum(axis=1)
        ratio = np.divide(l1_chosen, l1_all, out=np.ones(h_q), where=l1_all > 0)
        tau = np.sqrt(d * ratio)
        # zeroing the unchosen channels gives exactly q[i1] . k[i1] (the added terms are exact zeros),
        # and multiplying by 1/tau rounds like core.logits' 1/sqrt(d): r = d reproduces it bit for bit
        s = core.logits(np.where(chosen, q, 0.0), k, scale=1.0) * (1.0 / tau)[:, None]
        probs = core.softmax(s, axis=-1)
        dense = k_sel >= n
        if dense:
            selected = [np.arange(n, dtype=np.int64) for _ in range(h_q)]
        else:
            rank_by = s.copy()
            if self.gqa == "group":
                rank_by = np.repeat(rank_by.reshape(h_kv, g, n).sum(axis=1), g, axis=0)
            if self.forced_recent:
                rank_by[:, n - min(n, self.forced_recent):] = np.inf
            selected = [np.sort(row) for row in core.topk_indices(rank_by, k_sel)]
        return Approximation(channels, tau, s, probs, selected, dense)

    def select(self, q, k, v, *, positions=None) -> Selection:
        return Selection(tuple(self.approximate(q, k).selected), k.shape[1])

    def alpha(self, approx: Approximation) -> np.ndarray:
        """``[H_q]`` approximate softmax mass of each head's selection (1 on a dense step)."""
        if approx.dense:
            return np.ones(approx.probs.shape[0])
        return np.array([math.fsum(p[ix]) for p, ix in zip(approx.probs, approx.selected)])

    def mix(self, q, k, v, approx: Approximation, *, scale=None) -> np.ndarray:
        """Step 4: ``alpha * y + (1 - alpha) * mean(V)`` (``y`` alone without ``reallocate``)."""
        y = core.attend_indices(q, k, v, approx.selected, scale=scale)
        if not self.reallocate or approx.dense:
            return y
        alpha = self.alpha(approx)[:, None]
        mean_v = core.expand_kv(v.mean(axis=1), q.shape[0])
        return alpha * y + (1.0 - alpha) * mean_v

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        approx = self.approximate(q, k)
        if any(not np.array_equal(a, b) for a, b in zip(approx.selected, selection.indices)):
            raise ValueError("selection must be the one SparQ.select returns for these inputs (alpha depends on it)")
        return self.mix(q, k, v, approx, scale=scale)

    def step(self, q, k, v, *, positions=None, scale: float | None = None,
             layout: Layout = Layout()) -> StepResult:
        # one approximate pass serves selection and alpha
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale)
        if positions is not None:
            check_positions(positions, sh.n)
        approx = self.approximate(q, k)
        selection = Selection(tuple(approx.selected), sh.n)
        output = self.mix(q, k, v, approx, scale=scale)
        return StepResult(selection, output, self.traffic(selection, h_kv=sh.h_kv, d=sh.d, layout=layout))

    # --- traffic ------------------------------------------------------------------------------
    def metadata_traffic(self, n: int, *, h_q: int, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the approximate pass (r-channel key reads) and of the running mean of V."""
        if self.tokens(n) >= n:
            return Traffic({}, layout)
        share = layout.share_kv_heads
        key_readers = h_kv if (self.gqa == "group" and share) else h_q
        bits = n * self.rank(d) * layout.element_bits * key_readers
        if bits % 8:
            raise ValueError(f"{n} x r={self.rank(d)} elements of {layout.element_bits} bits is not whole bytes")
        out = {("hbm", "auxiliary" if self.transposed_keys else "keys"): bits // 8}
        if self.reallocate:
            mean_bits = self.mean_value_bits or layout.element_bits
            out[("hbm", "auxiliary")] = out.get(("hbm", "auxiliary"), 0) + (
                d * mean_bits * (h_kv if share else h_q) // 8)
        return Traffic(out, layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        return kv_traffic(selection, h_kv, d, layout) + self.metadata_traffic(
            selection.n, h_q=selection.h_q, h_kv=h_kv, d=d, layout=layout)

    @classmethod
    def presets(cls) -> dict[str, "SparQ"]:
        return {
            "canonical": cls(),
            # graphcore-research/llm-inference-research, llminference/methods/ann_attention.py with
            # local_k = 0: group-shared channels and tokens, current token forced, k + 1 selected,
            # mean(V) recomputed (counted as a running mean here: the research code is not a kernel).
            "llm-inference-research": cls(gqa="group", forced_recent=1, extra_token=True),
            # graphcore-research/sparq-gpt-fast, sparq.py: per head, r = round(d/8),
            # k = round(S_max/16) (set allocated_len = S_max), K stored twice, float32 running mean.
            "sparq-gpt-fast": cls(rounding="round", transposed_keys=True, mean_value_bits=32),
        }
