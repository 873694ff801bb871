"""Trace format: exact round trip, interop with safetensors, corrupt files rejected, shipped traces."""
import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvsparse.traces import format as fmt
from kvsparse.traces.capture import DATA_DIR, SHIPPED


def small_trace(dtype="float32", pre=False, T=7, h_q=4, h_kv=2, d=8, layers=(0, 2)):
    rng = np.random.default_rng(0)
    arrays = {i: fmt.LayerQKV(rng.standard_normal((T, h_q, d)), rng.standard_normal((T, h_kv, d)),
                              rng.standard_normal((T, h_kv, d)), rng.standard_normal((T, h_kv, d)) if pre else None)
              for i in layers}
    meta = fmt.make_metadata(model={"name": "test"}, config={"n_layers": 3, "n_heads": h_q, "n_kv_heads": h_kv,
                             "head_dim": d, "rope_base": 10000.0, "rope_layout": "half", "attention_scale": d ** -0.5},
                             dtype=dtype, n_tokens=T, layers=layers, has_k_pre_rope=pre,
                             prompt={"source": "none", "licence": "n/a"}, made={"by": "test"})
    return arrays, meta, fmt.build_trace(arrays, metadata=meta, token_ids=np.arange(T) * 3)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("pre", [False, True])
def test_round_trip_is_exact(tmp_path, dtype, pre):
    arrays, meta, trace = small_trace(dtype, pre)
    trace.save(tmp_path / "t.safetensors")
    back = fmt.load_trace(tmp_path / "t.safetensors")
    assert back.metadata == meta
    assert back.layers == (0, 2)
    np.testing.assert_array_equal(back.positions, np.arange(7))
    np.testing.assert_array_equal(back.token_ids, np.arange(7) * 3)
    for i, lay in arrays.items():
        got = back.layer(i)
        for part in ("q", "k", "v") + (("k_pre_rope",) if pre else ()):
            want = getattr(lay, part).astype(dtype)      # the cast is the only change
            assert getattr(got, part).dtype == np.dtype(dtype)
            np.testing.assert_array_equal(getattr(got, part), want)
        if not pre:
            assert got.k_pre_rope is None


def test_save_is_deterministic(tmp_path):
    small_trace()[2].save(tmp_path / "a.safetensors")
    small_trace()[2].save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_reads_a_hand_written_safetensors_file(tmp_path):
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    y = np.array([7, -1], dtype=np.int32)
    header = {"x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
              "y": {"dtype": "I32", "shape": [2], "data_offsets": [12, 20]}, "__metadata__": {"a": "b"}}
    raw = json.dumps(header).encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + x.tobytes() + y.tobytes())
    tensors, meta = fmt.read_safetensors(tmp_path / "h.safetensors")
    assert meta == {"a": "b"}
    np.testing.assert_array_equal(tensors["x"], x)
    np.testing.assert_array_equal(tensors["y"], y)


def test_interoperates_with_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    _, _, trace = small_trace("float16", pre=True)
    trace.save(tmp_path / "ours.safetensors")
    theirs = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    for name, arr in trace._tensors.items():
        np.testing.assert_array_equal(theirs[name], arr)
    st_numpy.save_file(dict(trace._tensors), str(tmp_path / "theirs.safetensors"),
                       metadata={fmt.METADATA_KEY: json.dumps(trace.metadata)})
    back = fmt.load_trace(tmp_path / "theirs.safetensors")
    np.testing.assert_array_equal(back.layer(2).k_pre_rope, trace.layer(2).k_pre_rope)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _edit_meta(fn):
    def edit(header):
        meta = json.loads(header["__metadata__"][fmt.METADATA_KEY])
        fn(meta)
        header["__metadata__"][fmt.METADATA_KEY] = json.dumps(meta)
    return edit


