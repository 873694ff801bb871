"""Dense decode attention: every head attends to all n cached tokens. The baseline every method
reduces to when its budget covers the context."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register_method
from . import core
from .method import Method, check_positions
from .types import Layout, Selection, StepResult


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

    def step(self, q, k, v, *, positions=None, scale=None, layout: Layout = Layout()) -> StepResult:
        """As ``Method.step``, but a low-precision cache is never copied to float64 whole (see
        ``core.attend_dense_partial``): peak memory stays below the cache's own size."""
        q, k, v, sh = core.check_decode_inputs(q, k, v, scale=scale, cast=False)
        if positions is not None:
            check_positions(positions, sh.n)
        selection = Selection.full(sh.h_q, sh.n)
        output = core.attend_dense(q, k, v, scale=scale)
        return StepResult(selection, output, self.traffic(selection, h_kv=sh.h_kv, d=sh.d, layout=layout))
