"""The integer-dot CPU kernel (kernels/cpu_int8_matmul.cpp): every instruction-set path against its torch
reference (int8 activations per block, then the dequantized weights), the fallbacks it takes to the float kernel,
the activation quantizer, the registered op and the dispatch choice.

Paths: AVX-512 VNNI where this CPU has it, AVX2 and the portable loop forced with MAMP_INT8_ISA (read per call).
"""
import copy
import pickle

import pytest
import torch

from mamp.kernels import cpu_matmul, dispatch, ops
from mamp.kernels.packed_linear import PackedLinear
from mamp.kernels.packing import PackSpec
from mamp.kernels.reference import packed_matmul_int8_reference, packed_matmul_reference, quantize_activations
from tests.helpers import TOL, make_case, make_x, random_packed

pytestmark = [pytest.mark.skipif(not ops.load_cpu_ops(), reason="the C++ extension cannot be built here"),
              pytest.mark.usefixtures("one_thread")]

ISAS = ["native", "avx2", "portable"]  # native: the best this CPU has (VNNI on AVX-512 VNNI machines)
SHAPES = [(172, 48), (384, 80), (208, 384), (576, 20)]  # padded K; 3*128; 13*16 x 3*128; N not a multiple of 16
GROUPS = [(64, 32), (128, 128), (128, 64), (32, 128)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "native":
        monkeypatch.delenv("MAMP_INT8_ISA", raising=False)
    else:
        monkeypatch.setenv("MAMP_INT8_ISA", request.param)
    name = cpu_matmul.int8_isa()
    assert name == request.param or request.param == "native" or (request.param == "avx2" and name == "portable")
    return name


def _relerr(y, ref):
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", GROUPS, ids=lambda g: f"g{g[0]}s{g[1]}")
def test_int8_kernel_matches_its_reference(isa, bits, groups):
    for i, (k, n) in enumerate(SHAPES):
        for m in (1, 2, 3, 7, 13, 16):  # VNNI passes 7 and 7 + 6 rows; elsewhere 4 + 2 + 1, 4 + 4 + 4 + 1
            for frac in (0.0, 0.3, 1.0):
                _, packed = make_case(k, n, bits, bits, frac, seed=m + i, groups=groups)
                x = make_x(m, k, torch.float32, strided=m % 2 == 1, seed=k + m)
                bias = torch.randn(n) if (m + i) % 2 else None
                for block in (32, 128):
                    y = torch.ops.mamp.packed_linear_int8_cpu(x, *packed.tensors().values(), bias, bits, bits,
                                                              *groups, block, 16, 1 << 22)
                    ref = packed_matmul_int8_reference(x, packed, bias, act_block=block)
                    assert y.shape == (m, n) and torch.isfinite(y).all()
                    assert _relerr(y, ref) < 2e-6, (isa, k, n, m, frac, block)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int8_kernel_half_activations_and_leading_dims(dtype):
    _, packed = make_case(208, 80, 4, 4, 0.25, groups=(128, 128))
    x = torch.randn(2, 3, 208).to(dtype)
    bias = torch.randn(80).to(dtype)
    y = ops.packed_linear_int8(x, packed, bias)
    assert y.shape == (2, 3, 80) and y.dtype == dtype
    ref = packed_matmul_int8_reference(x, packed, bias, act_block=cpu_matmul.ACT_BLOCK)
    assert _relerr(y, ref) <= 2 * TOL[dtype]


def test_int8_error_is_the_activation_rounding():
    """Against fp32 activations the error stays within the int8 rounding bound: |x - q d| <= d/2 per input."""
    _, packed = make_case(384, 80, 4, 4, 0.1, groups=(128, 128))
    x = torch.randn(4, 384)
    y = ops.packed_linear_int8(x, packed, None)
    exact = packed_matmul_reference(x.double(), packed, None)
    q, d = quantize_activations(x, cpu_matmul.ACT_BLOCK)
    from mamp.kernels.packing import dequantize
    bound = (d.repeat_interleave(cpu_matmul.ACT_BLOCK, dim=1)[:, :384].double() / 2) @ dequantize(packed).double().abs().t()
    assert ((y.double() - exact).abs() <= bound * 1.001 + 1e-5).all()
    assert (y.double() - exact).abs().max() > 0  # it really did quantize


def test_int8_falls_back_to_the_float_kernel():
    """M > small_m (the op's argument; the default, cpu_matmul.INT8_MAX_M, takes every M), and h != b (the
    paper's 8-bit means), take the float kernel: identical results."""
    _, packed = make_case(208, 48, 4, 4, 0.2, groups=(128, 128))
    x = torch.randn(17, 208)
    args = (*packed.tensors().values(), None, 4, 4, 128, 128, 64, 16, 1 << 22)
    assert torch.equal(torch.ops.mamp.packed_linear_int8_cpu(x, *args), ops.packed_linear(x, packed, None))
    _, p8 = make_case(208, 48, 2, 8, 0.2, groups=(128, 128))
    x1 = torch.randn(1, 208)
    assert torch.equal(ops.packed_linear_int8(x1, p8, None), ops.packed_linear(x1, p8, None))
    with pytest.raises(ValueError, match="layer expects 208"):
        ops.packed_linear_int8(torch.randn(1, 200), packed, None)
    args = (torch.randn(1, 208), *packed.tensors().values(), None, 4, 4, 128, 128, 24, 16, 1 << 22)
    with pytest.raises(RuntimeError, match="act_block"):
        torch.ops.mamp.packed_linear_int8_cpu(*args)


def test_quantize_activations():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29])
    q, d = quantize_activations(x, 32)
    assert q.dtype == torch.int8 and q.shape == (1, 64) and d.shape == (1, 2)
    assert (q[0, :32] == 0).all() and d[0, 0] == 0  # an all-zero block stays zero, no division by zero
    assert q[0, 33] == -127 and q[0, 32] == 64 and abs(float(d[0, 1]) - 2 / 127) < 1e-9  # 63.5 rounds to even
    x = torch.randn(3, 100)
    q, d = quantize_activations(x, 32)
    back = q.float() * d.repeat_interleave(32, dim=1)[:, :100]
    assert ((back - x).abs() <= d.repeat_interleave(32, dim=1)[:, :100] / 2 + 1e-7).all()


