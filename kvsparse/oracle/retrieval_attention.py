"""RetrievalAttention (Liu et al., arXiv 2409.10516): a static set on the GPU plus keys retrieved from
host memory by nearest-neighbour search, the two partial attentions merged by log-sum-exp.

No reference code of the original method is public (microsoft/RetrievalAttention now hosts its
successor RetroInfer), so this oracle follows the paper; every choice below is a parameter or stated.

* Static set ``W``: the first ``sinks`` tokens and the last ``window`` tokens of the cache by cache
  index (the window includes the current token ``n - 1``; at step ``t`` the new token is appended
  before attention). Positions are cache indices: the cache is never compacted.
* Candidates: every other token, ``[sinks, n - window)``. Retrieval is per *query* head (each head
  searches with its own query in its KV head's keys) by maximum inner product ``q . k`` (MIPS: not
  cosine, not L2; the 1/sqrt(d) scale does not change the order). The exact oracle returns the
  ``k_eff = min(top_k, #candidates)`` best with core.topk_indices (ties: lower index).
* Approximate retrieval with ``recall`` in [0, 1]: the index always returns ``k_eff`` tokens, of
  which exactly ``floor(recall * k_eff)`` (core.budget_from_ratio) are true top-``k_eff`` neighbours,
  except that a miss needs a replacement from outside the true top-``k_eff``: the number of misses
  is ``min(k_eff - floor(recall * k_eff), #candidates - k_eff)`` (so ``top_k >= #candidates``
  returns every candidate at any recall). Which true neighbours are missed: a uniform draw without
  replacement. What replaces them: with ``replacement="next_ranked"`` the candidates ranked
  ``k_eff, k_eff + 1, ...`` (an index that returns near misses), with ``"uniform"`` a uniform draw
  without replacement from the candidates outside the true top-``k_eff``. The generator is
  ``numpy.random.default_rng([seed, n, h])``: reproducible, different at every cache length and head.
  ``recall = 1`` consumes no randomness and is the exact oracle.
* Output: ``merge_partials`` of attention over ``W`` and over the retrieved set ``R``: exact softmax
  over ``W u R`` because they are disjoint by construction (``merge_disjoint`` checks it and raises
  on overlap). No correction for the mass of tokens that were not retrieved.
* Traffic (reads per step; "host" is memory the CPU reads itself, "pcie" what crosses the link):
  - hbm keys/values: the rows of ``W`` (``kv_traffic`` of the static selection: GPU side);
  - host keys (the search): ``scan_ratio=None`` is a flat scan that reads every candidate key,
    once per KV head under ``share_kv_heads`` (one GEMM for the group) and once per query head
    otherwise; a ratio models an index that visits ``max(k_eff, floor(ratio * #candidates))`` keys
    per query head (graph searches of different queries do not share reads; graph adjacency lists
    are not counted);
  - host keys/values (CPU attention): the rows of ``R`` (union over the group under ``share_kv_heads``);
  - pcie auxiliary: the query going down (``H_q * d`` elements) and the CPU's partial output
    (``H_q * d`` elements) plus one ``lse_bytes`` log-sum-exp per query head coming back, elements at
    the layout's element size. Nothing of the KV cache crosses the link.
  When nothing is retrieved (no candidates or ``top_k = 0``) no search, CPU attention or message happens.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Real
from typing import Sequence

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Layout, Selection, Traffic, kv_traffic

REPLACEMENTS = ("next_ranked", "uniform")


def static_set(n: int, sinks: int, window: int) -> np.ndarray:
    """Cache indices of the sinks ``[0, sinks)`` and the window ``[n - window, n)`` (sorted, unique)."""
    n = core.check_positive_int(n, "n", allow_zero=True)
    sinks = core.check_positive_int(sinks, "sinks", allow_zero=True)
    window = core.check_positive_int(window, "window", allow_zero=True)
    return np.union1d(np.arange(min(sinks, n)), np.arange(max(n - window, 0), n)).astype(np.int64)


def candidates(n: int, sinks: int, window: int) -> np.ndarray:
    """The tokens outside the static set, ``[sinks, n - window)`` (what the host-side index holds)."""
    return np.setdiff1d(np.arange(n), static_set(n, sinks, window)).astype(np.int64)


def inner_products(q, k) -> np.ndarray:
    """``[H_q, n]`` raw ``q . k`` of every query head with every key of its KV head (the search score)."""
    return core.logits(q, k, scale=1.0)


def exact_knn(scores: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` tokens of ``pool`` with the largest score (``scores [n]`` of one head), best first;
    lower index on ties."""
    return pool[core.topk_indices(scores[pool], k)]


def approximate_knn(scores: np.ndarray, pool: np.ndarray, k: int, *, recall, replacement: str,
                    rng: np.random.Generator) -> np.ndarray:
    """``k_eff`` retrieved tokens (sorted) of which ``floor(recall * k_eff)`` are true neighbours, as far
    as replacements exist (module doc: which are missed, what replaces them)."""
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    ranked = exact_knn(scores, pool, pool.size)          # the whole pool, best first
    k_eff = min(k, pool.size)
    true, rest = ranked[:k_eff], ranked[k_eff:]
    # an index returns k_eff tokens, so a miss needs a replacement from outside the true top-k
    misses = min(k_eff - core.budget_from_ratio(k_eff, recall), rest.size)
    if misses == 0:
        return np.sort(true)
    kept = true[np.sort(rng.choice(k_eff, size=k_eff - misses, replace=False))]
    if replacement == "next_ranked":
        new = rest[:misses]
    else:
        new = rest[rng.choice(rest.size, size=misses, replace=False)]
    return np.sort(np.concatenate([kept, new]))


