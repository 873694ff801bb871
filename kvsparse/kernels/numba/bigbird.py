"""BigBird (causal decode variant) in Numba: per query head, the tokens of its global, window and
seeded random blocks, attended with the shared-list sparse kernel (0/1 weights inside a GQA group).

The block plan (which blocks a head sees from the current query block) is the oracle's
``bigbird_blocks``: a static, seeded plan drawn with NumPy's Generator, a few integers per head, so the
kernel reuses it rather than re-deriving the Generator's stream; the kernel's work is the gather of the
planned blocks' tokens and the attention. Conventions: ``kvsparse.oracle.bigbird``."""
from __future__ import annotations

import numba
import numpy as np

from ...oracle.bigbird import bigbird_blocks
from ...oracle.method import check_positions
from ...registry import register_kernel
from .attention import attend_selection, check_float_arrays


@numba.njit(cache=True)
def tokens_of_blocks(pos, block_size, planned):
    """``planned [H_q, n_blocks]`` bool -> per head the sorted cache slots whose block is planned,
    as ``(lists [H_q, n], lengths [H_q])``."""
    h_q = planned.shape[0]
    n = pos.shape[0]
    lists = np.zeros((h_q, n), np.int64)
    lengths = np.zeros(h_q, np.int64)
    for h in range(h_q):
        m = 0
        for i in range(n):
            if planned[h, pos[i] // block_size]:
                lists[h, m] = i
                m += 1
        lengths[h] = m
    return lists, lengths


@register_kernel("bigbird", "numba")
def bigbird(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract: ``(out [H_q, d], indices)`` with one index array per query head."""
    q, k, v = check_float_arrays(q, k, v)
    h_q, n = q.shape[0], k.shape[1]
    pos = np.arange(n, dtype=np.int64) if positions is None else check_positions(positions, n)
    if n == 0:
        sets = [np.zeros(0, np.int64)] * h_q
    else:
        if pos.min() < 0:
            raise ValueError(f"positions must be non-negative, got minimum {pos.min()}")
        query_block = int(pos.max()) // method.block_size
        planned = np.zeros((h_q, query_block + 1), np.bool_)
        for h in range(h_q):
            planned[h, bigbird_blocks(query_block, h, global_blocks=method.global_blocks,
                                      window_blocks=method.window_blocks, random_blocks=method.random_blocks,
                                      seed=method.seed, layer=method.layer)] = True
        lists, lengths = tokens_of_blocks(pos, method.block_size, planned)
        sets = [lists[h, :lengths[h]] for h in range(h_q)]
    out, _ = attend_selection(q, k, v, sets, scale=scale)
    return out, sets
