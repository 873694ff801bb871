"""Model shapes for the simulator: built-ins (``data/models.toml``) and any HF ``config.json`` offline.

What a decode step reads besides the KV cache is the weights: every linear layer and norm of every
layer, the final norm and the LM head, plus one embedding row per request (the embedding table is
gathered, not streamed). MoE layers read the shared experts, the router, and the routed experts the
batch touches: with B requests and top-k of E experts, the expected number of distinct experts under
uniform independent routing is ``E * (1 - (1 - k/E)^B)`` (exactly k for B = 1; an assumption for B > 1).

KV per token per layer: ``2 * H_kv * head_dim`` elements for MHA/GQA/MQA; for MLA (absorbed decode,
as vLLM/SGLang cache it) one latent of ``kv_lora_rank`` plus the shared RoPE key of
``qk_rope_head_dim``: values are read from the same latent rows, so there is no factor 2.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from .hardware import tomllib


@dataclass(frozen=True)
class AttentionShape:
    """What one layer's decode attention looks like to a kernel.

    ``values_in_keys``: the value rows are a prefix of the key rows (MLA's latent), so reading the
    keys reads the values; cost models then count no separate value bytes.
    """

    h_q: int
    h_kv: int
    d: int
    d_v: int
    values_in_keys: bool = False

    def __post_init__(self):
        for name in ("h_q", "h_kv", "d", "d_v"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.h_q % self.h_kv:
            raise ValueError(f"h_q={self.h_q} must be a multiple of h_kv={self.h_kv}")
        if self.values_in_keys and self.d_v > self.d:
            raise ValueError(f"values_in_keys needs d_v <= d, got d_v={self.d_v}, d={self.d}")

    def kv_elements_per_token(self) -> int:
        return self.h_kv * (self.d if self.values_in_keys else self.d + self.d_v)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str
    n_layers: int
    hidden: int
    h_q: int
    h_kv: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    # MLA (DeepSeek-V2/V3); kv_lora_rank > 0 turns it on
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE; n_routed_experts > 0 turns it on
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    first_dense_layers: int = 0
    moe_layer_freq: int = 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def attention(self) -> AttentionShape:
        if self.is_mla:
            return AttentionShape(self.h_q, 1, self.kv_lora_rank + self.qk_rope_head_dim,
                                  self.kv_lora_rank, values_in_keys=True)
        return AttentionShape(self.h_q, self.h_kv, self.head_dim, self.head_dim)

    def kv_bytes_per_token(self, element_bits: int = 16) -> float:
        """KV bytes per token over all layers (no quantization scales)."""
        return self.n_layers * self.attention().kv_elements_per_token() * element_bits / 8

    def cache_len(self, n):
        """Tokens a layer's cache holds at context ``n`` (a rolling buffer caps it at the window)."""
        return np.minimum(n, self.sliding_window) if self.sliding_window else n

    # parameters -------------------------------------------------------------------------------
    def attention_params(self) -> int:
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.h_q * qk
            else:
                q = h * self.h_q * qk
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * self.h_q * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.h_q * self.v_head_dim * h
        qd, kvd = self.h_q * self.head_dim, self.h_kv * self.head_dim
        bias = (qd + 2 * kvd) if self.qkv_bias else 0
        return h * qd + 2 * h * kvd + qd * h + bias

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_dense_layers
                and layer % self.moe_layer_freq == 0)

    def mlp_params_read(self, layer: int, batch: int = 1) -> float:
        """Parameters of layer ``layer``'s MLP read by one decode step of ``batch`` requests."""
        h = self.hidden
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate
        e, k = self.n_routed_experts, self.experts_per_token
        touched = k if batch == 1 else e * (1 - (1 - k / e) ** batch)
        per_expert = 3 * h * self.moe_intermediate
        return h * e + (self.n_shared_experts + touched) * per_expert

    def mlp_params_used_per_token(self, layer: int) -> int:
        """Parameters one token multiplies through in layer ``layer``'s MLP (for FLOPs)."""
        h = self.hidden
        if not self.is_moe_layer(layer):
            return 3 * h * self.intermediate
        return h * self.n_routed_experts + (self.n_shared_experts + self.experts_per_token) * 3 * h * self.moe_intermediate

    def total_params(self) -> int:
        """All parameters (embedding and LM head counted once each unless tied)."""
        dense_mlp = 3 * self.hidden * self.intermediate
        per_expert = 3 * self.hidden * self.moe_intermediate
        mlp = sum((self.hidden * self.n_routed_experts
                   + (self.n_shared_experts + self.n_routed_experts) * per_expert)
                  if self.is_moe_layer(i) else dense_mlp for i in range(self.n_layers))
        layers = self.n_layers * (self.attention_params() + 2 * self.hidden) + mlp
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return layers + emb + self.hidden


_CONFIG_FIELDS = {
    "num_hidden_layers": "n_layers", "hidden_size": "hidden", "num_attention_heads": "h_q",
    "num_key_value_heads": "h_kv", "head_dim": "head_dim", "intermediate_size": "intermediate",
    "vocab_size": "vocab", "tie_word_embeddings": "tie_embeddings", "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "experts_per_token", "moe_intermediate_size": "moe_intermediate",
    "first_k_dense_replace": "first_dense_layers", "moe_layer_freq": "moe_layer_freq",
}
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def from_hf_config(config: Mapping | str | Path, key: str | None = None, source: str | None = None) -> ModelSpec:
    """A ``ModelSpec`` from a Hugging Face ``config.json`` (a path or the parsed dict), offline.

    Reads Llama/Mistral/Qwen2-style decoders and DeepSeek-V2/V3 (MLA, MoE). Sliding windows count
    only where the config enables them (Qwen2's ``use_sliding_window``).
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        with open(path) as fh:
            config = json.load(fh)
        source = source or str(path)
    cfg = dict(config)
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        cfg = dict(cfg["text_config"])
    missing = [f for f in _REQUIRED if f not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}; is this a decoder-only LLM config.json?")
    kwargs = {ours: cfg[theirs] for theirs, ours in _CONFIG_FIELDS.items() if cfg.get(theirs) is not None}
    kwargs.setdefault("h_kv", kwargs["h_q"])
    kwargs.setdefault("head_dim", kwargs["hidden"] // kwargs["h_q"])
    mtype = cfg.get("model_type", "")
    kwargs["qkv_bias"] = bool(cfg.get("attention_bias", False)) or mtype in ("qwen2", "qwen2_moe")
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):
        kwargs["sliding_window"] = int(window)
    spec = ModelSpec(key=key or cfg.get("_name_or_path") or mtype or "custom",
                     source=source or cfg.get("source", "config.json"), **kwargs)
    spec.attention()  # validates head counts
    return spec


def builtin_configs() -> dict[str, dict]:
    text = resources.files("kvsparse.sim").joinpath("data/models.toml").read_text()
    return dict(tomllib.loads(text)["models"])


def catalog() -> dict[str, ModelSpec]:
    return {k: from_hf_config(cfg, key=k, source=cfg["source"]) for k, cfg in builtin_configs().items()}


def model(name) -> ModelSpec:
    """A built-in model by key (``llama-3-8b``), a path to a config.json, or a ``ModelSpec``."""
    if isinstance(name, ModelSpec):
        return name
    cat = catalog()
    if name in cat:
        return cat[name]
    if isinstance(name, (str, Path)) and Path(name).is_file():
        return from_hf_config(name)
    raise ValueError(f"unknown model {name!r}; built-in: {', '.join(cat)}; or give a path to a config.json")