def merge_disjoint(q, k, v, static_sets: Sequence, retrieved_sets: Sequence, *,
                   scale: float | None = None) -> core.Partial:
    """Attention over ``static_sets[h]`` and ``retrieved_sets[h]`` separately, then merged.

    Equal to attention over the union only because the parts are disjoint: an overlap is a
    ``ValueError`` (core.check_disjoint), never a silent double count.
    """
    if len(static_sets) != len(retrieved_sets):
        raise ValueError(f"static_sets and retrieved_sets must have one set per query head each, got "
                         f"{len(static_sets)} and {len(retrieved_sets)}")
    for h, (w, r) in enumerate(zip(static_sets, retrieved_sets)):
        core.check_disjoint([w, r], f"static and retrieved sets of query head {h}")
    gpu = core.attend_indices_partial(q, k, v, static_sets, scale=scale)
    cpu = core.attend_indices_partial(q, k, v, retrieved_sets, scale=scale)
    return core.merge_partials([gpu, cpu])


def _check_ratio(value, name: str):
    if isinstance(value, bool) or not isinstance(value, (Real, Fraction, str)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    core.exact_ratio(value)   # raises if outside [0, 1] or not finite


@register_method
@dataclass(frozen=True)
class RetrievalAttention(Method):
    """Hyper-parameters. ``sinks``/``window``/``top_k`` defaults (128 / 512 / 100) are recalled from the
    paper and not verified against its text; ``recall = 1`` is the exact nearest-neighbour oracle."""

    name = "retrieval_attention"
    family = "dynamic"
    summary = "static sinks + window on GPU, top-k inner-product retrieval of the rest on CPU, LSE merge"

    sinks: int = 128
    window: int = 512
    top_k: int = 100
    recall: float = 1.0
    replacement: str = "next_ranked"
    seed: int = 0
    scan_ratio: float | None = None
    lse_bytes: int = 4

    def __post_init__(self):
        core.check_positive_int(self.sinks, "sinks", allow_zero=True)
        core.check_positive_int(self.window, "window", allow_zero=True)
        core.check_positive_int(self.top_k, "top_k", allow_zero=True)
        core.check_positive_int(self.seed, "seed", allow_zero=True)
        core.check_positive_int(self.lse_bytes, "lse_bytes")
        _check_ratio(self.recall, "recall")
        if self.scan_ratio is not None:
            _check_ratio(self.scan_ratio, "scan_ratio")
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")

    def retrieve(self, q: np.ndarray, k: np.ndarray) -> list[np.ndarray]:
        """Per query head, the retrieved tokens (sorted); disjoint from the static set."""
        n = k.shape[1]
        pool = candidates(n, self.sinks, self.window)
        scores = inner_products(q, k)
        if core.exact_ratio(self.recall) == 1:    # the exact oracle: no randomness
            return [np.sort(exact_knn(s, pool, self.top_k)) for s in scores]
        return [approximate_knn(s, pool, self.top_k, recall=self.recall, replacement=self.replacement,
                                rng=np.random.default_rng([self.seed, n, h])) for h, s in enumerate(scores)]

    def select(self, q, k, v, *, positions=None) -> Selection:
        w = static_set(k.shape[1], self.sinks, self.window)
        return Selection(tuple(np.union1d(w, r) for r in self.retrieve(q, k)), k.shape[1])

    def split(self, selection: Selection) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The selection's static part and retrieved part, per query head."""
        w = static_set(selection.n, self.sinks, self.window)
        return [w] * selection.h_q, [np.setdiff1d(ix, w) for ix in selection.indices]

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        static, retrieved = self.split(selection)
        return merge_disjoint(q, k, v, static, retrieved, scale=scale).out

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        static, retrieved = self.split(selection)
        h_q, n = selection.h_q, selection.n
        gpu = kv_traffic(Selection(tuple(static), n), h_kv, d, layout)
        cpu_attn = kv_traffic(Selection(tuple(retrieved), n), h_kv, d, layout, memory="host")
        pool = candidates(n, self.sinks, self.window).size
        k_eff = min(self.top_k, pool)
        if k_eff == 0:
            return gpu + cpu_attn
        row = layout.row_bytes(d)
        if self.scan_ratio is None:
            searches = h_kv if layout.share_kv_heads else h_q
            scanned = pool
        else:
            searches = h_q
            scanned = max(k_eff, core.budget_from_ratio(pool, self.scan_ratio))
        search = Traffic({("host", "keys"): searches * scanned * row}, layout)
        messages = Traffic({("pcie", "auxiliary"): 2 * h_q * row + h_q * self.lse_bytes}, layout)
        return gpu + cpu_attn + search + messages

    @classmethod
    def presets(cls) -> dict[str, "RetrievalAttention"]:
        return {
            "canonical": cls(),
            # an index that visits 3% of the keys (the paper's "1-3% of the data") and misses 10% of
            # the true top-k: an illustrative operating point, not a measured one
            "approximate": cls(recall=0.9, scan_ratio=0.03),
        }
