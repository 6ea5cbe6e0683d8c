"""A packed lm_head (--head-bits): quantize -> save -> load gives the fake-quantized model's logits; a tied
embedding is stored once (the packed copy) and looked up from the packed words (PackedEmbedding); an untied one
stays a 16-bit table."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamp.kernels.checkpoint import load_checkpoint
from mamp.kernels.cpu_layout import tile
from mamp.kernels.packed_linear import PackedEmbedding, PackedLinear
from mamp.kernels.packing import PackSpec, dequantize
from mamp.quantizer.config import QuantSpec, SpecError
from mamp.quantizer.export import save_quantized
from mamp.quantizer.pipeline import quantize_model
from tests.helpers import random_packed, tiny_llama, tiny_tokenizer

# Loaded models must equal the fake-quantized ones to fp32 rounding: fp32 activations (conftest.py).
pytestmark = pytest.mark.usefixtures("float_activations")


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("head_bits,tie", [(8, True), (4, True), (8, False)])
def test_packed_head_round_trip(tmp_path: Path, head_bits, tie):
    model = tiny_llama(128, tie=tie)
    ids = torch.randint(3, 503, (2, 9), generator=torch.Generator().manual_seed(2))
    before = model(ids).logits
    spec = QuantSpec.build(method="rtn", bits=4, head_bits=head_bits)
    qm = quantize_model(model, spec, None, progress=False)
    assert qm.packed["lm_head"].spec.bits == head_bits and qm.packed["lm_head"].spec.out_features == 512
    assert torch.equal(model.lm_head.weight, dequantize(qm.packed["lm_head"]))  # fake-quant = what is stored
    ref = model(ids).logits
    assert torch.isfinite(ref).all() and not torch.allclose(ref, before)

    out = save_quantized(qm, tiny_tokenizer(), tmp_path / "ckpt")
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    assert ("model.embed_tokens.weight" in stored) == (not tie)  # tied: the packed copy serves both
    loaded, _ = load_checkpoint(out)
    assert isinstance(loaded.lm_head, PackedLinear)
    assert isinstance(loaded.model.embed_tokens, PackedEmbedding) == tie
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_head_bits_validated():
    with pytest.raises(SpecError, match="head bits"):
        QuantSpec.build(method="rtn", bits=4, head_bits=3)


@pytest.mark.parametrize("tiled", [False, True])
def test_packed_embedding_reads_rows_from_the_packed_head(tiled):
    spec = PackSpec(80, 64, bits=8, salient_bits=8, group_size=32, salient_group_size=32)
    packed, _ = random_packed(spec, 0.2, seed=1)
    head = PackedLinear.from_packed(packed)
    if not tiled:
        head._untile()
    assert head.tiled == tiled
    emb = PackedEmbedding(head, torch.float32)
    ids = torch.tensor([[0, 63, 17], [17, 5, 40]])
    rows = emb(ids)
    assert rows.shape == (2, 3, 80)
    assert torch.equal(rows, dequantize(packed)[ids])
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 80)
    with pytest.raises(IndexError, match=r"\[0, 64\)"):
        emb(torch.tensor([64]))
    assert torch.equal(tile(packed).untile().qweight, packed.qweight)
