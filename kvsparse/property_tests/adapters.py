"""Adapters: well-known third-party implementations as kernels with the kernel-step contract.

    kvsparse validate snapkv kvsparse.property_tests.adapters:kvpress_snapkv --preset kvpress
    kvsparse validate streaming_llm kvsparse.property_tests.adapters:kvpress_streaming_llm --preset kvpress
    kvsparse validate pyramidkv kvsparse.property_tests.adapters:kvpress_pyramidkv --preset kvpress
    kvsparse validate h2o kvsparse.property_tests.adapters:kvpress_observed_attention --preset kvpress-observed-attention
    kvsparse validate quest kvsparse.property_tests.adapters:flashinfer_quest --dtype float16     # GPU only

**kvpress** (NVIDIA, CPU). A press compresses the prompt's cache once, inside the model's forward.
The adapter calls the press's own ``compress(module, hidden_states, keys, values, attentions,
kwargs)`` directly, on the suite's prompt, with a stand-in for the attention layer: ``q_proj`` is the
identity on ``hidden_states = q_prompt`` (flattened per token) and ``position_embeddings`` is the
identity rotation, because the suite's queries and keys are already the ones attention uses
(post-RoPE). ``attentions`` (ObservedAttentionPress) are the causal softmax probabilities computed by
transformers' ``eager_attention_forward``, as ``attn_implementation="eager"`` would hand them over.
Which positions the press kept is read from the values it gathered: the adapter passes values whose
every channel holds the token's position (exact in float32 below 2^24; none of these presses reads
values), and checks that the keys it gathered are the original keys of those positions. Decoding is
transformers' eager attention over the kept rows plus every later token (kvpress compresses only
the prompt). Softmax scale: presses divide their logits by ``sqrt(d)`` themselves, so an explicit
``scale`` given to ``prefill`` reaches them as queries multiplied by ``scale * sqrt(d)`` (the identity
``q_proj`` makes this exact up to one rounding of q); ``attentions`` and decoding get ``scale``
directly, and decode uses the prefill's scale (the oracles' rule). The press's hyper-parameters come from the oracle's fields; a configuration kvpress
cannot express (e.g. ``schedule="every_step"``) raises ``ValueError``: validate against our kvpress
preset (each adapter names it in ``kvsparse_preset``; ``kvsparse validate`` uses it when no
``--preset``/``--params`` is given).

**FlashInfer** (GPU only). ``flashinfer_dense`` and ``flashinfer_quest`` run
``BatchDecodeWithPagedKVCacheWrapper`` (paged decode, ``plan``/``run`` API, NHD layout) on one
request per query head: dense over every page, Quest over the pages the Quest bound selects (the
selection is computed here in torch; FlashInfer does the sparse paged attention). Head dims are
zero-padded to a size FlashInfer compiles (64/128/256; padding q, k, v with zeros changes no dot
product) and ``sm_scale`` is passed as ``1/sqrt(d)``. Without CUDA or the ``flashinfer`` package the
adapter raises ``RuntimeError`` with the reason (``flashinfer_unavailable()`` says it up front).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np


def kvpress_unavailable() -> str | None:
    """Why the kvpress adapters cannot run here, or None."""
    try:
        import kvpress  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"kvpress adapters need kvpress, torch and transformers ({exc})"
    return None


def flashinfer_unavailable() -> str | None:
    """Why the FlashInfer adapters cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "FlashInfer adapters need torch"
    if not torch.cuda.is_available():
        return "FlashInfer adapters need a CUDA GPU (none visible): skipped"
    try:
        import flashinfer  # noqa: F401
    except ImportError as exc:
        return f"FlashInfer adapters need the flashinfer package ({exc})"
    return None


# --------------------------------------------------------------------------------------------
# kvpress
# --------------------------------------------------------------------------------------------


@dataclass
class KvpressState:
    keys: list          # per KV head: torch [m_j, d], kept prompt rows then every later token
    values: list
    positions: list     # per KV head: np.int64 [m_j] original positions, aligned with keys
    t: int              # tokens seen so far
    scale: float | None = None   # the softmax scale prefill was given (None: 1/sqrt(d))


