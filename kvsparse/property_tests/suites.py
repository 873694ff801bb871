"""Reusable property suites: "kernel K implements method M" (public API).

The kernel-step contract (what a kernel of a stateless method is):

    kernel(method, q, k, v, *, positions=None, scale=None) -> output | (output, indices) | (output, indices, weights)

``method`` is the oracle's Method instance (the kernel reads its hyper-parameters from its fields);
``q [H_q, d]``, ``k``/``v`` ``[H_kv, n, d]`` are NumPy arrays in the kernel's dtype; ``output`` is
``[H_q, d]``; ``indices`` is the tokens each *query head* attended, either a sequence of H_q 1-D
integer arrays or a ``[H_q, B]`` array (each row a set, any order); ``weights`` (estimators) aligned
with ``indices``. Returning only the output skips the selection property.

A kernel of a stateful method also has

    kernel.prefill(method, q_prompt, k_prompt, v_prompt, *, scale=None) -> state
    kernel.decode(method, state, q, k_new, v_new, *, scale=None) -> (state, step)

where ``step`` is as above and indices are original positions ``0..t`` (the oracle's convention).
``scale`` is the softmax scale of every logit of the sequence, the prompt's scores (H2O's and CORM's
accumulated attention, SnapKV's window vote) as well as each step's (``None``: ``1/sqrt(d)``);
``check_decode`` gives prefill and every decode step the same one, as the oracles require
(``oracle.method.decode_scale``). Backwards compatibility: ``scale`` is passed to ``prefill`` only
when it is not None, and never to a ``prefill`` whose signature has no ``scale`` parameter (nor
``**kwargs``): the contract before stateful methods took a scale. Such a kernel is called without it
(the verdict's input says so) and passes only if the method's prefill does not depend on the scale
(StreamingLLM, ClusterKV); an H2O, CORM or SnapKV kernel that cannot take it is caught.

Properties, each a function returning a ``PropertyResult``:

* ``contract``  the kernel ran and returned the documented shapes (finite output).
* ``selection`` the kernel's set per query head equals the oracle's (tie rule: lower index wins), OR
  is a *valid top-k up to the rounding band*: with the oracle's per-token scores ``s`` (``+inf`` for
  tokens the method always keeps, ``-inf`` for tokens it can never keep) and a band ``b >= 0`` (how
  far the kernel's precision may move a score), the kernel's set ``K`` is accepted iff
  ``|K| = |O|`` (``O`` the oracle's set), every token of ``K`` has ``s > -inf``, and
  ``min_{i in K} s_i >= max_{j not in K} s_j - 2 b``. Equivalently: ``K`` is the exact top-``|O|`` of
  some scores ``s'`` with ``|s' - s| <= b`` everywhere (any tie order). Methods without a score
  function must match exactly.
* ``output``    within the FlashAttention rule (``tolerances.attention_tolerance``) of the oracle's
  ``attend`` over the *kernel's* selection (so an accepted tie difference is not double-counted),
  both on the inputs rounded to the kernel's dtype. The tolerance is taken at the scale the oracle
  attends with (``scale``, else the method's own ``default_scale`` where it has one: MLA's
  ``1/sqrt(d_N + d_R)``; else ``1/sqrt(d)``) and over the cache the method attends (``cache``: KV
  quantization's dequantized rows, ``tolerances.derived_cache_tolerance``).

Methods whose properties the per-token rules above cannot state (the structural methods,
``suites_structural.py``) give their suite a ``check`` of their own, used in place of ``check_step``
with the same arguments; it calls ``check_step`` with a ``selection_rule`` (Deja Vu's choice of heads:
``selection_rule(method, expected, got, q, k, v, dtype) -> PropertyResult`` replaces
``check_selection``) or a ``cache`` (``cache(method, k, v, dtype) -> (k, v, k_naive, v_naive)``), and
may add properties of an extended contract (CLA's layers, LoRC's latents).

``check_step`` / ``check_decode`` return a ``Verdict``; ``run_suite`` draws inputs with hypothesis
(shrinking to a minimal failing input) and returns a ``SuiteReport``. A ``MethodSuite`` (registered
per method with ``@register_suite``) bundles the strategies for a method's hyper-parameters and its
score function; calling it runs ``run_suite``.

Where the inputs come from (``run_suite(..., inputs=)``, ``suite_inputs``; ``INPUT_SOURCES``):
``"strategies"`` (default) the suite's own hypothesis strategies; ``"trace"`` an attention trace (the
shipped SmolLM2-135M trace unless ``trace=`` names another): a decode step of one of its layers for a
stateless method, a prefix of a layer's Q/K/V as a decode sequence for a stateful one;
``"synthetic"`` the seeded synthetic traces (``traces.synthetic`` presets); ``"mixed"`` any of these.
``max_n`` bounds the cache of a trace-drawn step (default ``TRACE_MAX_N``) or the length of a
trace-drawn sequence (default ``TRACE_MAX_T``); the suite's own strategies keep their bounds.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from hypothesis import given, seed as hypothesis_seed, settings as hyp_settings, strategies as st

from .. import registry
from ..oracle import core
from ..oracle.method import Method
from ..oracle.types import Selection, StepResult
from . import tolerances
from .sequences import DecodeSequence
from .strategies import DecodeInput, decode_inputs

# --------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PropertyResult:
    """One property on one input: which, whether it held, and what was expected vs got."""

    name: str                      # contract | selection | output
    ok: bool
    detail: str = ""
    error: float | None = None
    tolerance: float | None = None

    def __str__(self) -> str:
        num = "" if self.error is None else f" (error {self.error:.3e} vs tolerance {self.tolerance:.3e})"
        return f"[{'ok' if self.ok else 'FAIL'}] {self.name}{num}{': ' + self.detail if self.detail else ''}"


@dataclass(frozen=True)
class Verdict:
    """All properties checked on one input (and, for a decode, at one step)."""

    method: str
    input: str
    results: tuple[PropertyResult, ...]
    step: int | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> tuple[PropertyResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    def __str__(self) -> str:
        where = f" at decode step {self.step}" if self.step is not None else ""
        lines = [f"{self.method} on {self.input}{where}: {'ok' if self.ok else 'FAILED'}"]
        return "\n".join(lines + [f"  {r}" for r in self.results])


@dataclass
class SuiteReport:
    method: str
    kernel: str
    dtype: str
    examples: int = 0
    failure: Verdict | None = None       # the (shrunk) failing verdict, if any
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __str__(self) -> str:
        head = f"{self.kernel} implements {self.method} ({self.dtype}): "
        if self.ok:
            return head + f"ok on {self.examples} examples" + "".join(f"\n  note: {n}" for n in self.notes)
        return head + f"FAILED after {self.examples} examples\n{self.failure}"


# --------------------------------------------------------------------------------------------
# the kernel's return value
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelStep:
    output: np.ndarray
    indices: tuple[np.ndarray, ...] | None = None
    weights: tuple[np.ndarray, ...] | None = None


def to_numpy(x) -> np.ndarray:
    """A kernel's returned array as NumPy; torch tensors are converted at the boundary.

    A tensor (recognised by its methods, so torch is never imported here) is detached from autograd,
    moved to the CPU, and widened to float32 when it is a 16-bit float (NumPy has no bfloat16;
    float16 -> float32 is exact); float32/float64/integer tensors keep their dtype.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        t = x.detach()
        if str(getattr(t, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return np.asarray(t.cpu().numpy())
    return np.asarray(x)


def as_kernel_step(ret, h_q: int) -> KernelStep:
    """Normalise what a kernel returned (see the module doc) or raise ``TypeError``/``ValueError``.

    NumPy arrays, sequences, or torch tensors (any dtype, device, ``requires_grad``: ``to_numpy``).
    """
    if isinstance(ret, KernelStep):
        return ret
    if isinstance(ret, tuple):
        if not 1 <= len(ret) <= 3:
            raise TypeError(f"a kernel returns output, (output, indices) or (output, indices, weights); got a {len(ret)}-tuple")
        out, ix, w = (tuple(ret) + (None, None))[:3]
    else:
        out, ix, w = ret, None, None
    out = to_numpy(out)
    rows = None
    if ix is not None:
        if len(ix) != h_q:
            raise ValueError(f"indices must hold one set per query head ({h_q}), got {len(ix)}")
        rows = tuple(to_numpy(r).ravel() for r in ix)
    wrows = None
    if w is not None:
        if rows is None or len(w) != h_q:
            raise ValueError("weights need indices and one array per query head")
        wrows = tuple(np.asarray(to_numpy(r), dtype=np.float64).ravel() for r in w)
    return KernelStep(out, rows, wrows)


def kernel_selection(step: KernelStep, n: int) -> Selection:
    """The kernel's indices as a Selection (sorted; weights carried along), or ``ValueError``."""
    rows, wrows = [], [] if step.weights is not None else None
    for h, r in enumerate(step.indices):
        if r.size and r.dtype.kind not in "iu":
            raise ValueError(f"indices[{h}] must be integers, got dtype {r.dtype}")
        order = np.argsort(r, kind="stable")
        rows.append(r[order].astype(np.int64))
        if wrows is not None:
            if step.weights[h].shape != r.shape:
                raise ValueError(f"weights[{h}] must align with indices[{h}] ({r.shape}), got {step.weights[h].shape}")
            wrows.append(step.weights[h][order])
    return Selection(tuple(rows), n, None if wrows is None else tuple(wrows))


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------


def valid_topk(kept: np.ndarray, scores: np.ndarray, size: int, band: float) -> tuple[bool, str]:
    """Is ``kept`` the exact top-``size`` of some scores within ``band`` of ``scores``? (module doc)"""
    kept = np.asarray(kept, dtype=np.int64)
    if kept.size != size:
        return False, f"kept {kept.size} tokens, expected {size}"
    if kept.size == 0:
        return True, ""
    s = np.asarray(scores, dtype=np.float64)
    inside = np.zeros(s.shape[0], bool)
    inside[kept] = True
    if (s[inside] == -np.inf).any():
        return False, f"kept tokens the method can never keep: {np.flatnonzero(inside & (s == -np.inf))[:5].tolist()}"
    lo = float(s[inside].min())
    hi = float(s[~inside].max()) if (~inside).any() else -np.inf
    if hi == -np.inf or lo == np.inf:
        return True, ""
    if hi == np.inf:
        return False, f"dropped a token the method always keeps: {np.flatnonzero(~inside & (s == np.inf))[:5].tolist()}"
    ok = lo >= hi - 2 * band
    return ok, "" if ok else f"lowest kept score {lo:.9g} < highest dropped score {hi:.9g} - 2*band ({band:.3e})"


def check_selection(expected: Selection, got: Selection, scores=None) -> PropertyResult:
    """``got`` equals ``expected``, or per head is a valid top-k of ``scores = (s [H_q, n], band [H_q])``."""
    if got.n != expected.n or got.h_q != expected.h_q:
        return PropertyResult("selection", False, f"shape: expected {expected.h_q} heads over n={expected.n}, "
                                                  f"got {got.h_q} heads over n={got.n}")
    notes = []
    for h, (o, kk) in enumerate(zip(expected.indices, got.indices)):
        if np.array_equal(o, kk):
            continue
        extra, missing = np.setdiff1d(kk, o)[:6].tolist(), np.setdiff1d(o, kk)[:6].tolist()
        diff = f"head {h}: expected {o.size} tokens, got {kk.size}; kernel added {extra}, dropped {missing}"
        if scores is None:
            return PropertyResult("selection", False, diff + " (exact match required: no score function)")
        s, band = scores
        ok, why = valid_topk(kk, s[h], o.size, float(band[h]))
        self_ok, _ = valid_topk(o, s[h], o.size, 0.0)
        if not self_ok:
            return PropertyResult("selection", False, diff + " and the suite's scores do not explain the "
                                  "oracle's own selection (a bug in the suite's score function)")
        if not ok:
            return PropertyResult("selection", False, f"{diff}; not a valid top-k within the band: {why}")
        notes.append(f"head {h} differs within the rounding band")
    if expected.weights is not None and got.weights is not None:
        for h, (a, b) in enumerate(zip(expected.weights, got.weights)):
            if a.shape == b.shape and np.array_equal(expected.indices[h], got.indices[h]) and \
                    not np.allclose(a, b, rtol=1e-6, atol=0):
                return PropertyResult("selection", False, f"head {h}: weights differ (max rel. diff "
                                      f"{np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)):.3e} > 1e-6)")
    return PropertyResult("selection", True, "; ".join(notes))


def attention_scale(method, scale):
    """The softmax scale ``method.attend`` uses: ``scale``, else the method's own ``default_scale``
    where it defines one (MLA: ``1/sqrt(d_N + d_R)``), else None (``1/sqrt(d)``)."""
    return scale if scale is not None else getattr(method, "default_scale", None)


def check_output(method: Method, got_output, q, k, v, selection: Selection, dtype: str, *,
                 scale=None, cache: Callable | None = None) -> PropertyResult:
    """Output vs ``method.attend`` over ``selection`` on the rounded inputs, under the FA tolerance rule.

    The tolerance is that of softmax attention over ``selection.mask()`` in ``dtype`` (weighted by the
    selection's weights where it has them), at ``attention_scale(method, scale)``. ``cache(method, k, v,
    dtype) -> (k_hat, v_hat, k_naive, v_naive)``: the method attends over a cache derived from k and v
    (KV quantization's dequantized rows); the tolerance is then
    ``tolerances.derived_cache_tolerance`` over it.
    """
    qr, kr, vr = (tolerances.round_to(x, dtype) for x in (q, k, v))
    try:
        ref = np.asarray(method.attend(qr, kr, vr, selection, scale=scale), dtype=np.float64)
    except ValueError as exc:
        # methods whose output depends on their own selection (SparQ's alpha) refuse another one:
        # reached only when the kernel's selection differs from the oracle's within the band
        return PropertyResult("output", True, f"not judged: the oracle's attend refuses the kernel's "
                                              f"(band-equivalent) selection ({exc})")
    got = np.asarray(got_output, dtype=np.float64)
    if got.shape != ref.shape:
        return PropertyResult("output", False, f"expected shape {ref.shape}, got {got.shape}")
    err = float(np.max(np.abs(got - ref), initial=0.0)) if np.isfinite(got).all() else math.inf
    weights = selection.dense_weights()
    mask = selection.mask() if weights is None else None
    tol_scale = attention_scale(method, scale)
    if cache is None:
        tol = tolerances.attention_tolerance(qr, kr, vr, dtype, mask=mask, scale=tol_scale, weights=weights)
    else:
        tol = tolerances.derived_cache_tolerance(qr, *cache(method, kr, vr, dtype), dtype, mask=mask,
                                                 scale=tol_scale, weights=weights)
    if err <= tol:
        return PropertyResult("output", True, "", err, tol)
    return PropertyResult("output", False, _worst_row(ref, got), err, tol)


def _worst_row(ref: np.ndarray, got: np.ndarray, width: int = 6) -> str:
    """The query head and channel of the largest error, and a few values of its expected and got rows."""
    if not ref.size:
        return ""
    h, c = np.unravel_index(np.argmax(np.abs(np.nan_to_num(got - ref, nan=np.inf))), ref.shape)
    d = ref.shape[1]
    lo = max(0, min(int(c) - width // 2, d - width))
    hi = min(d, lo + width)
    row = lambda x: ("[..., " if lo else "[") + ", ".join(f"{t:.6g}" for t in x[h, lo:hi]) + (", ...]" if hi < d else "]")
    span = f"channels {lo}..{hi - 1}" + (f" of {d}" if (lo, hi) != (0, d) else "")
    return (f"worst query head {h}, channel {c}: expected {ref[h, c]:.9g}, got {got[h, c]:.9g}; "
            f"{span}: expected {row(ref)}, got {row(got)}")


def _contract_failure(exc: BaseException) -> PropertyResult:
    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return PropertyResult("contract", False, f"kernel raised {tb}")


def check_step(method: Method, kernel: Callable, inp: DecodeInput, *, dtype: str = "float32",
               scale=None, scores: Callable | None = None, selection_rule: Callable | None = None,
               cache: Callable | None = None) -> Verdict:
    """All properties of one stateless decode step.

    The oracle runs in float64 on the inputs rounded to ``dtype``; the kernel gets the same values in
    ``dtype``. ``scores(method, q, k, v, dtype) -> (s [H_q, n], band [H_q])`` enables the band rule;
    ``selection_rule`` replaces ``check_selection`` and ``cache`` goes to ``check_output`` (module doc).
    """
    q, k, v = (tolerances.round_to(x, dtype) for x in (inp.q, inp.k, inp.v))
    q, k, v, _ = core.check_decode_inputs(q, k, v, scale=scale)
    # select + attend, not step: byte counting is not under test here (and has its own limits); a
    # select that takes the scale (vAttention's plan reads softmax statistics) gets it
    selection = method.select(q, k, v, scale=scale) if _takes_scale(type(method).select) else method.select(q, k, v)
    expected = StepResult(selection, method.attend(q, k, v, selection, scale=scale), None)
    np_dtype = tolerances.numpy_dtype(dtype)
    results = []
    label = repr(inp) + _scale_label(scale)
    try:
        step = as_kernel_step(kernel(method, q.astype(np_dtype), k.astype(np_dtype), v.astype(np_dtype),
                                     positions=None, scale=scale), q.shape[0])
    except Exception as exc:  # a kernel's crash is a verdict, not a crash of the suite
        return Verdict(repr(method), label, (_contract_failure(exc),))
    return Verdict(repr(method), label, tuple(_judge(method, step, expected, q, k, v, dtype, scale, scores,
                                                     selection_rule, cache)))


def _scale_label(scale) -> str:
    return "" if scale is None else f", scale={scale!r}"


def _judge(method, step, expected, q, k, v, dtype, scale, scores, selection_rule=None, cache=None):
    h_q, d = q.shape
    if step.output.shape != (h_q, d) or not np.isfinite(np.asarray(step.output, dtype=np.float64)).all():
        return [PropertyResult("contract", False, f"output must be finite [H_q={h_q}, d={d}], got shape "
                                                  f"{step.output.shape}")]
    results = [PropertyResult("contract", True)]
    selection = expected.selection
    if step.indices is None:
        results.append(PropertyResult("selection", True, "not reported by the kernel: output judged on the oracle's selection"))
    else:
        try:
            got_sel = kernel_selection(step, expected.selection.n)
        except ValueError as exc:
            return results + [PropertyResult("selection", False, f"invalid indices: {exc}")]
        if selection_rule is not None:
            sel = selection_rule(method, expected.selection, got_sel, q, k, v, dtype)
        else:
            sel = check_selection(expected.selection, got_sel,
                                  None if scores is None else scores(method, q, k, v, dtype))
        results.append(sel)
        if not sel.ok:
            return results
        if got_sel.weights is None and expected.selection.weights is not None:
            got_sel = Selection(got_sel.indices, got_sel.n, None)
            if got_sel != Selection(expected.selection.indices, expected.selection.n):
                return results + [PropertyResult("selection", False, "kernel reported no weights")]
            got_sel = expected.selection
        selection = got_sel
    results.append(check_output(method, step.output, q, k, v, selection, dtype, scale=scale, cache=cache))
    return results


def prefill_takes_scale(kernel) -> bool:
    """Whether ``kernel.prefill`` accepts ``scale=``: a ``scale`` parameter or ``**kwargs`` (True when its
    signature cannot be read). A prefill without one follows the contract before stateful methods took
    a scale (module doc)."""
    import inspect
    try:
        params = inspect.signature(kernel.prefill).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "scale" or p.kind is p.VAR_KEYWORD for p in params)


def check_decode(method, kernel, q_seq, k_seq, v_seq, *, prefill_len: int, dtype: str = "float32",
                 scale=None, scores: Callable | None = None, label: str = "") -> list[Verdict]:
    """Stateful methods, step by step: prefill both, then decode each later token with both.

    Returns one Verdict per decode step, stopping after the first failing one. A step whose
    selection differs within the band (accepted) is the last one checked: after it the two states
    legitimately differ. ``scores(method, oracle_state, q, k_new, v_new, dtype)`` gives the band scores
    (state BEFORE the step; the oracle state holds the softmax scale, ``state.scale``). ``scale`` goes
    to the oracle's and the kernel's prefill and every decode step, only when it is not None, and to
    the kernel's prefill only if it takes one (``prefill_takes_scale``; module doc).
    """
    from ..oracle.method import check_sequence
    q_seq, k_seq, v_seq = (tolerances.round_to(x, dtype) for x in check_sequence(q_seq, k_seq, v_seq))
    np_dtype = tolerances.numpy_dtype(dtype)
    core.check_scale(scale)
    kw = {} if scale is None else {"scale": scale}
    kernel_kw = kw if prefill_takes_scale(kernel) else {}
    label = (label or f"sequence T={q_seq.shape[0]}, H_q={q_seq.shape[1]}, H_kv={k_seq.shape[1]}, d={q_seq.shape[2]}, "
                      f"prefill {prefill_len}") + _scale_label(scale)
    if kw and not kernel_kw:
        label += " (the kernel's prefill takes no scale: called without it)"
    state = method.prefill(q_seq[:prefill_len], k_seq[:prefill_len], v_seq[:prefill_len], **kw)
    try:
        kstate = kernel.prefill(method, *(x[:prefill_len].astype(np_dtype) for x in (q_seq, k_seq, v_seq)),
                                **kernel_kw)
    except Exception as exc:
        return [Verdict(repr(method), label, (_contract_failure(exc),), step=None)]
    verdicts = []
    for t in range(prefill_len, q_seq.shape[0]):
        q, kn, vn = q_seq[t], k_seq[t], v_seq[t]
        band_scores = None if scores is None else scores(method, state, q, kn, vn, dtype)
        state, expected = method.decode(state, q, kn, vn, **kw)
        try:
            kstate, ret = kernel.decode(method, kstate, q.astype(np_dtype), kn.astype(np_dtype),
                                        vn.astype(np_dtype), scale=scale)
            step = as_kernel_step(ret, q.shape[0])
        except Exception as exc:
            verdicts.append(Verdict(repr(method), label, (_contract_failure(exc),), step=t))
            return verdicts
        kc = np.ascontiguousarray(k_seq[: t + 1].transpose(1, 0, 2))
        vc = np.ascontiguousarray(v_seq[: t + 1].transpose(1, 0, 2))
        results = _judge(method, step, expected, q, kc, vc, dtype, scale,
                         None if band_scores is None else (lambda *_: band_scores))
        verdicts.append(Verdict(repr(method), label, tuple(results), step=t))
        sel = next((r for r in results if r.name == "selection"), None)
        if not verdicts[-1].ok or (sel is not None and sel.detail.startswith("head")):
            return verdicts
    return verdicts


# --------------------------------------------------------------------------------------------
# score bands
# --------------------------------------------------------------------------------------------


def dot_band(q, rows, dtype: str, *, scale=1.0) -> np.ndarray:
    """Per query head, a bound on the rounding error of a ``dtype`` dot product ``scale * q . row``.

    ``rows [H_kv, m, d]``. The classical bound ``gamma_{d+2} * scale * sum_c |q_c||row_c|`` (``d``
    accumulations, the product and the scale's rounding; ``gamma_j = j u / (1 - j u)``), maximised
    over the rows of the head's KV group. Any summation order is covered. ``scale`` may be per head.
    """
    q = np.asarray(q, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    h_q, d = q.shape
    u = tolerances.dtype_eps(dtype)
    gamma = (d + 2) * u / (1 - (d + 2) * u)
    if rows.shape[1] == 0:
        return np.zeros(h_q)
    mag = core.logits(np.abs(q), np.abs(rows), 1.0)          # [H_q, m] sum_c |q_c||row_c|
    return gamma * np.abs(scale) * mag.max(axis=1)


# --------------------------------------------------------------------------------------------
# the hypothesis runner and per-method suites
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSuite:
    """How to check kernels of one method: strategies for inputs and hyper-parameters, band scores.

    ``methods(shapes) -> SearchStrategy[Method]`` draws hyper-parameters for an input of the given
    ``DecodeShapes`` (budgets must be drawn relative to n). ``scores(method, q, k, v, dtype) -> (s, band)``
    (optional) enables the valid-top-k rule; ``inputs`` draws DecodeInputs. For a stateful method,
    ``sequences`` draws ``(q_seq, k_seq, v_seq, prefill_len)`` (or a ``sequences.DecodeSequence``) and
    ``methods`` receives the sequence's DecodeShapes (n = T), ``scores`` gets
    ``(method, oracle_state, q, k_new, v_new, dtype)``. ``min_prompt``: the shortest prompt every drawn
    method accepts; sequences drawn from traces (``suite_inputs``) prefill at least that many tokens.
    ``check`` (stateless methods): the method's own check of one case, called as ``check_step`` is
    (``check(method, kernel, inp, *, dtype, scale, scores) -> Verdict``) and used in its place, by
    ``run_suite`` and by ``kvsparse validate --replay`` (module doc).
    """

    name: str
    methods: Callable[[core.DecodeShapes], Any]
    inputs: Any = None
    scores: Callable | None = None
    sequences: Any = None
    min_prompt: int = 1
    check: Callable | None = None

    def __call__(self, kernel, **kwargs) -> SuiteReport:
        return run_suite(self, kernel, **kwargs)


def softmax_scales(d: int):
    """The softmax scale a suite passes to the kernel: ``None`` (the default ``1/sqrt(d)``) most of the
    time, sometimes an explicit float (``0.5/sqrt(d)``, ``2/sqrt(d)``, ``1.0``, ``1.3``). Shrinks to None."""
    explicit = (0.5 / math.sqrt(d), 2.0 / math.sqrt(d), 1.0, 1.3)
    return st.integers(0, 9).map(lambda i: None if i < 6 else explicit[i - 6])


def _takes_scale(fn) -> bool:
    import inspect
    try:
        return "scale" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def decode_takes_scale(method) -> bool:
    """Whether a stateful oracle's ``prefill`` and ``decode`` both take ``scale`` (every registered one
    does). When they do not, its selection is defined at the default scale only, so an explicit scale
    cannot be judged: such a suite keeps ``scale=None``."""
    cls = type(method)
    return _takes_scale(getattr(cls, "decode", None)) and _takes_scale(getattr(cls, "prefill", None))


INPUT_SOURCES = ("strategies", "trace", "synthetic", "mixed")
TRACE_MAX_N = 200     # default: largest cache of a stateless step drawn from a trace
TRACE_MAX_T = 48      # default: longest decode sequence (prompt included) drawn from a trace


def _remembered(seq: DecodeSequence) -> DecodeSequence:
    """A trace-drawn sequence, recorded for the eviction suites' rounding band (``suites_eviction.remember``)."""
    from .suites_eviction import remember
    remember(seq.q_seq, seq.k_seq)
    return seq


def suite_inputs(suite: "MethodSuite", inputs: str = "strategies", *, trace=None, max_n: int | None = None):
    """The strategy ``run_suite`` draws a suite's inputs from (module doc: ``INPUT_SOURCES``).

    Stateless suites: ``DecodeInput``s; stateful ones (``suite.sequences``): sequences, those drawn from
    traces as ``DecodeSequence``s (``trace_inputs.trace_decode_sequences``: tokens ``0..T-1`` of one
    layer, prefill of at least ``suite.min_prompt`` tokens). ``trace``: a trace file or ``AttentionTrace``
    for ``inputs="trace"``/``"mixed"`` (default: the shipped SmolLM2 trace).
    """
    from . import trace_inputs as ti
    if inputs not in INPUT_SOURCES:
        raise ValueError(f"inputs must be one of {INPUT_SOURCES}, got {inputs!r}")
    if trace is not None and inputs not in ("trace", "mixed"):
        raise ValueError(f"trace is read only with inputs='trace' or 'mixed', got inputs={inputs!r}")
    if max_n is not None:
        core.check_positive_int(max_n, "max_n")
    stateful = suite.sequences is not None
    if stateful:
        own = suite.sequences
        length = max_n if max_n is not None else TRACE_MAX_T
        from_trace = lambda: ti.trace_decode_sequences(trace, min_prefill=suite.min_prompt,  # noqa: E731
                                                        max_length=length).map(_remembered)
        synthetic = lambda: ti.synthetic_decode_sequences(min_prefill=suite.min_prompt,  # noqa: E731
                                                           max_length=length).map(_remembered)
    else:
        own = suite.inputs if suite.inputs is not None else decode_inputs(max_n=200)
        n = max_n if max_n is not None else TRACE_MAX_N
        from_trace = lambda: ti.trace_decode_inputs(trace, max_n=n)  # noqa: E731
        synthetic = lambda: ti.synthetic_decode_inputs(n_tokens=max(n, ti.SYNTHETIC_MIN_TOKENS),  # noqa: E731
                                                        max_n=n)
    if inputs == "strategies":
        return own
    if inputs == "trace":
        return from_trace()
    if inputs == "synthetic":
        return synthetic()
    return st.one_of(own, from_trace(), synthetic())


def _sequence_parts(payload):
    """``(q_seq, k_seq, v_seq, prefill_len, label)`` of a drawn sequence (a tuple or a DecodeSequence)."""
    if isinstance(payload, DecodeSequence):
        return payload.q_seq, payload.k_seq, payload.v_seq, payload.prefill_len, repr(payload)
    q_seq, k_seq, v_seq, prefill = payload
    return q_seq, k_seq, v_seq, prefill, ""


def run_suite(suite: "MethodSuite | str", kernel: Callable, *, dtype: str = "float32", max_examples: int | None = None,
              settings: hyp_settings | None = None, examples=(), seed: int | None = None,
              inputs: str = "strategies", trace=None, max_n: int | None = None) -> SuiteReport:
    """Hypothesis-driven: draw inputs, hyper-parameters and the softmax scale, check, shrink a failure.

    ``examples`` are explicit ``(method, DecodeInput)`` pairs (or ``(method, sequence)`` for stateful
    methods, a tuple or a ``DecodeSequence``), optionally with a third item, the scale, always checked
    first. The active hypothesis profile applies unless ``settings`` is given; ``seed`` fixes
    hypothesis's random seed (a reproducible non-derandomized run). The scale is drawn by
    ``softmax_scales`` (stateless methods, and stateful ones whose oracle ``prefill`` and ``decode``
    take a scale: ``decode_takes_scale``), so a kernel that ignores ``scale`` is caught. ``inputs``,
    ``trace`` and ``max_n``: where the inputs come from (``suite_inputs``; module doc).
    """
    if isinstance(suite, str):
        entry = registry.get(suite)
        if not isinstance(entry.suite, MethodSuite):
            raise ValueError(f"method {suite!r} has no property suite")
        suite = entry.suite
    drawn = suite_inputs(suite, inputs, trace=trace, max_n=max_n)
    name = getattr(kernel, "__qualname__", type(kernel).__name__)
    report = SuiteReport(suite.name, f"{getattr(kernel, '__module__', '')}.{name}", dtype)
    if inputs != "strategies":
        report.notes.append(f"inputs: {inputs}" + ("" if trace is None else f" ({getattr(trace, 'source', trace)})"))
    last: list[Verdict] = []

    def one(method, payload, scale=None) -> Verdict:
        report.examples += 1
        if suite.sequences is not None:
            q_seq, k_seq, v_seq, prefill, label = _sequence_parts(payload)
            verdicts = check_decode(method, kernel, q_seq, k_seq, v_seq, prefill_len=prefill, dtype=dtype,
                                    scale=scale, scores=suite.scores, label=label)
            return next((v for v in verdicts if not v.ok), verdicts[-1])
        return (suite.check or check_step)(method, kernel, payload, dtype=dtype, scale=scale, scores=suite.scores)

    for example in examples:
        verdict = one(*example)
        if not verdict.ok:
            report.failure = verdict
            return report

    if suite.sequences is not None:
        @st.composite
        def cases(draw):
            seq = draw(drawn)
            q_seq, k_seq = _sequence_parts(seq)[:2]
            shapes = core.DecodeShapes(q_seq.shape[1], k_seq.shape[1], q_seq.shape[0], q_seq.shape[2])
            method = draw(suite.methods(shapes))
            scale = draw(softmax_scales(shapes.d)) if decode_takes_scale(method) else None
            return method, seq, scale
    else:
        @st.composite
        def cases(draw):
            inp = draw(drawn)
            return draw(suite.methods(inp.shapes)), inp, draw(softmax_scales(inp.shapes.d))

    @given(cases())
    def prop(case):
        verdict = one(*case)
        last.append(verdict)
        assert verdict.ok, str(verdict)

    if seed is not None:   # a random but reproducible search (kvsparse validate --seed)
        prop = hypothesis_seed(seed)(prop)
    if settings is not None:
        prop = settings(prop)
    elif max_examples is not None:
        prop = hyp_settings(max_examples=max_examples)(prop)
    try:
        prop()
    except AssertionError:
        report.failure = next((v for v in reversed(last) if not v.ok), None)
        if report.failure is None:
            raise
    return report


def suite_for(name: str) -> MethodSuite:
    entry = registry.get(name)
    if not isinstance(entry.suite, MethodSuite):
        raise ValueError(f"method {name!r} has no property suite")
    return entry.suite


# --- dense -------------------------------------------------------------------------------------

def _dense_methods(shapes):
    from ..oracle.dense import Dense
    return st.just(Dense())


registry.register_suite("dense")(MethodSuite("dense", _dense_methods))


# --- quest -------------------------------------------------------------------------------------

def _quest_methods(shapes):
    from ..oracle.quest import BUDGET_ROUNDINGS, LAST_PAGE_RULES, Quest
    n = max(shapes.n, 1)
    return st.builds(
        Quest, token_budget=st.one_of(st.integers(1, 2 * n), st.sampled_from([1, n - 1 or 1, n, n + 1])),
        page_size=st.sampled_from([1, 2, 3, 4, 8, 16]), budget_rounding=st.sampled_from(BUDGET_ROUNDINGS),
        min_pages=st.integers(1, 3), last_page=st.sampled_from(LAST_PAGE_RULES),
        dense_if_budget_covers=st.booleans(), cap_budget_at_n=st.booleans(),
        dense_layers=st.integers(0, 2), layer=st.one_of(st.none(), st.integers(0, 3)))


def _quest_scores(method, q, k, v, dtype):
    """Token score = its page's bound; the forced last page (``last_page="always"``) +inf; dense: all +inf."""
    from ..oracle.quest import page_metadata, page_scores
    n, p = k.shape[1], method.page_size
    if method.is_dense(n):
        return np.full((q.shape[0], n), np.inf), np.zeros(q.shape[0])
    kmin, kmax = page_metadata(k, p)
    s = page_scores(q, kmin, kmax)
    if method.last_page == "always":
        s[:, -1] = np.inf
    # the bound is a d-term sum of max(q_c lo_c, q_c hi_c): |term| <= |q_c| max(|lo_c|, |hi_c|)
    band = dot_band(q, np.maximum(np.abs(kmin), np.abs(kmax)), dtype)
    return np.repeat(s, p, axis=1)[:, :n], band


registry.register_suite("quest")(MethodSuite("quest", _quest_methods, scores=_quest_scores))


# --- sparq -------------------------------------------------------------------------------------

def _sparq_methods(shapes):
    from ..oracle.sparq import GQA_MODES, ROUNDINGS, SparQ
    n, d = max(shapes.n, 1), shapes.d
    return st.builds(
        SparQ, r=st.one_of(st.none(), st.integers(1, d)), k=st.one_of(st.none(), st.integers(1, n + 1)),
        compression_ratio=st.integers(1, 16), rounding=st.sampled_from(ROUNDINGS),
        allocated_len=st.one_of(st.none(), st.integers(n, 2 * n)), gqa=st.sampled_from(GQA_MODES),
        forced_recent=st.integers(0, 3), extra_token=st.booleans(), reallocate=st.booleans())


def _sparq_scores(method, q, k, v, dtype):
    """The oracle's ranking scores (approximate logits, group-summed for ``gqa="group"``, +inf forced)."""
    approx = method.approximate(q, k)
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    if approx.dense:
        return np.full((h_q, n), np.inf), np.zeros(h_q)
    chosen = np.zeros((h_q, d), bool)
    np.put_along_axis(chosen, approx.channels, True, axis=1)
    band = dot_band(np.where(chosen, q, 0.0), k, dtype, scale=1.0 / approx.tau)
    s = approx.logits
    if method.gqa == "group":
        g = h_q // h_kv
        s = np.repeat(s.reshape(h_kv, g, n).sum(axis=1), g, axis=0)
        band = np.repeat(band.reshape(h_kv, g).sum(axis=1), g)
    if method.forced_recent:
        s = s.copy()
        s[:, n - min(n, method.forced_recent):] = np.inf
    return s, band


registry.register_suite("sparq")(MethodSuite("sparq", _sparq_methods, scores=_sparq_scores))


# --- double sparsity ---------------------------------------------------------------------------

@st.composite
def _ds_methods(draw, shapes):
    from ..oracle.double_sparsity import DoubleSparsity
    n, d = max(shapes.n, 1), shapes.d
    rows = draw(st.sampled_from([0, 1, shapes.h_kv, shapes.h_q]))
    seed = draw(st.integers(0, 2**16))
    channels = None if rows == 0 else tuple(tuple(np.random.default_rng(seed + i).permutation(d).tolist())
                                            for i in range(rows))
    r = draw(st.one_of(st.none(), st.integers(1, d)))
    bits = draw(st.sampled_from([None, 1, 2, 4, 8]))
    if bits and (min(d, r or max(1, d // 8)) * bits) % 8:
        bits = None   # the oracle counts label bytes only for whole-byte labels
    return DoubleSparsity(channels=channels, r=r,
                          token_budget=draw(st.one_of(st.integers(1, n + 1), st.just(n - 1 or 1))),
                          label_bits=bits,
                          quantize_query_label=draw(st.booleans()),
                          dense_layers=draw(st.integers(0, 1)), layer=draw(st.one_of(st.none(), st.integers(0, 2))))


def _ds_scores(method, q, k, v, dtype):
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    if method.is_dense(n):
        return np.full((h_q, n), np.inf), np.zeros(h_q)
    s = method.label_scores(q, k)
    ch = method.channels_per_query_head(h_q, h_kv, d)
    r = ch.shape[1]
    # labels are exact functions of the rounded inputs; only the r-term label dot product rounds
    u = tolerances.dtype_eps(dtype)
    gamma = (r + 2) * u / (1 - (r + 2) * u)
    kv = core.kv_head_of(h_q, h_kv)
    mag = np.array([np.abs(k[kv[h]][:, ch[h]]).max(axis=0) @ np.abs(q[h, ch[h]]) for h in range(h_q)])
    if method.label_bits:  # a quantized label can exceed the raw range by at most one step: bound by 2x
        mag = 2 * mag
    return s, gamma * mag


registry.register_suite("double_sparsity")(MethodSuite("double_sparsity", _ds_methods, scores=_ds_scores))


# --- twilight ----------------------------------------------------------------------------------

@st.composite
def _twilight_methods(draw, shapes):
    from ..oracle.double_sparsity import DoubleSparsity
    from ..oracle.quest import Quest
    from ..oracle.twilight import Twilight
    n = max(shapes.n, 1)
    budget = draw(st.integers(1, n + 1))
    if draw(st.booleans()):
        base = Quest(token_budget=budget, page_size=draw(st.sampled_from([1, 2, 4, 8])),
                     last_page=draw(st.sampled_from(["scored", "always"])))
    else:
        base = DoubleSparsity(token_budget=budget, r=draw(st.one_of(st.none(), st.integers(1, shapes.d))))
    return Twilight(base=base, p=draw(st.sampled_from([0.1, 0.5, 0.85, 0.99, 1.0])),
                    quant_bits=draw(st.sampled_from([None, 2, 4, 8])),
                    top_p=draw(st.sampled_from(["sort", "search"])), bracket=draw(st.sampled_from(["max", "first"])),
                    epsilon=draw(st.sampled_from([0.0, 1e-5])), dense_layers=draw(st.integers(0, 1)),
                    layer=draw(st.one_of(st.none(), st.integers(0, 2))))


def _twilight_scores(method, q, k, v, dtype):
    """Estimated probabilities over the candidates (-inf outside them); band from the logit band."""
    h_q, n = q.shape[0], k.shape[1]
    cand, _ = method.select_with_candidates(q, k, v)
    if method.dense_layer or method.p >= 1:
        s = np.full((h_q, n), -np.inf)
        for h, ix in enumerate(cand.indices):
            s[h, ix] = np.inf
        return s, np.zeros(h_q)
    probs = method.estimated_probabilities(q, k, cand)
    s = np.full((h_q, n), -np.inf)
    for h, (ix, p) in enumerate(zip(cand.indices, probs)):
        s[h, ix] = p
    # |d p_i| <= p_i * 2 * (logit error): bound by the largest probability times twice the logit band
    band = 2 * dot_band(q, k, dtype, scale=core.default_scale(q.shape[1])) * np.array(
        [p.max() if p.size else 0.0 for p in probs])
    return s, band


registry.register_suite("twilight")(MethodSuite("twilight", _twilight_methods, scores=_twilight_scores))


# --- sliding window ----------------------------------------------------------------------------

def _sliding_window_methods(shapes):
    from ..oracle.sliding_window import SlidingWindow
    n = max(shapes.n, 1)
    return st.one_of(
        st.builds(SlidingWindow, window=st.integers(1, n + 2), recent_includes_current=st.just(True)),
        st.builds(SlidingWindow, window=st.integers(0, n + 2), recent_includes_current=st.just(False)))


registry.register_suite("sliding_window")(MethodSuite("sliding_window", _sliding_window_methods))


# --- streaming llm (stateful) ------------------------------------------------------------------

@st.composite
def decode_sequences(draw, *, max_t: int = 48, max_h_kv: int = 3, max_group: int = 3, head_dims=(4, 8, 16, 32)):
    """A ``DecodeSequence`` (``q_seq [T, H_q, d]``, ``k_seq [T, H_kv, d]``, ``v_seq``, ``prefill_len``) for a
    multi-step decode; it prints as one line in a falsifying example, not as its arrays."""
    from .strategies import FAMILIES, make_decode_input
    h_kv, g = draw(st.integers(1, max_h_kv)), draw(st.integers(1, max_group))
    t = draw(st.integers(2, max_t))
    d = draw(st.sampled_from(head_dims))
    inp = make_decode_input(h_kv * g, h_kv, t, d, draw(st.sampled_from(FAMILIES)), draw(st.integers(0, 2**32 - 1)))
    # one query per position: the decode-input family shapes the keys; queries drawn alike per step
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q_seq = rng.standard_normal((t, h_kv * g, d)) + inp.q[None]
    return DecodeSequence(q_seq, inp.k.transpose(1, 0, 2), inp.v.transpose(1, 0, 2), draw(st.integers(0, t - 1)),
                          inp.family, inp.seed)


def _streaming_methods(shapes):
    from ..oracle.streaming_llm import StreamingLLM
    n = max(shapes.n, 1)
    return st.builds(StreamingLLM, sinks=st.integers(0, 6), recent=st.integers(1, n + 2),
                     recent_includes_current=st.booleans())


registry.register_suite("streaming_llm")(MethodSuite("streaming_llm", _streaming_methods,
                                                     sequences=decode_sequences()))
