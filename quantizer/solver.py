"""GPTQ-style solver for the packed mamp format (METHOD.md 1.2). Knows nothing of hooks, datasets or files.

solve(W [N, K], H [K, K] or None, spec, salient [N, G]) quantizes W column by column (a column = one input row
in METHOD.md's notation) with block error compensation, and returns the packed tensors plus the dequantized
weight, which equals kernels.packing.dequantize(packed) exactly.

- Normal groups: b-bit affine grid per `group_size` input rows, fitted at the start of each scale group to the
  current (error-updated) NON-salient values of that row (GPTQ's non-static groups).
- Salient groups: each run of h/b consecutive weights is replaced by its mean, quantized at the first column of
  the run from the current values on an h-bit grid per `salient_group_size` rows fitted to the salient means;
  the rounding error of every column (salient or not) is compensated by the later columns.
- H = None gives round-to-nearest on the same grids (no compensation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.packing import GROUP, PackedWeight, PackSpec, affine_grid, dequantize_affine, pack, quantize_affine

CLIP_STEPS = 40  # shrink factors 1.00, 0.98, ..., 0.22 tried by the MSE clipping search
CLIP_STEP = 0.02
CLIP_NORM = 2.4  # error norm of the search (GPTQ's choice)


@dataclass
class SolverResult:
    packed: PackedWeight
    weight: torch.Tensor  # [N, K] float32, the dequantized weight (== dequantize(packed))
    hinv_diag: torch.Tensor | None  # [K] diag of the damped H^-1 (None for RTN)


def damped_hessian(h: torch.Tensor, w: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (H_ii = 0) get H_ii = 1 and zero weights; then H += percdamp * mean(diag H) * I.

    Returns (H [K, K] float32, W [N, K] float32), both new tensors.
    """
    h = h.float().clone()
    w = w.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    return h, w


def inverse_hessian(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H^-1, diag of H^-1) for a damped, positive-definite H."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h.double()))
    diag = torch.diag(hinv).float()
    return torch.linalg.cholesky(hinv, upper=True).float(), diag


