"""Quantize -> save -> load_checkpoint -> logits equal the fake-quantized model, on tiny Llamas and stories260K."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamp.kernels.half_linear import HalfEmbedding, HalfLinear
from mamp.kernels.packed_linear import PackedLinear, weight_memory
from mamp.kernels.checkpoint import FORMAT_VERSION, load_checkpoint
from mamp.kernels.packing import dequantize
from mamp.quantizer.export import save_quantized
from mamp.quantizer.config import QuantSpec
from mamp.quantizer.pipeline import (LINEARS, HessianAccumulator, LayerStages, capture_inputs, decoder_layers,
                                quantize_model)
from tests.helpers import tiny_llama, tiny_tokenizer

# Loaded models must equal the fake-quantized ones to fp32 rounding: fp32 activations (conftest.py).
pytestmark = pytest.mark.usefixtures("float_activations")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
STORIES = SHARED / "models" / "stories260K"
@pytest.fixture(autouse=True)
def _inference():
    """Serving-style forward passes (PackedLinear's fast CPU path does not support autograd)."""
    with torch.no_grad():
        yield


# head_bits=0: these cases check the 16-bit tables; tests/test_quantizer_head.py covers the packed lm_head.
SPECS = [
    QuantSpec.build(method="mamp", head_bits=0, bits=2, salient_bits=8, salient_fraction=0.1, group_size=32, salient_group_size=32),
    QuantSpec.build(method="mamp", head_bits=0, bits=2, salient_bits=2, salient_fraction=0.1),
    QuantSpec.build(method="mamp", head_bits=0, bits=2, salient_bits=2, salient_fraction=0.25, assign="error", keep_dtype="float16"),
    QuantSpec.build(method="mamp", head_bits=0, bits=4, salient_bits=4, top_k=3, group_size=64),
    QuantSpec.build(method="mamp", head_bits=0, bits=4, salient_bits=8, salient_fraction=0.05, true_sequential=False, assign="saliency"),
    QuantSpec.build(method="gptq", bits=2, mse_clip=False),
    QuantSpec.build(method="rtn", bits=4, keep_dtype="float32"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-b{s.bits}-h{s.salient_bits}-{s.assign}-{s.keep_dtype}")
def test_save_load_matches_fake_quant(tmp_path, spec):
    inter = 176 if spec.bits == 2 else 128
    model = tiny_llama(inter, tie=spec.method != "rtn")
    windows = torch.randint(3, 503, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 503, (3, 17), generator=torch.Generator().manual_seed(2))
    before = model(ids).logits
    qm = quantize_model(model, spec, None if spec.method == "rtn" else windows, progress=False)
    assert set(qm.packed) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    for name, p in qm.packed.items():  # the in-memory fake-quant weight is exactly what the packed format holds
        assert torch.equal(model.get_submodule(name).weight, dequantize(p))
    sal = sum(s.salient_groups for s in qm.stats)
    assert (sal > 0) == spec.uses_salient
    ref = model(ids).logits
    assert not torch.allclose(ref, before)

    out = save_quantized(qm, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, tok = load_checkpoint(out)
    assert tok is not None and tok("w1 w2").input_ids == [4, 5]
    packed_layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed_layers) == 14
    got = loaded(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if spec.method != "rtn":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # A 16-bit table stays 16-bit under fp32 compute, so what the model holds is what the file holds.
    half = spec.keep_dtype != "float32"
    assert isinstance(loaded.model.embed_tokens, HalfEmbedding) == half
    assert isinstance(loaded.lm_head, HalfLinear) == half
    assert loaded.model.embed_tokens.weight.dtype == getattr(torch, spec.keep_dtype)
    stored = load_file(str(out / "model.safetensors"))
    emb = stored["model.embed_tokens.weight"]
    assert loaded.model.embed_tokens.weight.nbytes == emb.nbytes
    norms = sum(v.numel() for k, v in stored.items() if k.endswith("norm.weight"))  # upcast to fp32 (tiny)
    tables = emb.nbytes + (0 if spec.method != "rtn" else stored["lm_head.weight"].nbytes)
    packed = sum(v.nbytes for k, v in stored.items() if any(k.startswith(p + ".") for p in qm.packed))
    # Every tensor the kernels stream starts on a cache line, wherever the file's header left it.
    for mod in loaded.modules():
        if isinstance(mod, (PackedLinear, HalfEmbedding, HalfLinear)):
            assert all(t.data_ptr() % 64 == 0 for t in list(mod.buffers(recurse=False)) + list(mod.parameters(recurse=False)))
    rotary = sum(b.nbytes for n, b in loaded.named_buffers() if "rotary_emb" in n)  # inv_freq, not in the file
    assert weight_memory(loaded)[0] == packed + tables + 4 * norms + rotary

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "mamp" and cfg["format_version"] == FORMAT_VERSION
    assert cfg["method"] == spec.method and cfg["bits"] == spec.bits and cfg["salient_bits"] == spec.salient_bits
    assert len(cfg["layers"]) == 14 and cfg["bits_per_weight"] > spec.bits
    assert cfg["assign"] == spec.assign and cfg["keep_dtype"] == spec.keep_dtype
    untouched = [k for k in stored if not any(k.startswith(p + ".") for p in qm.packed)]
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    assert {stored[k].dtype for k in untouched} == {getattr(torch, spec.keep_dtype)}
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name, meta in manifest.items():
        data = (out / name).read_bytes()
        assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"]
    assert not list(tmp_path.glob("ckpt.tmp-*"))


def test_load_bf16_and_overwrite(tmp_path):
    model = tiny_llama(128)
    qm = quantize_model(model, QuantSpec.build(method="rtn", bits=2), None, progress=False)
    out = save_quantized(qm, tiny_tokenizer(), tmp_path / "c")
    with pytest.raises(ValueError, match="exists"):
        save_quantized(qm, tiny_tokenizer(), out)
    save_quantized(qm, tiny_tokenizer(), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    loaded, _ = load_checkpoint(out, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    y = loaded(torch.tensor([[5, 6, 7]])).logits
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_stages_equal_layer():
    model = tiny_llama(176)
    x, kw = capture_inputs(model, torch.randint(0, 512, (2, 24)), "cpu")
    for layer in decoder_layers(model):
        st = LayerStages(layer, kw)
        st.verify(x)
        x2 = st.linear_inputs(x)[-1]
        torch.testing.assert_close(x2, layer(x, **kw), rtol=1e-5, atol=1e-6)
        x = x2


def test_true_sequential_sees_quantized_inputs(monkeypatch):
    """o_proj's Hessian comes from the attention output of the already-quantized q, k, v (true-sequential), or of
    the float ones (not): both recomputed here from layer 0's inputs and compared with what the solver got."""
    from mamp.quantizer import pipeline

    windows = torch.randint(3, 503, (4, 32), generator=torch.Generator().manual_seed(1))
    seen: dict[bool, list] = {True: [], False: []}
    real = pipeline.quantize_linears

    def spy(layer, names, hess, spec):
        seen[spec.true_sequential].append((tuple(names), hess.clone()))
        return real(layer, names, hess, spec)

    monkeypatch.setattr(pipeline, "quantize_linears", spy)
    # keep_dtype float32: the untouched norms are not rounded afterwards, so layer 0 can be re-run exactly.
    seq = quantize_model(tiny_llama(), QuantSpec.build(method="gptq", bits=2, keep_dtype="float32"), windows,
                         progress=False)
    quantize_model(tiny_llama(), QuantSpec.build(method="gptq", bits=2, keep_dtype="float32", true_sequential=False),
                   windows, progress=False)
    float_model = tiny_llama()
    x, kw = capture_inputs(float_model, windows, "cpu")

    def o_proj_hessian(layer):
        st = LayerStages(layer, kw)
        acc = HessianAccumulator(layer.self_attn.o_proj.in_features, "cpu")
        for s in range(x.shape[0]):
            acc.add(st.attn_core(x[s:s + 1]))
        return acc.h

    (names_seq, h_seq), (names_par, h_par) = seen[True][1], seen[False][1]
    assert names_seq == names_par == tuple(pipeline.OUT)
    torch.testing.assert_close(h_seq, o_proj_hessian(decoder_layers(seq.model)[0]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h_par, o_proj_hessian(decoder_layers(float_model)[0]), rtol=1e-4, atol=1e-6)
    assert (h_seq - h_par).abs().max() > 1e-3 * h_par.abs().max()  # the quantized q, k, v changed it


@pytest.mark.parametrize("band", [256, 2, 3])
def test_hessian_weights_each_window_first_token(monkeypatch, band):
    """H = 2 X^T W X / sum(W), W = 1 but sink_weight on the first token of each window, accumulated window by
    window (and a [T, K] input carries no window structure: plain rows); whole and symmetric however the upper
    part is cut into row bands (one band; 2+2+1; 3+2)."""
    monkeypatch.setattr(HessianAccumulator, "BAND", band)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    rows = torch.cat([x.reshape(-1, 5) for x in xs])
    plain, sink = HessianAccumulator(5, "cpu"), HessianAccumulator(5, "cpu", sink_weight=4.0)
    for x in xs:
        plain.add(x)
        sink.add(x)
    torch.testing.assert_close(plain.h, 2 * rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    w = torch.ones(rows.shape[0])
    w[::7] = 4.0
    torch.testing.assert_close(sink.h, 2 * (rows * w[:, None]).t() @ rows / w.sum(), rtol=1e-5, atol=1e-6)
    flat = HessianAccumulator(5, "cpu", sink_weight=4.0)
    flat.add(rows)
    torch.testing.assert_close(flat.h, plain.h, rtol=1e-5, atol=1e-6)
    assert torch.equal(sink.h, sink.h.t())


@pytest.mark.skipif(not STORIES.exists(), reason="shared stories260K absent")
def test_stories260k_cli_end_to_end(tmp_path, capsys):
    """The real tiny Llama (FFN 172: padded K) through the CLI, then load_checkpoint and the evaluator."""
    from mamp.quantizer.__main__ import main
    from mamp.quantizer.eval import main as eval_main

    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little girl named Lily. She liked to play in the park. " * 60)
    out = tmp_path / "q"
    rc = main([str(STORIES), "--out", str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "64",
               "--salient-bits", "8", "--salient-fraction", "0.1"])
    assert rc == 0, capsys.readouterr().err
    assert "bits per weight" in capsys.readouterr().out
    model, tok = load_checkpoint(out)
    ids = tok("Lily went to the park", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert model.model.layers[0].mlp.down_proj.in_features == 172
    assert eval_main([str(out), "--text", str(text), "--seqlen", "64", "--max-tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert "method: mamp checkpoint: method mamp, 2-bit, salient bits 8" in printed and "perplexity:" in printed
    assert eval_main([str(STORIES), "--text", str(text), "--seqlen", "64", "--max-tokens", "512"]) == 0
    assert "unquantized" in capsys.readouterr().out


def test_perplexity_windows():
    """Uniform logits give perplexity = vocab; windows are non-overlapping and the partial tail is dropped."""
    from types import SimpleNamespace

    from mamp.quantizer.eval import perplexity

    seen = []

    def model(ids, use_cache=False):
        seen.append(ids.clone())
        return SimpleNamespace(logits=torch.zeros(1, ids.shape[1], 37))

    ppl, count = perplexity(model, torch.arange(100) % 37, 16, progress=False)
    assert abs(ppl - 37) < 1e-3 and count == 6 * 15
    assert [int(s[0, 0]) for s in seen] == [i % 37 for i in (0, 16, 32, 48, 64, 80)]
