"""The CPU packed matmul (C++ extension and its torch twin) against the reference and a float64 product.

Full grid: widths (b, h) in {2, 4} x {b, 8} and (2, 4); M in {1, 3, 17, 257}; K, N odd multiples of 16 and
128 and a padded K; fp16 / bf16 / fp32; no, a few, half and all groups salient; with and without bias; contiguous and
strided x. Outputs are poisoned with NaN before each run so an unwritten element fails.
"""
import pytest
import torch

from mamp.kernels import cpu_matmul
from mamp.kernels.dispatch import can_implement
from mamp.kernels.packed_linear import PackedLinear
from mamp.kernels.packing import PackSpec, dequantize
from mamp.kernels.reference import packed_matmul_reference
from tests.helpers import TOL, check_close, make_case, make_x, random_packed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

WIDTHS = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]  # h = b takes the one-decode path
SHAPES = [(172, 48), (384, 80), (208, 384)]  # (K, N): padded K; 3*128; 13*16 and 3*128
FRACS = [0.0, 0.04, 0.5, 1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = [1, 3, 17, 257]
def run_poisoned(fn, x, packed, bias, **kw):
    out = torch.full((*x.shape[:-1], packed.spec.out_features), float("nan"), dtype=x.dtype)
    y = fn(x, packed, bias, out=out, **kw)
    assert y.data_ptr() == out.data_ptr()
    return out


@pytest.mark.parametrize("bits,hbits", WIDTHS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("frac", FRACS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matmul_grid(bits, hbits, k, n, frac, dtype):
    _, packed = make_case(k, n, bits, hbits, frac)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    w64 = dequantize(packed).double()
    for m in MS:
        for with_bias, strided in ((False, False), (True, True), (True, False), (False, True)):
            b = bias if with_bias else None
            x = make_x(m, k, dtype, strided, seed=m)
            y = run_poisoned(cpu_matmul.packed_matmul_cpu, x, packed, b)
            check_close(y, x, packed, b, w64)
            # The oracle agrees within one output rounding (both accumulate in fp32).
            ref = packed_matmul_reference(x, packed, b)
            scale = ref.float().abs().max().clamp_min(1.0)
            assert float((y.float() - ref.float()).abs().max() / scale) <= 2 * TOL[dtype]


@pytest.mark.parametrize("bits,hbits", WIDTHS)
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_cpu_paths_agree_across_m_threshold(bits, hbits, frac):
    """Streaming kernel, dequantize-and-BLAS (tiny scratch: many column blocks) and the torch twin."""
    _, packed = make_case(172, 80, bits, hbits, frac, seed=2)
    bias = torch.randn(80)
    for m in (1, 5, 16, 17, 40):
        x = make_x(m, 172, torch.float32, strided=m % 2 == 1)
        y_stream = run_poisoned(cpu_matmul.packed_matmul_cpu, x, packed, bias, small_m=64)
        y_blas = run_poisoned(cpu_matmul.packed_matmul_cpu, x, packed, bias, small_m=0, scratch_bytes=1)
        y_torch = run_poisoned(cpu_matmul.packed_matmul_torch, x, packed, bias, k_tile=32)
        for y in (y_stream, y_blas, y_torch):
            check_close(y, x, packed, bias)


@pytest.mark.parametrize("m", [1, 3, 17, 100])
def test_threads_agree(m):
    """Column tiles are split across threads, each computed whole: any thread count gives the same bits."""
    _, packed = make_case(576, 592, 2, 8, 0.1)
    x = torch.randn(m, 576)
    one = cpu_matmul.packed_matmul_cpu(x, packed)
    torch.set_num_threads(2)
    try:
        two = cpu_matmul.packed_matmul_cpu(x, packed)
    finally:
        torch.set_num_threads(1)
    if m <= cpu_matmul.SMALL_M:
        assert torch.equal(one, two)
    check_close(two, x, packed, None)


def test_cpu_matmul_batched_input_and_fallback(monkeypatch):
    _, packed = make_case(208, 48, 2, 8, 0.1)
    x = torch.randn(2, 3, 208, dtype=torch.bfloat16)
    y = cpu_matmul.packed_matmul_cpu(x, packed)
    assert y.shape == (2, 3, 48)
    check_close(y.reshape(6, 48), x.reshape(6, 208), packed, None)
    # Without the extension the torch twin answers.
    monkeypatch.setattr(cpu_matmul, "_ext", None)
    monkeypatch.setattr(cpu_matmul, "_ext_error", "simulated: no compiler")
    assert cpu_matmul.cpu_backend() == "torch"
    check_close(cpu_matmul.packed_matmul_cpu(x, packed).reshape(6, 48), x.reshape(6, 208), packed, None)


def test_extension_builds_here():
    """CI and this machine have gcc and Python headers: the C++ path must actually be the one tested."""
    assert cpu_matmul.cpu_backend() == "cpp", cpu_matmul.ext_error()


def test_packed_linear_holds_no_dequantized_weight():
    spec, packed = make_case(172, 48, 2, 8, 0.1)
    layer = PackedLinear.from_packed(packed, torch.randn(48))
    before = {name: (t.dtype, tuple(t.shape)) for name, t in layer.named_buffers()}
    x = torch.randn(3, 172)
    for xx in (x, x[:1], torch.randn(40, 172)):
        check_close(layer(xx), xx, packed, layer.bias)
    after = {name: (t.dtype, tuple(t.shape)) for name, t in layer.named_buffers()}
    assert after == before and not list(layer.parameters())
    packed_bytes = packed.nbytes + layer.bias.numel() * layer.bias.element_size()
    assert sum(t.numel() * t.element_size() for t in layer.buffers()) == packed_bytes
    for name, value in vars(layer).items():  # no tensor attribute of weight size sneaked in either
        if isinstance(value, torch.Tensor):
            assert value.numel() < spec.in_features * spec.out_features, name
    for t in layer.buffers():
        assert not (t.is_floating_point() and t.numel() >= spec.in_features * spec.out_features)


def test_can_implement_reasons():
    spec = PackSpec(64, 32)
    assert can_implement(spec, "cpu") == (True, "cpu")
    ok, reason = can_implement(spec, "meta")
    assert not ok and "meta" in reason
    ok, reason = can_implement(PackSpec(1 << 16, 1 << 16), "cuda")
    assert not ok and ("int32" in reason or "triton" in reason)


def test_packed_linear_under_autograd_matches_and_backpropagates(monkeypatch):
    """Calling a packed model with grad mode on (HF's default outside no_grad) must work and give dL/dx. (The
    differentiable path is the float reference: compared here with the float-activation kernel.)"""
    from mamp.kernels.packed_linear import PackedLinear
    from mamp.kernels.packing import PackSpec, dequantize

    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "float")

    spec = PackSpec(48, 16, bits=2, salient_bits=2, group_size=32, salient_group_size=32)
    packed, _ = random_packed(spec, 0.25)
    layer = PackedLinear.from_packed(packed)
    x = torch.randn(3, 48, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        y_fast = layer(x)
    torch.testing.assert_close(y, y_fast, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dequantize(packed).sum(0).expand(3, 48), rtol=1e-5, atol=1e-5)


def test_a_slow_fallback_is_a_warning_with_the_reason(monkeypatch, caplog):
    import logging

    from mamp.kernels import dispatch

    monkeypatch.setattr(dispatch.ops, "load_cpu_ops", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mamp.kernels.dispatch"):
        kernel = dispatch.choose_kernel(PackSpec(64, 32), "cpu", layer="layer0")
    assert kernel.name == "cpu-torch"
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "layer0: served by the cpu-torch kernel because" in record.getMessage()
    assert "cpu: the C++ extension is unavailable" in record.getMessage()
