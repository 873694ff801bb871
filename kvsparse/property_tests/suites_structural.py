"""Property suites (``suites.MethodSuite``) of the structural methods: Deja Vu heads, CLA, MLA, LoRC and
KV quantization. Their kernels are checked on the kernel-step contract like every stateless method
(``suites.check_step``: contract, selection, output under the FlashAttention rule); what that contract
cannot state, each suite's own ``check`` (``MethodSuite.check``, also used by ``kvsparse validate
--replay``) adds:

* **deja_vu**: the selection is a choice of *heads* (a kept head attends every token, a skipped one
  none and outputs 0), so the per-token top-k band of ``check_selection`` does not apply; the rule is
  ``head_choice`` (below). A predictor's mask (``head_mask``) must be followed exactly.
* **cla**: the step's ``k``/``v`` are already the producer's cache, so layer sharing is invisible in it;
  a kernel with ``decode_layers(method, q_layers, k_layers, v_layers, *, scale=None) -> out [L, H_q, d]``
  (or a tuple led by it) is also checked on ``L = max(layer + 1, sharing_factor + 1)`` layers derived
  from the step (``cla_layers``: every layer a different cache, values offset by the layer index), each
  layer against attention over its producer's cache (property ``layers``). Without it: noted, not checked.
* **mla**: the drawn input becomes the absorbed view of the drawn dimensions (``mla_view``: one latent
  head ``k = [c; k^R]`` of width ``latent_dim + rope_dim``, values ``[c; 0]``); with ``scale=None`` the
  kernel must use ``1/sqrt(nope_dim + rope_dim)`` (the tolerance is taken at that scale).
* **lorc**: the step is dense attention over the rebuilt cache; a kernel with
  ``decode_latent(method, q, latent_k, latent_v, b_k, b_v, positions, *, scale=None) -> out [H_q, d]``
  is also checked from the latents of the step's cache at the method's ranks (``lorc_latents``: the
  cache projected on its top ``key_rank`` / ``value_rank`` right singular vectors, RoPE at positions
  ``0..n-1`` with ``rope_base`` when d is even) against ``LoRC.decode`` (property ``latent``), under
  ``tolerances.derived_cache_tolerance`` (the naive computation rebuilds in the dtype).
* **kv_quant**: the base method (drawn from the registered suites of every stateless method KVQuant
  composes with, or dense) selects on the dequantized cache, so the selection is judged by the base's
  own rule (its score band, or Deja Vu's head rule) on that cache, and the output's tolerance is
  ``derived_cache_tolerance`` over it (the naive computation dequantizes ``code * scale + zero`` in the
  dtype). Scales: ``scale_dtype="float64"`` (exact scales) is a float64 kernel's convention; a kernel
  of a lower precision is compared with scales stored in float32 (``scale_dtype="float32"``, what the
  Numba kernel stores: its scales are in q's dtype), the drawn ``"float32"``/``"float16"`` as drawn.

Deja Vu's band. A kernel ranks heads by the norms of *its* outputs. The output property allows every
element of head ``h``'s output to differ from the oracle's by ``T_h``, the FlashAttention tolerance of
that head's dense attention in the dtype (``tolerances.attention_tolerance`` of head ``h`` alone, at
the default scale ``1/sqrt(d)`` the oracle predictor ranks with): twice the error of the naive
same-precision attention or its first-order float32 accumulation scale, plus one rounding. A row
within ``T_h`` of ``o_h`` element-wise has a 2-norm within ``sqrt(d) T_h`` of ``||o_h||``
(``| ||a|| - ||b|| | <= ||a - b||_2 <= sqrt(d) ||a - b||_inf``), and computing the norm in the dtype
(d squares summed, a square root) adds at most ``gamma_{d+2} ||o_h||`` (``gamma_j = j u / (1 - j u)``).
So ``band_h = sqrt(d) T_h + gamma_{d+2} ||o_h||``, and a kernel's kept heads ``K`` are accepted iff
``|K| = |O|`` and ``min_{h in K} (s_h + b_h) >= max_{j not in K} (s_j - b_j)`` with ``s`` the oracle's
norms: ``K`` is the exact top-``|O|`` of some norms within the band of the oracle's (any tie order).
Where the oracle's norms are further apart than that, a different choice fails ``selection``.
"""
from __future__ import annotations

