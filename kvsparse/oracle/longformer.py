"""Longformer (Beltagy et al., 2020), causal decode variant: a (dilated) sliding window + global tokens.

``allenai/longformer`` with ``autoregressive=True`` gives query ``i`` the keys ``i - w .. i``
(``attention_window`` is one-sided there; HF's config value is the two-sided total, halved).
Conventions (fields of ``Longformer``):

* ``window`` = w, one-sided: the current token and the ``w`` tokens before it (``w + 1`` keys).
* ``dilation`` = δ: the keys at distance ``0, δ, 2δ, .., wδ`` (``w + 1`` keys over a span of ``wδ``);
  δ = 1 is the plain window. (The reference supports dilation only in its TVM kernel.)
* ``global_tokens``: positions every query attends to (causally: those ``<=`` the current position);
  a global token inside the window is attended once (the reference removes global keys from the band
  before adding them as extra columns). If the current token is itself global it attends to every
  earlier token (a global query row). The reference's separate global projections are outside the
  oracle's scope (they change q, k, v, not the pattern).

Selection: the same set for every head; output: attention over it. Traffic: the selected K/V rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import register_method
from . import core
from .sliding_window import StaticPattern, stateless_positions
from .types import Selection


def longformer_mask(positions: np.ndarray, window: int, dilation: int, global_tokens) -> np.ndarray:
    """``[n]`` bool: the dilated causal band of the current (largest) position plus the global tokens."""
    if positions.size == 0:
        return np.zeros(0, dtype=bool)
    cur = positions.max()
    glob = np.isin(positions, np.asarray(global_tokens, dtype=np.int64))
    if cur in set(int(g) for g in global_tokens):
        return np.ones(positions.size, dtype=bool)
    dist = cur - positions
    band = (dist % dilation == 0) & (dist <= window * dilation)
    return band | glob


@register_method
@dataclass(frozen=True)
class Longformer(StaticPattern):
    name: ClassVar[str] = "longformer"
    family: ClassVar[str] = "static"
    summary: ClassVar[str] = "causal (dilated) sliding window + global tokens, each key counted once"

    window: int = 256
    dilation: int = 1
    global_tokens: tuple[int, ...] = (0,)

    def __post_init__(self):
        core.check_positive_int(self.window, "window", allow_zero=True)
        core.check_positive_int(self.dilation, "dilation")
        if not isinstance(self.global_tokens, tuple):
            raise TypeError(f"global_tokens must be a tuple of positions, got {type(self.global_tokens).__name__}")
        for g in self.global_tokens:
            core.check_positive_int(g, "global_tokens[i]", allow_zero=True)

    def select(self, q, k, v, *, positions=None) -> Selection:
        pos = stateless_positions(positions, k.shape[1])
        keep = np.flatnonzero(longformer_mask(pos, self.window, self.dilation, self.global_tokens))
        return Selection(tuple(keep for _ in range(q.shape[0])), k.shape[1])

    @classmethod
    def presets(cls) -> dict[str, "Longformer"]:
        return {
            "canonical": cls(),
            # HF LongformerConfig attention_window=512 is two-sided: 256 per side; no dilation
            "hf-longformer-base": cls(window=256, global_tokens=(0,)),
            # a dilated head as in the char-LM's upper layers (window 256, dilation 2) [paper, not re-checked]
            "dilated-2": cls(window=256, dilation=2),
        }
