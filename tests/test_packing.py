"""Exact round trips of the packed format (kernels/packing.py) over awkward shapes and every width pair."""
import pytest
import torch

from mamp.kernels.packing import (GROUP, PackedWeight, PackSpec, affine_grid, dequantize, dequantize_affine, pack,
                             pack_bitmap, quantize_affine, unpack, unpack_bitmap)
from tests.helpers import random_packed

WIDTHS = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]
SHAPES = [(16, 1), (172, 5), (176, 48), (128, 3), (400, 17), (64 * 3 + 16, 7)]


@pytest.mark.parametrize("bits,hbits", WIDTHS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("frac", [0.0, 0.1, 0.5, 1.0])
def test_pack_unpack_exact(bits, hbits, k, n, frac):
    spec = PackSpec(k, n, bits=bits, salient_bits=hbits, group_size=32, salient_group_size=64)
    p, (low, high, sal) = random_packed(spec, frac)
    low2, high2, sal2 = unpack(p)
    assert torch.equal(sal2, sal)
    assert torch.equal(low2, low.masked_fill(sal.repeat_interleave(GROUP, 1), 0))
    assert torch.equal(high2, high.masked_fill(~sal.repeat_interleave(GROUP // spec.run, 1), 0))
    # Packing what was unpacked gives back the same bits.
    p2 = pack(spec, low2, high2, sal2, p.scales.float(), p.zeros.float(), p.hscales.float(), p.hzeros.float())
    for name, t in p.tensors().items():
        assert torch.equal(t, getattr(p2, name)), name


@pytest.mark.parametrize("bits,hbits", WIDTHS)
def test_word_layout_bit_by_bit(bits, hbits):
    """The documented layout, checked by hand on one column (docs/FORMAT.md)."""
    spec = PackSpec(32, 1, bits=bits, salient_bits=hbits, group_size=16, salient_group_size=16)
    low = torch.arange(32).remainder(1 << bits).unsqueeze(0)
    high = torch.arange(spec.n_high_codes).mul(7).remainder(1 << hbits).unsqueeze(0)
    sal = torch.tensor([[False, True]])
    one = torch.ones(2, 1)
    p = pack(spec, low, high, sal, one, one * 0, one, one * 0)
    words = [int(w) & 0xFFFFFFFF for w in p.qweight[:, 0]]
    vpw = 32 // bits
    run = hbits // bits
    for k in range(32):
        word, i = words[k // vpw], k % vpw
        if k < 16:  # normal group: code i at bits [b*i, b*i + b)
            assert (word >> (bits * i)) & ((1 << bits) - 1) == int(low[0, k])
        else:  # salient group: code j = i // run at bits [h*j, h*j + h), covering run consecutive rows
            assert (word >> (hbits * (i // run))) & ((1 << hbits) - 1) == int(high[0, k // run])
    assert int(p.bitmap[0, 0]) == 0b10


def test_bitmap_roundtrip_odd_group_counts():
    for g in (1, 7, 8, 9, 23):
        sal = torch.rand(5, g) < 0.5
        b = pack_bitmap(sal)
        assert b.shape == (-(-g // 8), 5)
        assert torch.equal(unpack_bitmap(b, g), sal)


def test_dequantize_matches_formula_and_pads_k():
    spec = PackSpec(172, 4, bits=2, salient_bits=8, group_size=128, salient_group_size=128)
    assert spec.padded_in == 176 and spec.n_scale_groups == 2 and spec.qweight_rows == 11
    p, (low, high, sal) = random_packed(spec, 0.3, seed=3)
    w = dequantize(p)
    assert w.shape == (4, 172)
    n, k = 2, 150
    s, z = p.scales[k // 128, n].float(), p.zeros[k // 128, n].float()
    hs, hz = p.hscales[k // 128, n].float(), p.hzeros[k // 128, n].float()
    if sal[n, k // 16]:
        expect = (high[n, k // 4] - hz) * hs
    else:
        expect = (low[n, k] - z) * s
    assert float(w[n, k]) == float(expect)


def test_affine_grid_roundtrip_and_fp16_scale():
    x = torch.randn(8, 128)
    scale, zero = affine_grid(x.amin(1, keepdim=True), x.amax(1, keepdim=True), 4)
    assert torch.equal(scale, scale.half().float())
    q = quantize_affine(x, scale, zero, 4)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    err = (dequantize_affine(q, scale, zero) - x).abs().max()
    assert float(err) <= float(scale.max()) * 0.5 + 1e-6
    # A constant group still gets a finite, positive scale.
    s, z = affine_grid(torch.zeros(1), torch.zeros(1), 2)
    assert float(s) > 0 and torch.isfinite(s).all()


def test_spec_validation_and_bits_per_weight():
    with pytest.raises(ValueError):
        PackSpec(64, 8, bits=3)
    with pytest.raises(ValueError):
        PackSpec(64, 8, bits=4, salient_bits=2)
    with pytest.raises(ValueError):
        PackSpec(64, 8, bits=8, salient_bits=4)  # h >= b: b = 8 takes h = 8
    # b = 8: sixteen 8-bit codes in 4 words per group, plus the same metadata as the other widths.
    assert PackSpec(4096, 4096, bits=8, salient_bits=8).bits_per_weight() == pytest.approx(8 + 1 / 16 + 48 / 128)
    with pytest.raises(ValueError):
        PackSpec(64, 8, group_size=24)
    spec = PackSpec(4096, 4096, bits=2, salient_bits=8, group_size=128, salient_group_size=128)
    # 2 (words) + 1/16 (bitmap) + 2 * (16 + 8) / 128 (two grids' fp16 scale + uint8 zero)
    assert spec.bits_per_weight() == pytest.approx(2 + 1 / 16 + 48 / 128)
    with pytest.raises(ValueError):
        PackedWeight(spec, *(torch.zeros(1) for _ in range(6)))