def test_int8_opcheck():
    _, packed = make_case(80, 48, 4, 4, 0.25, groups=(32, 32))
    for x, bias in ((torch.randn(2, 3, 80), torch.randn(48)), (torch.randn(1, 80, dtype=torch.bfloat16), None)):
        args = (x, *packed.tensors().values(), bias, 4, 4, 32, 32, 32, 16, 1 << 22)
        result = torch.library.opcheck(torch.ops.mamp.packed_linear_int8_cpu.default, args,
                                       test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        assert set(result.values()) == {"SUCCESS"}, result


def test_dispatch_chooses_int8_for_h_equal_b_unless_float_is_asked(monkeypatch):
    monkeypatch.delenv(cpu_matmul.ACTIVATIONS_ENV, raising=False)
    monkeypatch.delenv("MAMP_INT8_ISA", raising=False)
    if cpu_matmul.int8_isa() == "portable":
        pytest.skip("this CPU has neither AVX2 nor AVX-512 VNNI: the float kernel serves (see the test below)")
    assert dispatch.choose_kernel(PackSpec(64, 32, bits=4, salient_bits=4), "cpu").name == "cpu-int8"
    assert dispatch.choose_kernel(PackSpec(64, 32, bits=2, salient_bits=2), "cpu").name == "cpu-int8"
    assert dispatch.choose_kernel(PackSpec(64, 32, bits=2, salient_bits=8), "cpu").name == "cpu"
    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "float")
    assert dispatch.choose_kernel(PackSpec(64, 32, bits=4, salient_bits=4), "cpu").name == "cpu"
    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "fp8")
    with pytest.raises(ValueError, match="int8 or float"):
        dispatch.choose_kernel(PackSpec(64, 32, bits=4, salient_bits=4), "cpu")


def test_without_simd_the_float_kernel_serves(monkeypatch):
    monkeypatch.delenv(cpu_matmul.ACTIVATIONS_ENV, raising=False)
    monkeypatch.setenv("MAMP_INT8_ISA", "portable")
    kernel = dispatch.choose_kernel(PackSpec(64, 32, bits=4, salient_bits=4), "cpu")
    assert kernel.name == "cpu"


