"""half_matmul (16-bit weight, fp32 accumulation) and the HalfLinear / HalfEmbedding modules.

Every path (the C++ streaming kernel with and without the per-tile upcast, its upcast-blocks + BLAS prefill with a
normal and a tiny scratch, the torch fallback) against a float64 product with an explicit error bound; outputs
are poisoned with NaN before each call so an unwritten element fails.
"""
import pytest
import torch
from torch import nn

from mamp.kernels import cpu_matmul
from mamp.kernels.half_linear import (HalfEmbedding, HalfLinear, half_matmul, half_matmul_reference,
                                 half_matmul_torch)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WDTYPES = [torch.bfloat16, torch.float16]
XDTYPES = [torch.float32, torch.bfloat16, torch.float16]
MS = [1, 3, 17, 257]
SHAPES = [(72, 50), (576, 193), (1000, 37), (1003, 29), (13, 5)]  # (K, N); K % 8 != 0 exercises the scalar tail
# |y - y64| <= TOL * (|x| @ |W|^T + |bias|): fp32 accumulation (<= ~1e-6 relative here), then rounding to the
# output dtype (half an ulp: 2^-9 bf16, 2^-12 fp16).
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_w(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.1).to(dtype)


def make_x(m, k, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    if layout == "transposed":  # stride 1 along M, not K
        return torch.randn(k, m, generator=g).to(dtype).t()
    if layout == "sliced":  # every other row of a wider tensor, and K of K + 3 columns
        return torch.randn(2 * m, k + 3, generator=g).to(dtype)[::2, 1:k + 1]
    return torch.randn(m, k, generator=g).to(dtype)


def check_close(y, x, w, bias, out_dtype=None):
    out_dtype = x.dtype if out_dtype is None else out_dtype
    xd, wd = x.double(), w.double()
    y64 = xd @ wd.t()
    bound = xd.abs() @ wd.abs().t()
    if bias is not None:
        y64 = y64 + bias.double()
        bound = bound + bias.double().abs()
    assert y.dtype == out_dtype and y.shape == y64.shape
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    err = (y.double() - y64).abs()
    worst = float((err / (TOL[out_dtype] * bound + 1e-30)).max()) if y.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the {out_dtype} tolerance"


def run_poisoned(fn, x, w, bias, **kw):
    out = torch.full((*x.shape[:-1], w.shape[0]), float("nan"), dtype=x.dtype)
    y = fn(x, w, bias, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    return out


def test_extension_has_half_kernel():
    """The C++ path must be the one tested here (gcc and headers are present)."""
    assert cpu_matmul.cpu_backend() == "cpp", cpu_matmul.ext_error()
    assert hasattr(cpu_matmul.load_extension(), "half_linear")


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_half_matmul_grid(wdtype, xdtype, k, n):
    w = make_w(n, k, wdtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(xdtype)
    for m in MS:
        for with_bias, layout in ((False, "contiguous"), (True, "transposed"), (True, "contiguous"),
                                  (False, "sliced")):
            b = bias if with_bias else None
            x = make_x(m, k, xdtype, layout, seed=m)
            check_close(run_poisoned(half_matmul, x, w, b), x, w, b)
            y = half_matmul(x, w, b)  # no out: a fresh tensor in x's dtype
            check_close(y, x, w, b)
            # The oracle agrees within about one output rounding (both accumulate in fp32).
            ref = half_matmul_reference(x, w, b)
            scale = ref.float().abs().max().clamp_min(1.0)
            assert float((y.float() - ref.float()).abs().max() / scale) <= 2 * TOL[xdtype]


@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
def test_paths_agree_across_m_threshold(wdtype):
    """Streaming (tile upcast / direct conversion), upcast blocks + BLAS (tiny scratch: 16-row blocks), torch."""
    k, n = 100, 90
    w = make_w(n, k, wdtype, seed=3)
    bias = torch.randn(n)
    for m in (1, 2, 3, 4, 5, 7, 16, 17, 40):
        x = make_x(m, k, torch.float32, "transposed" if m % 2 else "contiguous", seed=m)
        outs = [run_poisoned(half_matmul, x, w, bias, small_m=64, upcast_m=1),
                run_poisoned(half_matmul, x, w, bias, small_m=64, upcast_m=1 << 30),
                run_poisoned(half_matmul, x, w, bias, small_m=0, scratch_bytes=1),
                run_poisoned(half_matmul, x, w, bias, small_m=0),
                run_poisoned(half_matmul_torch, x, w, bias, block_bytes=4 * k * 7)]
        for y in outs:
            check_close(y, x, w, bias)


@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_threads_agree(m):
    """Tiles of W rows are split across threads, each output computed whole: decode gives the same bits."""
    w = make_w(600, 576, torch.bfloat16)
    x = torch.randn(m, 576)
    one = half_matmul(x, w)
    torch.set_num_threads(2)
    try:
        two = half_matmul(x, w)
    finally:
        torch.set_num_threads(1)
    if m <= 16:
        assert torch.equal(one, two)
    check_close(two, x, w, None)


def test_batched_input_edge_shapes_and_errors():
    w = make_w(37, 24, torch.bfloat16)
    x = torch.randn(2, 3, 24, dtype=torch.float16)
    y = half_matmul(x, w)
    assert y.shape == (2, 3, 37) and y.dtype == torch.float16
    check_close(y.reshape(6, 37), x.reshape(6, 24), w, None)
    assert half_matmul(torch.randn(0, 24), w).shape == (0, 37)
    bias = torch.randn(3)
    y0 = run_poisoned(half_matmul, torch.randn(2, 0), torch.empty(3, 0, dtype=torch.bfloat16), bias)
    assert torch.equal(y0, bias.expand(2, 3))
    with pytest.raises(ValueError, match="features"):
        half_matmul(torch.randn(2, 25), w)
    with pytest.raises(ValueError, match="out"):
        half_matmul(torch.randn(2, 24), w, out=torch.empty(2, 37, dtype=torch.bfloat16))


def test_torch_fallback(monkeypatch):
    w = make_w(50, 72, torch.float16)
    bias = torch.randn(50, dtype=torch.bfloat16)
    for m in (1, 17):
        x = make_x(m, 72, torch.bfloat16, "transposed")
        check_close(run_poisoned(half_matmul_torch, x, w, bias, block_bytes=1), x, w, bias)  # 1-row blocks
        check_close(half_matmul_torch(x, w, bias), x, w, bias)
    # Without the extension half_matmul answers through half_matmul_torch.
    monkeypatch.setattr(cpu_matmul, "_ext", None)
    monkeypatch.setattr(cpu_matmul, "_ext_error", "simulated: no compiler")
    calls = []
    real = half_matmul_torch

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    import mamp.kernels.half_linear as hl
    monkeypatch.setattr(hl, "half_matmul_torch", spy)
    x = torch.randn(3, 72)
    check_close(run_poisoned(half_matmul, x, w, bias), x, w, bias)
    assert calls


def test_autograd_matches_reference():
    w = make_w(20, 16, torch.bfloat16)
    bias = torch.randn(20, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    y = half_matmul(x, w, bias)
    y.square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    (x2 @ w.float().t() + b2).square().sum().backward()
    torch.testing.assert_close(y, (x2 @ w.float().t() + b2).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_half_linear_from_linear():
    lin = nn.Linear(72, 50)
    layer = HalfLinear.from_linear(lin, dtype=torch.bfloat16)
    assert (layer.in_features, layer.out_features) == (72, 50)
    assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
    assert torch.equal(layer.weight, lin.weight.detach().to(torch.bfloat16))
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, lin.bias.detach())
    for x in (torch.randn(4, 72), torch.randn(2, 3, 72, dtype=torch.bfloat16)):
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 50)
        check_close(y.reshape(-1, 50), x.reshape(-1, 72), layer.weight, layer.bias)
    # 16-bit weights only: fp32 goes through from_linear.
    with pytest.raises(ValueError, match="bf16 or fp16"):
        HalfLinear(torch.randn(4, 4))
    # Converting the module to fp32 keeps the 16-bit weight (that memory is the point); fp16 still converts.
    layer.float()
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    layer.half()
    assert layer.weight.dtype == torch.float16


def test_half_embedding_exact_rows():
    emb = nn.Embedding(100, 24, padding_idx=0)
    for dtype, compute in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                           (torch.bfloat16, torch.bfloat16)):
        h = HalfEmbedding.from_embedding(emb, dtype=dtype, compute_dtype=compute)
        assert (h.num_embeddings, h.embedding_dim, h.padding_idx) == (100, 24, 0)
        assert h.weight.dtype == dtype and h.compute_dtype == compute and not h.weight.requires_grad
        ids = torch.tensor([[0, 5, 99], [7, 7, 1]])
        y = h(ids)
        assert y.dtype == compute and y.shape == (2, 3, 24)
        assert torch.equal(y, h.weight[ids].to(compute))  # upcast is exact
        assert torch.equal(y.float(), emb.weight.detach()[ids].to(dtype).float())
    assert HalfEmbedding(torch.zeros(4, 2, dtype=torch.float16)).padding_idx is None


def test_tied_embedding_and_lm_head_share_one_weight():
    emb = HalfEmbedding.from_embedding(nn.Embedding(64, 40), dtype=torch.bfloat16)
    head = HalfLinear(emb.weight)  # tied: the same Parameter, no copy
    assert head.weight is emb.weight
    assert (head.in_features, head.out_features) == (40, 64) and head.bias is None

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens, self.lm_head = emb, head

    model = Tiny()
    assert len(list(model.parameters())) == 1  # counted once
    sd = model.state_dict()
    assert sd["embed_tokens.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    model.float()  # a conversion of the whole model keeps the shared table in bf16, still shared
    assert head.weight is emb.weight and emb.weight.dtype == torch.bfloat16
    ids = torch.tensor([[3, 10, 63]])
    hidden = emb(ids)
    assert hidden.dtype == torch.float32
    logits = head(hidden)
    check_close(logits.reshape(3, 64), hidden.reshape(3, 40), emb.weight, None)
    # A write through one module is seen by the other.
    with torch.no_grad():
        emb.weight[5].fill_(1.0)
    assert torch.equal(head(torch.ones(1, 40))[0, 5], torch.tensor(40.0))
