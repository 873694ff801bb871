"""BigBird (Zaheer et al., NeurIPS 2020), causal decode variant: global + sliding + random *blocks*.

BigBird is an encoder pattern (``google-research/bigbird``: query block ``i`` sees the global blocks
0 and ``n-1``, the window ``i-1, i, i+1`` and ``r`` random middle blocks). There is no reference
decoder, so this package defines the causal decode variant (our definition, every part a field):

* Tokens are cut into blocks of ``block_size`` by position; the current token (the largest position)
  lies in query block ``i``.
* Global: blocks ``0 .. global_blocks - 1`` (the encoder's second global block, the last one, is the
  query's own block in decoding: it is in the window).
* Window: the ``window_blocks`` latest blocks ``i - window_blocks + 1 .. i`` (the query's own block up
  to the current token: causal).
* Random: ``random_blocks`` distinct blocks drawn uniformly without replacement from the blocks
  before the window that are not global (all of them if fewer), per query head, from
  ``numpy.random.default_rng([seed, layer, head, i])``: a static plan per (layer, head, query block),
  reproducible and independent of the cache length within a block.
* The kept set is a *set*: a block reached twice (window and random cannot overlap here; global and
  window can) is attended once. The encoder gather kernel's double counting of rows ``n-3, n-2`` is not
  reproduced (it is a bug of that kernel, not of the pattern).

Selection per query head; output: attention over the selected tokens (dense when the blocks cover
the context). Traffic: the selected K/V rows (``kv_traffic``); the plan is computed, not read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .sliding_window import StaticPattern, stateless_positions
from .types import Selection


def bigbird_blocks(query_block: int, head: int, *, global_blocks: int, window_blocks: int, random_blocks: int,
                   seed: int, layer: int) -> np.ndarray:
    """Sorted block indices query head ``head`` attends from query block ``query_block``."""
    window_start = max(0, query_block - window_blocks + 1)
    glob = np.arange(min(global_blocks, query_block + 1))
    window = np.arange(window_start, query_block + 1)
    candidates = np.arange(min(global_blocks, window_start), window_start)
    rng = np.random.default_rng([seed, layer, head, query_block])
    rand = rng.choice(candidates, size=min(random_blocks, candidates.size), replace=False)
    return np.unique(np.concatenate([glob, window, rand]).astype(np.int64))


@register_method
@dataclass(frozen=True)
class BigBird(StaticPattern):
    name: ClassVar[str] = "bigbird"
    family: ClassVar[str] = "static"
    summary: ClassVar[str] = "causal block pattern: global blocks + window blocks + seeded random earlier blocks"

    block_size: int = 64
    global_blocks: int = 1
    window_blocks: int = 3
    random_blocks: int = 3
    seed: int = 0
    layer: int = 0

    def __post_init__(self):
        core.check_positive_int(self.block_size, "block_size")
        core.check_positive_int(self.global_blocks, "global_blocks", allow_zero=True)
        core.check_positive_int(self.window_blocks, "window_blocks")
        core.check_positive_int(self.random_blocks, "random_blocks", allow_zero=True)
        core.check_positive_int(self.seed, "seed", allow_zero=True)
        core.check_positive_int(self.layer, "layer", allow_zero=True)

    def select(self, q, k, v, *, positions=None) -> Selection:
        pos = stateless_positions(positions, k.shape[1])
        if pos.size == 0:
            return Selection(tuple(np.zeros(0, np.int64) for _ in range(q.shape[0])), 0)
        block = pos // self.block_size
        query_block = int(block.max())
        sets = []
        for h in range(q.shape[0]):
            blocks = bigbird_blocks(query_block, h, global_blocks=self.global_blocks,
                                    window_blocks=self.window_blocks, random_blocks=self.random_blocks,
                                    seed=self.seed, layer=self.layer)
            sets.append(np.flatnonzero(np.isin(block, blocks)))
        return Selection(tuple(sets), k.shape[1])

    @classmethod
    def presets(cls) -> dict[str, "BigBird"]:
        return {
            "canonical": cls(),
            # bigbird/core/flags.py default block size 16 (released scripts use 64, the canonical)
            "bigbird-flags-block16": cls(block_size=16),
        }
