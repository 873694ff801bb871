"""Multi-head latent attention (MLA, DeepSeek-V2 §2.1): one latent vector per token plus one shared,
decoupled RoPE key; keys and values are up-projections of the latent.

Shapes and names (DeepSeek-V2's config names in brackets; DeepSeek-V2-Lite values):

* ``heads`` H [num_attention_heads] = 16
* ``latent_dim`` r [kv_lora_rank] = 512: the cached latent ``c_t`` (after ``kv_a_layernorm``)
* ``rope_dim`` d_R [qk_rope_head_dim] = 64: the cached RoPE key ``k^R_t``, one per token, shared by
  every head, already rotated at the token's position
* ``nope_dim`` d_N [qk_nope_head_dim] = 128 and ``v_dim`` d_V [v_head_dim] = 128
* up-projections ``w_uk [H, d_N, r]`` and ``w_uv [H, d_V, r]`` (``kv_b_proj`` split per head):
  ``k^C_{h,t} = w_uk[h] c_t``, ``v_{h,t} = w_uv[h] c_t``
* a decode query per head: ``q^C_h [d_N]`` and ``q^R_h [d_R]`` (already rotated)
* ``scale`` = ``1 / sqrt(d_N + d_R)`` by default (DeepSeek's ``softmax_scale = q_head_dim ** -0.5``;
  YaRN's mscale correction, where used, is a different explicit ``scale``)

Naive decode (HF's ``DeepseekV2Attention``): expand ``k_{h,t} = [w_uk[h] c_t ; k^R_t]`` and
``v_{h,t} = w_uv[h] c_t`` for every head and token, then ``o_h = softmax(q_h . k_h * scale) v_h``.

Absorbed decode (vLLM / SGLang): fold ``w_uk`` into the query, ``q^L_h = w_uk[h]^T q^C_h [r]``, attend
with the MQA-like single KV head ``[c_t ; k^R_t]`` (``r + d_R`` wide) whose values are its first ``r``
channels, ``o^L_h = sum_t p_{h,t} c_t``, and fold ``w_uv`` into the output, ``o_h = w_uv[h] o^L_h``.
Both are the same arithmetic re-associated, so they agree to float64 rounding.

Method view (``MLA.step`` on the generic decode shapes, the absorbed form): ``q = [q^L ; q^R]``
``[H, r + d_R]``, ``k = [c ; k^R]`` ``[1, n, r + d_R]`` and ``v = [c ; 0]`` (``absorbed_view`` builds
them); the output's first ``r`` channels are ``o^L``. Every token is attended (MLA changes the cache,
not the selection).

Traffic (exact bytes of one decode step of one layer, HBM):

* ``form="absorbed"``: ``keys = n * (r + d_R) * bits / 8`` for the latent rows; ``values = 0`` (the
  values are the latent rows already read as keys: no factor 2). In the generic view:
  ``kv_traffic`` over the selection with keys only, ``d = r + d_R``.
* ``form="naive"`` (a cache of expanded per-head keys and values, as HF caches them):
  ``keys = n * H * (d_N + d_R) * bits / 8``, ``values = n * H * d_V * bits / 8``.
Up-projection weights are model weights, not KV traffic: they are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

FORMS = ("absorbed", "naive")


@dataclass(frozen=True)
class MLAWeights:
    """The key and value up-projections of one layer: ``w_uk [H, d_N, r]``, ``w_uv [H, d_V, r]``."""

    w_uk: np.ndarray
    w_uv: np.ndarray

    def __post_init__(self):
        w_uk = core.as_float64(self.w_uk, "w_uk", ndim=3)
        w_uv = core.as_float64(self.w_uv, "w_uv", ndim=3)
        if w_uk.shape[0] != w_uv.shape[0] or w_uk.shape[2] != w_uv.shape[2]:
            raise ValueError(f"w_uk [H, d_N, r] {w_uk.shape} and w_uv [H, d_V, r] {w_uv.shape} must agree on H and r")
        object.__setattr__(self, "w_uk", w_uk)
        object.__setattr__(self, "w_uv", w_uv)

    @property
    def heads(self) -> int:
        return self.w_uk.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.w_uk.shape[2]


def random_weights(rng: np.random.Generator, heads: int, latent_dim: int, nope_dim: int, v_dim: int) -> MLAWeights:
    """Gaussian up-projections scaled by ``1/sqrt(r)`` (keys and values of unit size for unit latents)."""
    s = 1.0 / math.sqrt(latent_dim)
    return MLAWeights(rng.standard_normal((heads, nope_dim, latent_dim)) * s,
                      rng.standard_normal((heads, v_dim, latent_dim)) * s)


def check_mla_inputs(weights: MLAWeights, q_nope, q_rope, latent, k_rope):
    if not isinstance(weights, MLAWeights):
        raise TypeError(f"weights must be MLAWeights, got {type(weights).__name__}")
    q_nope = core.as_float64(q_nope, "q_nope", ndim=2)
    q_rope = core.as_float64(q_rope, "q_rope", ndim=2)
    latent = core.as_float64(latent, "latent", ndim=2)
    k_rope = core.as_float64(k_rope, "k_rope", ndim=2)
    h, d_n, r = weights.w_uk.shape
    if q_nope.shape != (h, d_n):
        raise ValueError(f"q_nope must be [H, d_N] = {(h, d_n)}, got {q_nope.shape}")
    if q_rope.shape[0] != h:
        raise ValueError(f"q_rope must be [H={h}, d_R], got {q_rope.shape}")
    if latent.shape[1] != r:
        raise ValueError(f"latent must be [n, r={r}], got {latent.shape}")
    if k_rope.shape != (latent.shape[0], q_rope.shape[1]):
        raise ValueError(f"k_rope must be [n, d_R] = {(latent.shape[0], q_rope.shape[1])}, got {k_rope.shape}")
    return q_nope, q_rope, latent, k_rope


def default_mla_scale(nope_dim: int, rope_dim: int) -> float:
    return 1.0 / math.sqrt(nope_dim + rope_dim)


def naive_keys_values(weights: MLAWeights, latent, k_rope) -> tuple[np.ndarray, np.ndarray]:
    """The expanded per-head cache: keys ``[H, n, d_N + d_R]`` and values ``[H, n, d_V]``."""
    k_nope = np.einsum("hdr,nr->hnd", weights.w_uk, latent)
    k_shared = np.broadcast_to(k_rope, (weights.heads,) + k_rope.shape)
    return np.concatenate([k_nope, k_shared], axis=-1), np.einsum("hdr,nr->hnd", weights.w_uv, latent)


def decode_naive(weights: MLAWeights, q_nope, q_rope, latent, k_rope, *, scale: float | None = None) -> core.Partial:
    """Naive MLA decode: up-project K and V for every head, then attend. Output ``[H, d_V]``."""
    q_nope, q_rope, latent, k_rope = check_mla_inputs(weights, q_nope, q_rope, latent, k_rope)
    core.check_scale(scale)
    s_scale = default_mla_scale(q_nope.shape[1], q_rope.shape[1]) if scale is None else scale
    k, v = naive_keys_values(weights, latent, k_rope)
    s = core.logits(np.concatenate([q_nope, q_rope], axis=-1), k, s_scale)
    return core.Partial(np.einsum("hn,hnd->hd", core.softmax(s), v), core.log_sum_exp(s))


def absorb_query(weights: MLAWeights, q_nope) -> np.ndarray:
    """``q^L_h = w_uk[h]^T q^C_h``: ``[H, r]``."""
    return np.einsum("hdr,hd->hr", weights.w_uk, q_nope)


def absorbed_view(weights: MLAWeights, q_nope, q_rope, latent, k_rope):
    """The generic decode inputs of the absorbed form: ``q [H, r+d_R]``, ``k = [c; k^R] [1, n, r+d_R]``,
    ``v = [c; 0] [1, n, r+d_R]``."""
    q_nope, q_rope, latent, k_rope = check_mla_inputs(weights, q_nope, q_rope, latent, k_rope)
    q = np.concatenate([absorb_query(weights, q_nope), q_rope], axis=-1)
    k = np.concatenate([latent, k_rope], axis=-1)[None]
    v = np.concatenate([latent, np.zeros_like(k_rope)], axis=-1)[None]
    return q, k, v


def decode_absorbed_latent(weights: MLAWeights, q_nope, q_rope, latent, k_rope, *,
                           scale: float | None = None) -> core.Partial:
    """Absorbed MLA attention in latent space: ``o^L [H, r]`` and its log-sum-exp."""
    q, k, _ = absorbed_view(weights, q_nope, q_rope, latent, k_rope)
    core.check_scale(scale)
    r = weights.latent_dim
    s_scale = default_mla_scale(weights.w_uk.shape[1], q.shape[1] - r) if scale is None else scale
    s = core.logits(q, k, s_scale)
    return core.Partial(core.softmax(s) @ k[0, :, :r], core.log_sum_exp(s))


def decode_absorbed(weights: MLAWeights, q_nope, q_rope, latent, k_rope, *, scale: float | None = None) -> core.Partial:
    """Absorbed MLA decode: attention over the latent cache, then ``o_h = w_uv[h] o^L_h``. Output ``[H, d_V]``."""
    part = decode_absorbed_latent(weights, q_nope, q_rope, latent, k_rope, scale=scale)
    return core.Partial(np.einsum("hdr,hr->hd", weights.w_uv, part.out), part.lse)


@register_method
@dataclass(frozen=True)
class MLA(Method):
    """MLA's cache and decode (see the module docstring). Hyper-parameters are the layer's dimensions."""

    name: ClassVar[str] = "mla"
    family: ClassVar[str] = "structural"
    summary: ClassVar[str] = "cache one latent + one shared RoPE key per token; absorbed or naive decode"

    heads: int = 16
    latent_dim: int = 512
    rope_dim: int = 64
    nope_dim: int = 128
    v_dim: int = 128
    form: str = "absorbed"

    def __post_init__(self):
        for f in ("heads", "latent_dim", "nope_dim", "v_dim"):
            core.check_positive_int(getattr(self, f), f)
        core.check_positive_int(self.rope_dim, "rope_dim", allow_zero=True)
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")

    @property
    def default_scale(self) -> float:
        return default_mla_scale(self.nope_dim, self.rope_dim)

    def cache_elements_per_token(self) -> tuple[int, int]:
        """``(key, value)`` elements stored per token of one layer in this form."""
        if self.form == "absorbed":
            return self.latent_dim + self.rope_dim, 0
        return self.heads * (self.nope_dim + self.rope_dim), self.heads * self.v_dim

    def cache_traffic(self, n: int, layout: Layout) -> Traffic:
        """Bytes a decode step over ``n`` tokens reads in this form (every token is attended)."""
        kel, vel = self.cache_elements_per_token()
        bits = layout.element_bits
        for el in (kel, vel):
            if (el * bits) % 8:
                raise ValueError(f"{el} elements at {bits} bits are not a whole number of bytes")
        return Traffic({("hbm", "keys"): n * kel * bits // 8, ("hbm", "values"): n * vel * bits // 8}, layout)

    def check_weights(self, weights: MLAWeights) -> None:
        if not isinstance(weights, MLAWeights):
            raise TypeError(f"weights must be MLAWeights, got {type(weights).__name__}")
        want = (self.heads, self.nope_dim, self.latent_dim), (self.heads, self.v_dim, self.latent_dim)
        if (weights.w_uk.shape, weights.w_uv.shape) != want:
            raise ValueError(f"weights must have w_uk {want[0]} and w_uv {want[1]}, got "
                             f"{weights.w_uk.shape} and {weights.w_uv.shape}")

    def decode(self, weights: MLAWeights, q_nope, q_rope, latent, k_rope, *, scale: float | None = None,
               layout: Layout = Layout()) -> StepResult:
        """One decode step from the latent cache ``latent [n, r]``, ``k_rope [n, d_R]``. Output ``[H, d_V]``."""
        self.check_weights(weights)
        if np.shape(q_rope)[-1] != self.rope_dim:
            raise ValueError(f"q_rope must have rope_dim={self.rope_dim} channels, got shape {np.shape(q_rope)}")
        s = self.default_scale if scale is None else scale
        run = decode_absorbed if self.form == "absorbed" else decode_naive
        out = run(weights, q_nope, q_rope, latent, k_rope, scale=s).out
        n = np.shape(latent)[0]
        return StepResult(Selection.full(self.heads, n), out, self.cache_traffic(n, layout))

    # --- the generic (absorbed) view ---------------------------------------------------------------
    def select(self, q, k, v, *, positions=None) -> Selection:
        return Selection.full(q.shape[0], k.shape[1])

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return core.attend_dense(q, k, v, scale=self.default_scale if scale is None else scale)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        if self.form == "naive":
            return self.cache_traffic(selection.n, layout)
        return kv_traffic(selection, h_kv, d, layout, tensors=("keys",))

    @classmethod
    def presets(cls) -> dict[str, "MLA"]:
        return {
            "canonical": cls(),                        # DeepSeek-V2-Lite, absorbed decode
            "deepseek-v2-lite-naive": cls(form="naive"),
            "deepseek-v2": cls(heads=128),             # DeepSeek-V2 / V3: 128 heads, same r, d_R, d_N, d_V
        }