def fit_grid(x: torch.Tensor, mask: torch.Tensor, bits: int, mse_clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row affine grid for the entries of x [N, M] where mask is True; 0 always lies inside the range.

    Returns (scale [N], zero [N]) from kernels.packing.affine_grid (fp16-rounded scale, integer zero).
    """
    xm = torch.where(mask, x, 0.0)  # 0 is always exactly on the grid, so masked entries add no error
    xmin = xm.amin(1).clamp(max=0.0)
    xmax = xm.amax(1).clamp(min=0.0)
    scale, zero = affine_grid(xmin, xmax, bits)
    if not mse_clip:
        return scale, zero
    best = _grid_error(xm, scale, zero, bits)
    for i in range(1, CLIP_STEPS):
        p = 1.0 - CLIP_STEP * i
        s, z = affine_grid(xmin * p, xmax * p, bits)
        err = _grid_error(xm, s, z, bits)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _grid_error(x, scale, zero, bits):
    """sum |dequant(quant(x)) - x|^CLIP_NORM per row; the same arithmetic as quantize_affine/dequantize_affine."""
    s, z = scale[:, None], zero[:, None]
    t = x / s
    t.round_().add_(z).clamp_(0, (1 << bits) - 1).sub_(z).mul_(s).sub_(x).abs_().pow_(CLIP_NORM)
    return t.sum(1)


def _run_means(x: torch.Tensor, valid: torch.Tensor, run: int) -> torch.Tensor:
    """Means of consecutive runs of `run` columns of x [N, M] over valid columns only. -> [N, M / run]."""
    n, m = x.shape
    v = valid.float().reshape(m // run, run)
    s = (x * valid.float()).reshape(n, m // run, run).sum(-1)
    return s / v.sum(-1).clamp_min(1.0)


class _one_thread:
    """The column loop issues thousands of tiny ops; OpenMP fork/join per op costs far more than the work
    (measured 35x slower with 2 threads on a busy 2-core machine), so the solver runs single-threaded."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def solve(*args, **kwargs) -> SolverResult:
    """See _solve. Runs with one intra-op thread."""
    with _one_thread():
        return _solve(*args, **kwargs)


def _solve(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: PackSpec,
    salient: torch.Tensor | None = None,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    mse_clip: bool = False,
) -> SolverResult:
    """Quantize weight [N, K] into the packed format described by spec.

    hessian: [K, K] (2 X X^T / n from calibration inputs), or None for round-to-nearest.
    salient: [N, G] bool mask of salient groups (None: none). Fixed before the loop.
    """
    n, k = weight.shape
    if (spec.out_features, spec.in_features) != (n, k):
        raise ValueError(f"spec is {spec.out_features}x{spec.in_features}, weight is {n}x{k}")
    kp, b, h, run = spec.padded_in, spec.bits, spec.salient_bits, spec.run
    gs, sgs = spec.group_size, spec.salient_group_size
    dev = weight.device
    if salient is None:
        salient = torch.zeros(n, spec.n_groups, dtype=torch.bool, device=dev)
    if tuple(salient.shape) != (n, spec.n_groups):
        raise ValueError(f"salient mask must be {(n, spec.n_groups)}, got {tuple(salient.shape)}")
    has_salient = bool(salient.any())

    # Pad K to K_pad: padded inputs are dead (zero weight, unit Hessian diagonal, no coupling).
    w = torch.zeros(n, kp, dtype=torch.float32, device=dev)
    w[:, :k] = weight.float()
    if hessian is None:
        hinv = torch.eye(kp, device=dev)
        hinv_diag = None
    else:
        hd, w[:, :k] = damped_hessian(hessian, weight, percdamp)
        hp = torch.eye(kp, dtype=torch.float32, device=dev)  # padded inputs: dead, uncoupled
        hp[:k, :k] = hd
        hinv, hinv_diag_full = inverse_hessian(hp)
        hinv_diag = hinv_diag_full[:k]

    valid = torch.arange(kp, device=dev) < k
    sal_col = salient.repeat_interleave(GROUP, dim=1)  # [N, K_pad]
    sal_run = salient.repeat_interleave(GROUP // run, dim=1)  # [N, K_pad / run]
    low_codes = torch.zeros(n, kp, dtype=torch.int64, device=dev)
    high_codes = torch.zeros(n, kp // run, dtype=torch.int64, device=dev)
    scales = torch.zeros(spec.n_scale_groups, n, device=dev)
    zeros = torch.zeros_like(scales)
    hscales = torch.full((spec.n_salient_scale_groups, n), 1.0, device=dev)
    hzeros = torch.zeros_like(hscales)
    q_all = torch.zeros(n, kp, device=dev)

    # Work on W^T [K_pad, N] so that one input row (one GPTQ "column") is a contiguous vector.
    wt = w.t().contiguous()
    hinv_t = hinv.t().contiguous()
    scale = zero = hscale = hzero = hdq = None
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        w1 = wt[i1:i2].clone()  # [B, N]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                cur = torch.cat([w1[i:], wt[i2:]], 0)[:gs].t()
                m = ~sal_col[:, col:col + gs] & valid[col:col + gs]
                scale, zero = fit_grid(cur, m, b, mse_clip)
                scales[col // gs], zeros[col // gs] = scale, zero
            if has_salient and col % sgs == 0:
                cur = torch.cat([w1[i:], wt[i2:]], 0)[:sgs].t()
                means = _run_means(cur, valid[col:col + cur.shape[1]], run)
                r0 = col // run
                m = sal_run[:, r0:r0 + means.shape[1]]
                hscale, hzero = fit_grid(means, m, h, mse_clip)
                hscales[col // sgs], hzeros[col // sgs] = hscale, hzero
            if has_salient and col % run == 0:
                mean = _run_means(w1[i:i + run].t(), valid[col:col + run], run)[:, 0]
                hq = quantize_affine(mean, hscale, hzero, h)
                hdq = dequantize_affine(hq, hscale, hzero)
                high_codes[:, col // run] = torch.where(sal_run[:, col // run], hq, 0)
            x = w1[i]
            lq = quantize_affine(x, scale, zero, b)
            low_codes[:, col] = lq
            q = dequantize_affine(lq, scale, zero)
            if has_salient:
                q = torch.where(sal_col[:, col], hdq, q)
            q_all[:, col] = q
            if hessian is not None:
                e = (x - q).div_(hinv1[i, i])
                w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
                err1[i] = e
        if hessian is not None and i2 < kp:
            wt[i2:].addmm_(hinv_t[i2:, i1:i2], err1, alpha=-1.0)

    low_codes = low_codes.masked_fill(sal_col, 0)
    packed = pack(spec, low_codes, high_codes, salient, scales, zeros, hscales, hzeros)
    return SolverResult(packed=packed, weight=q_all[:, :k].contiguous(), hinv_diag=hinv_diag)


def hinv_diagonal(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """diag of the damped H^-1 [K] used for saliency (same damping and dead-input handling as solve)."""
    hd, _ = damped_hessian(hessian, torch.zeros(1, hessian.shape[0], device=hessian.device), percdamp)
    return inverse_hessian(hd)[1]


def proxy_loss(weight: torch.Tensor, quant: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T): the layer-output error the solver minimises (up to a constant)."""
    d = (weight.float() - quant.float()).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))
