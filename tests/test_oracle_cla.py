"""CLA oracle: factor 1 ≡ no sharing, consumers read their producer's cache, bytes by hand."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvsparse.oracle import core
from kvsparse.oracle.cla import CLA, decode_layers
from kvsparse.oracle.types import Layout, Selection, kv_traffic


def layers(seed, n_layers, h_q, h_kv, n, d):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_layers, h_q, d)), rng.standard_normal((n_layers, h_kv, n, d)),
            rng.standard_normal((n_layers, h_kv, n, d)))


@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(1, 6), h_kv=st.integers(1, 3), g=st.integers(1, 3),
       n=st.integers(1, 40), d=st.sampled_from([2, 4, 8]), reads=st.sampled_from(["hbm", "reuse"]))
def test_factor_one_is_no_sharing(seed, n_layers, h_kv, g, n, d, reads):
    q, k, v = layers(seed, n_layers, h_kv * g, h_kv, n, d)
    steps = decode_layers(CLA(sharing_factor=1, consumer_reads=reads), q, k, v)
    for layer, step in enumerate(steps):
        np.testing.assert_array_equal(step.output, core.attend_dense(q[layer], k[layer], v[layer]))
        assert step.traffic == kv_traffic(Selection.full(h_kv * g, n), h_kv, d)


@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(2, 7), f=st.integers(2, 4), n=st.integers(2, 30))
def test_consumers_attend_to_their_producers_cache(seed, n_layers, f, n):
    q, k, v = layers(seed, n_layers, 4, 2, n, 4)
    steps = decode_layers(CLA(sharing_factor=f), q, k, v)
    for layer, step in enumerate(steps):
        p = (layer // f) * f
        np.testing.assert_array_equal(step.output, core.attend_dense(q[layer], k[p], v[p]))
        if layer != p:   # the check can fail: a consumer's own (never stored) K/V give another output
            assert not np.allclose(step.output, core.attend_dense(q[layer], k[layer], v[layer]))


def test_bytes_by_hand():
    """L=5 layers, f=2: caches at layers 0, 2, 4 (3 of 5). n=100, H_kv=2, d=8, fp16: 2*100*2*16 B per cache."""
    m = CLA(sharing_factor=2)
    assert [m.producer(layer) for layer in range(5)] == [0, 0, 2, 2, 4]
    assert m.cache_layers(5) == 3
    assert m.cache_bytes(100, 5, 2, 8) == 3 * 2 * 100 * 2 * 16
    assert CLA(sharing_factor=1).cache_bytes(100, 5, 2, 8) == 5 * 2 * 100 * 2 * 16
    q, k, v = layers(0, 5, 4, 2, 100, 8)
    hbm = sum(s.traffic.total for s in decode_layers(m, q, k, v))
    reuse = sum(s.traffic.total for s in decode_layers(dataclasses.replace(m, consumer_reads="reuse"), q, k, v))
    assert hbm == 5 * 2 * 100 * 2 * 16            # every layer reads its cache
    assert reuse == 3 * 2 * 100 * 2 * 16          # only producers read: the bytes scale with the caches


def test_bad_inputs():
    with pytest.raises(ValueError, match="sharing_factor"):
        CLA(sharing_factor=0)
    with pytest.raises(ValueError, match="consumer_reads"):
        CLA(consumer_reads="l2")
    with pytest.raises(TypeError, match="CLA"):
        decode_layers(object(), *layers(0, 2, 2, 1, 3, 2))
    q, k, v = layers(0, 3, 2, 1, 3, 2)
    with pytest.raises(ValueError, match="number of layers"):
        decode_layers(CLA(), q[:2], k, v)
