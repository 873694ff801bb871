"""GPU catalog, efficiency curves, user overrides, and model shapes (hand counts from published configs)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from kvsparse.sim import hardware, models

REQUIRED_GPUS = ("h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "l40s", "rtx-4090",
                 "rtx-6000-ada", "gh200")


def test_catalog_has_every_required_gpu_with_sources():
    cat = hardware.catalog()
    for key in REQUIRED_GPUS:
        g = cat[key]
        for field in ("hbm_gbps", "l2_mb", "fp16_tflops", "bf16_tflops", "fp8_tflops", "link_h2d_gbps",
                      "link_latency_us", "host_mem_gbps", "launch_us", "efficiency_curve"):
            assert g.sources.get(field), (key, field)


def test_datasheet_figures():
    """Spot checks against the datasheets (GB = 1e9): H100 SXM 3.35 TB/s, H200 4.8, A100-40 1.555."""
    cat = hardware.catalog()
    assert cat["h100-sxm"].hbm_gbps == 3352 and cat["h200"].hbm_gbps == 4800
    assert cat["a100-40gb"].hbm_gbps == 1555 and cat["a100-80gb"].hbm_gbps == 2039
    assert cat["h100-sxm"].fp16_tflops == 989.4        # dense, not the 1979 sparse figure
    assert cat["gh200"].link == "NVLink-C2C" and cat["gh200"].link_h2d_gbps == 375


def test_efficiency_curve_passes_through_flashinfer_points_and_time_increases():
    curve = hardware.catalog()["h100-sxm"].efficiency
    tokens = np.array([1024, 4096, 8192, 16384, 32768, 65536])
    np.testing.assert_allclose(curve(tokens * 16384), [0.25, 0.47, 0.61, 0.74, 0.83, 0.89], rtol=1e-12)
    sizes = np.geomspace(1e3, 1e11, 400)
    t = sizes / curve(sizes)
    assert np.all(np.diff(t) > 0)
    assert curve(1e12) == pytest.approx(0.89)      # flat above the last point


def test_curve_rejects_utilization_that_would_make_time_fall():
    with pytest.raises(ValueError, match="increase"):
        hardware.EfficiencyCurve("bad", (1e6, 2e6), (0.2, 0.5), "test")


USER_TOML = b"""
[gpus.my-h100]
base = "h100-sxm"
hbm_gbps = 3000
[gpus.my-h100.sources]
hbm_gbps = "our own measurement"

[gpus.h200]
launch_us = 3
[gpus.h200.sources]
launch_us = "measured with CUDA 12.4"
"""


def test_user_toml_adds_and_overrides():
    cat = hardware.load_catalog(io.BytesIO(USER_TOML))
    assert cat["my-h100"].hbm_gbps == 3000 and cat["my-h100"].fp16_tflops == 989.4
    assert cat["my-h100"].sources["hbm_gbps"] == "our own measurement"
    assert cat["h200"].launch_us == 3 and cat["h200"].hbm_gbps == 4800
    assert hardware.catalog()["h200"].launch_us == 5     # the built-in catalog is untouched


@pytest.mark.parametrize("text, match", [
    (b'[gpus.x]\nbase = "h100-sxm"\nbandwidth = 1\n', "unknown fields"),
    (b'[gpus.x]\nbase = "nope"\n', "base"),
    (b'[gpus.x]\nbase = "h100-sxm"\nhbm_gbps = -1\n[gpus.x.sources]\nhbm_gbps = "s"\n', ">= 0"),
    (b'[gpus.x]\nname = "x"\n', "missing fields"),
])
def test_bad_user_toml_is_refused(text, match):
    with pytest.raises(ValueError, match=match):
        hardware.load_catalog(io.BytesIO(text))


def test_device_names_and_calibration_records():
    assert hardware.for_device_name("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert hardware.peak_hbm_gbps_for_device_name("NVIDIA A100-SXM4-80GB") == 2039
    with pytest.raises(ValueError):
        hardware.for_device_name("NVIDIA Tesla T4")
    g = hardware.gpu("h100-sxm")
    recs = [{"gpu": "H100", "kernel": "sdpa_flash", "bytes": b, "seconds": b / (u * g.hbm_gbps * 1e9)}
            for b, u in ((1e7, 0.3), (1e8, 0.6), (1e9, 0.9))]
    cal = hardware.calibrated(g, recs)
    np.testing.assert_allclose(cal.efficiency([1e7, 1e8, 1e9]), [0.3, 0.6, 0.9], rtol=1e-9)
    assert "own measurement" in cal.sources["efficiency_curve"]
    # a graph replay is the kernel's own time: it is used over the eager timing (which holds a launch)
    eager = [{**r, "seconds": r["seconds"] + 5e-6, "seconds_graph": r["seconds"]} for r in recs]
    np.testing.assert_allclose(hardware.calibrated(g, eager).efficiency([1e7, 1e8, 1e9]), [0.3, 0.6, 0.9],
                               rtol=1e-9)
    without_graph = [{**r, "seconds_graph": None} for r in eager]
    assert hardware.calibrated(g, without_graph).efficiency([1e7])[0] < 0.3


# ---- models: numbers from the published config.json files and model cards ----------------------

@pytest.mark.parametrize("key, params", [
    ("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_248_023_552),
    ("qwen2.5-7b", 7_615_616_512), ("llama-3.1-70b", 70_553_706_496), ("deepseek-v2-lite", 15_706_484_224),
    ("smollm2-135m", 134_515_008),                          # tied embeddings: counted once
])
def test_parameter_counts_match_published(key, params):
    assert models.model(key).total_params() == params


@pytest.mark.parametrize("key, per_token", [
    ("llama-2-7b", 524_288), ("llama-3-8b", 131_072), ("llama-3.1-70b", 327_680), ("mistral-7b", 131_072),
    ("qwen2.5-7b", 57_344), ("deepseek-v2-lite", 31_104),   # MLA: 27 x (512 + 64) x 2 bytes, no factor 2
])
def test_fp16_kv_bytes_per_token(key, per_token):
    assert models.model(key).kv_bytes_per_token(16) == per_token


def test_hf_config_read_offline(tmp_path):
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = models.model(str(path))
    assert spec.attention() == models.AttentionShape(4, 2, 16, 16)
    # 2 layers x (q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 + 2 norms 64) + tied embedding + final norm
    assert spec.total_params() == 2 * (4096 + 4096 + 4096 + 24576 + 128) + 6400 + 64
    with pytest.raises(ValueError, match="missing"):
        models.from_hf_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="multiple"):
        models.from_hf_config({**cfg, "num_key_value_heads": 3})


def test_sliding_window_caps_the_cache():
    v01 = models.model("mistral-7b-v0.1")
    assert v01.sliding_window == 4096 and int(v01.cache_len(32768)) == 4096
    assert models.model("qwen2.5-7b").sliding_window is None      # use_sliding_window = false
