"""Double Sparsity (Yang et al., arXiv 2408.07092): token sparsity steered by offline channel sparsity.

Offline, ``calibrate_channels`` ranks the channels of every head by a statistic over calibration
data. At a decode step query head ``h`` keeps its ``r`` top-ranked channels ``c``: the *label* of a
key is ``k[c]`` (a separate "label cache" in the GPU system), the query label ``q[c]``; the label score
``q[c] . k_j[c]`` ranks the tokens, and the ``token_budget`` best are attended exactly (core tie
rule). With all ``d`` channels the label score is ``q . k_j``: the exact top-k.

Conventions (fields of ``DoubleSparsity`` and arguments of ``calibrate_channels``):

* ``channels``: a channel ranking per head, ``[rows, d]`` (or longer than ``r`` at least), with
  ``rows`` = ``H_q`` (one ranking per query head: the ``q`` and ``qk`` statistics, computed after
  ``repeat_kv`` in the repo), ``H_kv`` (one per KV head: the ``k`` statistic, shared by the group) or 1.
  ``None`` is an *uncalibrated placeholder*: channels in index order.
* ``label_bits``: ``None`` keeps labels exact; ``b`` fake-quantizes them per token over the ``r``
  label channels (``fake_quantize_per_token``). ``quantize_query_label``: the accuracy path
  (``evaluation/modify_llama.py``) quantizes the query label too, Twilight's DS selector only the keys.
* The label score is unscaled (the repos divide by ``sqrt(d / group_factor)`` or ``sqrt(d)``: no
  effect on a top-k).
* ``token_budget >= n`` is dense attention (the top-n is everything anyway).
* Dense first layers: ``layer < dense_layers``; 0 by default (modify_llama.py at the commit we read
  and the gpt-fast GPU path exempt no layer).

Traffic (exact, one step): the selected K/V rows (``kv_traffic``, memory ``kv_memory``: ``"hbm"``,
or ``"pcie"`` for the offload path where the full KV lives in host memory), plus the label cache,
tensor ``"metadata"`` in HBM: all ``n`` labels of ``r`` elements of ``label_bits`` (or
``layout.element_bits`` when unquantized) plus, when quantized, a per-token scale and zero of
``label_scale_bits`` each. Labels are read once per KV head when the channel ranking is shared by the
group (``rows`` = ``H_kv`` or 1) and ``layout.share_kv_heads``; once per query head otherwise (with
per-query-head channels the label cache itself has ``H_q`` heads). A dense step reads no labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .quest import attend_selection
from .types import Layout, Selection, Traffic, kv_traffic

STATISTICS = ("q", "k", "qk")


def calibrate_channels(q_calib=None, k_calib=None, statistic: str = "qk", *,
                       last_tokens: int | None = None) -> np.ndarray:
    """Rank channels per head by mean importance over calibration tokens: ``[H, d]`` int64.

    ``q_calib`` ``[T, H_q, d]`` and ``k_calib`` ``[T, H_kv, d]`` are the calibration activations
    (``statistic="q"`` needs only ``q_calib``, ``"k"`` only ``k_calib``). Importance of channel ``c``:
    ``"q"``: mean_t |q_c|, per query head; ``"k"``: mean_t |k_c|, per KV head; ``"qk"``:
    mean_t |q_c k_c| with each token's own key ("every token attends to itself"), per query head
    (query head ``h`` pairs with KV head ``h // G``). Row ``h`` lists channels from most to least
    important; equal importance: the lower channel first (the core tie rule).

    ``last_tokens`` keeps only the last tokens: the repo's ``qk`` accumulator overwrites itself every
    512-token block, so its files hold the last block's statistic (``last_tokens=512``). The repo's
    ``q``/``k`` statistics hook the projections, i.e. pre-RoPE activations; ``qk`` is post-RoPE: pass
    the activations that match.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    q = None if q_calib is None else core.as_float64(q_calib, "q_calib", ndim=3)
    k = None if k_calib is None else core.as_float64(k_calib, "k_calib", ndim=3)
    if statistic in ("q", "qk") and q is None:
        raise ValueError(f"statistic {statistic!r} needs q_calib [T, H_q, d]")
    if statistic in ("k", "qk") and k is None:
        raise ValueError(f"statistic {statistic!r} needs k_calib [T, H_kv, d]")
    if q is not None and k is not None:
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            raise ValueError(f"q_calib {q.shape} and k_calib {k.shape} must agree on T (axis 0) and d (axis 2)")
        core.group_size(q.shape[1], k.shape[1])
    if last_tokens is not None:
        core.check_positive_int(last_tokens, "last_tokens")
        q = None if q is None else q[-last_tokens:]
        k = None if k is None else k[-last_tokens:]
    x = q if q is not None else k
    if x.shape[0] == 0:
        raise ValueError("calibration data must hold at least one token")
    if statistic == "q":
        importance = np.abs(q).mean(axis=0)
    elif statistic == "k":
        importance = np.abs(k).mean(axis=0)
    else:
        k_per_query = np.repeat(k, core.group_size(q.shape[1], k.shape[1]), axis=1)
        importance = np.abs(q * k_per_query).mean(axis=0)
    return core.topk_indices(importance, importance.shape[1]).astype(np.int64)


def interleaved_channels(channels, d: int) -> np.ndarray:
    """Map channel indices of the rotate-half RoPE layout to the interleaved layout: ``c -> 2c mod d + 2c // d``.

    The DS GPU path (gpt-fast, interleaved RoPE) remaps the HF-layout calibration files this way.
    """
    c = np.asarray(channels, dtype=np.int64)
    if d % 2:
        raise ValueError(f"d must be even for a RoPE channel layout, got {d}")
    if c.size and (c.min() < 0 or c.max() >= d):
        raise ValueError(f"channels must lie in [0, {d}), got values in [{c.min()}, {c.max()}]")
    return (2 * c) % d + (2 * c) // d


def fake_quantize_per_token(x, bits: int) -> np.ndarray:
    """Asymmetric min-max quantization over the last axis, returned dequantized (float64).

    ``levels = 2^bits - 1``, ``scale = (max - min) / levels``, ``x_hat = round((x - min) / scale) * scale
    + min`` with round-half-to-even (torch.round); a constant row (``max = min``) is returned
    unchanged (the repos guard the zero range with ``range := 1`` or ``scale >= 1e-9``: same result).
    """
    x = core.as_float64(x, "x")
    return _fake_quantize(x, core.check_positive_int(bits, "bits"))


def _fake_quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """``fake_quantize_per_token`` on validated float64 input."""
    levels = 2 ** bits - 1
    lo = x.min(axis=-1, keepdims=True)
    span = x.max(axis=-1, keepdims=True) - lo
    # a constant row gets scale 1 and code 0: it comes back as lo, i.e. unchanged; codes need no
    # clipping: x - lo >= 0 exactly and (x - lo) / scale <= levels up to one rounding
    scale = np.where(span > 0, span / levels, 1.0)
    codes = x - lo
    codes /= scale
    np.rint(codes, out=codes)
    codes *= scale
    codes += lo
    return codes


@register_method
@dataclass(frozen=True)
class DoubleSparsity(Method):
    """Double Sparsity decode step on the label cache; see the module docstring."""

    name: ClassVar[str] = "double_sparsity"
    family: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "offline top-r channels per head (label cache) rank tokens; exact attention on the top-k"

    channels: tuple | None = None
    r: int | None = None
    token_budget: int = 256
    label_bits: int | None = None
    quantize_query_label: bool = True
    label_scale_bits: int = 16
    kv_memory: str = "hbm"
    dense_layers: int = 0
    layer: int | None = None

    def __post_init__(self):
        if self.channels is not None:
            arr = np.asarray(self.channels)
            if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.size == 0:
                raise TypeError(f"channels must be a 2-D integer ranking [rows, d], got {arr.dtype} {arr.shape}")
            for i, row in enumerate(arr):
                if np.unique(row).size != row.size or row.min() < 0:
                    raise ValueError(f"channels[{i}] must hold distinct non-negative channel indices")
            object.__setattr__(self, "channels", tuple(tuple(int(c) for c in row) for row in arr))
        if self.r is not None:
            core.check_positive_int(self.r, "r")
        core.check_positive_int(self.token_budget, "token_budget")
        if self.label_bits is not None and self.label_bits not in (1, 2, 4, 8):
            raise ValueError(f"label_bits must be None or one of 1, 2, 4, 8, got {self.label_bits!r}")
        if not isinstance(self.quantize_query_label, bool):
            raise TypeError("quantize_query_label must be a bool")
        if self.label_scale_bits not in (8, 16, 32):
            raise ValueError(f"label_scale_bits must be 8, 16 or 32, got {self.label_scale_bits!r}")
        if self.kv_memory not in ("hbm", "pcie"):
            raise ValueError(f"kv_memory must be 'hbm' or 'pcie', got {self.kv_memory!r}")
        core.check_positive_int(self.dense_layers, "dense_layers", allow_zero=True)
        if self.layer is not None:
            core.check_positive_int(self.layer, "layer", allow_zero=True)

    # --- channels -----------------------------------------------------------------------------
    def rank(self, d: int) -> int:
        return min(d, self.r if self.r is not None else max(1, d // 8))

    def channels_per_query_head(self, h_q: int, h_kv: int, d: int) -> np.ndarray:
        """``[H_q, r]``: the label channels of every query head (rankings expanded to the group)."""
        r = self.rank(d)
        if self.channels is None:
            return np.tile(np.arange(r, dtype=np.int64), (h_q, 1))
        ranking = np.asarray(self.channels, dtype=np.int64)
        if ranking.shape[1] < r or ranking.max() >= d:
            raise ValueError(f"channels must rank at least r={r} channels of [0, {d}), got shape {ranking.shape} "
                             f"with max {ranking.max()}")
        rows = ranking.shape[0]
        if rows == 1:
            ranking = np.repeat(ranking, h_q, axis=0)
        elif rows == h_kv:
            ranking = np.repeat(ranking, core.group_size(h_q, h_kv), axis=0)
        elif rows != h_q:
            raise ValueError(f"channels must have 1, H_kv={h_kv} or H_q={h_q} rows, got {rows}")
        return ranking[:, :r]

    def shared_by_group(self, h_q: int, h_kv: int) -> bool:
        """True if the channel ranking (hence the label cache) is per KV head."""
        return self.channels is None or len(self.channels) in (1, h_kv)

    # --- the method ---------------------------------------------------------------------------
    def is_dense(self, n: int) -> bool:
        return (self.layer is not None and self.layer < self.dense_layers) or self.token_budget >= n

    def label_scores(self, q, k) -> np.ndarray:
        """``[H_q, n]`` unscaled label scores ``q[c] . k_j[c]`` (quantized labels if ``label_bits``)."""
        h_q, d = q.shape
        h_kv = k.shape[0]
        ch = np.sort(self.channels_per_query_head(h_q, h_kv, d), axis=1)   # the order within a label is immaterial
        kv = core.kv_head_of(h_q, h_kv)
        scores = np.empty((h_q, k.shape[1]))
        key_labels: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}  # one label cache per (KV head, channels)
        for h in range(h_q):
            cache_key = (int(kv[h]), tuple(ch[h]))
            if cache_key not in key_labels:
                k_lab = k[kv[h]][:, ch[h]]
                if self.label_bits is not None:
                    k_lab = _fake_quantize(k_lab, self.label_bits)
                key_labels[cache_key] = k_lab
            q_lab = q[h, ch[h]]
            if self.label_bits is not None and self.quantize_query_label:
                q_lab = _fake_quantize(q_lab, self.label_bits)
            # einsum sums every row the same way (BLAS gemv need not): identical keys get identical scores
            scores[h] = np.einsum("nc,c->n", key_labels[cache_key], q_lab)
        return scores

    def select(self, q, k, v, *, positions=None) -> Selection:
        n = k.shape[1]
        if self.is_dense(n):
            return Selection.full(q.shape[0], n)
        top = core.topk_indices(self.label_scores(q, k), self.token_budget)
        return Selection(tuple(np.sort(row) for row in top), n)

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return attend_selection(q, k, v, selection, scale=scale)

    # --- traffic ------------------------------------------------------------------------------
    def metadata_traffic(self, n: int, *, h_q: int, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the label-cache reads of one step (tensor ``metadata``, HBM)."""
        if self.is_dense(n):
            return Traffic({}, layout)
        r = self.rank(d)
        bits = self.label_bits or layout.element_bits
        if (r * bits) % 8:
            raise ValueError(f"a label of r={r} channels at {bits} bits is not a whole number of bytes")
        per_token = r * bits // 8 + (2 * self.label_scale_bits // 8 if self.label_bits else 0)
        readers = h_kv if (self.shared_by_group(h_q, h_kv) and layout.share_kv_heads) else h_q
        return Traffic({("hbm", "metadata"): n * per_token * readers}, layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        return kv_traffic(selection, h_kv, d, layout, memory=self.kv_memory) + self.metadata_traffic(
            selection.n, h_q=selection.h_q, h_kv=h_kv, d=d, layout=layout)

    @classmethod
    def presets(cls) -> dict[str, "DoubleSparsity"]:
        return {
            "canonical": cls(),
            # evaluation/modify_llama.py convert_kvcache_llama_heavy_recent defaults: heavy_const 256,
            # group_factor 8 (r = d/8), 4-bit labels of query and keys.
            "doublesparse-accuracy": cls(token_budget=256, label_bits=4, quantize_query_label=True),
            # models/model.py (gpt-fast): a label cache of 32 channels in model dtype, heavy_const 256.
            "doublesparse-gpu": cls(r=32, token_budget=256),
            # the paper's offload path: labels on the GPU, the selected K/V rows over PCIe.
            "doublesparse-offload": cls(r=32, token_budget=256, kv_memory="pcie"),
            # Twilight's DS selector (pyimpl/double_sparse.py, benchmark/configs/config_ds_twi.json):
            # r = 64 channels, 2-bit key labels only (the query label stays exact), budget 8192.
            "twilight-ds": cls(r=64, token_budget=8192, label_bits=2, quantize_query_label=False),
        }


CALIBRATION_PRESETS = {
    # which statistic each reference uses for its channel files
    "doublesparse-accuracy": dict(statistic="k"),   # convert_llama_channel_config default "k"
    "twilight-ds": dict(statistic="q"),              # benchmark/configs/config_ds_twi.json "selected_channel": "q"
    "doublesparse-qk-file": dict(statistic="qk", last_tokens=512),  # the qk accumulator keeps the last block
}
