"""Quest (Tang et al., ICML 2024): query-aware page selection over a full KV cache.

The cache is cut into pages of ``page_size`` consecutive tokens. Each page keeps, per KV head, the
element-wise minimum and maximum of its keys (``page_metadata``). At a decode step, query head ``h``
scores every page of its KV head with the upper bound

    U_P(q) = sum_i max(q_i * min_{P,i}, q_i * max_{P,i})  >=  max_{j in P} q . k_j

(``page_scores``; unscaled, as in the reference code: the scale does not change a top-k) and
attends exactly to every token of its top pages. Selection is per *query* head (the accuracy code
runs ``repeat_kv``); the metadata rows are shared by a GQA group.

Conventions (all explicit fields of ``Quest``):

* Partial last page: its min/max cover only its filled tokens (never padding).
* ``budget_rounding``: pages = ``floor(B / P)`` (canonical, the pages fit in the budget),
  ``ceil(B / P)``, or Twilight's ``max(1, B // P) + (B % P != 0)``; then at least ``min_pages``.
  A budget smaller than a page therefore still attends one page (more tokens than the budget).
* ``last_page``: ``"scored"`` (canonical, accuracy path: the last page competes like any other) or
  ``"always"`` (kernel path, ``quest/utils/controller.py``: the page budget counts the last page,
  which is always attended and excluded from scoring; if the cache has no more pages than the page
  budget, estimation is skipped and attention is dense).
* ``cap_budget_at_n``: the accuracy path counts pages from ``min(n, B)``, not ``B``.
* ``dense_if_budget_covers``: ``token_budget >= n`` means dense attention. The reference paths do not
  have this rule and can drop a page although the budget covers the context (see the presets).
* Ties between equal page scores: the core rule (lower page index wins).
* Dense first layers: ``layer < dense_layers`` means dense attention (Quest: layers 0 and 1). ``layer
  = None`` means "a sparse layer" (the caller routes the first layers to dense attention itself).

Traffic: the selected K/V rows (``kv_traffic``) plus the metadata reads, tensor ``"metadata"`` in
HBM: two rows (min and max) of ``d`` elements at ``layout.element_bits`` for every *scored* page,
read once per KV head under ``layout.share_kv_heads`` (the group shares the metadata) and once per
query head otherwise. A dense step (dense layer, budget covering the context, or the kernel path's
skipped estimation) reads no metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Layout, Selection, Traffic, kv_traffic

BUDGET_ROUNDINGS = ("floor", "ceil", "twilight")
LAST_PAGE_RULES = ("scored", "always")


def page_metadata(k, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise ``(min, max)`` of the keys of every page: two ``[H_kv, ceil(n / P), d]`` arrays.

    The last page may be partial: its min/max run over its filled tokens only. A zero pad would keep
    the bound valid but loosen it: a partial page of negative keys would score as if it held a 0.
    """
    k = core.as_float64(k, "k", ndim=3)
    page_size = core.check_positive_int(page_size, "page_size")
    h_kv, n, d = k.shape
    full = n // page_size
    body = k[:, : full * page_size].reshape(h_kv, full, page_size, d)
    lo, hi = body.min(axis=2), body.max(axis=2)
    if n % page_size:  # the partial last page: its filled tokens only, no padding
        tail = k[:, full * page_size:]
        lo = np.concatenate([lo, tail.min(axis=1, keepdims=True)], axis=1)
        hi = np.concatenate([hi, tail.max(axis=1, keepdims=True)], axis=1)
    return lo, hi


def page_scores(q, kmin, kmax) -> np.ndarray:
    """``[H_q, n_pages]``: ``sum_i max(q_i * min_i, q_i * max_i)``, query head ``h`` on KV head ``h // G``.

    An upper bound on ``q . k_j`` for every key ``j`` of the page (no ``1/sqrt(d)`` scale).
    """
    q = core.as_float64(q, "q", ndim=2)
    kmin = core.as_float64(kmin, "kmin", ndim=3)
    kmax = core.as_float64(kmax, "kmax", ndim=3)
    if kmin.shape != kmax.shape:
        raise ValueError(f"kmin {kmin.shape} and kmax {kmax.shape} must have the same shape")
    if kmin.shape[2] != q.shape[1]:
        raise ValueError(f"metadata head dim {kmin.shape[2]} must equal q's head dim {q.shape[1]}")
    h_q, d = q.shape
    h_kv, n_pages, _ = kmin.shape
    g = core.group_size(h_q, h_kv)
    qg = q.reshape(h_kv, g, d)
    # max(q_i min_i, q_i max_i) is q_i max_i where q_i > 0 and q_i min_i where q_i < 0 (0 at q_i = 0)
    bound = (np.einsum("hgd,hpd->hgp", np.maximum(qg, 0.0), kmax)
             + np.einsum("hgd,hpd->hgp", np.minimum(qg, 0.0), kmin))
    return bound.reshape(h_q, n_pages)


def pages_to_tokens(pages: np.ndarray, page_size: int, n: int) -> np.ndarray:
    """Sorted token indices of the given pages, the last page cut at ``n``."""
    pages = np.sort(np.asarray(pages, dtype=np.int64))
    tok = (pages[:, None] * page_size + np.arange(page_size)[None, :]).ravel()
    return tok[tok < n]


def attend_selection(q, k, v, selection: Selection, *, scale: float | None = None) -> np.ndarray:
    """Exact softmax attention over ``selection``: core's gather (``attend_indices``) for small sets,
    core's masked attention over the whole cache (``attend_mask``, no gather) once the heads keep
    more than 1/16 of the tokens on average. Same math, a speed choice only."""
    if selection.sizes.mean() * 16 > selection.n:
        return core.attend_mask(q, k, v, selection.mask(), scale=scale)
    return core.attend_indices(q, k, v, selection.indices, scale=scale)