import dataclasses
import math
import traceback

import numpy as np
from hypothesis import strategies as st

from .. import registry
from ..oracle import core
from ..oracle.types import Selection
from . import tolerances
from .strategies import DecodeInput, decode_inputs
from .suites import MethodSuite, PropertyResult, Verdict, check_selection, check_step, to_numpy

# --------------------------------------------------------------------------------------------
# deja_vu
# --------------------------------------------------------------------------------------------


def _deja_vu_methods(shapes):
    from ..oracle.deja_vu import DejaVu
    h = shapes.h_q
    return st.one_of(
        st.builds(DejaVu, head_ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1])),
        st.builds(DejaVu, head_budget=st.one_of(st.integers(0, h + 1), st.sampled_from([1, max(h - 1, 0), h]))),
        st.lists(st.booleans(), min_size=h, max_size=h).map(lambda m: DejaVu(head_mask=tuple(m))))


def head_norm_band(q, k, v, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(s, band)`` ``[H_q]``: the oracle predictor's head norms and the band of a ``dtype`` kernel's
    norms (module doc); ``q``, ``k``, ``v`` are the float64 (rounded) inputs the oracle ranks."""
    from ..oracle.deja_vu import head_output_norms
    h_q, d = q.shape
    kv = core.kv_head_of(h_q, k.shape[0])
    s = head_output_norms(q, k, v)
    t = np.array([tolerances.attention_tolerance(q[h:h + 1], k[kv[h]:kv[h] + 1], v[kv[h]:kv[h] + 1], dtype)
                  for h in range(h_q)])
    u = tolerances.dtype_eps(dtype)
    gamma = (d + 2) * u / (1 - (d + 2) * u)
    return s, math.sqrt(d) * t + gamma * s


def head_choice(kept: np.ndarray, s: np.ndarray, band: np.ndarray, size: int) -> tuple[bool, str]:
    """Are the heads ``kept`` (bool ``[H_q]``) the exact top-``size`` of some scores within ``band`` of ``s``?"""
    kept = np.asarray(kept, bool)
    if kept.sum() != size:
        return False, f"kept {int(kept.sum())} heads, expected {size}"
    if kept.all() or not kept.any():
        return True, ""
    i = np.flatnonzero(kept)[np.argmin((s + band)[kept])]
    j = np.flatnonzero(~kept)[np.argmax((s - band)[~kept])]
    if s[i] + band[i] >= s[j] - band[j]:
        return True, ""
    return False, (f"kept head {i} (norm {s[i]:.9g}, band {band[i]:.3e}) over head {j} (norm {s[j]:.9g}, "
                   f"band {band[j]:.3e}): the norms are further apart than the bands")


def deja_vu_selection(method, expected: Selection, got: Selection, q, k, v, dtype: str) -> PropertyResult:
    """Deja Vu's selection rule (module doc): all-or-nothing heads; the predictor's mask exactly; the
    oracle predictor's choice, or another one only within the band of a tie of the oracle's norms."""
    n = expected.n
    if got.n != n or got.h_q != expected.h_q:
        return PropertyResult("selection", False, f"shape: expected {expected.h_q} heads over n={n}, "
                                                  f"got {got.h_q} heads over n={got.n}")
    everything = np.arange(n)
    for h, ix in enumerate(got.indices):
        if ix.size and not np.array_equal(ix, everything):
            return PropertyResult("selection", False, f"head {h} attends {ix.size} of {n} tokens: a kept head "
                                                      f"attends every token, a skipped head none")
    want = np.array([ix.size > 0 for ix in expected.indices], bool)
    kept = np.array([ix.size > 0 for ix in got.indices], bool)
    if np.array_equal(want, kept):
        return PropertyResult("selection", True)
    diff = f"kept heads {np.flatnonzero(kept).tolist()}, the oracle {np.flatnonzero(want).tolist()}"
    if method.head_mask is not None:
        return PropertyResult("selection", False, f"{diff}: the predictor's head_mask must be followed exactly")
    s, band = head_norm_band(q, k, v, dtype)
    if not head_choice(want, s, np.zeros_like(s), int(want.sum()))[0]:
        return PropertyResult("selection", False, f"{diff}, and the oracle's own choice is not the top of its "
                                                  f"norms (a bug in the suite's band)")
    ok, why = head_choice(kept, s, band, int(want.sum()))
    if not ok:
        return PropertyResult("selection", False, f"{diff}; not a top choice within the band: {why}")
    return PropertyResult("selection", True, f"{diff}: within the band of a tie")


def _method_of(method, name: str):
    """``method`` if it is ``name``'s oracle, else ``TypeError`` naming it (a suite's check takes its own method)."""
    cls = type(registry.oracle(name))
    if not isinstance(method, cls):
        raise TypeError(f"method must be a {cls.__name__} instance (the {name!r} suite), got {type(method).__name__}")
    return method


def _deja_vu_check(method, kernel, inp, *, dtype="float32", scale=None, scores=None) -> Verdict:
    _method_of(method, "deja_vu")
    return check_step(method, kernel, inp, dtype=dtype, scale=scale, scores=scores, selection_rule=deja_vu_selection)


# a choice of heads needs heads: groups of 4 are what hypothesis shrinks towards (first of sampled_from)
registry.register_suite("deja_vu")(MethodSuite(
    "deja_vu", _deja_vu_methods,
    inputs=decode_inputs(max_n=100, h_kv=st.integers(1, 3), group=st.sampled_from([4, 1, 2, 3]),
                         head_dims=(1, 2, 4, 8, 16, 32)),
    check=_deja_vu_check))


# --------------------------------------------------------------------------------------------
# cla
# --------------------------------------------------------------------------------------------


def _cla_methods(shapes):
    from ..oracle.cla import CLA, CONSUMER_READS
    return st.builds(CLA, sharing_factor=st.integers(1, 4), layer=st.integers(0, 5),
                     consumer_reads=st.sampled_from(CONSUMER_READS))


def cla_layers(method, q, k, v, dtype: str):
    """``(q_layers [L, H_q, d], k_layers, v_layers [L, H_kv, n, d])`` rounded to ``dtype``, derived from
    one step: ``L = max(layer + 1, sharing_factor + 1)`` (a whole group and the next producer); layer
    ``l`` has queries ``q (1 + l/8)``, keys ``k (1 + l/4)`` and values ``v + l``, so reading another
    layer's cache moves the output by at least 1 in every channel (its values) and its logits (its keys)."""
    n_layers = max(method.layer + 1, method.sharing_factor + 1)
    ls = np.arange(n_layers, dtype=np.float64)
    return (tolerances.round_to(q[None] * (1 + ls[:, None, None] / 8), dtype),
            tolerances.round_to(k[None] * (1 + ls[:, None, None, None] / 4), dtype),
            tolerances.round_to(v[None] + ls[:, None, None, None], dtype))


