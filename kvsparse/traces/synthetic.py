"""Synthetic attention traces with the structure of real ones, every feature an explicit seeded knob.

Queries and keys are built *before* RoPE from parts that each do one thing, then rotated with
``core.rope_apply`` (rotate-half layout; channel pair ``i`` is ``(i, i + d/2)`` with frequency
``base**(-2i/d)``, so the last pairs turn slowest):

* content noise: i.i.d. Gaussian parts whose ``q.k * scale`` has standard deviation ``noise`` nats;
* sink: token 0's key and every query share a direction ``u`` in the slowest pairs (so the bonus
  hardly depends on position): token 0 gets ``+sink_strength`` nats over an ordinary token;
* heavy hitters: ``n_heavy`` random tokens (never 0) share another slow direction ``w`` with the
  queries, ``+heavy_strength`` nats each;
* locality: query ``t`` and key ``t`` share a vector ``r_t`` that drifts with ``t`` (AR(1), unit norm on
  average, ``E r_t.r_j = exp(-|t-j| / local_window)``) in channel pairs turning at most once per
  ``local_window`` tokens (so RoPE hardly changes it): key ``j`` gets ``~ local_strength *
  exp(-|t-j| / local_window)`` nats, with fluctuations of relative size ``~ 1/sqrt(#channels)``;
* outlier channels: ``n_outlier_channels`` key channels carry a constant offset ``outlier_scale``
  (x the noise scale), the queries' spread in them shrinks by the same factor so logits keep their
  scale; as many other channels do the same with the roles of q and k swapped;
* ``special_value_scale`` multiplies the values of the sink and heavy tokens (real ones are small);
* ``head_variety``: each query head's sink / heavy / locality strength is multiplied by its own
  ``exp(head_variety * N(0, 1))`` factor;
* GQA with consecutive grouping (query head ``h`` reads KV head ``h // G``), as in the oracle.

Keys of sink and heavy tokens keep their bonus only through the sink/heavy direction: key noise is
projected off that plane, so each bonus alone is exact apart from the ``cos(theta t)`` of the slow
pairs (with both a sink and heavy hitters, RoPE also leaks ``~sin(theta t)`` between them).
``SyntheticConfig.presets()`` holds settings measured against the shipped SmolLM2 traces
(docs/traces.md compares their statistics).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..oracle import core
from . import format as fmt

SLOW_PAIRS = 4          # the slowest channel pairs carry the sink / heavy directions


@dataclass(frozen=True)
class SyntheticConfig:
    n_tokens: int = 1024
    n_layers: int = 1
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    rope_base: float | None = 10000.0    # None: no RoPE
    noise: float = 1.0                   # std of the content logits, nats
    sink_strength: float = 0.0           # logit bonus of token 0, nats
    n_heavy: int = 0
    heavy_strength: float = 0.0          # logit bonus of each heavy hitter, nats
    local_strength: float = 0.0          # logit bonus at distance 0, nats
    local_window: float = 32.0           # tokens over which the local bonus decays
    n_outlier_channels: int = 0          # per side (keys, and as many for queries)
    outlier_scale: float = 0.0           # offset of an outlier channel, in units of the noise scale
    special_value_scale: float = 1.0     # value norm factor of sink and heavy tokens
    head_variety: float = 0.0            # log-normal sigma of per-head strength factors
    seed: int = 0

    def __post_init__(self):
        for name in ("n_tokens", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            core.check_positive_int(getattr(self, name), name)
        core.check_positive_int(self.n_heavy, "n_heavy", allow_zero=True)
        core.check_positive_int(self.n_outlier_channels, "n_outlier_channels", allow_zero=True)
        core.check_positive_int(self.seed, "seed", allow_zero=True)
        core.group_size(self.n_heads, self.n_kv_heads)
        if self.head_dim % 2 or self.head_dim < 2 * SLOW_PAIRS + 4:
            raise ValueError(f"head_dim must be even and >= {2 * SLOW_PAIRS + 4}, got {self.head_dim}")
        for name in ("noise", "sink_strength", "heavy_strength", "local_strength", "outlier_scale",
                     "special_value_scale", "head_variety"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.rope_base is not None and not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1 or None, got {self.rope_base!r}")
        if not self.local_window >= 1:
            raise ValueError(f"local_window must be >= 1 token, got {self.local_window!r}")
        if self.n_heavy >= self.n_tokens:
            raise ValueError(f"n_heavy must be < n_tokens={self.n_tokens}, got {self.n_heavy}")
        if self.n_outlier_channels > 0 and self.outlier_scale <= 0:
            raise ValueError("outlier_scale must be > 0 when n_outlier_channels > 0")
        free = self.head_dim - 2 * SLOW_PAIRS
        if 2 * self.n_outlier_channels > free:
            raise ValueError(f"2 * n_outlier_channels must be <= {free} (channels outside the slow pairs), "
                             f"got {2 * self.n_outlier_channels}")

    @classmethod
    def presets(cls) -> dict[str, "SyntheticConfig"]:
        """``gaussian`` (no structure) and settings that resemble SmolLM2-135M layers (see docs/traces.md)."""
        smol = dict(n_heads=9, n_kv_heads=3, head_dim=64, rope_base=100000.0, n_tokens=2048)
        return {
            "gaussian": cls(),
            # early layer (3): persistent heavy hitters with small values, almost no sink
            "smollm2-early": cls(**smol, noise=1.7, sink_strength=4.5, n_heavy=20, heavy_strength=6.5,
                                 local_strength=3.5, local_window=64.0, n_outlier_channels=1, outlier_scale=9.0,
                                 special_value_scale=0.15, head_variety=0.3),
            # late layer (27): a strong sink with a small value, strong short-range locality
            "smollm2-late": cls(**smol, noise=0.8, sink_strength=10.5, n_heavy=0, heavy_strength=0.0,
                                local_strength=10.0, local_window=16.0, n_outlier_channels=1, outlier_scale=13.0,
                                special_value_scale=0.2, head_variety=0.3),
        }


def _rope_pairs(cfg: SyntheticConfig):
    half = cfg.head_dim // 2
    slow = np.arange(half - SLOW_PAIRS, half)
    base = cfg.rope_base if cfg.rope_base is not None else 10000.0
    theta = base ** (-2.0 * np.arange(half) / cfg.head_dim)
    pairs = np.arange(half - SLOW_PAIRS)
    if cfg.rope_base is None:
        return half, slow, pairs
    turning_slowly = pairs[theta[pairs] * cfg.local_window <= 1.0]
    return half, slow, turning_slowly if turning_slowly.size >= 2 else pairs[-2:]


def _pair_channels(pairs, half):
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.concatenate([pairs, pairs + half])


def _unit_in(channels, d, rng, exclude=None):
    x = np.zeros(d)
    x[channels] = rng.standard_normal(len(channels))
    if exclude is not None:
        x -= (x @ exclude) * exclude
    return x / np.linalg.norm(x)


def generate_layer(cfg: SyntheticConfig, rng: np.random.Generator):
    """One layer: ``(q [T, H_q, d], k [T, H_kv, d], v [T, H_kv, d], k_pre_rope)`` in float64."""
    T, h_q, h_kv, d = cfg.n_tokens, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = h_q // h_kv
    scale = core.default_scale(d)
    half, slow, local_pairs = _rope_pairs(cfg)
    slow_ch = _pair_channels(slow, half)
    s = math.sqrt(cfg.noise)                       # per-channel std: (s^2)^2 * d * scale^2 = noise^2
    q = s * rng.standard_normal((T, h_q, d))
    k = s * rng.standard_normal((T, h_kv, d))
    v = rng.standard_normal((T, h_kv, d))
    factors = np.exp(cfg.head_variety * rng.standard_normal((3, h_q)))     # sink, heavy, local per query head
    heavy = np.sort(rng.choice(np.arange(1, T), size=cfg.n_heavy, replace=False)) if cfg.n_heavy else np.zeros(0, int)
    other = np.setdiff1d(np.arange(d), slow_ch)
    outlier_ch = rng.choice(other, size=2 * cfg.n_outlier_channels, replace=False)
    k_out, q_out = outlier_ch[: cfg.n_outlier_channels], outlier_ch[cfg.n_outlier_channels:]
    local_ch = np.setdiff1d(_pair_channels(local_pairs, half), outlier_ch)
    for hk in range(h_kv):
        heads = slice(hk * g, (hk + 1) * g)
        u = _unit_in(slow_ch, d, rng)
        w = _unit_in(slow_ch, d, rng, exclude=u)
        # keys carry nothing along u, w except the planted bonuses: project the noise off that plane
        k[:, hk] -= np.outer(k[:, hk] @ u, u) + np.outer(k[:, hk] @ w, w)
        if cfg.sink_strength > 0:
            b = math.sqrt(cfg.sink_strength / scale)
            k[0, hk] += b * u
            q[:, heads] += (cfg.sink_strength * factors[0, heads] / (b * scale))[None, :, None] * u
        if cfg.n_heavy and cfg.heavy_strength > 0:
            b = math.sqrt(cfg.heavy_strength / scale)
            k[heavy, hk] += b * w
            q[:, heads] += (cfg.heavy_strength * factors[1, heads] / (b * scale))[None, :, None] * w
        if cfg.local_strength > 0:
            # a vector shared by q_t and k_t that drifts with t (AR(1), correlation rho^|t-j|), in
            # channels that turn slowly over the window, so RoPE leaves the bonus nearly intact
            rho = math.exp(-1.0 / cfg.local_window)
            m = local_ch.size
            eps = rng.standard_normal((T, m)) / math.sqrt(m)
            r = np.empty((T, m))
            r[0] = eps[0]
            for t in range(1, T):
                r[t] = rho * r[t - 1] + math.sqrt(1 - rho * rho) * eps[t]
            c = math.sqrt(cfg.local_strength / scale)
            k[:, hk, local_ch] += c * r
            q[:, heads, local_ch] += c * factors[2, heads][None, :, None] * r[:, None, :]
    if cfg.n_outlier_channels:
        k[:, :, k_out] = k[:, :, k_out] / cfg.outlier_scale + cfg.outlier_scale * s
        q[:, :, k_out] /= cfg.outlier_scale
        q[:, :, q_out] = q[:, :, q_out] / cfg.outlier_scale + cfg.outlier_scale * s
        k[:, :, q_out] /= cfg.outlier_scale
    special = np.concatenate([[0] if cfg.sink_strength > 0 else [], heavy]).astype(int)
    v[special] *= cfg.special_value_scale
    if cfg.rope_base is None:
        return q, k, v, k.copy()
    pos = np.arange(T)
    rot = lambda x: core.rope_apply(x.transpose(1, 0, 2), pos, base=cfg.rope_base).transpose(1, 0, 2)
    return rot(q), rot(k), v, k


def synthetic_trace(cfg: SyntheticConfig = SyntheticConfig(), *, dtype: str = "float32",
                    keep_pre_rope: bool = False) -> fmt.AttentionTrace:
    """A seeded synthetic ``AttentionTrace`` (layer ``i`` from the ``i``-th child of ``SeedSequence(seed)``)."""
    children = np.random.SeedSequence(cfg.seed).spawn(cfg.n_layers)
    layers = {}
    for i, child in enumerate(children):
        q, k, v, k_pre = generate_layer(cfg, np.random.default_rng(child))
        layers[i] = fmt.LayerQKV(q, k, v, k_pre if keep_pre_rope else None)
    config = {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "head_dim": cfg.head_dim, "rope_base": cfg.rope_base,
              "rope_layout": "half" if cfg.rope_base is not None else "none",
              "attention_scale": core.default_scale(cfg.head_dim)}
    meta = fmt.make_metadata(
        model={"name": "synthetic"}, config=config, dtype=dtype, n_tokens=cfg.n_tokens, layers=range(cfg.n_layers),
        has_k_pre_rope=keep_pre_rope, prompt={"source": "none (synthetic)", "licence": "n/a"},
        made={"by": "kvsparse.traces.synthetic", "knobs": json.loads(json.dumps(asdict(cfg)))})
    return fmt.build_trace(layers, metadata=meta)


def preset(name: str, **overrides) -> SyntheticConfig:
    """A named preset with some knobs changed (e.g. ``preset("smollm2-late", n_tokens=512, seed=3)``)."""
    presets = SyntheticConfig.presets()
    if name not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {name!r}")
    return replace(presets[name], **overrides)
