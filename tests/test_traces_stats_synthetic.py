"""Trace statistics on cases with known answers; synthetic knobs do what they say; trace inputs; CLI."""
import math

import numpy as np
import pytest
from hypothesis import given

from kvsparse.cli import main
from kvsparse.oracle import core
from kvsparse.property_tests import trace_inputs
from kvsparse.property_tests.strategies import DecodeInput
from kvsparse.traces.stats import layer_stats
from kvsparse.traces.synthetic import SyntheticConfig, preset, synthetic_trace


def test_uniform_attention_statistics_match_closed_forms():
    T, d = 300, 4
    q = np.zeros((T, 2, d))                         # q = 0: every query attends uniformly
    k = np.random.default_rng(0).standard_normal((T, 1, d))
    m, _, _ = layer_stats(q, k, queries=50, local_window=64, heavy=0)
    ns = np.arange(T - 50, T) + 1
    np.testing.assert_allclose(m["sink"], np.mean(1 / ns))
    np.testing.assert_allclose(m["entropy"], np.mean(np.log(ns)))
    np.testing.assert_allclose(m["f90"], np.mean(np.ceil(0.9 * ns - 1e-9) / ns))
    np.testing.assert_allclose(m["local"], np.mean(64 / ns))


def test_planted_sink_heavy_hitters_and_outlier_channel_are_found():
    T, d = 400, 8
    rng = np.random.default_rng(1)
    q = np.tile(np.eye(d)[0] * 10, (T, 1, 1))               # every query along channel 0
    k = rng.standard_normal((T, 1, d)) * 0.01
    k[0, 0, 0] = 8.0                                        # token 0: logit 8 * 10 / sqrt(8) = 28 nats
    k[[50, 60], 0, 1] = 0.0
    k[[50, 60], 0, 0] = 7.0                                 # two heavy hitters, e^-2.8 of the sink each
    k[:, 0, 5] += 200.0                                     # an outlier channel in K
    m, _, _ = layer_stats(q, k, queries=20, heavy=2, local_window=8)
    p0 = 1 / (1 + 2 * math.exp(-10 / math.sqrt(8)))         # sink share among the three planted tokens
    assert abs(m["sink"][0] - p0) < 1e-3
    assert abs(m["heavy"][0] - (1 - p0)) < 1e-3
    assert m["f90"][0] == pytest.approx(np.mean(1 / np.arange(381, 401)))
    # channel 5 (offset 200) and channel 0 (the planted keys: RMS 0.64 against 0.01 for the others)
    assert m["k_outliers"][0] == 2 and m["k_peak"][0] > 1e4


def test_synthetic_is_seeded_and_shaped_by_its_config():
    cfg = SyntheticConfig(n_tokens=64, n_heads=6, n_kv_heads=2, head_dim=32, sink_strength=3.0, n_heavy=3,
                          heavy_strength=2.0, local_strength=2.0, n_outlier_channels=1, outlier_scale=5.0, seed=7)
    a, b = synthetic_trace(cfg, keep_pre_rope=True), synthetic_trace(cfg, keep_pre_rope=True)
    c = synthetic_trace(SyntheticConfig(**{**cfg.__dict__, "seed": 8}))
    np.testing.assert_array_equal(a.layer(0).q, b.layer(0).q)
    assert not np.array_equal(a.layer(0).q, c.layer(0).q)
    lay = a.layer(0)
    assert lay.q.shape == (64, 6, 32) and lay.k.shape == (64, 2, 32) and lay.v.shape == (64, 2, 32)
    # RoPE: the stored keys are the pre-RoPE keys rotated (rotate-half, positions 0..T-1)
    rot = core.rope_apply(lay.k_pre_rope.transpose(1, 0, 2), np.arange(64), base=10000.0).transpose(1, 0, 2)
    np.testing.assert_allclose(rot, lay.k, atol=1e-6)


