"""The column-tiled layout of the CPU kernels (kernels/cpu_layout.py, cpu_layout.h): exact round trip, the same
results as the checkpoint's row-major layout in every kernel, and a PackedLinear that tiles itself at load while
state_dict, load_state_dict, .to() and autograd keep seeing row-major tensors."""
import gc
import weakref

import pytest
import torch

from mamp.kernels import cpu_layout, ops
from mamp.kernels.packed_linear import PackedLinear
from mamp.kernels.packing import PackSpec
from mamp.kernels.reference import packed_matmul_reference
from tests.helpers import make_case, random_packed

pytestmark = pytest.mark.skipif(not ops.load_cpu_ops(), reason="the C++ extension cannot be built here")


@pytest.mark.parametrize("bits,hbits", [(2, 2), (2, 8), (4, 4), (4, 8)])
def test_tiled_equals_row_major_in_both_kernels(bits, hbits):
    _, packed = make_case(208, 96, bits, hbits, 0.3, groups=(64, 32))
    tiled = cpu_layout.tile(packed)
    assert tiled.qweight.shape == (6, packed.qweight.shape[0], 16)
    back = tiled.untile()
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), packed.tensors().values()))
    bias = torch.randn(96)
    for m in (1, 3, 16, 17, 40):  # decode kernels and the prefill path
        x = torch.randn(m, 208)
        torch.testing.assert_close(ops.packed_linear(x, tiled, bias), ops.packed_linear(x, packed, bias),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ops.packed_linear_int8(x, tiled, bias), ops.packed_linear_int8(x, packed, bias),
                                   rtol=1e-5, atol=1e-5)


def test_tiling_needs_whole_tiles_and_one_layout():
    _, packed = make_case(208, 40, 4, 4, 0.3)
    with pytest.raises(ValueError, match="out_features % 16"):
        cpu_layout.tile(packed)
    _, p96 = make_case(208, 96, 4, 4, 0.3)
    t = cpu_layout.tile(p96)
    mixed = (torch.randn(1, 208), t.qweight, p96.bitmap, *list(p96.tensors().values())[2:], None, 4, 4, 64, 32, 16,
             1 << 22)
    with pytest.raises(RuntimeError, match="all 2-D .row-major. or all 3-D"):
        torch.ops.mamp.packed_linear_cpu(*mixed)


def test_packed_linear_tiles_at_load_and_shows_row_major_outside():
    spec = PackSpec(208, 96, bits=4, salient_bits=4)
    packed, _ = random_packed(spec, 0.1, seed=5)
    bias = torch.randn(96)
    layer = PackedLinear.from_packed(packed, bias)
    assert layer.tiled and layer.qweight.dim() == 3 and layer.kernel_name == "cpu-int8"
    state = layer.state_dict()
    assert all(torch.equal(state[k], v) for k, v in packed.tensors().items())  # the checkpoint's format
    assert all(torch.equal(a, b) for a, b in zip(layer.packed.tensors().values(), packed.tensors().values()))
    x = torch.randn(2, 208)
    with torch.no_grad():
        y = layer(x)
    # A second layer loads the row-major state_dict and serves the same; so does the autograd (reference) path.
    other = PackedLinear.from_packed(random_packed(spec, 0.5, seed=6)[0], torch.zeros(96))
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), y) and other.tiled
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(layer(xg), packed_matmul_reference(x, packed, bias))
    # .to() moves the row-major tensors and tiles again for the kernel chosen after the move.
    moved = layer.to("cpu")
    assert moved.tiled and all(torch.equal(a, b) for a, b in zip(moved.packed.tensors().values(),
                                                                   packed.tensors().values()))


def test_a_layer_with_a_partial_tile_stays_row_major():
    spec = PackSpec(208, 40, bits=4, salient_bits=4)
    packed, _ = random_packed(spec, 0.1, seed=5)
    layer = PackedLinear.from_packed(packed)
    assert not layer.tiled and layer.qweight.shape == packed.qweight.shape


def test_fused_packed_linears_equal_the_layers_and_share_their_memory():
    from mamp.kernels.packed_linear import FusedPackedLinears

    specs = [PackSpec(208, n, bits=4, salient_bits=4) for n in (96, 32, 32)]
    packs = [random_packed(s, 0.2, seed=i)[0] for i, s in enumerate(specs)]
    mods = [PackedLinear.from_packed(p) for p in packs]
    x = torch.randn(3, 208)
    with torch.no_grad():
        alone = [m(x) for m in mods]
        before = [weakref.ref(m.qweight) for m in mods]
        fused = FusedPackedLinears.fuse(mods)
        assert fused is not None and fused.splits == [96, 32, 32]
        gc.collect()  # nothing (a layer's integer-kernel plan included) holds the layers' own tensors any more
        assert all(r() is None for r in before)
        for y, ref in zip(fused(x), alone):
            torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        for m, ref, p in zip(mods, alone, packs):  # still serving alone, from views of the fused tensors
            assert m.qweight.untyped_storage().data_ptr() == fused.view.qweight.untyped_storage().data_ptr()
            torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
            assert all(torch.equal(m.state_dict()[k], v) for k, v in p.tensors().items())
    with_bias = PackedLinear.from_packed(packs[1], torch.zeros(32))
    assert FusedPackedLinears.fuse([mods[0], with_bias]) is None
    other = PackedLinear.from_packed(random_packed(PackSpec(208, 32, bits=2, salient_bits=2), 0.2)[0])
    assert FusedPackedLinears.fuse([mods[0], other]) is None
