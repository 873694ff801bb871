"""A check against code we did not write: our kvpress presets keep what NVIDIA kvpress keeps.

A tiny randomly initialised Llama (built from a LlamaConfig, no download, CPU, eager attention so
ObservedAttentionPress sees the attention weights) is prefilled under each press. A hook registered
before the press's own captures, per layer, the uncompressed post-RoPE keys/values and the hidden
states; the queries are recomputed from them (q_proj + the layer's RoPE). What kvpress kept is read
back from the compressed cache (its rows are matched to the original keys: kvpress gathers rows in
score order). Our oracle's prefill on the same queries/keys must keep exactly the same positions per
KV head. kvpress scores in float32 and our oracle in float64: the test inputs are generic (no exact
ties except StreamingLLM's 0/1 scores, where both follow the same rule), and a difference is
reported with the boundary scores.
"""
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed: the third-party check is skipped")
transformers = pytest.importorskip("transformers")

from kvsparse.oracle.h2o import H2O  # noqa: E402
from kvsparse.oracle.pyramidkv import PyramidKV, pyramid_budget  # noqa: E402
from kvsparse.oracle.snapkv import SnapKV  # noqa: E402
from kvsparse.oracle.streaming_llm import StreamingLLM  # noqa: E402

T, LAYERS, RATIO, WINDOW, KERNEL = 48, 3, 0.5, 8, 3
# a prompt where kvpress's float budget is not the exact one: int(90 * (1 - 0.3)) = int(62.999...) = 62,
# floor(90 * 7/10) = 63 (research notes, pitfall 6)
FLOAT_T, FLOAT_RATIO, FLOAT_KEPT, EXACT_KEPT = 90, 0.3, 62, 63
KINDS = ("streaming_llm", "snapkv", "pyramidkv", "observed_attention")


def press_for(kind, ratio):
    """kvpress's press, sized as ``ours_for``."""
    if kind == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=StreamingLLM.presets()["kvpress"].sinks)
    if kind == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
    if kind == "pyramidkv":
        return kvpress.PyramidKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
    return kvpress.ObservedAttentionPress(compression_ratio=ratio)


def ours_for(kind, ratio, layer):
    """Our kvpress preset of ``kind`` (from ``presets()``), only its sizes changed (``dataclasses.replace``)."""
    if kind == "streaming_llm":
        return replace(StreamingLLM.presets()["kvpress"], compression_ratio=ratio)
    if kind == "snapkv":
        return replace(SnapKV.presets()["kvpress"], window=WINDOW, kernel=KERNEL, compression_ratio=ratio)
    if kind == "pyramidkv":
        return replace(PyramidKV.presets()["kvpress"], window=WINDOW, kernel=KERNEL, compression_ratio=ratio,
                       layer=layer, num_layers=LAYERS)
    return replace(H2O.presets()["kvpress-observed-attention"], compression_ratio=ratio)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      attn_implementation="eager")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def kept_by_kvpress(model, press, seed=0, t=T):
    """Per layer: (q [t, H_q, d], k [t, H_kv, d], v, kept [H_kv, t] bool) after prefilling under ``press``."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    captured = {}

    def hook(module, args, kwargs, output):
        layer = module.layer_idx
        cache = kwargs["past_key_values"].layers[layer]
        h = kwargs["hidden_states"]
        q = module.q_proj(h).view(1, h.shape[1], -1, module.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        captured[layer] = (q[0].transpose(0, 1).double().numpy(), cache.keys[0].transpose(0, 1).double().numpy(),
                           cache.values[0].transpose(0, 1).double().numpy())
    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    ids = torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad(), press(model):
            cache = DynamicCache()
            model(ids, past_key_values=cache)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for layer in range(LAYERS):
        q, k, v = captured[layer]
        kept_keys = cache.layers[layer].keys[0].double().numpy()                 # [H_kv, n_kept, d]
        kept = np.zeros((k.shape[1], t), dtype=bool)
        for j in range(k.shape[1]):
            for row in kept_keys[j]:
                match = np.flatnonzero((k[:, j] == row).all(axis=1))
                assert match.size == 1, "a kept key row must match exactly one original key"
                kept[j, match[0]] = True
        out.append((q, k, v, kept))
    return out


def assert_same_kept(ours, theirs, label):
    for j, (a, b) in enumerate(zip(ours, theirs)):
        assert np.array_equal(a, b), (f"{label}, KV head {j}: only ours {np.flatnonzero(a & ~b).tolist()}, "
                                      f"only kvpress {np.flatnonzero(b & ~a).tolist()}")


@pytest.mark.parametrize("kind", KINDS)
def test_presets_keep_what_kvpress_keeps(model, kind):
    for layer, (q, k, v, kept) in enumerate(kept_by_kvpress(model, press_for(kind, RATIO), seed=KINDS.index(kind))):
        state = ours_for(kind, RATIO, layer).prefill(q, k, v)
        assert state.kept.sum(axis=1).tolist() == kept.sum(axis=1).tolist(), (kind, layer)
        assert_same_kept(state.kept, kept, f"{kind} layer {layer}")


@pytest.mark.parametrize("kind", KINDS)
def test_float_budget_where_it_differs_from_the_exact_one(model, kind):
    """T=90, ratio 0.3: kvpress keeps int(62.999...) = 62 tokens (PyramidKV: its own float schedule);
    our presets keep the same positions, and their exact-rounding variant would keep 63."""
    for layer, (q, k, v, kept) in enumerate(kept_by_kvpress(model, press_for(kind, FLOAT_RATIO), seed=7,
                                                            t=FLOAT_T)):
        ours = ours_for(kind, FLOAT_RATIO, layer)
        assert_same_kept(ours.prefill(q, k, v).kept, kept, f"{kind} layer {layer}, T={FLOAT_T}")
        if kind != "pyramidkv":            # the float schedule rounds to nearest: 82, 63, 44 either way
            assert (kept.sum(axis=1) == FLOAT_KEPT).all()
            exact = replace(ours, ratio_rounding="exact").prefill(q, k, v).kept
            assert (exact.sum(axis=1) == EXACT_KEPT).all()


def test_pyramid_float_budget_matches_kvpress():
    class Module:                                       # what get_layer_budget reads from a layer
        def __init__(self, layer, layers):
            self.layer_idx = layer
            self.config = type("Config", (), {"num_hidden_layers": layers})()
    for q_len in (9, 40, 65, 100, 333, 1000, 4100):
        for ratio in (0.1, 0.25, 0.5, 0.7, 0.9):
            for layers in (1, 2, 5, 32):
                press = kvpress.PyramidKVPress(compression_ratio=ratio, window_size=8, kernel_size=3)
                for layer in {0, layers // 2, layers - 1}:
                    expected = press.get_layer_budget(Module(layer, layers), q_len)
                    got = pyramid_budget(q_len, capacity=None, window=8, beta=20, layer=layer, num_layers=layers,
                                         arithmetic="float", compression_ratio=ratio)
                    assert got == expected, (q_len, ratio, layers, layer)