def _raised(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _first(ret):
    return to_numpy(ret[0] if isinstance(ret, tuple) else ret)


def check_cla_layers(method, kernel, q, k, v, dtype: str, scale=None) -> PropertyResult:
    """Property ``layers``: ``kernel.decode_layers`` on ``cla_layers`` against ``oracle.cla.decode_layers``."""
    from ..oracle.cla import decode_layers
    fn = getattr(kernel, "decode_layers", None)
    if fn is None:
        return PropertyResult("layers", True,
                              "not checked: the kernel has no decode_layers (the multi-layer contract)")
    ql, kl, vl = cla_layers(method, q, k, v, dtype)
    np_dtype = tolerances.numpy_dtype(dtype)
    try:
        ret = fn(method, ql.astype(np_dtype), kl.astype(np_dtype), vl.astype(np_dtype), scale=scale)
        got = np.asarray(_first(ret), dtype=np.float64)
    except Exception as exc:    # a kernel's crash is a verdict, not a crash of the suite
        return PropertyResult("layers", False, f"decode_layers raised {_raised(exc)}")
    if got.shape != ql.shape or not np.isfinite(got).all():
        return PropertyResult("layers", False, f"decode_layers must return a finite [L={ql.shape[0]}, H_q, d] output "
                                               f"{ql.shape}, got shape {got.shape}")
    steps = decode_layers(method, ql, kl, vl, scale=scale)
    worst = None
    for layer, step in enumerate(steps):
        p = method.producer(layer)
        err = float(np.max(np.abs(got[layer] - step.output), initial=0.0))
        tol = tolerances.attention_tolerance(ql[layer], kl[p], vl[p], dtype, scale=scale)
        if err > tol:
            read = [j for j in range(len(steps)) if float(np.max(np.abs(got[layer] - core.attend_dense(
                ql[layer], kl[j], vl[j], scale=scale)), initial=0.0)) <= tol]
            seen = f"; it matches attention over layer {read[0]}'s cache" if read else ""
            return PropertyResult("layers", False, f"layer {layer} of {len(steps)} (sharing_factor "
                                  f"{method.sharing_factor}) must attend over producer layer {p}'s cache{seen}",
                                  err, tol)
        if worst is None or err / max(tol, 1e-300) > worst[0] / max(worst[1], 1e-300):
            worst = (err, tol)
    return PropertyResult("layers", True, f"{len(steps)} layers", *worst)


def _extended(verdict: Verdict, result: PropertyResult) -> Verdict:
    return dataclasses.replace(verdict, results=verdict.results + (result,))


def _rounded(inp, dtype):
    return (tolerances.round_to(x, dtype) for x in (inp.q, inp.k, inp.v))


def _step_then(name: str, extra):
    """A suite check: the plain step, then (if it passed) ``extra(method, kernel, q, k, v, dtype, scale)``
    on the inputs rounded to the dtype (CLA's layers, LoRC's latents)."""
    def check(method, kernel, inp, *, dtype="float32", scale=None, scores=None) -> Verdict:
        _method_of(method, name)
        verdict = check_step(method, kernel, inp, dtype=dtype, scale=scale, scores=scores)
        if not verdict.ok:
            return verdict
        return _extended(verdict, extra(method, kernel, *_rounded(inp, dtype), dtype, scale))
    return check


_cla_check = _step_then("cla", check_cla_layers)


registry.register_suite("cla")(MethodSuite(
    "cla", _cla_methods, inputs=decode_inputs(max_n=100, max_h_kv=3, max_group=3, head_dims=(1, 2, 4, 8, 16, 32)),
    check=_cla_check))


# --------------------------------------------------------------------------------------------
# mla
# --------------------------------------------------------------------------------------------

MLA_WIDTHS = (1, 2, 3, 6, 9, 16, 24, 40)
"""Widths ``latent_dim + rope_dim`` of the drawn views (tiny, odd, and past the 4x4 register tiles)."""


@st.composite
def _mla_methods(draw, shapes):
    from ..oracle.mla import FORMS, MLA
    d = shapes.d
    rope = draw(st.one_of(st.sampled_from(sorted({0, min(2, d - 1), d - 1})), st.integers(0, d - 1)))
    return MLA(heads=shapes.h_q, latent_dim=d - rope, rope_dim=rope, nope_dim=draw(st.sampled_from([1, 7, 16, 128])),
               v_dim=draw(st.sampled_from([1, 8, 128])), form=draw(st.sampled_from(FORMS)))


def widened(x, width: int) -> np.ndarray:
    """``x [..., d]`` with its channels repeated cyclically to ``width`` (``x`` itself when ``d == width``)."""
    x = np.asarray(x, np.float64)
    return x if x.shape[-1] == width else x[..., np.arange(width) % x.shape[-1]]


def mla_view(method, inp: DecodeInput) -> DecodeInput:
    """The absorbed view ``q [H, r + d_R]``, ``k = [c; k^R] [1, n, r + d_R]``, ``v = [c; 0]`` of a drawn
    input for ``method``'s dimensions: its first KV head, channels repeated cyclically to the width
    ``r + d_R`` (unchanged when the input already has it: a saved view replays as itself)."""
    r, w = method.latent_dim, method.latent_dim + method.rope_dim
    q, k = widened(inp.q, w), widened(np.asarray(inp.k)[:1], w)
    v = np.concatenate([k[..., :r], np.zeros_like(k[..., r:])], axis=-1)
    return DecodeInput(q, k, v, inp.family, inp.seed)


def _mla_check(method, kernel, inp, *, dtype="float32", scale=None, scores=None) -> Verdict:
    _method_of(method, "mla")
    return check_step(method, kernel, mla_view(method, inp), dtype=dtype, scale=scale, scores=scores)


registry.register_suite("mla")(MethodSuite(
    "mla", _mla_methods, inputs=decode_inputs(h_kv=1, max_group=9, max_n=150, head_dims=MLA_WIDTHS),
    check=_mla_check))


# --------------------------------------------------------------------------------------------
# lorc
# --------------------------------------------------------------------------------------------


@st.composite
def _lorc_methods(draw, shapes):
    from ..oracle.lorc import LoRC
    full = shapes.h_kv * shapes.d
    base = draw(st.sampled_from([10000.0, 100.0, 1e6]))
    if draw(st.booleans()):
        ratio = st.sampled_from([0.1, 0.25, 0.5, 1])
        return LoRC(key_ratio=draw(ratio), value_ratio=draw(ratio), rope_base=base)
    rank = st.one_of(st.integers(1, full), st.sampled_from([1, max(full - 1, 1), full]))
    return LoRC(key_rank=draw(rank), value_rank=draw(rank), rope_base=base)


def lorc_latents(method, k, v, dtype: str) -> dict:
    """The latent cache of the step's ``k``/``v`` at ``method``'s ranks, rounded to ``dtype``: each
    ``[n, H_kv d]`` cache matrix ``M`` projected on its top ``r`` right singular vectors,
    ``latent = M B^T [n, r]``, ``b = B [r, H_kv d]`` (the best rank-``r`` rebuild ``latent @ b``);
    ``positions = 0..n-1`` when d is even (RoPE rotates channel pairs), else None; the oracle's
    ``LowRankKV`` factors and hidden states (identity down-projections: ``x A`` is the latent exactly)."""
    from ..oracle.lorc import LowRankKV
    h_kv, n, d = k.shape
    full = h_kv * d
    rk, rv = method.ranks(full)

    def factor(x, r):
        m = x.transpose(1, 0, 2).reshape(n, full)
        b = np.linalg.svd(m, full_matrices=True)[2][:r] if n else np.eye(full)[:r]
        return tolerances.round_to(m @ b.T, dtype), tolerances.round_to(b, dtype)

    lat_k, b_k = factor(k, rk)
    lat_v, b_v = factor(v, rv)
    factors = LowRankKV(np.vstack([np.eye(rk), np.zeros((rv, rk))]), b_k, np.vstack([np.zeros((rk, rv)), np.eye(rv)]),
                        b_v, h_kv)
    return dict(lat_k=lat_k, lat_v=lat_v, b_k=b_k, b_v=b_v, positions=np.arange(n) if d % 2 == 0 else None,
                factors=factors, x=np.concatenate([lat_k, lat_v], axis=1), h_kv=h_kv)


def _naive_rebuild(lat, b, h_kv, dtype, positions=None, rope_base=10000.0):
    """The cache rebuilt naively in ``dtype``: the matmul accumulated in float32 (float64 for float64) and
    rounded to the dtype, then RoPE applied to it and rounded."""
    acc = np.float64 if dtype == "float64" else np.float32
    n = lat.shape[0]
    x = tolerances.round_to(lat.astype(acc) @ b.astype(acc), dtype).reshape(n, h_kv, -1).transpose(1, 0, 2)
    if positions is not None:
        x = tolerances.round_to(core.rope_apply(x, positions, base=rope_base), dtype)
    return x


def check_lorc_latent(method, kernel, q, k, v, dtype: str, scale=None) -> PropertyResult:
    """Property ``latent``: ``kernel.decode_latent`` from ``lorc_latents`` against ``LoRC.decode``."""
    fn = getattr(kernel, "decode_latent", None)
    if fn is None:
        return PropertyResult("latent", True, "not checked: the kernel has no decode_latent (the latent contract)")
    c = lorc_latents(method, k, v, dtype)
    np_dtype = tolerances.numpy_dtype(dtype)
    args = [c[name].astype(np_dtype) for name in ("lat_k", "lat_v", "b_k", "b_v")]
    try:
        got = np.asarray(_first(fn(method, q.astype(np_dtype), *args, c["positions"], scale=scale)), dtype=np.float64)
    except Exception as exc:    # a kernel's crash is a verdict, not a crash of the suite
        return PropertyResult("latent", False, f"decode_latent raised {_raised(exc)}")
    if got.shape != q.shape or not np.isfinite(got).all():
        return PropertyResult("latent", False, f"decode_latent must return a finite [H_q, d] output {q.shape}, "
                                               f"got shape {got.shape}")
    ref = method.decode(c["factors"], q, c["x"], c["positions"], scale=scale).output
    k_hat, v_hat = c["factors"].rebuild(c["x"], c["positions"], rope_base=method.rope_base)
    k_naive = _naive_rebuild(c["lat_k"], c["b_k"], c["h_kv"], dtype, c["positions"], method.rope_base)
    v_naive = _naive_rebuild(c["lat_v"], c["b_v"], c["h_kv"], dtype)
    tol = tolerances.derived_cache_tolerance(q, k_hat, v_hat, k_naive, v_naive, dtype, scale=scale)
    err = float(np.max(np.abs(got - ref), initial=0.0))
    ranks = f"key_rank {c['lat_k'].shape[1]}, value_rank {c['lat_v'].shape[1]}, rope_base {method.rope_base:g}"
    if err <= tol:
        return PropertyResult("latent", True, ranks, err, tol)
    return PropertyResult("latent", False, f"decode from the latents ({ranks}, positions "
                                           f"{'0..n-1' if c['positions'] is not None else 'none (odd d)'})", err, tol)


_lorc_check = _step_then("lorc", check_lorc_latent)


registry.register_suite("lorc")(MethodSuite(
    "lorc", _lorc_methods, inputs=decode_inputs(max_n=80, max_h_kv=3, max_group=3, head_dims=(1, 2, 4, 8, 16)),
    check=_lorc_check))


# --------------------------------------------------------------------------------------------
# kv_quant
# --------------------------------------------------------------------------------------------

SELECTION_RULES = {"deja_vu": deja_vu_selection}
"""Methods whose selection is not judged per token (``check_selection``): their rule, also applied to
them as a quantized cache's base."""


def quant_bases() -> list[str]:
    """Every stateless method with a registered suite that ``KVQuant`` composes with (dense: ``base=None``)."""
    from ..oracle.kv_quant import composition_refusal
    return [name for name, e in registry.entries().items()
            if isinstance(e.suite, MethodSuite) and e.oracle is not None and name != "dense"
            and composition_refusal(name, e.oracle.stateful, {}) is None]


@st.composite
def _kv_quant_methods(draw, shapes):
    from ..oracle.kv_quant import BITS, SCALE_DTYPES, KVQuant, composition_refusal
    base = None
    if draw(st.integers(0, 3)):      # a base three times in four
        name = draw(st.sampled_from(quant_bases()))
        base = draw(registry.get(name).suite.methods(shapes).filter(
            lambda m: composition_refusal(m.name, m.stateful, vars(m)) is None))
    bits = st.sampled_from([b for b in BITS if (shapes.d * b) % 8 == 0])    # whole bytes per packed row
    group = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 32]))
    rule = draw(st.sampled_from(["window", "kivi"]))
    residual = draw(st.integers(0, 12))
    if rule == "kivi":               # KIVI flushes in blocks of R: R > 0, a multiple of the group
        residual = max(1, group) * max(1, residual // 4)
    axes = st.sampled_from(["token", "channel"])
    return KVQuant(base=base, key_bits=draw(bits), value_bits=draw(bits), key_axis=draw(axes), value_axis=draw(axes),
                   group_size=group, residual=residual, residual_rule=rule,
                   scale_bits=draw(st.sampled_from([16, 32])), scale_dtype=draw(st.sampled_from(SCALE_DTYPES)))


def stored_scales(method, dtype: str):
    """``method`` with the scales a ``dtype`` kernel stores (module doc): exact (float64) scales only in float64."""
    if dtype != "float64" and method.scale_dtype == "float64":
        return dataclasses.replace(method, scale_dtype="float32")
    return method


def dequantized_cache(method, k, v, dtype: str):
    """``(k_hat, v_hat, k_naive, v_naive)``: the oracle's dequantized cache (float64) and the same
    dequantized naively in ``dtype`` (``code * scale + zero``, each operation rounded to the dtype; the
    full-precision residual rounded)."""
    cache = method.quantize_cache(k, v)
    np_dtype = tolerances.numpy_dtype(dtype)

    def naive(quant, full):
        with np.errstate(over="ignore", invalid="ignore"):
            x = (quant.codes.astype(np_dtype) * quant.expand(quant.scale).astype(np_dtype)
                 + quant.expand(quant.zero).astype(np_dtype))
        return np.concatenate([x.astype(np.float64), tolerances.round_to(full, dtype)], axis=1)
    return (*cache.dequantize(), naive(cache.keys, cache.k_full), naive(cache.values, cache.v_full))


def kv_quant_selection(method, expected: Selection, got: Selection, q, k, v, dtype: str) -> PropertyResult:
    """The base's rule on the dequantized cache: its score band (``suites`` of the base), Deja Vu's head
    rule, or an exact match (dense and bases without scores)."""
    base = method.base
    if base is None:
        return check_selection(expected, got)
    k_hat, v_hat = method.dequantized(k, v)
    if base.name in SELECTION_RULES:
        return SELECTION_RULES[base.name](base, expected, got, q, k_hat, v_hat, dtype)
    scores = getattr(registry.get(base.name).suite, "scores", None)
    return check_selection(expected, got, None if scores is None else scores(base, q, k_hat, v_hat, dtype))


def packable(method, inp: DecodeInput) -> DecodeInput:
    """``inp`` with its channels repeated cyclically to the smallest ``d' >= d`` whose packed rows are
    whole bytes at the method's key and value bits (``d' * bits % 8 == 0``; a packed cache cannot
    hold another d). The drawn methods pick bits that fit, so this widens only inputs of a fixed method."""
    d = inp.q.shape[1]
    step = max(8 // math.gcd(8, b) for b in (method.key_bits, method.value_bits))
    width = -(-d // step) * step
    if width == d:
        return inp
    return DecodeInput(widened(inp.q, width), widened(inp.k, width), widened(inp.v, width), inp.family, inp.seed)


def _kv_quant_check(method, kernel, inp, *, dtype="float32", scale=None, scores=None) -> Verdict:
    _method_of(method, "kv_quant")
    return check_step(stored_scales(method, dtype), kernel, packable(method, inp), dtype=dtype, scale=scale,
                      selection_rule=kv_quant_selection, cache=dequantized_cache)


registry.register_suite("kv_quant")(MethodSuite(
    "kv_quant", _kv_quant_methods,
    inputs=decode_inputs(max_n=80, max_h_kv=3, max_group=3, head_dims=(1, 2, 4, 8, 16, 32)),
    check=_kv_quant_check))