@pytest.mark.parametrize("sink,heavy", [(6.0, 0.0), (0.0, 4.0)])
def test_sink_and_heavy_bonuses_are_the_stated_nats(sink, heavy):
    # noise 0, no variety, one feature at a time: the planted tokens' logit is the bonus times a weighted
    # mean of cos(theta_i t) over the slow pairs; every other logit is 0
    T, base = 256, 10000.0
    cfg = SyntheticConfig(n_tokens=T, n_heads=2, n_kv_heads=1, head_dim=32, noise=0.0, sink_strength=sink,
                          n_heavy=5 if heavy else 0, heavy_strength=heavy, rope_base=base)
    lay = synthetic_trace(cfg, dtype="float64").layer(0)
    s = np.einsum("thd,nd->thn", lay.q, lay.k[:, 0]) * cfg.head_dim ** -0.5       # [T, H_q, T]
    fastest_slow = base ** (-2 * (16 - 4) / 32)                                  # the slow pairs turn at most this fast
    slack = 1 - math.cos(fastest_slow * T)
    planted = np.flatnonzero(np.abs(s[-1, 0]) > 1e-9)
    assert list(planted) == ([0] if sink else sorted(planted)) and len(planted) == (1 if sink else 5)
    bonus = sink or heavy
    assert np.all(np.abs(s[:, :, planted] - bonus) <= bonus * slack + 1e-9)
    others = np.setdiff1d(np.arange(T), planted)
    assert np.all(np.abs(s[:, :, others]) < 1e-9)


def test_locality_bonus_decays_with_distance():
    L, W = 5.0, 16.0
    cfg = SyntheticConfig(n_tokens=1024, n_heads=1, n_kv_heads=1, head_dim=64, noise=0.0, local_strength=L,
                          local_window=W, rope_base=10000.0)
    lay = synthetic_trace(cfg, dtype="float64").layer(0)
    s = np.einsum("td,nd->tn", lay.q[:, 0], lay.k[:, 0]) / 8.0
    at = lambda dist: np.mean([s[t, t - dist] for t in range(200, 1024)])
    # E s(t, t - D) = L exp(-D/W) x (RoPE factor ~1): the mean over 824 positions is within ~15% at D = 0
    assert 0.85 * L < at(0) < 1.15 * L
    assert at(int(W)) < 0.6 * L and abs(at(int(8 * W))) < 0.1 * L


def test_bad_knobs_are_rejected_by_name():
    with pytest.raises(ValueError, match="sink_strength"):
        SyntheticConfig(sink_strength=-1.0)
    with pytest.raises(ValueError, match="n_heads=6 must be divisible by n_kv_heads=4|h_q=6"):
        SyntheticConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("nope")


@given(trace_inputs.trace_decode_inputs(max_n=256))
def test_trace_inputs_are_decode_steps_of_the_shipped_trace(x):
    assert isinstance(x, DecodeInput) and x.family.startswith("trace:")
    layer = int(x.family.rsplit(":L", 1)[1])
    q, k, v = trace_inputs.shipped_trace().layer(layer).decode_step(x.seed)
    np.testing.assert_array_equal(x.q, q)
    assert x.k.shape == (3, x.seed + 1, 64) and x.q.dtype == np.float64
    out = core.attend_dense(x.q, x.k, x.v, scale=0.125)       # a convex combination of values
    assert np.all(out <= x.v.max(axis=1).repeat(3, axis=0) + 1e-12)


@given(trace_inputs.mixed_decode_inputs(max_n=64))
def test_mixed_inputs_are_valid_decode_steps(x):
    core.check_decode_inputs(x.q, x.k, x.v)


def test_cli_stats_and_synthetic(tmp_path, capsys):
    assert main(["traces", "stats", "shipped", "--per-layer", "--queries", "32"]) == 0
    out = capsys.readouterr().out
    assert "sink" in out and "\n3 " in out and "\n27 " in out
    assert main(["traces", "synthetic", "--tokens", "64", "--out", str(tmp_path / "s.safetensors")]) == 0
    assert main(["traces", "stats", str(tmp_path / "s.safetensors"), "--queries", "8"]) == 0
    pytest.importorskip("matplotlib")
    assert main(["traces", "stats", "shipped", "--queries", "16", "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
