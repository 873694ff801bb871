"""Dense decode attention: every head attends to all n cached tokens. The baseline every method
reduces to when its budget covers the context."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register_method
from . import core
from .method import Method
from .types import Selection


@register_method
@dataclass(frozen=True)
class Dense(Method):
    name = "dense"
    family = "baseline"
    summary = "softmax(q K^T / sqrt(d)) V over all n tokens"

    def select(self, q, k, v, *, positions=None) -> Selection:
        return Selection.full(q.shape[0], k.shape[1])

    def attend(self, q, k, v, selection, *, scale=None) -> np.ndarray:
        # the full selection needs no gather: one batched softmax over all tokens
        return core.attend_dense(q, k, v, scale=scale)
