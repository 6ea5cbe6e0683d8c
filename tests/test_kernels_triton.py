"""Triton GEMV and GEMM kernels against the reference and a float64 product.

On a GPU the cases run directly on CUDA. Without one they run on the CPU under TRITON_INTERPRET=1, which must be
set before triton is imported: `test_triton_kernels_interpreted` re-runs this file in a subprocess with it set,
so the rest of the suite never sees the variable. The interpreter is slow, so the cases are a covering subset
(every width pair x dtype, with shapes, salient fractions, bias, strides, M and configs rotated through them)
rather than the full cross product that tests/test_kernels_cpu.py runs on the CPU path.

Known interpreter limits (triton 3.9): tl.dot on bf16 tiles multiplies raw bits, so bf16 dots run in fp32 when
interpreted (kernels.triton_autotune.dot_in_fp32); fp32 -> bf16 stores truncate, hence the bf16 tolerance.
"""
import itertools
import os

import pytest
import torch

from tests.helpers import TOL, check_close, make_case, make_x, run_interpreted

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
RUN_HERE = INTERPRET or ON_GPU
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(not RUN_HERE, reason="run via test_triton_kernels_interpreted (no GPU)")

WIDTHS = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]  # h = b: one code width
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(172, 48), (384, 80), (208, 384)]  # (K, N): padded K; 3*128 x 5*16; 13*16 x 3*128
FRACS = [0.0, 0.04, 0.5, 1.0]
# (group_size, salient_group_size): 128 lets a 128-row tile (or 64) load each grid once per column (the
# tile-uniform path of load_word_rows); 64 / 32 splits such tiles (the per-word path).
GROUPS = [(64, 32), (128, 128), (128, 64)]


def _cases(ms):
    """Each (widths, dtype) pair once per M, the other axes rotated so that every value appears several times."""
    out = []
    for i, ((bits, hbits), dtype, m) in enumerate(itertools.product(WIDTHS, DTYPES, ms)):
        k, n = SHAPES[i % len(SHAPES)]
        gs = GROUPS[(i // 3) % len(GROUPS)]
        out.append(pytest.param(bits, hbits, dtype, m, k, n, FRACS[i % len(FRACS)], i % 2 == 0, i % 3 == 1, gs,
                                id=f"b{bits}h{hbits}-{str(dtype)[6:]}-m{m}-{k}x{n}-f{FRACS[i % len(FRACS)]}"
                                   f"-g{gs[0]}s{gs[1]}{'-bias' if i % 2 == 0 else ''}"
                                   f"{'-strided' if i % 3 == 1 else ''}"))
    return out


def _setup(bits, hbits, dtype, m, k, n, frac, with_bias, strided, groups=(64, 32)):
    _, packed = make_case(k, n, bits, hbits, frac, seed=m, groups=groups)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype) if with_bias else None
    x = make_x(m, k, dtype, strided, seed=k)
    return packed, bias, x


def _check(kernel, packed, bias, x, config):
    """Run on DEVICE into a NaN-poisoned out=, compare with float64 and the reference on the CPU."""
    from mamp.kernels.reference import packed_matmul_reference

    pd, xd = packed.to(DEVICE), x.to(DEVICE)
    bd = None if bias is None else bias.to(DEVICE)
    out = torch.full((*x.shape[:-1], packed.spec.out_features), float("nan"), dtype=x.dtype, device=DEVICE)
    y = kernel(xd, pd, bd, out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    y = out.cpu()
    check_close(y, x, packed, bias)
    ref = packed_matmul_reference(x, packed, bias)
    scale = ref.float().abs().max().clamp_min(1.0)
    assert float((y.float() - ref.float()).abs().max() / scale) <= 2 * TOL[x.dtype]


@needs_triton
@pytest.mark.parametrize("bits,hbits,dtype,m,k,n,frac,with_bias,strided,groups", _cases([1, 3]))
def test_gemv(bits, hbits, dtype, m, k, n, frac, with_bias, strided, groups):
    from mamp.kernels.triton_autotune import KernelConfig
    from mamp.kernels.triton_gemv import GEMV_CONFIGS, packed_gemv

    packed, bias, x = _setup(bits, hbits, dtype, m, k, n, frac, with_bias, strided, groups)
    # The first curated config, and a narrow split-K one (atomics into the fp32 workspace), its tile ordered by
    # code for all but fp16 (only M > 1 reads CODE_MAJOR).
    split = {"BLOCK_N": 32, "BLOCK_R": 16, "SPLIT_K": 3, "CODE_MAJOR": int(dtype != torch.float16)}
    configs = [GEMV_CONFIGS[0], KernelConfig(split)]
    for cfg in configs if (m == 1 or ON_GPU) else configs[1:]:
        _check(packed_gemv, packed, bias, x, cfg)


@needs_triton
@pytest.mark.parametrize("bits,hbits,dtype,m,k,n,frac,with_bias,strided,groups", _cases([17]))
def test_gemm(bits, hbits, dtype, m, k, n, frac, with_bias, strided, groups):
    from mamp.kernels.triton_autotune import KernelConfig
    from mamp.kernels.triton_gemm import packed_gemm

    packed, bias, x = _setup(bits, hbits, dtype, m, k, n, frac, with_bias, strided, groups)
    code_major = int(dtype != torch.float16)  # both orders of the dequantized tile (triton_decode.dequant_tile)
    _check(packed_gemm, packed, bias, x,
           KernelConfig({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16, "CODE_MAJOR": code_major}))


@needs_triton
@pytest.mark.parametrize("bits,hbits", [(2, 8), (4, 4)])
def test_gemm_m257_and_curated_config(bits, hbits):
    from mamp.kernels.triton_gemm import GEMM_CONFIGS, packed_gemm

    packed, bias, x = _setup(bits, hbits, torch.float16, 257, 172, 80, 0.04, True, True, (128, 128))
    _check(packed_gemm, packed, bias, x, GEMM_CONFIGS[0])


@needs_triton
def test_gemv_m16_and_batched_shape():
    from mamp.kernels.triton_gemv import packed_gemv

    packed, bias, x = _setup(2, 8, torch.float16, 16, 208, 48, 0.5, True, False)
    _check(packed_gemv, packed, bias, x, None)  # config None: the tuner's pick (first config off-GPU)
    y = packed_gemv(x.view(2, 8, 208).to(DEVICE), packed.to(DEVICE), bias.to(DEVICE))
    assert y.shape == (2, 8, 48)


@needs_triton
def test_packed_linear_dispatches_to_triton_on_gpu():
    if not ON_GPU:
        pytest.skip("PackedLinear sends CPU tensors to the CPU kernel; the CUDA route needs a GPU")
    from mamp.kernels.packed_linear import PackedLinear

    packed, bias, _ = _setup(2, 8, torch.float16, 1, 384, 80, 0.04, True, False)
    layer = PackedLinear.from_packed(packed, bias).to(DEVICE)
    for m in (1, 5, 40):
        x = torch.randn(m, 384, dtype=torch.float16)
        check_close(layer(x.to(DEVICE)).cpu(), x, packed, bias)


@pytest.mark.skipif(RUN_HERE, reason="the kernel cases run directly in this process")
def test_triton_kernels_interpreted():
    """Every case above, on the CPU under TRITON_INTERPRET=1, in a child process."""
    run_interpreted(__file__, "not interpreted")
