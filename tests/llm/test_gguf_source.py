"""GGUFSource: names, layouts and dequantised values equal what transformers loads.

The reference is transformers' own GGUF loader (it dequantises with gguf and undoes
llama.cpp's Q/K permutation itself), on the real SmolLM2 file and on tiny files written
here for llama (GQA), qwen2 (QKV biases) and gpt2 (Conv1D layout).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from edgepart.llm.gguf_source import GGUFSource, open_gguf_model  # noqa: E402

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> GGUFSource:
    return GGUFSource(smollm2_path)


@pytest.fixture(scope="session")
def reference_state(transformers_smollm2) -> dict[str, torch.Tensor]:
    """transformers' float32 weights of the same GGUF file."""
    return {k: v.detach() for k, v in transformers_smollm2.state_dict().items()}


# ------------------------------------------------------------------ the real SmolLM2 file


def test_every_tensor_equals_transformers(smollm2, reference_state):
    assert set(smollm2.names()) == set(reference_state)
    assert len(smollm2.names()) == 30 * 9 + 3  # 9 per layer, embedding, norm, tied head
    for name in smollm2.names():
        ours, ref = smollm2.get(name), reference_state[name]
        assert tuple(ours.shape) == smollm2.shape(name) == tuple(ref.shape), name
        assert ours.dtype == torch.float32
        if not torch.equal(ours, ref):  # same dequantiser, so equal; allow float noise only
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=name)


def test_the_header_parses_as_the_gguf_package_parses_it(smollm2_path):
    from edgepart.llm.gguf_meta import open_gguf

    ours, stock = open_gguf(smollm2_path), gguf.GGUFReader(str(smollm2_path), "r")
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        mine = ours.fields[key]
        assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset)
        assert all(np.array_equal(a, b) for a, b in zip(mine.parts, field.parts, strict=True))
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, list(t.shape), t.data_offset) for t in stock.tensors
    ]
    assert np.array_equal(ours.tensors[-1].data, stock.tensors[-1].data)