CORRUPTIONS = {
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated: tensors need"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:40]), "truncated: header length says"),
    "empty file": (lambda p: p.write_bytes(b""), "fewer than the 8-byte header length"),
    "trailing bytes": (lambda p: p.write_bytes(p.read_bytes() + b"xx"), "unexpected trailing bytes"),
    "huge header length": (lambda p: p.write_bytes(struct.pack("<Q", 2**60) + p.read_bytes()[8:]), "exceeds the limit"),
    "garbage header": (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{not jso" + p.read_bytes()[8:]),
                       "not valid UTF-8 JSON"),
    "no trace metadata": (lambda p: _rewrite_header(p, lambda h: h.pop("__metadata__")), "not a kvsparse attention trace"),
    "bad metadata json": (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update({fmt.METADATA_KEY: "{"})),
                          "trace metadata is not valid JSON"),
    "wrong data span": (lambda p: _rewrite_header(p, lambda h: h["layer.0.q"].update(shape=[7, 4, 9])),
                        "'layer.0.q' data_offsets span"),
    "overlap": (lambda p: _rewrite_header(p, lambda h: h["positions"].update(
        data_offsets=[h["positions"]["data_offsets"][0] - 4, h["positions"]["data_offsets"][1] - 4])), "overlaps"),
    "unknown dtype": (lambda p: _rewrite_header(p, lambda h: h["layer.0.v"].update(dtype="Q4")), "unsupported dtype"),
    "heads disagree": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m["config"].update(n_kv_heads=1))),
                       "tensor 'layer.0.k' has shape (7, 2, 8), expected (7, 1, 8)"),
    "tokens disagree": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.update(n_tokens=8))), "expected (8,)"),
    "layer missing": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.update(layers=[0, 1, 2]))),
                      "tensor 'layer.1.q' is missing"),
    "extra tensor": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.update(layers=[0]))), "unexpected tensors"),
    "dtype disagrees": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.update(dtype="float16"))),
                        "has dtype float32, expected float16"),
    "metadata key missing": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.pop("prompt"))), "missing 'prompt'"),
    "gqa impossible": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m["config"].update(n_heads=3))),
                       "must be divisible"),
    "future version": (lambda p: _rewrite_header(p, _edit_meta(lambda m: m.update(version=99))), "unsupported format version"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_files_are_rejected_with_the_reason(tmp_path, name):
    corrupt, message = CORRUPTIONS[name]
    path = tmp_path / "t.safetensors"
    small_trace()[2].save(path)
    fmt.load_trace(path)                                   # fine before
    corrupt(path)
    with pytest.raises(fmt.TraceFormatError, match=None) as info:
        fmt.load_trace(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_non_finite_values_are_rejected_when_the_layer_is_read(tmp_path):
    arrays, meta, _ = small_trace()
    arrays[2].v[3, 1, 5] = np.nan
    trace = fmt.build_trace(arrays, metadata=meta)
    trace.layer(0)                                          # other layers are fine
    with pytest.raises(fmt.TraceFormatError, match=r"'layer.2.v' contains a non-finite value at \(3, 1, 5\)"):
        trace.layer(2)


def test_decode_step_is_the_causal_prefix():
    arrays, _, trace = small_trace("float64")
    q, k, v = trace.layer(2).decode_step(4)
    np.testing.assert_array_equal(q, arrays[2].q[4])
    np.testing.assert_array_equal(k, arrays[2].k[:5].transpose(1, 0, 2))
    np.testing.assert_array_equal(v, arrays[2].v[:5].transpose(1, 0, 2))
    with pytest.raises(ValueError, match="t must be < T=7"):
        trace.layer(2).decode_step(7)
    with pytest.raises(KeyError, match="layer 1 is not in this trace"):
        trace.layer(1)


def test_shipped_traces_meet_the_spec():
    files = sorted(DATA_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) <= 8_000_000
    for name in SHIPPED:
        trace = fmt.load_trace(DATA_DIR / name)
        n_layers = trace.config["n_layers"]
        assert trace.dtype == "float16" and trace.n_tokens >= 2048
        assert min(trace.layers) < n_layers / 3 and max(trace.layers) >= 2 * n_layers / 3   # an early and a late one
        assert trace.metadata["prompt"]["licence"] and trace.metadata["model"]["sha256"]
        trace.check_values()
        np.testing.assert_array_equal(trace.positions, np.arange(trace.n_tokens))


def test_shipped_traces_load_without_the_hf_extra():
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "safetensors", "gguf"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from kvsparse.traces.format import load_trace
        from kvsparse.property_tests.trace_inputs import shipped_trace
        t = shipped_trace()
        for i in t.layers:
            lay = t.layer(i)
            assert lay.q.shape == (t.n_tokens, t.h_q, t.d), lay.q.shape
        assert not any(m.split(".")[0] in ("torch", "transformers", "safetensors") for m in sys.modules)
        print("ok", t.layers)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
