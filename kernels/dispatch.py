"""Which kernel multiplies a packed layer on which device, chosen once per layer (at load), and why the others
cannot.

KERNELS is tried in order; the first whose `can_implement(spec, device)` says yes serves the layer, and every
refused kernel is logged with its reason. Order: Triton on CUDA (GEMV for M <= 16, GEMM above), the C++ CPU
extension with integer dot products (int8 activations; h = b; MAMP_CPU_ACTIVATIONS=float turns it off), the
same extension with fp32 activations, its pure-torch twin on the CPU, and the pure-torch reference anywhere.
The first three run as the registered ops of kernels/ops.py (torch.ops.mamp.*). Every path dequantizes
transiently at most; none keeps a weight copy.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from mamp.kernels import ops
from mamp.kernels.packing import PackedWeight, PackSpec
from mamp.kernels.reference import packed_matmul_reference

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1

MatmulFn = Callable[[torch.Tensor, PackedWeight, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """One way to compute y = x W^T + bias from a PackedWeight: fn(x, packed, bias) -> y."""

    name: str
    fn: MatmulFn
    can_implement: Callable[[PackSpec, torch.device], tuple[bool, str]]


def _triton_ok(spec: PackSpec, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"Triton kernels run on CUDA, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if max(spec.qweight_rows, spec.padded_in) * spec.out_features > INT32_MAX:
        return False, "layer too large for the kernels' int32 offsets"
    return True, "triton"


def _cpu_ext_ok(spec: PackSpec, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the C++ kernel runs on the CPU, not {device.type}"
    from mamp.kernels.cpu_matmul import ext_error
    if not ops.load_cpu_ops():
        return False, f"the C++ extension is unavailable ({ext_error()})"
    return True, "cpu"


def _cpu_int8_ok(spec: PackSpec, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the integer C++ kernel runs on the CPU, not {device.type}"
    from mamp.kernels.cpu_matmul import ACTIVATIONS_ENV, cpu_activations, int8_isa
    if cpu_activations() != "int8":
        return False, f"float activations chosen ({ACTIVATIONS_ENV}=float)"
    if spec.salient_bits != spec.bits:
        return False, f"integer kernel serves h = b, not b={spec.bits} h={spec.salient_bits}"
    ok, reason = _cpu_ext_ok(spec, device)
    if not ok:
        return ok, reason
    if int8_isa() == "portable":  # measured 2-3x slower than the float kernel (docs/RESULTS.md)
        return False, "no AVX2 or AVX-512 VNNI here: the integer kernel's portable loop is slower than fp32"
    return True, "cpu-int8"


def _cpu_torch_matmul(x, packed, bias=None):
    from mamp.kernels.cpu_matmul import packed_matmul_torch
    return packed_matmul_torch(x, packed, bias)


def _cpu_torch_ok(spec: PackSpec, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the torch CPU path runs on the CPU, not {device.type}"
    return True, "cpu (torch)"


def _reference_ok(spec: PackSpec, device: torch.device) -> tuple[bool, str]:
    return True, "reference"


FALLBACKS = ("cpu-torch", "reference")  # correct but slow: choosing one is worth a warning

KERNELS: tuple[Kernel, ...] = (
    Kernel("triton", ops.packed_linear, _triton_ok),  # torch.ops.mamp.packed_linear_triton
    Kernel("cpu-int8", ops.packed_linear_int8, _cpu_int8_ok),  # torch.ops.mamp.packed_linear_int8_cpu
    Kernel("cpu", ops.packed_linear, _cpu_ext_ok),  # torch.ops.mamp.packed_linear_cpu
    Kernel("cpu-torch", _cpu_torch_matmul, _cpu_torch_ok),
    Kernel("reference", packed_matmul_reference, _reference_ok),
)


def choose_kernel(spec: PackSpec, device: torch.device | str, kernels: tuple[Kernel, ...] = KERNELS,
                  layer: str = "") -> Kernel:
    """The first kernel of `kernels` that can serve this layer on this device; refusals are logged (debug)."""
    device = torch.device(device)
    refused = []
    for k in kernels:
        ok, reason = k.can_implement(spec, device)
        if ok:
            if k.name in FALLBACKS and refused:  # a slow path serves: say why the fast one could not, in full
                log.warning("%s: served by the %s kernel because %s", layer or spec, k.name, "; ".join(refused))
            return k
        refused.append(f"{k.name}: {reason}")
        log.debug("%s: kernel %s refused: %s", layer or spec, k.name, reason)
    raise RuntimeError(f"no kernel can serve {spec} on {device}")  # unreachable with the reference last


def can_implement(spec: PackSpec, device: torch.device | str) -> tuple[bool, str]:
    """(ok, reason): whether a fast kernel (not the reference, nor the torch fallback) serves this layer here."""
    device = torch.device(device)
    reasons = []
    for k in (k for k in KERNELS if k.name not in FALLBACKS):
        ok, reason = k.can_implement(spec, device)
        if ok:
            return True, reason
        reasons.append(reason)
    fallback = "the torch CPU path" if device.type == "cpu" else "the reference"
    return False, f"no fast packed kernel for {device.type}: " + "; ".join(reasons) + f"; using {fallback}"


@functools.lru_cache(maxsize=256)
def _cached_choice(spec: PackSpec, device: torch.device) -> Kernel:
    return choose_kernel(spec, device)


def packed_matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias on x's device with the kernel choose_kernel picks (remembered per spec and device), for
    callers without a PackedLinear. Under autograd the differentiable reference runs instead."""
    if x.requires_grad and torch.is_grad_enabled():
        return packed_matmul_reference(x, packed, bias)
    return _cached_choice(packed.spec, x.device).fn(x, packed, bias)
