"""The solver and saliency on single layers: exact packed round trip, error below RTN, planted outliers."""
import pytest
import torch

from mamp.kernels.packing import PackSpec, dequantize, unpack_bitmap
from mamp.quantizer.saliency import group_saliency, top_k_mask
from mamp.quantizer.solver import hinv_diagonal, proxy_loss, solve


def correlated(n_tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 2 + 0.5
    return (torch.randn(n_tokens, k, generator=g) @ mix) * scale


def layer(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(n, k, generator=g) * 0.05
    x = correlated(4 * k, k, seed)
    return w, 2 * x.t() @ x / x.shape[0]


@pytest.mark.parametrize("bits,hbits", [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize("k,n", [(64, 24), (172, 17), (176, 32)])
@pytest.mark.parametrize("frac", [0.0, 0.2, 1.0])
def test_packed_equals_fake_quant(bits, hbits, k, n, frac):
    w, h = layer(n, k)
    spec = PackSpec(k, n, bits=bits, salient_bits=hbits, group_size=32, salient_group_size=64)
    sal = torch.rand(n, spec.n_groups, generator=torch.Generator().manual_seed(3)) < frac
    for hess in (h, None):
        r = solve(w, hess, spec, sal, block_size=32, mse_clip=frac == 0.2)
        assert torch.equal(dequantize(r.packed), r.weight)
        assert r.weight.shape == w.shape


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_error_below_rtn(bits):
    w, h = layer(48, 256)
    spec = PackSpec(256, 48, bits=bits, salient_bits=bits, group_size=64, salient_group_size=64)
    for clip in (False, True):
        rtn = proxy_loss(w, solve(w, None, spec, mse_clip=clip).weight, h)
        gptq = proxy_loss(w, solve(w, h, spec, mse_clip=clip).weight, h)
        assert gptq < rtn
    # Salient groups on their own grid, compensated in the loop, help further on outlier-heavy weights.
    w2 = w.clone()
    w2[torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.02] *= 20
    sal = top_k_mask(group_saliency(w2, hinv_diagonal(h, 0.01)), 5)
    plain = proxy_loss(w2, solve(w2, h, spec).weight, h)
    mamp = proxy_loss(w2, solve(w2, h, spec, sal).weight, h)
    assert mamp < plain


@pytest.mark.parametrize("bits,most", [(2, 0.7), (4, 0.97)])
def test_mse_clip_pays(bits, most):
    """The clipping search cuts the rounding error of Gaussian weights (measured: to 0.54x at b = 2, 0.91x at
    b = 4); a search that kept min..max would fail here."""
    w, h = layer(32, 128)
    spec = PackSpec(128, 32, bits=bits, salient_bits=bits)
    a = (solve(w, None, spec).weight - w).pow(2).sum()
    b = (solve(w, None, spec, mse_clip=True).weight - w).pow(2).sum()
    assert b < most * a


@pytest.mark.parametrize("bits", [2, 4])
def test_coarse_clip_search(bits):
    """Coarse to fine tries a subset of the 40 shrink factors: per row never better than trying them all (the
    exhaustive search, written out here), never worse than the best coarse candidate, and equal on most rows."""
    from mamp.kernels.packing import affine_grid
    from mamp.quantizer import solver
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(256, 128, generator=g) * torch.rand(256, 1, generator=g)
    x[:, 5] *= 8  # an outlier column: clipping pays
    mask = torch.rand(256, 128, generator=g) > 0.2
    xm = torch.where(mask, x, 0.0)
    lo, hi = xm.amin(1).clamp(max=0.0), xm.amax(1).clamp(min=0.0)
    errs = torch.stack([solver._grid_error(xm, *affine_grid(lo * (1 - 0.02 * i), hi * (1 - 0.02 * i), bits), bits)
                        for i in range(40)])
    got = solver._grid_error(xm, *solver.fit_grid(x, mask, bits, True), bits)
    assert torch.all(got >= errs.min(0).values)
    assert torch.all(got <= errs[::solver.CLIP_COARSE].min(0).values)
    assert (got == errs.min(0).values).float().mean() > 0.7
    assert torch.equal(solver._grid_error(xm, *solver.fit_grid(x, mask, bits, True, coarse=1), bits), errs.min(0).values)


def test_saliency_picks_planted_outliers():
    n, k = 40, 96
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.01
    planted = {(3, 0), (17, 2), (31, 5), (8, 5)}
    for (row, g) in planted:
        w[row, 16 * g + 4] = 1.0
    s = group_saliency(w, torch.ones(k))
    mask = top_k_mask(s, 2)
    assert mask.sum(0).tolist() == [2] * (k // 16)
    for (row, g) in planted:
        assert mask[row, g]
    # H^-1 weighting: a small weight on an input with tiny [H^-1]_jj (a well-measured input) wins.
    d = torch.ones(k)
    d[16 * 1 + 3] = 1e-3
    w2 = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.01
    w2[9, 16 + 3] = 0.05
    assert top_k_mask(group_saliency(w2, d), 1)[9, 1]
    assert top_k_mask(s, 0).sum() == 0 and top_k_mask(s, n).all()


def test_dead_inputs_and_padding():
    w, h = layer(16, 172)
    h[5, :] = 0
    h[:, 5] = 0
    spec = PackSpec(172, 16, bits=2, salient_bits=8, group_size=64, salient_group_size=64)
    sal = torch.zeros(16, spec.n_groups, dtype=torch.bool)
    sal[:, -1] = True  # the last group straddles the padding
    r = solve(w, h, spec, sal)
    assert torch.isfinite(r.weight).all()
    assert torch.all(r.weight[:, 5] == 0)
    assert torch.equal(dequantize(r.packed), r.weight)


@pytest.mark.parametrize("bits,hbits", [(2, 2), (2, 4), (4, 4)])
@pytest.mark.parametrize("k,n", [(256, 48), (172, 17)])
def test_error_assignment(bits, hbits, k, n):
    """Groups given to the grid with the lower weighted error: a mask that differs from the start, recorded in the
    bitmap, packed == fake-quant, and a layer-output loss below the fixed saliency mask's on outlier-heavy weights."""
    w, h = layer(n, k)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) < 0.02] *= 20
    spec = PackSpec(k, n, bits=bits, salient_bits=hbits, group_size=64, salient_group_size=64)
    start = top_k_mask(group_saliency(w, hinv_diagonal(h, 0.01)), max(1, n // 4))
    fixed = solve(w, h, spec, start, block_size=32, mse_clip=True)
    for hess in (h, None):
        r = solve(w, hess, spec, start, block_size=32, mse_clip=True, assign="error")
        assert torch.equal(dequantize(r.packed), r.weight)
        assert torch.equal(unpack_bitmap(r.packed.bitmap, spec.n_groups), r.salient)
        assert not torch.equal(r.salient, start) and r.salient.any()
        if hess is not None and hbits == bits:  # two grids as one codebook beat the paper's fixed top-K mask
            assert proxy_loss(w, r.weight, h) < proxy_loss(w, fixed.weight, h)


def test_error_assignment_needs_equal_group_sizes():
    w, h = layer(16, 128)
    spec = PackSpec(128, 16, bits=2, salient_bits=2, group_size=64, salient_group_size=128)
    with pytest.raises(ValueError, match="group_size == salient_group_size"):
        solve(w, h, spec, None, assign="error")
    with pytest.raises(ValueError, match="assign must be one of"):
        solve(w, h, spec, None, assign="magic")


@pytest.mark.parametrize("bits,hbits,frac", [(2, 2, 0.0), (2, 2, 0.25), (2, 8, 0.1), (4, 4, 0.05)])
def test_refit_lowers_layer_error(bits, hbits, frac):
    """The closed-form scale refit never raises any row's error, lowers the layer's, and stays exactly packed."""
    w, h = layer(40, 172)
    spec = PackSpec(172, 40, bits=bits, salient_bits=hbits, group_size=64, salient_group_size=64)
    sal = top_k_mask(group_saliency(w, hinv_diagonal(h, 0.01)), round(frac * 40))
    plain = solve(w, h, spec, sal, block_size=32, mse_clip=True)
    refit = solve(w, h, spec, sal, block_size=32, mse_clip=True, refit=True)
    assert torch.equal(dequantize(refit.packed), refit.weight)
    assert torch.equal(refit.packed.qweight, plain.packed.qweight)  # codes untouched, only scales move
    assert torch.equal(refit.packed.zeros, plain.packed.zeros)
    d0, d1 = (plain.weight - w).double(), (refit.weight - w).double()
    rows0, rows1 = ((d0 @ h.double()) * d0).sum(1), ((d1 @ h.double()) * d1).sum(1)
    assert (rows1 <= rows0).all()
    assert rows1.sum() < (0.97 if bits == 2 else 0.99) * rows0.sum()
    assert not torch.equal(refit.packed.scales, plain.packed.scales)


@pytest.mark.parametrize("assign", ["saliency", "error"])
def test_fixed_grids_second_pass(assign):
    """grids= uses the given grids as they are (no fitting); the codes are solved again on them."""
    w, h = layer(24, 128)
    spec = PackSpec(128, 24, bits=2, salient_bits=2, group_size=64, salient_group_size=64)
    sal = top_k_mask(group_saliency(w, hinv_diagonal(h, 0.01)), 6)
    first = solve(w, h, spec, sal, mse_clip=True, assign=assign, refit=True)
    p = first.packed
    grids = (p.scales, p.zeros.float(), p.hscales, p.hzeros.float())
    second = solve(w, h, spec, first.salient, assign=assign, grids=grids)
    assert torch.equal(second.packed.scales, p.scales) and torch.equal(second.packed.zeros, p.zeros)
    assert torch.equal(second.packed.hscales, p.hscales) and torch.equal(second.packed.hzeros, p.hzeros)
    assert torch.equal(dequantize(second.packed), second.weight)
    with pytest.raises(ValueError, match="grids: expected shapes"):
        solve(w, h, spec, sal, grids=(p.scales[:1], p.zeros, p.hscales, p.hzeros))
