"""The kernels as registered ops: torch.ops.mamp lists them, their schemas and fake kernels pass opcheck, and a
torch.compile'd function over a PackedLinear / HalfLinear gives the eager result."""
from __future__ import annotations

import pytest
import torch

from mamp.kernels import ops
from mamp.kernels.half_linear import HalfLinear
from mamp.kernels.packed_linear import PackedLinear
from mamp.kernels.packing import PackSpec
from tests.helpers import random_packed

pytestmark = pytest.mark.skipif(not ops.load_cpu_ops(), reason="the C++ extension cannot be built here")


def _case(bits=4, hbits=4, k=80, n=48):
    spec = PackSpec(k, n, bits=bits, salient_bits=hbits, group_size=32, salient_group_size=32)
    packed, _ = random_packed(spec, 0.25, seed=bits + hbits)
    return packed


def test_torch_ops_mamp_lists_the_kernels():
    for name in ("packed_linear_cpu", "packed_linear_int8_cpu", "half_linear_cpu", "packed_linear_triton"):
        assert isinstance(getattr(torch.ops.mamp, name), torch._ops.OpOverloadPacket), name


@pytest.mark.parametrize("bits,hbits", [(2, 8), (4, 4)])
def test_packed_linear_cpu_opcheck(bits, hbits):
    packed = _case(bits, hbits)
    for x, bias in ((torch.randn(2, 3, 80), torch.randn(48)), (torch.randn(1, 80, dtype=torch.bfloat16), None)):
        args = (x, *packed.tensors().values(), bias, bits, hbits, 32, 32, 16, 1 << 22)
        result = torch.library.opcheck(torch.ops.mamp.packed_linear_cpu.default, args,
                                       test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        assert set(result.values()) == {"SUCCESS"}, result
        assert torch.ops.mamp.packed_linear_cpu(*args).shape == (*x.shape[:-1], 48)


@pytest.mark.parametrize("bits,hbits,k", [(2, 8, 80), (8, 8, 80), (4, 4, 72), (2, 2, 80), (4, 8, 72)])
def test_packed_rows_are_dequantized_columns_in_either_layout(bits, hbits, k):
    """The tied embedding's lookup: columns `ids` of the packed weight, dequantized, bit for bit, from the row-major
    and the column-tiled layout, by the torch op and the C++ one alike (ops.rows takes the C++ one on the CPU);
    schemas, fake kernels and autograd registration pass opcheck; a bad id is an error."""
    from mamp.kernels.cpu_layout import tile
    from mamp.kernels.packing import dequantize

    packed = _case(bits, hbits, k=k)
    ids = torch.tensor([[5, 0, 47], [5, 16, 31]])
    want = dequantize(packed)[ids.reshape(-1)]  # [N, K]: row t is output t's weights
    for view, tiled in ((packed, False), (tile(packed), True)):
        args = (ids, *view.tensors().values(), bits, hbits, 32, 32, k)
        for op, op_args in ((torch.ops.mamp.packed_rows, (*args, tiled)), (torch.ops.mamp.packed_rows_cpu, args)):
            got = op(*op_args)
            assert got.shape == (6, k) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            result = torch.library.opcheck(op.default, op_args,
                                           test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
            assert set(result.values()) == {"SUCCESS"}, result
        torch.testing.assert_close(ops.rows(ids, view), want, rtol=0, atol=0)
        assert ops.rows(torch.zeros(0, dtype=torch.long), view).shape == (0, k)
        with pytest.raises(RuntimeError, match="outside"):
            torch.ops.mamp.packed_rows_cpu(torch.tensor([48]), *args[1:])


def test_half_linear_cpu_opcheck():
    w = torch.randn(48, 80).bfloat16()
    args = (torch.randn(3, 80), w, torch.randn(48), 16, 1, 1 << 22)
    result = torch.library.opcheck(torch.ops.mamp.half_linear_cpu.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_torch_compile_calls_the_ops():
    packed = _case()
    layer = PackedLinear.from_packed(packed, torch.randn(48))
    head = HalfLinear(torch.randn(32, 48).bfloat16())
    assert layer.kernel_name == "cpu-int8"  # torch.ops.mamp.packed_linear_int8_cpu

    def f(t):
        return head(torch.relu(layer(t)))

    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break (an opaque call) would raise
    x = torch.randn(5, 80)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_is_bit_identical_to_hf():
    """kernels.llama_block.rms_norm replaces HF's RMSNorm by F.rms_norm only where the bits agree (fp32)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mamp.kernels.llama_block import rms_norm

    norm = LlamaRMSNorm(576, eps=1e-5)
    norm.weight.data = torch.randn(576, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 1, 576), (16, 1, 576), (3, 37, 576)):
        x = torch.randn(*shape, generator=g) * 5
        assert torch.equal(rms_norm(norm, x), norm(x))
    xb = torch.randn(2, 576, generator=g).bfloat16()
    assert torch.equal(rms_norm(norm, xb), norm(xb))  # bf16: the module itself runs