def test_packed_linear_serves_through_the_int8_kernel(monkeypatch):
    monkeypatch.delenv(cpu_matmul.ACTIVATIONS_ENV, raising=False)
    monkeypatch.delenv("MAMP_INT8_ISA", raising=False)
    spec = PackSpec(208, 48, bits=4, salient_bits=4)
    packed, _ = random_packed(spec, 0.1, seed=3)
    bias = torch.randn(48)
    layer = PackedLinear.from_packed(packed, bias)
    assert layer.kernel_name == "cpu-int8"
    g = torch.Generator().manual_seed(0)  # fixed inputs: about 1 draw in 100 puts an activation on a rounding
    x = torch.randn(3, 208, generator=g)  # boundary that the reference's fp32 scale and the kernel's round apart
    with torch.no_grad():
        y = layer(x)
    assert _relerr(y, packed_matmul_int8_reference(x, packed, bias, cpu_matmul.ACT_BLOCK)) < 2e-6
    with torch.no_grad():  # prefill sizes too (cpu_matmul.INT8_MAX_M)
        x40 = torch.randn(40, 208, generator=g)
        ref = packed_matmul_int8_reference(x40, packed, bias, cpu_matmul.ACT_BLOCK)
        assert _relerr(layer(x40), ref) < 2e-6


def test_packed_linear_prepared_plan_is_the_op_and_follows_its_weights(monkeypatch):
    """PackedLinear serves the integer kernel through the layer plan it prepared at load (cpu_matmul.int8_linear):
    bit for bit the registered op, for leading dims, strides and 16-bit x; a load_state_dict in place (the plan's
    salient tiles were read from the old bitmap: none salient, the new one salient groups in every tile), a deepcopy
    and a pickle serve the weights they hold."""
    monkeypatch.delenv(cpu_matmul.ACTIVATIONS_ENV, raising=False)
    monkeypatch.delenv("MAMP_INT8_ISA", raising=False)
    spec = PackSpec(208, 40, bits=4, salient_bits=4)  # 40 % 16 != 0: row-major, so loaded in place
    plain, _ = random_packed(spec, 0.0, seed=1)
    salient, _ = random_packed(spec, 0.3, seed=2)
    layer = PackedLinear.from_packed(plain, torch.randn(40))
    assert layer.kernel_name == "cpu-int8" and layer.__dict__["_plan"] is not None
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(2, 3, 208, generator=g), torch.randn(5, 416, generator=g)[:, ::2],
          torch.randn(1, 208, generator=g).bfloat16())
    with torch.no_grad():
        for x in xs:
            assert torch.equal(layer(x), ops.packed_linear_int8(x, plain, layer.bias))
        layer.load_state_dict({**salient.tensors(), "bias": layer.bias.clone()})
        x = torch.randn(4, 208, generator=g)
        y = layer(x)
        assert torch.equal(y, ops.packed_linear_int8(x, salient, layer.bias))
        assert _relerr(y, packed_matmul_int8_reference(x, salient, layer.bias, cpu_matmul.ACT_BLOCK)) < 2e-6
        assert torch.equal(copy.deepcopy(layer)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threads_split_the_tiles_exactly(threads):
    """Threads take their own run of tiles, then what is left of the others' (on 2 cores, 3 and 5 threads are
    preempted mid-run, so runs are taken over): every tile computed once, so the result is the one-thread result
    bit for bit, at every M (claims of several tiles at M = 1, of one at M = 31) and for a last tile < 16 columns."""
    k, n = 576, 1000  # 63 tiles
    _, packed = make_case(k, n, 4, 4, 0.3, seed=3, groups=(64, 64))
    args = (*packed.tensors().values(), None, 4, 4, 64, 64, 64, 64, 1 << 22)
    for m in (1, 5, 16, 31):
        x = make_x(m, k, torch.float32, strided=False, seed=m)
        want = torch.ops.mamp.packed_linear_int8_cpu(x, *args)  # one thread (module fixture)
        torch.set_num_threads(threads)
        try:
            for _ in range(20):
                assert torch.equal(torch.ops.mamp.packed_linear_int8_cpu(x, *args), want), (threads, m)
        finally:
            torch.set_num_threads(1)
