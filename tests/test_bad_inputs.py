"""Bad input at every registered oracle's entry point raises ValueError/TypeError naming the argument.

Parametrized over ``kvsparse.registry.entries()``: every method with an oracle, in its ``canonical``
preset. Entry points (``kvsparse/oracle/method.py``): ``step(q, k, v)`` for stateless methods,
``prefill(q_prompt, k_prompt, v_prompt)`` then ``decode(state, q, k_new, v_new)`` for stateful ones.
Structural methods whose own decode takes other tensors (MLA's latent cache, LoRC's hidden states,
CLA's layer stack) are checked there too. A wrong answer, a NaN, or any other exception type (a deep
AttributeError / IndexError / numpy error) fails the test.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from kvsparse import registry
from kvsparse.oracle import core
from kvsparse.oracle.method import Method, StatefulMethod

H_Q, H_KV, N, D = 4, 2, 12, 8
METHODS = sorted(name for name, e in registry.entries().items() if e.oracle is not None)


def _rng():
    return np.random.default_rng(1234)


def _with(a, index, value):
    a = np.array(a, copy=True)
    a[index] = value
    return a


def assert_rejected(call, *args, names, **kwargs):
    """``call(*args)`` raises ValueError/TypeError whose message names one of ``names`` (as a word)."""
    try:
        result = call(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        pattern = r"(?<![\w.])(" + "|".join(re.escape(n) for n in names) + r")(?![\w])"
        if not re.search(pattern, msg):
            pytest.fail(f"{type(exc).__name__} does not name any of {names}: {msg!r}")
        return exc
    except Exception as exc:       # a deep traceback, not a documented error
        pytest.fail(f"raised {type(exc).__name__} instead of ValueError/TypeError naming {names}: {exc!r}")
    pytest.fail(f"bad input accepted silently (expected an error naming {names}); returned {type(result).__name__}")


def step_cases():
    """(label, (q, k, v), names the error must mention) for one decode step ``q [H_q, d]``, ``k``/``v`` ``[H_kv, n, d]``."""
    rng = _rng()
    q, k, v = rng.standard_normal((H_Q, D)), rng.standard_normal((H_KV, N, D)), rng.standard_normal((H_KV, N, D))
    return q, k, v, [
        ("q 1-D", (q[0], k, v), ("q",)),
        ("q 3-D", (q[None], k, v), ("q",)),
        ("k 2-D", (q, k[0], v), ("k",)),
        ("v fewer tokens", (q, k, v[:, :5]), ("v",)),
        ("v other head dim", (q, k, v[..., :4]), ("v",)),
        ("head dims differ", (q[:, :4], k, v), ("q", "k")),
        ("H_q not divisible by H_kv", (q[:3], k, v), ("H_q", "q")),
        ("q NaN", (_with(q, (1, 2), np.nan), k, v), ("q",)),
        ("k +inf", (q, _with(k, (1, 2, 3), np.inf), v), ("k",)),
        ("v -inf", (q, k, _with(v, (0, 0, 0), -np.inf)), ("v",)),
        ("q float16 NaN", (_with(q, (0, 0), np.nan).astype(np.float16), k, v), ("q",)),
        ("q int32", (q.astype(np.int32), k, v), ("q",)),
        ("k int64", (q, k.astype(np.int64), v), ("k",)),
        ("v bool", (q, k, v > 0), ("v",)),
        ("v complex", (q, k, v.astype(np.complex128)), ("v",)),
        ("v str", (q, k, "values"), ("v",)),
    ]


def sequence_cases():
    """Prompts in trace layout: ``q_prompt [T, H_q, d]``, ``k_prompt``/``v_prompt`` ``[T, H_kv, d]``."""
    rng = _rng()
    q, k, v = (rng.standard_normal((N, h, D)) for h in (H_Q, H_KV, H_KV))
    names_q, names_k, names_v = ("q_seq", "q_prompt"), ("k_seq", "k_prompt"), ("v_seq", "v_prompt")
    return q, k, v, [
        ("q_prompt 2-D", (q[0], k, v), names_q),
        ("k_prompt 2-D", (q, k[0], v), names_k),
        ("v_prompt other head dim", (q, k, v[..., :4]), names_v),
        ("head dims differ", (q[..., :4], k, v), names_q + names_k),
        ("T differs", (q[:5], k, v), names_q + names_k),
        # check_sequence names the head counts (h_q, h_kv) rather than the tensors here
        ("H_q not divisible by H_kv", (q[:, :3], k, v), names_q + ("h_q", "H_q")),
        ("q_prompt NaN", (_with(q, (0, 1, 2), np.nan), k, v), names_q),
        ("k_prompt inf", (q, _with(k, (3, 1, 0), np.inf), v), names_k),
        ("v_prompt -inf", (q, k, _with(v, (2, 0, 1), -np.inf)), names_v),
        ("q_prompt int", (q.astype(np.int32), k, v), names_q),
        ("k_prompt int", (q, k.astype(np.int64), v), names_k),
        ("v_prompt str", (q, k, "values"), names_v),
    ]


def token_cases():
    """One decode token: ``q [H_q, d]``, ``k_new``/``v_new`` ``[H_kv, d]``."""
    rng = _rng()
    q, kn, vn = rng.standard_normal((H_Q, D)), rng.standard_normal((H_KV, D)), rng.standard_normal((H_KV, D))
    return q, kn, vn, [
        ("q 1-D", (q[0], kn, vn), ("q",)),
        ("k_new 1-D", (q, kn[0], vn), ("k_new",)),
        ("v_new other head dim", (q, kn, vn[:, :4]), ("v_new",)),
        ("k_new other H_kv", (q, kn[:1], vn[:1]), ("k_new",)),
        ("q other head dim", (q[:, :4], kn, vn), ("q",)),
        ("H_q not divisible by H_kv", (q[:3], kn, vn), ("q", "H_q")),
        ("q NaN", (_with(q, (1, 1), np.nan), kn, vn), ("q",)),
        ("k_new inf", (q, _with(kn, (1, 3), np.inf), vn), ("k_new",)),
        ("v_new -inf", (q, kn, _with(vn, (0, 0), -np.inf)), ("v_new",)),
        ("q int", (q.astype(np.int32), kn, vn), ("q",)),
        ("k_new int", (q, kn.astype(np.int64), vn), ("k_new",)),
        ("v_new str", (q, kn, "v"), ("v_new",)),
    ]


def _canonical(name):
    return registry.oracle(name, "canonical")


def _has_step(method) -> bool:
    """``step`` is an entry point unless the method is stateful and ``select`` says to use prefill/decode."""
    if not isinstance(method, StatefulMethod):
        return True
    q, k, v, _ = step_cases()
    try:
        method.step(q, k, v)
    except NotImplementedError:
        return False
    return True


STEP_LABELS = [c[0] for c in step_cases()[3]]
SEQ_LABELS = [c[0] for c in sequence_cases()[3]]
TOKEN_LABELS = [c[0] for c in token_cases()[3]]


def test_every_method_with_an_oracle_is_covered():
    """The parametrization is computed from the registry and reaches every oracle by some entry point."""
    assert len(METHODS) >= 21 and {"dense", "quest", "h2o", "mla", "vattention"} <= set(METHODS)
    for name in METHODS:
        m = _canonical(name)
        assert _has_step(m) or isinstance(m, StatefulMethod), name


@pytest.mark.parametrize("name", METHODS)
def test_step_rejects_bad_inputs_naming_the_argument(name):
    method = _canonical(name)
    if not _has_step(method):
        pytest.skip(f"{name} is stateful and its select() refuses a single step: prefill/decode are its entry points")
    q, k, v, cases = step_cases()
    out = method.step(q, k, v).output          # the valid input works: errors below are the bad argument's
    assert np.isfinite(out).all()
    failures = []
    for label, args, names in cases:
        try:
            assert_rejected(method.step, *args, names=names)
        except pytest.fail.Exception as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, f"{name}.step: " + "; ".join(failures)


@pytest.mark.parametrize("name", METHODS)
def test_step_rejects_bad_scale_and_positions(name):
    method = _canonical(name)
    if not _has_step(method):
        pytest.skip(f"{name} is stateful: prefill/decode are its entry points (their scale: below)")
    q, k, v, _ = step_cases()
    for scale in (0.0, -1.0, float("nan"), float("inf"), "0.5", True):
        assert_rejected(method.step, q, k, v, scale=scale, names=("scale",))
    assert_rejected(method.step, q, k, v, positions=np.arange(N - 1), names=("positions",))
    assert_rejected(method.step, q, k, v, positions=np.arange(N, dtype=np.float64), names=("positions",))


STATEFUL = [n for n in METHODS if isinstance(_canonical(n), StatefulMethod)]


@pytest.mark.parametrize("name", STATEFUL)
def test_prefill_and_decode_reject_bad_inputs_naming_the_argument(name):
    method = _canonical(name)
    qp, kp, vp, prompt_cases = sequence_cases()
    state = method.prefill(qp, kp, vp)
    q, kn, vn, cases = token_cases()
    method.decode(state, q, kn, vn)             # the valid token works
    failures = []
    for label, args, names in prompt_cases:
        try:
            assert_rejected(method.prefill, *args, names=names)
        except pytest.fail.Exception as exc:
            failures.append(f"prefill {label}: {exc}")
    for label, args, names in cases:
        try:
            assert_rejected(method.decode, state, *args, names=names)
        except pytest.fail.Exception as exc:
            failures.append(f"decode {label}: {exc}")
    try:
        assert_rejected(method.decode, "not a state", q, kn, vn, names=("state",))
    except pytest.fail.Exception as exc:
        failures.append(f"decode with a wrong state: {exc}")
    assert not failures, f"{name}: " + "; ".join(failures)


@pytest.mark.parametrize("name", STATEFUL)
def test_prefill_and_decode_reject_a_bad_or_inconsistent_scale(name):
    """A bad scale names ``scale``; so does a decode whose scale is not the one the state was prefilled with."""
    method = _canonical(name)
    qp, kp, vp, _ = sequence_cases()
    q, kn, vn, _ = token_cases()
    for scale in (0.0, -1.0, float("nan"), float("inf"), "0.5", True):
        assert_rejected(method.prefill, qp, kp, vp, scale=scale, names=("scale",))
        assert_rejected(method.decode, method.prefill(qp, kp, vp), q, kn, vn, scale=scale, names=("scale",))
    state = method.prefill(qp, kp, vp, scale=0.25)
    exc = assert_rejected(method.decode, state, q, kn, vn, scale=0.5, names=("scale",))
    assert "prefilled with (0.25)" in str(exc)
    assert_rejected(method.decode, method.prefill(qp, kp, vp), q, kn, vn, scale=0.25, names=("scale",))
    method.decode(state, q, kn, vn, scale=0.25)      # the same scale, or none (the state's), is fine
    method.decode(state, q, kn, vn)


# --- structural methods' own entry points ------------------------------------------------------

def test_mla_decode_rejects_bad_latent_cache_inputs():
    from kvsparse.oracle import mla
    m = mla.MLA(heads=2, latent_dim=8, rope_dim=4, nope_dim=6, v_dim=5)
    rng = _rng()
    w = mla.random_weights(rng, 2, 8, 6, 5)
    qn, qr, lat, kr = (rng.standard_normal(s) for s in ((2, 6), (2, 4), (7, 8), (7, 4)))
    assert np.isfinite(m.decode(w, qn, qr, lat, kr).output).all()
    assert_rejected(m.decode, "weights", qn, qr, lat, kr, names=("weights",))
    assert_rejected(m.decode, w, _with(qn, (0, 1), np.nan), qr, lat, kr, names=("q_nope",))
    assert_rejected(m.decode, w, qn[:1], qr, lat, kr, names=("q_nope",))
    assert_rejected(m.decode, w, qn, qr.astype(np.int64), lat, kr, names=("q_rope",))
    assert_rejected(m.decode, w, qn, qr, _with(lat, (2, 3), np.inf), kr, names=("latent",))
    assert_rejected(m.decode, w, qn, qr, lat[:, :5], kr, names=("latent",))
    assert_rejected(m.decode, w, qn, qr, lat, kr[:3], names=("k_rope",))


def test_lorc_decode_rejects_bad_hidden_states_and_positions():
    from kvsparse.oracle import lorc
    rng = _rng()
    m = lorc.LoRC()
    f = lorc.LowRankKV.compress(rng.standard_normal((16, 8)), rng.standard_normal((16, 8)), 4, 4, 2)
    x, q, pos = rng.standard_normal((5, 16)), rng.standard_normal((4, 4)), np.arange(5)
    assert np.isfinite(m.decode(f, q, x, pos).output).all()
    assert_rejected(m.decode, "factors", q, x, pos, names=("factors",))
    assert_rejected(m.decode, f, q, _with(x, (0, 1), np.nan), pos, names=("x",))
    assert_rejected(m.decode, f, q, x.astype(np.int64), pos, names=("x",))
    assert_rejected(m.decode, f, q, x[:, :10], pos, names=("x",))
    assert_rejected(m.decode, f, _with(q, (0, 0), np.nan), x, pos, names=("q",))
    assert_rejected(m.decode, f, q[:3], x, pos, names=("q", "H_q"))
    assert_rejected(m.decode, f, q, x, _with(pos.astype(float), 2, np.nan), names=("positions",))
    assert_rejected(m.decode, f, q, x, pos[:4], names=("positions",))


def test_cla_decode_layers_rejects_bad_layer_stacks():
    from kvsparse.oracle import cla
    rng = _rng()
    m = cla.CLA()
    ql, kl, vl = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 2, 6, 8)), rng.standard_normal((2, 2, 6, 8))
    assert len(cla.decode_layers(m, ql, kl, vl)) == 2
    assert_rejected(cla.decode_layers, m, _with(ql, (0, 0, 1), np.nan), kl, vl, names=("q_layers",))
    assert_rejected(cla.decode_layers, m, ql, kl[0], vl, names=("k_layers",))
    assert_rejected(cla.decode_layers, m, ql, kl, vl.astype(np.int64), names=("v_layers",))
    assert_rejected(cla.decode_layers, m, ql[:1], kl, vl, names=("q_layers",))
    assert_rejected(cla.decode_layers, m, ql[:, :3], kl, vl, names=("H_q", "q"))


# --- the checker itself can fail ---------------------------------------------------------------

class _Unchecked(Method):
    """A planted bug: a step that skips validation (NaN in, NaN out) and names nothing."""

    def step(self, q, k, v, **kw):
        q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
        return core.softmax(np.einsum("hd,hnd->hn", q, np.repeat(k, q.shape[0] // k.shape[0], 0)))


def test_the_checker_catches_silent_acceptance_wrong_names_and_deep_tracebacks():
    q, k, v, _ = step_cases()
    with pytest.raises(pytest.fail.Exception, match="accepted silently"):
        assert_rejected(_Unchecked().step, _with(q, (0, 0), np.nan), k, v, names=("q",))
    with pytest.raises(pytest.fail.Exception, match="does not name"):
        assert_rejected(_Unchecked().step, q, k[0], v, names=("k",))      # numpy's einsum error, deep inside

    def deep(*_):
        raise IndexError("index 3 is out of bounds for axis 0 with size 3")
    with pytest.raises(pytest.fail.Exception, match="instead of ValueError/TypeError"):
        assert_rejected(deep, q, k, v, names=("q",))

    def names_other(*_):
        raise ValueError("k_new must have 2 dimensions")    # names k_new, not k: the word boundary holds
    with pytest.raises(pytest.fail.Exception, match="does not name"):
        assert_rejected(names_other, q, k, v, names=("k",))
