"""Deja Vu's attention-head sparsity (Liu et al., ICML 2023): per token, only the heads a predictor
marks important are computed.

Conventions:

* The mask is per *query* head. ``head_mask`` (a predictor's output, a tuple of H_q bools) wins when
  given; otherwise the *oracle predictor* keeps the ``head_budget`` query heads (or
  ``budget_from_ratio(H_q, head_ratio, minimum=1)``) whose true dense output has the largest L2 norm
  ``||o_h||_2`` (logits scaled by ``1/sqrt(d)``), ties to the lower head index (``core.topk_indices``).
* A skipped head outputs 0: Deja Vu drops the head's slice of the output projection, which is the same
  as adding 0 to the residual stream. Its Selection entry is empty.
* Traffic: the kept heads' K/V rows (``kv_traffic``): under ``layout.share_kv_heads`` a KV head is read
  once if any query head of its group is kept and not at all otherwise; per kept query head without
  sharing. The predictor's own cost (a small MLP on the hidden state: weights, not KV) is not counted;
  the oracle predictor is a measurement device, its dense pass is not part of the method's cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Selection


def head_output_norms(q, k, v, *, scale: float | None = None) -> np.ndarray:
    """``[H_q]``: the L2 norm of every head's exact dense output (the oracle predictor's score)."""
    return np.linalg.norm(core.attend_dense(q, k, v, scale=scale), axis=-1)


@register_method
@dataclass(frozen=True)
class DejaVu(Method):
    name: ClassVar[str] = "deja_vu"
    family: ClassVar[str] = "structural"
    summary: ClassVar[str] = "compute only the heads a predictor keeps (oracle: largest true output norm); others output 0"

    head_ratio: float = 0.5
    head_budget: int | None = None
    head_mask: tuple[bool, ...] | None = None

    def __post_init__(self):
        core.exact_ratio(self.head_ratio)
        if self.head_budget is not None:
            core.check_positive_int(self.head_budget, "head_budget", allow_zero=True)
        if self.head_mask is not None:
            mask = tuple(self.head_mask)
            if not all(isinstance(b, (bool, np.bool_)) for b in mask):
                raise TypeError("head_mask must be a tuple of bools, one per query head")
            object.__setattr__(self, "head_mask", tuple(bool(b) for b in mask))

    def heads_to_keep(self, h_q: int) -> int:
        if self.head_budget is not None:
            return min(h_q, self.head_budget)
        return core.budget_from_ratio(h_q, self.head_ratio, minimum=1)

    def kept_heads(self, q, k, v) -> np.ndarray:
        """``[H_q]`` bool: the predictor's mask, or the oracle predictor's top heads."""
        h_q = q.shape[0]
        if self.head_mask is not None:
            if len(self.head_mask) != h_q:
                raise ValueError(f"head_mask must have one entry per query head ({h_q}), got {len(self.head_mask)}")
            return np.array(self.head_mask, dtype=bool)
        return core.topk_mask(head_output_norms(q, k, v), self.heads_to_keep(h_q))

    def select(self, q, k, v, *, positions=None) -> Selection:
        n = k.shape[1]
        keep = self.kept_heads(q, k, v)
        return Selection(tuple(np.arange(n) if kept else np.zeros(0, np.int64) for kept in keep), n)

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        # the masked dense form: a kept head is computed exactly as dense attention computes it
        return core.attend_mask(q, k, v, selection.mask(), scale=scale)

    @classmethod
    def presets(cls) -> dict[str, "DejaVu"]:
        return {"canonical": cls(), "all-heads": cls(head_ratio=1), "quarter-heads": cls(head_ratio=0.25)}