def _layer(method, h_q: int, h_kv: int, d: int):
    """The attributes of an attention layer that the presses and eager attention read."""
    import torch
    cfg = SimpleNamespace(num_attention_heads=h_q, num_key_value_heads=h_kv,
                          num_hidden_layers=getattr(method, "num_layers", 1))
    return SimpleNamespace(config=cfg, head_dim=d, layer_idx=getattr(method, "layer", 0),
                           num_key_value_groups=h_q // h_kv, training=False, q_proj=torch.nn.Identity())


def _causal_mask(t: int, dtype):
    import torch
    return torch.triu(torch.full((t, t), float("-inf"), dtype=dtype), diagonal=1)[None, None]


class KvpressKernel:
    """A kvpress press as a stateful kernel (module docstring). ``make_press(method)`` builds the press."""

    def __init__(self, name: str, make_press, preset: str, needs_attentions: bool = False):
        self.__qualname__ = self.__name__ = name
        self.__module__ = __name__
        self.make_press = make_press
        self.kvsparse_preset = preset
        self.needs_attentions = needs_attentions

    def __call__(self, method, q, k, v, *, positions=None, scale=None):
        raise ValueError(f"{self.__name__} is a prefill-time press: use prefill() then decode()")

    def prefill(self, method, q_prompt, k_prompt, v_prompt, *, scale=None) -> KvpressState:
        import torch
        from transformers.models.llama.modeling_llama import eager_attention_forward
        from ..oracle.method import prefill_scale
        press = self.make_press(method)
        t, h_q, d = q_prompt.shape
        h_kv = k_prompt.shape[1]
        sm = prefill_scale(scale, d)
        q = torch.from_numpy(np.ascontiguousarray(q_prompt))
        keys = torch.from_numpy(np.ascontiguousarray(k_prompt.transpose(1, 0, 2)))[None]     # [1, H_kv, T, d]
        values = torch.from_numpy(np.ascontiguousarray(v_prompt.transpose(1, 0, 2)))[None]
        layer = _layer(method, h_q, h_kv, d)
        attentions = None
        if self.needs_attentions:
            _, attentions = eager_attention_forward(layer, q.transpose(0, 1)[None], keys, values,
                                                    _causal_mask(t, q.dtype), sm)
        if scale is not None:        # the press divides by sqrt(d): hand it queries that make its logits scale*q.k
            q = q * (sm * math.sqrt(d))
        rotation = (torch.ones(1, t, d, dtype=q.dtype), torch.zeros(1, t, d, dtype=q.dtype))
        code = torch.arange(t, dtype=torch.float32).to(keys.dtype)[None, None, :, None].expand(1, h_kv, t, d)
        kept_k, kept_code = press.compress(layer, q.reshape(1, t, h_q * d), keys, code.contiguous(), attentions,
                                           {"position_embeddings": rotation})
        st = KvpressState([], [], [], t, sm)
        for j in range(h_kv):
            pos = kept_code[0, j, :, 0].to(torch.float64).numpy().astype(np.int64)
            if not torch.equal(kept_k[0, j], keys[0, j, pos]):
                raise RuntimeError(f"kvpress gathered keys that are not the original rows {pos.tolist()} (KV head {j})")
            order = np.argsort(pos, kind="stable")      # kvpress gathers in score order
            st.positions.append(pos[order])
            st.keys.append(keys[0, j, pos[order]])
            st.values.append(values[0, j, pos[order]])
        return st

    def decode(self, method, state: KvpressState, q, k_new, v_new, *, scale=None):
        import torch
        from transformers.models.llama.modeling_llama import eager_attention_forward
        from ..oracle.method import decode_scale
        scale = decode_scale(state.scale, scale)
        h_q, d = q.shape
        h_kv = k_new.shape[0]
        for j in range(h_kv):
            state.keys[j] = torch.cat([state.keys[j], torch.from_numpy(np.ascontiguousarray(k_new[j]))[None]])
            state.values[j] = torch.cat([state.values[j], torch.from_numpy(np.ascontiguousarray(v_new[j]))[None]])
            state.positions[j] = np.append(state.positions[j], state.t)
        state.t += 1
        g = h_q // h_kv
        layer = _layer(method, g, 1, d)
        out = np.empty((h_q, d), dtype=q.dtype)
        qt = torch.from_numpy(np.ascontiguousarray(q))
        sm = 1.0 / math.sqrt(d) if scale is None else scale
        for j in range(h_kv):       # heads of one KV head see the same kept rows
            o, _ = eager_attention_forward(layer, qt[j * g:(j + 1) * g, None][None], state.keys[j][None, None],
                                           state.values[j][None, None], None, sm)
            out[j * g:(j + 1) * g] = o[0, 0].numpy()
        return state, (out, [state.positions[h // g] for h in range(h_q)])


def _need(method, cls_name: str, **expected):
    if type(method).__name__ != cls_name:
        raise ValueError(f"this adapter wraps a press for {cls_name}, got {type(method).__name__}")
    for field, want in expected.items():
        got = getattr(method, field)
        if (got not in want) if isinstance(want, tuple) else got != want:
            raise ValueError(f"kvpress cannot express {field}={got!r} (it needs {want!r}): validate against "
                             f"our kvpress preset")
    if getattr(method, "compression_ratio", None) is None:
        raise ValueError("kvpress presses need a compression_ratio")


def _streaming_press(method):
    import kvpress
    _need(method, "StreamingLLM", schedule="prefill_once", ratio_rounding="float", rope="as_given")
    return kvpress.StreamingLLMPress(compression_ratio=method.compression_ratio, n_sink=method.sinks)


def _snapkv_checks(method, cls_name):
    _need(method, cls_name, ratio_rounding="float", pool="avg", window_score="mean", gqa="mean",
          reduce_before_pool=False)


def _snapkv_press(method):
    import kvpress
    _snapkv_checks(method, "SnapKV")
    return kvpress.SnapKVPress(compression_ratio=method.compression_ratio, window_size=method.window,
                               kernel_size=method.kernel)


def _pyramidkv_press(method):
    import kvpress
    _snapkv_checks(method, "PyramidKV")
    _need(method, "PyramidKV", arithmetic="float")
    return kvpress.PyramidKVPress(compression_ratio=method.compression_ratio, window_size=method.window,
                                  kernel_size=method.kernel, beta=method.beta)


def _observed_press(method):
    import kvpress
    _need(method, "H2O", ratio_rounding="float", decode_eviction=False, score_normalization="visible_queries",
          gqa="mean")
    return kvpress.ObservedAttentionPress(compression_ratio=method.compression_ratio)


kvpress_streaming_llm = KvpressKernel("kvpress_streaming_llm", _streaming_press, "kvpress")
kvpress_snapkv = KvpressKernel("kvpress_snapkv", _snapkv_press, "kvpress")
kvpress_pyramidkv = KvpressKernel("kvpress_pyramidkv", _pyramidkv_press, "kvpress")
kvpress_observed_attention = KvpressKernel("kvpress_observed_attention", _observed_press,
                                           "kvpress-observed-attention", needs_attentions=True)
KVPRESS_ADAPTERS = {  # method name -> adapter
    "streaming_llm": kvpress_streaming_llm, "snapkv": kvpress_snapkv, "pyramidkv": kvpress_pyramidkv,
    "h2o": kvpress_observed_attention,
}


# --------------------------------------------------------------------------------------------
# FlashInfer (GPU only; written against the documented plan/run API, not run on CPU machines)
# --------------------------------------------------------------------------------------------

FLASHINFER_HEAD_DIMS = (64, 128, 256)
_WORKSPACE = {}


def _flashinfer_paged_decode(q, k, v, pages_per_head, page_size: int, scale):
    """Paged decode, one request per query head over that head's pages (sorted page ids) of its KV head."""
    reason = flashinfer_unavailable()
    if reason:
        raise RuntimeError(reason)
    import flashinfer
    import torch
    h_q, d = q.shape
    h_kv, n, _ = k.shape
    g = h_q // h_kv
    dp = next((x for x in FLASHINFER_HEAD_DIMS if x >= d), None)
    if dp is None:
        raise ValueError(f"FlashInfer decodes head dims up to {FLASHINFER_HEAD_DIMS[-1]}, got {d}")
    dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float16}.get(q.dtype, torch.bfloat16)
    if str(q.dtype) == "bfloat16":
        dtype = torch.bfloat16
    dev = torch.device("cuda")
    n_pages = -(-n // page_size)
    # paged cache [H_kv * n_pages, 2, page_size, 1, dp]: page p of KV head j is j * n_pages + p
    cache = torch.zeros(h_kv * n_pages, 2, page_size, 1, dp, dtype=dtype, device=dev)
    pad = np.zeros((h_kv, n_pages * page_size, dp), np.float32)
    for slot, x in ((0, k), (1, v)):
        pad[:] = 0
        pad[:, :n, :d] = np.asarray(x, np.float32)
        cache[:, slot, :, 0] = torch.from_numpy(pad.reshape(h_kv * n_pages, page_size, dp)).to(dev, dtype)
    indices, indptr, last = [], [0], []
    for h, pages in enumerate(pages_per_head):
        pages = np.sort(np.asarray(pages, np.int64))
        indices.extend(((h // g) * n_pages + pages).tolist())
        indptr.append(len(indices))
        last.append(n - (n_pages - 1) * page_size if pages[-1] == n_pages - 1 else page_size)
    i32 = dict(dtype=torch.int32, device=dev)
    if dev not in _WORKSPACE:
        _WORKSPACE[dev] = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_WORKSPACE[dev], "NHD")
    wrapper.plan(torch.tensor(indptr, **i32), torch.tensor(indices, **i32), torch.tensor(last, **i32),
                 1, 1, dp, page_size, pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype,
                 sm_scale=1.0 / math.sqrt(d) if scale is None else scale)
    qp = torch.zeros(h_q, 1, dp, dtype=dtype, device=dev)
    qp[:, 0, :d] = torch.from_numpy(np.asarray(q, np.float32)).to(dev, dtype)
    out = wrapper.run(qp, cache)                          # [H_q (requests), 1, dp]
    return out[:, 0, :d].float().cpu().numpy()


def flashinfer_dense(method, q, k, v, *, positions=None, scale=None):
    """Dense decode attention through FlashInfer's paged decode (page size 16)."""
    n = k.shape[1]
    pages = [np.arange(-(-n // 16))] * q.shape[0]
    out = _flashinfer_paged_decode(q, k, v, pages, 16, scale)
    return out, [np.arange(n)] * q.shape[0]


def flashinfer_quest(method, q, k, v, *, positions=None, scale=None):
    """Quest: page bounds and top pages per query head (torch), sparse paged attention by FlashInfer."""
    import torch
    h_q, n = q.shape[0], k.shape[1]
    p = method.page_size
    n_pages = -(-n // p)
    if method.is_dense(n):
        pages = [np.arange(n_pages)] * h_q
    else:
        g = h_q // k.shape[0]
        kt = torch.from_numpy(np.asarray(k, np.float32))
        padded = torch.nn.functional.pad(kt, (0, 0, 0, n_pages * p - n), value=float("nan"))
        blocks = padded.view(k.shape[0], n_pages, p, -1)
        kmin = torch.from_numpy(np.nanmin(blocks.numpy(), axis=2))
        kmax = torch.from_numpy(np.nanmax(blocks.numpy(), axis=2))
        qt = torch.from_numpy(np.asarray(q, np.float32))
        kv = torch.arange(h_q) // g
        bound = torch.maximum(qt[:, None] * kmin[kv], qt[:, None] * kmax[kv]).sum(-1)    # [H_q, n_pages]
        budget = method.page_budget(n)
        if method.last_page == "always":
            bound[:, -1] = float("inf")
        # stable descending sort: lower page id wins ties (the oracle's rule)
        order = torch.sort(-bound, dim=1, stable=True).indices[:, :min(budget, n_pages)]
        pages = [order[h].numpy() for h in range(h_q)]
    out = _flashinfer_paged_decode(q, k, v, pages, p, scale)
    sets = [np.concatenate([np.arange(pg * p, min(n, (pg + 1) * p)) for pg in np.sort(row)]) for row in pages]
    return out, sets