def test_types_and_shapes_are_hugging_face_order(smollm2):
    assert smollm2.architecture == "llama" and smollm2.tied
    assert smollm2.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert smollm2.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert smollm2.shape("model.norm.weight") == (576,)
    assert smollm2.ggml_type("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    assert smollm2.ggml_type("model.embed_tokens.weight") == "Q8_0"
    assert smollm2.shape("lm_head.weight") == smollm2.shape("model.embed_tokens.weight")


SLICES = [slice(0, 64), slice(64, 128), slice(128, 320), slice(5, 77), slice(3, 190, 7), None]


@pytest.mark.parametrize("name", [
    "model.layers.7.self_attn.q_proj.weight",  # permuted, 9 heads
    "model.layers.7.self_attn.k_proj.weight",  # permuted, 3 KV heads
    "model.layers.7.self_attn.v_proj.weight",
    "model.layers.7.self_attn.o_proj.weight",
    "model.layers.7.mlp.down_proj.weight",
    "model.embed_tokens.weight",
    "model.layers.7.input_layernorm.weight",
])
def test_row_slices_are_rows_of_the_full_tensor(smollm2, reference_state, name):
    full = smollm2.get(name)
    rows = full.shape[0]
    for sel in SLICES:
        if sel is not None and sel.start >= rows:
            continue
        part = smollm2.get(name, rows=sel)
        expected = full if sel is None else full[sel]
        assert torch.equal(part, expected), (name, sel)
        ref = reference_state[name]
        assert torch.equal(part, ref if sel is None else ref[sel])
        assert part.is_contiguous()


def test_column_slices_and_dtypes(smollm2):
    name = "model.layers.2.self_attn.o_proj.weight"
    full = smollm2.get(name)
    assert torch.equal(smollm2.get(name, cols=slice(64, 128)), full[:, 64:128])
    assert torch.equal(smollm2.get(name, rows=slice(10, 20), cols=slice(0, 64)), full[10:20, :64])
    for dtype in (torch.float16, torch.bfloat16):
        got = smollm2.get(name, rows=slice(0, 64), dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, full[:64].to(dtype))


def test_bad_requests_are_named(smollm2):
    with pytest.raises(KeyError, match=r"no tensor 'model\.layers\.99"):
        smollm2.get("model.layers.99.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="one-dimensional"):
        smollm2.get("model.norm.weight", cols=slice(0, 2))
    with pytest.raises(ValueError, match="selects nothing"):
        smollm2.get("model.norm.weight", rows=slice(600, 700))


def test_architecture_from_the_file(smollm2_path):
    source, arch = open_gguf_model(smollm2_path)
    assert arch.family == "llama" and arch.rope_theta == 100000.0
    assert arch.spec.heads == 9 and arch.spec.kv_heads == 3 and arch.spec.layers == 30
    assert arch.tie_word_embeddings and arch.max_positions == 8192
    assert abs(arch.norm_eps - 1e-5) < 1e-9
    assert source.rope_freq_factors() is None


def test_a_slice_never_materialises_the_whole_tensor(smollm2):
    """Peak allocation while reading a quarter of the embedding stays near a quarter."""
    name = "model.embed_tokens.weight"
    rows, cols = smollm2.shape(name)
    full_bytes = rows * cols * 4
    tracemalloc.start()
    try:
        part = smollm2.get(name, rows=slice(rows // 4, rows // 2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert part.shape == (rows // 4, cols)
    assert peak < 0.35 * full_bytes, f"peak {peak / 2**20:.1f} MiB for a quarter"


RSS_PROBE = textwrap.dedent("""
    import sys
    from edgepart.llm.gguf_source import GGUFSource

    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    source = GGUFSource(sys.argv[1])
    fraction = float(sys.argv[2])
    names = [n for n in source.names() if n.startswith("model.layers.") and "_proj." in n]
    try:  # reset the peak-RSS mark so only what follows counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status()["VmRSS"]
    held = [source.get(n, rows=slice(0, round(source.shape(n)[0] * fraction))) for n in names]
    print(status()["VmHWM"] - before, sum(t.numel() * t.element_size() for t in held))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_quarter_of_the_rows_costs_a_fraction_of_the_memory(smollm2_path):
    """A process holding 1/4 of every layer's rows grows far less than one holding all."""
    procs = {
        fraction: subprocess.Popen(
            [sys.executable, "-c", RSS_PROBE, str(smollm2_path), str(fraction)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for fraction in (1.0, 0.25)
    }
    grown, held = {}, {}
    for fraction, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        grown[fraction], held[fraction] = (int(x) for x in out.split())
    assert held[0.25] < 0.26 * held[1.0]
    # Measured: about 0.30 (the quarter also touches a quarter of the file's pages).
    assert grown[0.25] < 0.5 * grown[1.0], grown
    assert grown[1.0] >= held[1.0] * 0.9  # the probe did see the weights being loaded


# ------------------------------------------------------------------ dequantisation


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Any]], **shape: int):
    """A GGUF file with the given tensors (float32 values, stored as the given type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(shape.get("layers", 1))
    w.add_context_length(shape.get("ctx", 64))
    w.add_embedding_length(shape.get("d", 64))
    w.add_feed_forward_length(shape.get("ff", 128))
    w.add_head_count(shape.get("heads", 4))
    w.add_head_count_kv(shape.get("kv_heads", 2))
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(10000.0)
    vocab = shape.get("vocab", 96)
    w.add_vocab_size(vocab)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_file_type(1)
    for name, (values, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, values.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            packed = gguf.quants.quantize(values.astype(np.float32), qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _reference_dequantize(raw: np.ndarray, qtype: Any, cols: int) -> np.ndarray:
    """GGML block formats decoded from their byte layout (ggml-common.h), in plain numpy."""
    blocks = raw.reshape(raw.shape[0], cols // 32, -1)
    scale = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # (rows, nb, 1)
    if qtype == Q.Q8_0:  # f16 scale, 32 int8
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        return (scale * q).reshape(raw.shape[0], cols)
    if qtype == Q.Q4_0:  # f16 scale, 16 bytes: low nibbles are elements 0-15, high 16-31
        nib = blocks[..., 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32) - 8.0
        return (scale * q).reshape(raw.shape[0], cols)
    if qtype == Q.Q4_1:  # f16 scale, f16 minimum, 16 bytes of nibbles
        low = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        nib = blocks[..., 4:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32)
        return (scale * q + low).reshape(raw.shape[0], cols)
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_values_match_the_block_format(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    values = rng.standard_normal((48, 96)).astype(np.float32)
    path = tmp_path / "q.gguf"
    _write_gguf(path, "llama", {"blk.0.ffn_up.weight": (values, qtype)})
    source = GGUFSource(path)
    raw = np.asarray(gguf.GGUFReader(str(path)).tensors[0].data)
    expected = _reference_dequantize(raw, qtype, 96)
    got = source.get("model.layers.0.mlp.up_proj.weight").numpy()
    np.testing.assert_array_equal(got, expected)
    # And the quantisation is what it claims: errors within a step of each block's scale
    # (half a step when rounding; Q4_0's scale is set by the block's signed extreme, so the
    # other end can be clipped by up to a whole step).
    amax = np.abs(values).reshape(48, 3, 32).max(axis=-1, keepdims=True)
    step = amax / {Q.Q8_0: 127, Q.Q4_0: 8, Q.Q4_1: 7.5}[qtype]
    bound = {Q.Q8_0: 0.6, Q.Q4_0: 1.01, Q.Q4_1: 0.6}[qtype] * step
    assert (np.abs(got - values).reshape(48, 3, 32) <= bound).all()
    np.testing.assert_array_equal(source.get("model.layers.0.mlp.up_proj.weight",
                                             rows=slice(13, 40)).numpy(), expected[13:40])


def test_float_types_are_exact(tmp_path):
    rng = np.random.default_rng(1)
    f16 = rng.standard_normal((32, 64)).astype(np.float16)
    f32 = rng.standard_normal(64).astype(np.float32)
    path = tmp_path / "f.gguf"
    _write_gguf(path, "qwen2", {"blk.0.ffn_down.weight": (f16, Q.F16),
                                "blk.0.attn_q.bias": (f32, Q.F32)})
    source = GGUFSource(path)
    got = source.get("model.layers.0.mlp.down_proj.weight")
    np.testing.assert_array_equal(got.numpy(), f16.astype(np.float32))
    as_f16 = source.get("model.layers.0.mlp.down_proj.weight", dtype=torch.float16)
    assert as_f16.numpy().tobytes() == f16.tobytes()
    # qwen2 is not permuted: the bias comes out as written.
    np.testing.assert_array_equal(source.get("model.layers.0.self_attn.q_proj.bias").numpy(), f32)
    np.testing.assert_array_equal(
        source.get("model.layers.0.self_attn.q_proj.bias", rows=slice(16, 32)).numpy(), f32[16:32]
    )


# ------------------------------------------------------------------ tiny models, all layouts


def _tiny_tensors(arch: str, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Any]]:
    d, ff, vocab = 64, 128, 96

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    t: dict[str, tuple[np.ndarray, Any]] = {"token_embd.weight": (r(vocab, d), Q.Q8_0),
                                            "output_norm.weight": (r(d), Q.F32)}
    if arch == "gpt2":
        t["position_embd.weight"] = (r(1024, d), Q.F16)
        t["output_norm.bias"] = (r(d), Q.F32)
        for layer in range(2):
            p = f"blk.{layer}."
            t[p + "attn_qkv.weight"] = (r(3 * d, d), Q.Q4_0)
            t[p + "attn_output.weight"] = (r(d, d), Q.Q8_0)
            t[p + "ffn_up.weight"] = (r(4 * d, d), Q.F16)
            t[p + "ffn_down.weight"] = (r(d, 4 * d), Q.Q4_1)
            for stem, n in (("attn_qkv", 3 * d), ("attn_output", d), ("ffn_up", 4 * d),
                            ("ffn_down", d), ("attn_norm", d), ("ffn_norm", d)):
                t[f"{p}{stem}.bias"] = (r(n), Q.F32)
            t[p + "attn_norm.weight"] = (r(d), Q.F32)
            t[p + "ffn_norm.weight"] = (r(d), Q.F32)
        return t
    t["output.weight"] = (r(vocab, d), Q.Q4_0)
    for layer in range(2):
        p = f"blk.{layer}."
        t[p + "attn_q.weight"] = (r(64, d), Q.Q4_0)  # 4 heads of 16
        t[p + "attn_k.weight"] = (r(32, d), Q.Q8_0)  # 2 KV heads
        t[p + "attn_v.weight"] = (r(32, d), Q.F16)
        t[p + "attn_output.weight"] = (r(d, 64), Q.Q4_1)
        t[p + "ffn_gate.weight"] = (r(ff, d), Q.Q4_0)
        t[p + "ffn_up.weight"] = (r(ff, d), Q.Q8_0)
        t[p + "ffn_down.weight"] = (r(d, ff), Q.F16)
        t[p + "attn_norm.weight"] = (r(d), Q.F32)
        t[p + "ffn_norm.weight"] = (r(d), Q.F32)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = (r(64), Q.F32)
            t[p + "attn_k.bias"] = (r(32), Q.F32)
            t[p + "attn_v.bias"] = (r(32), Q.F32)
    return t


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_files_equal_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"{arch}.gguf"
    kv_heads = 4 if arch == "gpt2" else 2
    _write_gguf(path, arch, _tiny_tensors(arch, np.random.default_rng(7)), layers=2,
                kv_heads=kv_heads, ff=256 if arch == "gpt2" else 128, ctx=1024)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ref = model.state_dict()
    source = GGUFSource(path)
    assert set(source.names()) == set(ref)
    for name in source.names():
        torch.testing.assert_close(source.get(name), ref[name], rtol=0, atol=0, msg=name)
        shape = source.shape(name)
        if len(shape) == 2 and shape[0] >= 32:
            rows = slice(16, 32)  # one head of Wq, one KV head of Wk: crosses the permutation
            assert torch.equal(source.get(name, rows=rows), ref[name][rows]), name
            assert torch.equal(source.get(name, cols=slice(8, 40)), ref[name][:, 8:40]), name
    if arch == "gpt2":  # Conv1D layout: (in, out), per-head slices are columns
        assert source.shape("transformer.h.0.attn.c_attn.weight") == (64, 192)
        assert source.shape("transformer.h.1.mlp.c_proj.weight") == (256, 64)


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        GGUFSource(path)
    with pytest.raises(FileNotFoundError):
        GGUFSource(tmp_path / "absent.gguf")
