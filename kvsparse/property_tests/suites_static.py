"""Property suites of the static patterns (bigbird, longformer), exact RetrievalAttention, and the
stateful CORM and ClusterKV (step by step over drawn sequences, prefill of at least one token).

CORM and ClusterKV have no band: their kernels compute importance and cluster scores in float64 from
the rounded inputs, as the oracle does, so their sets must match exactly. Static patterns have no score function: the kernel's set must equal the oracle's exactly. Retrieval
ranks tokens by ``q . k``, so its suite has scores: ``+inf`` for the static set (always kept),
``q . k`` for the candidates, with the dtype's dot-product band (``suites.dot_band``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from .. import registry
from ..oracle import core
from .suites import MethodSuite, dot_band


def _bigbird_methods(shapes):
    from ..oracle.bigbird import BigBird
    return st.builds(BigBird, block_size=st.integers(1, 16), global_blocks=st.integers(0, 3),
                     window_blocks=st.integers(1, 4), random_blocks=st.integers(0, 4),
                     seed=st.integers(0, 2**16), layer=st.integers(0, 3))


registry.register_suite("bigbird")(MethodSuite("bigbird", _bigbird_methods))


def _longformer_methods(shapes):
    from ..oracle.longformer import Longformer
    n = max(shapes.n, 1)
    return st.builds(Longformer, window=st.integers(0, n + 2), dilation=st.integers(1, 4),
                     global_tokens=st.lists(st.integers(0, n + 2), max_size=4).map(tuple))


registry.register_suite("longformer")(MethodSuite("longformer", _longformer_methods))


def _retrieval_methods(shapes):
    from ..oracle.retrieval_attention import RetrievalAttention
    n = max(shapes.n, 1)
    return st.builds(RetrievalAttention, sinks=st.integers(0, n), window=st.integers(0, n),
                     top_k=st.one_of(st.integers(0, n + 1), st.sampled_from([1, n // 4 or 1])),
                     recall=st.just(1.0))


def _retrieval_scores(method, q, k, v, dtype):
    """Candidates: raw ``q . k`` (the search score); the static set ``+inf``; band of a raw dot product."""
    from ..oracle.retrieval_attention import inner_products, static_set
    s = inner_products(q, k)
    s[:, static_set(k.shape[1], method.sinks, method.window)] = np.inf
    return s, dot_band(q, k, dtype)


registry.register_suite("retrieval_attention")(MethodSuite("retrieval_attention", _retrieval_methods,
                                                           scores=_retrieval_scores))


def _corm_methods(shapes):
    from ..oracle.corm import CORM, CORM_GQA
    n = max(shapes.n, 1)
    return st.builds(CORM, window=st.integers(1, n + 1), recent=st.one_of(st.none(), st.integers(0, n)),
                     threshold=st.sampled_from([0.0, 0.5, 1.0, 2.0]), gqa=st.sampled_from(CORM_GQA))


def _corm_sequences():
    """CORM's prefill needs a prompt: prefill lengths of at least 1 (sequences have T >= 2)."""
    from .suites import decode_sequences
    return decode_sequences().map(lambda seq: dataclasses.replace(seq, prefill_len=max(1, seq.prefill_len)))


registry.register_suite("corm")(MethodSuite("corm", _corm_methods, sequences=_corm_sequences()))


def _clusterkv_methods(shapes):
    from ..oracle.clusterkv import GQA_POLICIES, INITS, METRICS, ClusterKV
    n = max(shapes.n, 1)
    return st.builds(ClusterKV, n_clusters=st.integers(1, 12), sinks=st.integers(0, 4),
                     budget=st.integers(0, n + 2), iterations=st.integers(1, 5), seed=st.integers(0, 2**16),
                     metric=st.sampled_from(METRICS), init=st.sampled_from(INITS), reassign=st.booleans(),
                     gqa=st.sampled_from(GQA_POLICIES))


registry.register_suite("clusterkv")(MethodSuite("clusterkv", _clusterkv_methods,
                                                 sequences=_corm_sequences()))