@register_method
@dataclass(frozen=True)
class Quest(Method):
    """Quest page selection; see the module docstring for every convention."""

    name: ClassVar[str] = "quest"
    family: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "pages of P keys keep min/max; attend the top pages by sum_i max(q_i min_i, q_i max_i)"

    token_budget: int = 1024
    page_size: int = 16
    budget_rounding: str = "floor"
    min_pages: int = 1
    last_page: str = "scored"
    dense_if_budget_covers: bool = True
    cap_budget_at_n: bool = False
    dense_layers: int = 2
    layer: int | None = None

    def __post_init__(self):
        core.check_positive_int(self.token_budget, "token_budget")
        core.check_positive_int(self.page_size, "page_size")
        core.check_positive_int(self.min_pages, "min_pages")
        core.check_positive_int(self.dense_layers, "dense_layers", allow_zero=True)
        if self.layer is not None:
            core.check_positive_int(self.layer, "layer", allow_zero=True)
        if self.budget_rounding not in BUDGET_ROUNDINGS:
            raise ValueError(f"budget_rounding must be one of {BUDGET_ROUNDINGS}, got {self.budget_rounding!r}")
        if self.last_page not in LAST_PAGE_RULES:
            raise ValueError(f"last_page must be one of {LAST_PAGE_RULES}, got {self.last_page!r}")
        for flag in ("dense_if_budget_covers", "cap_budget_at_n"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")

    # --- the page count and when Quest falls back to dense attention ------------------------
    def page_budget(self, n: int) -> int:
        """Pages to attend for an ``n``-token cache, before capping at the number of pages."""
        b, p = (min(n, self.token_budget) if self.cap_budget_at_n else self.token_budget), self.page_size
        if self.budget_rounding == "floor":
            pages = b // p
        elif self.budget_rounding == "ceil":
            pages = -(-b // p)
        else:  # Twilight's quest_selector
            pages = max(1, b // p) + (b % p != 0)
        return max(self.min_pages, pages)

    def is_dense(self, n: int) -> bool:
        """True when this step attends to all ``n`` tokens without estimation."""
        if self.layer is not None and self.layer < self.dense_layers:
            return True
        if self.dense_if_budget_covers and self.token_budget >= n:
            return True
        n_pages = -(-n // self.page_size)
        return self.last_page == "always" and n_pages <= self.page_budget(n)

    def scored_pages(self, n: int) -> int:
        """How many pages' metadata a step over ``n`` tokens reads."""
        if self.is_dense(n):
            return 0
        n_pages = -(-n // self.page_size)
        return n_pages - 1 if self.last_page == "always" else n_pages

    # --- the method ---------------------------------------------------------------------------
    def select_pages(self, q, k) -> list[np.ndarray]:
        """Per query head, the sorted chosen page indices (all pages on a dense step)."""
        h_q, n = q.shape[0], k.shape[1]
        n_pages = -(-n // self.page_size)
        if self.is_dense(n):
            return [np.arange(n_pages, dtype=np.int64) for _ in range(h_q)]
        kmin, kmax = page_metadata(k, self.page_size)
        scores = page_scores(q, kmin, kmax)
        if self.last_page == "always":
            top = core.topk_indices(scores[:, : n_pages - 1], self.page_budget(n) - 1)
            return [np.sort(np.append(row, n_pages - 1)) for row in top]
        top = core.topk_indices(scores, min(self.page_budget(n), n_pages))
        return [np.sort(row) for row in top]

    def select(self, q, k, v, *, positions=None) -> Selection:
        n = k.shape[1]
        if self.is_dense(n):
            return Selection.full(q.shape[0], n)
        pages = self.select_pages(q, k)
        return Selection(tuple(pages_to_tokens(p, self.page_size, n) for p in pages), n)

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        return attend_selection(q, k, v, selection, scale=scale)

    def metadata_traffic(self, n: int, *, h_q: int, h_kv: int, d: int, layout: Layout) -> Traffic:
        """Bytes of the min/max page metadata one step reads (tensor ``metadata``, HBM)."""
        readers = h_kv if layout.share_kv_heads else h_q
        return Traffic({("hbm", "metadata"): 2 * self.scored_pages(n) * layout.row_bytes(d) * readers}, layout)

    def traffic(self, selection: Selection, *, h_kv: int, d: int, layout: Layout) -> Traffic:
        return kv_traffic(selection, h_kv, d, layout) + self.metadata_traffic(
            selection.n, h_q=selection.h_q, h_kv=h_kv, d=d, layout=layout)

    @classmethod
    def presets(cls) -> dict[str, "Quest"]:
        return {
            "canonical": cls(),
            # evaluation/quest_attention.py: pages = min(max(3, min(n, B) // P), ceil(n / P)); nothing
            # forced; no dense rule for B >= n (with a partial last page it can drop one page).
            "quest-accuracy": cls(min_pages=3, dense_if_budget_covers=False, cap_budget_at_n=True),
            # quest/utils/controller.py: page budget counts the always-attended last page; dense when
            # the cache has at most page_budget pages.
            "quest-kernel": cls(last_page="always", dense_if_budget_covers=False),
            # Twilight's pyimpl/quest.py selector: ceil-like page count, no dense rule.
            "twilight-quest": cls(token_budget=8192, budget_rounding="twilight", dense_if_budget_covers=False),
        }

