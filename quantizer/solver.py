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

Scale refit (`refit`, after the loop): with every code and zero point fixed, the dequantized weight is linear in
the scales, so each output row's scales (both grids) are re-solved in closed form for the least layer-output
error (W - Q) H (W - Q)^T, rounded to fp16, and kept per row only where that error went down.

Assignment of groups to the two grids (`assign`):
- "saliency" (the paper): the salient mask is fixed before the loop (top-K groups by saliency per 16-row block).
- "error": at the start of each scale group the two grids and the group-to-grid assignment are fitted jointly
  (alternating: fit both grids to their groups, the clipping search weighted by the columns' Hessian weights;
  move each group to the grid with the lower Hessian-weighted rounding error; repeat; the saliency mask is the
  starting point); then each 16-group is assigned once more when the loop reaches it, from its current
  error-compensated values. With h = b the two grids act as one non-uniform 2^(b+1)-level codebook per scale
  group; each group uses half of it. Needs group_size == salient_group_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mamp.kernels.packing import (GROUP, MIN_SCALE, SCALE_DTYPE, PackedWeight, PackSpec, affine_grid,
                                  dequantize_affine, pack, quantize_affine)

CLIP_STEPS = 40  # shrink factors 1.00, 0.98, ..., 0.22: the MSE clipping search's candidates
CLIP_STEP = 0.02
CLIP_COARSE = 4  # default stride of the search: every 4th candidate, then the 3 on each side of each row's best
                 # (16 of 40); pass clip_coarse=1 to solve / coarse=1 to fit_grid for all 40
CLIP_NORM = 2.4  # error norm of the search (GPTQ's choice)
ASSIGN_ITERS = 4  # alternating grid-fit / group-assignment rounds per scale group ("error" assignment)
ASSIGNS = ("saliency", "error")


@dataclass
class SolverResult:
    packed: PackedWeight
    weight: torch.Tensor  # [N, K] float32, the dequantized weight (== dequantize(packed))
    hinv_diag: torch.Tensor | None  # [K] diag of the damped H^-1 (None for RTN)
    salient: torch.Tensor  # [N, G] bool, the final salient mask (== the bitmap)


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


def fit_grid(x: torch.Tensor, mask: torch.Tensor, bits: int, mse_clip: bool,
             weight: torch.Tensor | None = None, coarse: int = CLIP_COARSE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row affine grid for the entries of x [N, M] where mask is True; 0 always lies inside the range.
    weight: optional [M] per-column weights of the clipping search's error; coarse: the search's stride (every
    coarse-th shrink factor, then the coarse - 1 on each side of each row's best; 1 tries all CLIP_STEPS).

    Returns (scale [N], zero [N]) from kernels.packing.affine_grid (fp16-rounded scale, integer zero).
    """
    xm = torch.where(mask, x, 0.0)  # 0 is always exactly on the grid, so masked entries add no error
    xmin = xm.amin(1).clamp(max=0.0)
    xmax = xm.amax(1).clamp(min=0.0)
    scale, zero = affine_grid(xmin, xmax, bits)
    if not mse_clip:
        return scale, zero
    # Coarse to fine (16 of the 40 candidates at coarse = 4). On SmolLM2 layers (benchmarks/clip_search.py)
    # the layer error moves by -0.1 % to +0.6 % against all 40, and the solver takes about half the time.
    best = _grid_error(xm, scale, zero, bits, weight)
    best_i = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(coarse, CLIP_STEPS, coarse):
        scale, zero, best, best_i = _try_clip(xm, xmin, xmax, bits, weight, torch.full_like(best_i, i),
                                              scale, zero, best, best_i)
    for d in [*range(1 - coarse, 0), *range(1, coarse)]:
        scale, zero, best, best_i = _try_clip(xm, xmin, xmax, bits, weight, best_i + d, scale, zero, best, best_i)
    return scale, zero


def _try_clip(xm, xmin, xmax, bits, weight, i, scale, zero, best, best_i):
    """Rows whose candidate i [N] (shrink factor 1 - CLIP_STEP i; outside 0..CLIP_STEPS-1: skipped) beats
    their best error so far take it. -> updated (scale, zero, best, best_i)."""
    ok = (i >= 0) & (i < CLIP_STEPS)
    p = (1.0 - CLIP_STEP * i.clamp(0, CLIP_STEPS - 1).double()).to(xm.dtype)
    s, z = affine_grid(xmin * p, xmax * p, bits)
    err = _grid_error(xm, s, z, bits, weight)
    better = ok & (err < best)
    return (torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best),
            torch.where(better, i, best_i))


def _grid_error(x, scale, zero, bits, weight=None):
    """sum |dequant(quant(x)) - x|^CLIP_NORM (times weight) per row; the arithmetic of quantize/dequantize_affine."""
    s, z = scale[:, None], zero[:, None]
    t = x / s
    t.round_().add_(z).clamp_(0, (1 << bits) - 1).sub_(z).mul_(s).sub_(x).abs_().pow_(CLIP_NORM)
    if weight is not None:
        t.mul_(weight)
    return t.sum(1)


def _group_errors(x: torch.Tensor, valid: torch.Tensor, wgt: torch.Tensor, scale, zero, hscale, hzero,
                  b: int, h: int, run: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted squared rounding error of every 16-group of x [N, M] on the normal and on the salient grid.

    Normal: each value on the b-bit grid (scale, zero [N]). Salient: each run of `run` values replaced by its
    mean on the h-bit grid (hscale, hzero [N]). Error weights wgt [M] (0 at padded columns). -> two [N, M/16].
    """
    n, m = x.shape
    xv = torch.where(valid, x, 0.0)
    s, z = scale[:, None], zero[:, None]
    ql = dequantize_affine(quantize_affine(xv, s, z, b), s, z)
    means = _run_means(xv, valid, run)
    hs, hz = hscale[:, None], hzero[:, None]
    qh = dequantize_affine(quantize_affine(means, hs, hz, h), hs, hz).repeat_interleave(run, dim=1)
    el = ((ql - xv).square() * wgt).reshape(n, m // GROUP, GROUP).sum(-1)
    eh = ((qh - xv).square() * wgt).reshape(n, m // GROUP, GROUP).sum(-1)
    return el, eh


def _fit_grids(x, sal_col, valid, run, b, h, mse_clip, wgt=None, coarse=CLIP_COARSE):
    """Normal grid on the valid non-salient values of x [N, M]; salient grid on the means of the salient runs.

    sal_col: [N, M] bool (constant over each 16-group); wgt: optional [M] error weights of the clipping search.
    Returns (scale, zero, hscale, hzero), each [N].
    """
    scale, zero = fit_grid(x, ~sal_col & valid, b, mse_clip, wgt, coarse)
    means = _run_means(x, valid, run)
    hw = None if wgt is None else wgt.reshape(-1, run).sum(1)
    hscale, hzero = fit_grid(means, sal_col[:, ::run], h, mse_clip, hw, coarse)
    return scale, zero, hscale, hzero


def _run_means(x: torch.Tensor, valid: torch.Tensor, run: int) -> torch.Tensor:
    """Means of consecutive runs of `run` columns of x [N, M] over valid columns only. -> [N, M / run]."""
    n, m = x.shape
    v = valid.float().reshape(m // run, run)
    s = (x * valid.float()).reshape(n, m // run, run).sum(-1)
    return s / v.sum(-1).clamp_min(1.0)


@dataclass
class _Masks:
    """The group-to-grid assignment at three granularities, kept in step: per 16-group, per input row, per run."""

    groups: torch.Tensor  # [N, G] bool
    cols: torch.Tensor  # [N, K_pad]
    runs: torch.Tensor  # [N, K_pad / run]

    def set_group(self, g: int, pick: torch.Tensor, run: int) -> None:
        c0, c1 = g * GROUP, (g + 1) * GROUP
        self.groups[:, g] = pick
        self.cols[:, c0:c1] = pick[:, None]
        self.runs[:, c0 // run:c1 // run] = pick[:, None]


class _Grids:
    """Where the column loop's grids come from: a strategy called at group boundaries (`at_column`), which sets
    the grids in force (scale, zero, hscale, hzero: [N] each), records them in the packed grid tensors, and may
    move 16-groups between the grids (masks). Subclasses: FixedGrids, SaliencyGrids, ErrorGrids."""

    def __init__(self, spec: PackSpec, masks: _Masks, valid: torch.Tensor, col_wgt: torch.Tensor,
                 out: tuple[torch.Tensor, ...], has_salient: bool, mse_clip: bool, clip_coarse: int) -> None:
        self.spec, self.masks, self.valid, self.col_wgt = spec, masks, valid, col_wgt
        self.scales, self.zeros, self.hscales, self.hzeros = out
        self.has_salient, self.mse_clip, self.coarse = has_salient, mse_clip, clip_coarse
        self.scale = self.zero = self.hscale = self.hzero = None

    def at_column(self, col: int, upcoming, group) -> None:
        """Called before column `col` is quantized. upcoming(m): the current (error-compensated) values of
        columns col .. col + m - 1 as [N, <= m]; group(): those of the 16-group starting at col, [N, 16]."""
        raise NotImplementedError

    def _reassign(self, col: int, values: torch.Tensor) -> None:
        """Move the 16-group at col to the grid (in force) on which its current values round with less error."""
        s, c1 = self.spec, col + GROUP
        el, eh = _group_errors(values, self.valid[col:c1], self.col_wgt[col:c1], self.scale, self.zero,
                               self.hscale, self.hzero, s.bits, s.salient_bits, s.run)
        self.masks.set_group(col // GROUP, (eh < el)[:, 0], s.run)


class FixedGrids(_Grids):
    """Grids given in advance (a second pass over a first one's grids); with reassign, groups still move."""

    def __init__(self, *args, reassign: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reassign = reassign

    def at_column(self, col, upcoming, group):
        gs, sgs = self.spec.group_size, self.spec.salient_group_size
        if col % gs == 0:
            self.scale, self.zero = self.scales[col // gs], self.zeros[col // gs]
        if self.has_salient and col % sgs == 0:
            self.hscale, self.hzero = self.hscales[col // sgs], self.hzeros[col // sgs]
        if self.reassign and col % GROUP == 0:
            self._reassign(col, group())


class SaliencyGrids(_Grids):
    """The paper: the mask is fixed; each grid is fitted at its scale-group start to the current values of its
    own groups (non-salient values for the normal grid, salient run means for the salient one)."""

    def at_column(self, col, upcoming, group):
        s, m = self.spec, self.masks
        if col % s.group_size == 0:
            cur = upcoming(s.group_size)
            keep = ~m.cols[:, col:col + s.group_size] & self.valid[col:col + s.group_size]
            self.scale, self.zero = fit_grid(cur, keep, s.bits, self.mse_clip, coarse=self.coarse)
            self.scales[col // s.group_size], self.zeros[col // s.group_size] = self.scale, self.zero
        if self.has_salient and col % s.salient_group_size == 0:
            cur = upcoming(s.salient_group_size)
            means = _run_means(cur, self.valid[col:col + cur.shape[1]], s.run)
            r0 = col // s.run
            self.hscale, self.hzero = fit_grid(means, m.runs[:, r0:r0 + means.shape[1]], s.salient_bits,
                                               self.mse_clip, coarse=self.coarse)
            self.hscales[col // s.salient_group_size], self.hzeros[col // s.salient_group_size] = self.hscale, self.hzero


class ErrorGrids(_Grids):
    """assign="error": at each scale-group start both grids and the assignment are fitted jointly
    (_assign_by_error); each 16-group is then assigned once more from its current values when the loop
    reaches it."""

    def at_column(self, col, upcoming, group):
        s = self.spec
        if col % s.group_size == 0:
            cur = upcoming(s.group_size)
            c1 = col + cur.shape[1]
            self.scale, self.zero, self.hscale, self.hzero = _assign_by_error(
                cur, self.masks.cols[:, col:c1], self.valid[col:c1], self.col_wgt[col:c1], s.run, s.bits,
                s.salient_bits, self.mse_clip, self.coarse)
            self.scales[col // s.group_size], self.zeros[col // s.group_size] = self.scale, self.zero
            self.hscales[col // s.salient_group_size], self.hzeros[col // s.salient_group_size] = self.hscale, self.hzero
        if col % GROUP == 0:
            self._reassign(col, group())


def solve(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: PackSpec,
    salient: torch.Tensor | None = None,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    mse_clip: bool = False,
    assign: str = "saliency",
    refit: bool = False,
    grids: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    clip_coarse: int = CLIP_COARSE,
    threads: int = 1,
) -> SolverResult:
    """Quantize weight [N, K] into the packed format described by spec.

    hessian: [K, K] (2 X X^T / n from calibration inputs), or None for round-to-nearest.
    salient: [N, G] bool mask of salient groups (None: none). Fixed before the loop with assign="saliency";
    the starting point of the joint grid/assignment fit with assign="error" (see the module docstring).
    grids: (scales, zeros, hscales, hzeros) in the packed shapes to use as they are instead of fitting them
    (a second pass over grids from a first one); assign="error" still re-assigns every group on them.
    clip_coarse: the clipping search's stride (fit_grid). threads: torch intra-op threads while solving; the
    column loop issues thousands of tiny ops, and OpenMP fork/join per op costs far more than the work (measured
    35x slower with 2 threads on a busy 2-core machine), hence 1. Restored afterwards.
    """
    if assign not in ASSIGNS:
        raise ValueError(f"assign must be one of {ASSIGNS}, got {assign!r}")
    n, k = weight.shape
    if (spec.out_features, spec.in_features) != (n, k):
        raise ValueError(f"spec is {spec.out_features}x{spec.in_features}, weight is {n}x{k}")
    if salient is not None and tuple(salient.shape) != (n, spec.n_groups):
        raise ValueError(f"salient mask must be {(n, spec.n_groups)}, got {tuple(salient.shape)}")
    if assign == "error" and spec.group_size != spec.salient_group_size:
        raise ValueError("assign='error' needs group_size == salient_group_size "
                         f"({spec.group_size} != {spec.salient_group_size})")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _solve(weight, hessian, spec, salient, percdamp, block_size, mse_clip, assign, refit, grids,
                      clip_coarse)
    finally:
        torch.set_num_threads(saved)


def _solve(weight, hessian, spec, salient, percdamp, block_size, mse_clip, assign, refit, grids, clip_coarse):
    """solve's work: set up the padded weight and H^-1, run the GPTQ column loop (grids from a _Grids
    strategy at group boundaries), refit, pack."""
    n, k = weight.shape
    kp, b, h, run = spec.padded_in, spec.bits, spec.salient_bits, spec.run
    dev = weight.device
    if salient is None:
        salient = torch.zeros(n, spec.n_groups, dtype=torch.bool, device=dev)
    by_error = assign == "error"
    salient = salient.clone()
    has_salient = by_error or bool(salient.any())

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
    masks = _Masks(salient, salient.repeat_interleave(GROUP, dim=1), salient.repeat_interleave(GROUP // run, dim=1))
    low_codes = torch.zeros(n, kp, dtype=torch.int64, device=dev)
    high_codes = torch.zeros(n, kp // run, dtype=torch.int64, device=dev)
    scales = torch.zeros(spec.n_scale_groups, n, device=dev)
    zeros = torch.zeros_like(scales)
    hscales = torch.full((spec.n_salient_scale_groups, n), 1.0, device=dev)
    hzeros = torch.zeros_like(hscales)
    q_all = torch.zeros(n, kp, device=dev)
    if grids is not None:
        for dst, src in zip((scales, zeros, hscales, hzeros), grids):
            if dst.shape != src.shape:
                raise ValueError(f"grids: expected shapes {[tuple(t.shape) for t in (scales, zeros, hscales, hzeros)]}")
            dst.copy_(src.float())
    # Per-column weight of a rounding error in the layer-output loss: 1 / U_jj^2 (U = chol(H^-1), upper).
    col_wgt = torch.diagonal(hinv).square().reciprocal() * valid
    common = (spec, masks, valid, col_wgt, (scales, zeros, hscales, hzeros), has_salient, mse_clip, clip_coarse)
    if grids is not None:
        g = FixedGrids(*common, reassign=by_error)
    else:
        g = ErrorGrids(*common) if by_error else SaliencyGrids(*common)

    # The GPTQ column loop, on W^T [K_pad, N] so that one input row (one GPTQ "column") is a contiguous vector.
    wt = w.t().contiguous()
    hinv_t = hinv.t().contiguous()
    hdq = None
    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        w1 = wt[i1:i2].clone()  # [B, N]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g.at_column(col, lambda m: torch.cat([w1[i:], wt[i2:]], 0)[:m].t(), lambda: w1[i:i + GROUP].t())
            if has_salient and col % run == 0:  # the run's mean on the salient grid, used by its salient rows
                mean = _run_means(w1[i:i + run].t(), valid[col:col + run], run)[:, 0]
                hq = quantize_affine(mean, g.hscale, g.hzero, h)
                hdq = dequantize_affine(hq, g.hscale, g.hzero)
                high_codes[:, col // run] = torch.where(masks.runs[:, col // run], hq, 0)
            x = w1[i]
            lq = quantize_affine(x, g.scale, g.zero, b)
            low_codes[:, col] = lq
            q = dequantize_affine(lq, g.scale, g.zero)
            if has_salient:
                q = torch.where(masks.cols[:, col], hdq, q)
            q_all[:, col] = q
            if hessian is not None:  # spread this column's error over the later columns of the block
                e = (x - q).div_(hinv1[i, i])
                w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
                err1[i] = e
        if hessian is not None and i2 < kp:  # ... and over the columns after it, in one product
            wt[i2:].addmm_(hinv_t[i2:, i1:i2], err1, alpha=-1.0)

    low_codes = low_codes.masked_fill(masks.cols, 0)
    if refit and hessian is not None:
        scales, hscales, q_all = refit_scales(w, hp, spec, low_codes, high_codes, masks.cols, scales, zeros,
                                              hscales, hzeros, q_all)
    packed = pack(spec, low_codes, high_codes, masks.groups, scales, zeros, hscales, hzeros)
    return SolverResult(packed=packed, weight=q_all[:, :k].contiguous(), hinv_diag=hinv_diag, salient=masks.groups)


def _assign_by_error(x, sal_col, valid, wgt, run, b, h, mse_clip, coarse=CLIP_COARSE):
    """Jointly fit both grids of one scale group and the group-to-grid assignment (alternating rounds).

    x: [N, M] current values; sal_col: [N, M] bool, the starting assignment, updated in place. Returns the
    grids (scale, zero, hscale, hzero) fitted to the final assignment.
    """
    fw = wgt / wgt.max().clamp_min(1e-30)  # the clipping search weighs columns like the assignment does
    grids = _fit_grids(x, sal_col, valid, run, b, h, mse_clip, fw, coarse)
    for _ in range(ASSIGN_ITERS):
        el, eh = _group_errors(x, valid, wgt, *grids, b, h, run)
        new = (eh < el).repeat_interleave(GROUP, dim=1)
        if torch.equal(new, sal_col):
            break
        sal_col.copy_(new)
        grids = _fit_grids(x, sal_col, valid, run, b, h, mse_clip, fw, coarse)
    return grids


def hinv_diagonal(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """diag of the damped H^-1 [K] used for saliency (same damping and dead-input handling as solve)."""
    hd, _ = damped_hessian(hessian, torch.zeros(1, hessian.shape[0], device=hessian.device), percdamp)
    return inverse_hessian(hd)[1]


def proxy_loss(weight: torch.Tensor, quant: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Q) H (W - Q)^T): the layer-output error the solver minimises (up to a constant)."""
    d = (weight.float() - quant.float()).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))


REFIT_CHUNK_BYTES = 256 << 20  # float64 working set of one chunk of rows in refit_scales


def refit_scales(w, h, spec: PackSpec, low_codes, high_codes, sal_col, scales, zeros, hscales, hzeros, q):
    """Least-squares refit of every scale with codes and zeros fixed (see the module docstring).

    w: [N, K_pad] original weight (zero-padded); h: [K_pad, K_pad] damped Hessian; codes/grids as the loop left
    them; q: [N, K_pad] their dequantized weight. Returns (scales, hscales, q), new tensors; a row keeps its old
    scales unless the refit lowers its error.
    """
    n, kp = w.shape
    gs, sgs, run = spec.group_size, spec.salient_group_size, spec.run
    gl = torch.arange(kp, device=w.device) // gs
    gh = torch.arange(kp, device=w.device) // sgs
    # Coefficient of each column's scale: (code - zero) on the grid the column uses, 0 on the other.
    cl = torch.where(sal_col, 0.0, low_codes.float() - zeros.t()[:, gl])
    ch = torch.where(sal_col, high_codes.float().repeat_interleave(run, 1) - hzeros.t()[:, gh], 0.0)
    params = [(cl, gs, g) for g in range(spec.n_scale_groups)] + [(ch, sgs, g) for g in range(spec.n_salient_scale_groups)]
    p = len(params)
    old = torch.cat([scales.t(), hscales.t()], 1)  # [N, P]
    new = old.clone()
    hd = h.double()
    chunk = max(1, REFIT_CHUNK_BYTES // (8 * p * kp))
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        wr = w[r0:r1].double()
        ha = torch.stack([c[r0:r1, g * size:(g + 1) * size].double() @ hd[g * size:(g + 1) * size]
                          for c, size, g in params], 1)  # [R, P, K_pad]: H times each scale's column
        m = torch.stack([(ha[:, :, g * size:(g + 1) * size] * c[r0:r1, None, g * size:(g + 1) * size].double()).sum(-1)
                         for c, size, g in params], 2)  # [R, P, P]
        rhs = (ha * wr[:, None]).sum(-1)  # [R, P]
        used = torch.diagonal(m, dim1=1, dim2=2) > 0
        m = m + torch.diag_embed((~used).double() + 1e-9 * torch.diagonal(m, dim1=1, dim2=2).mean(1, keepdim=True))
        rhs = torch.where(used, rhs, old[r0:r1].double())
        sol = torch.linalg.solve(m, rhs)
        ok = used & torch.isfinite(sol) & (sol > 0)
        new[r0:r1] = torch.where(ok, sol.float(), old[r0:r1])
    new = new.clamp_min(MIN_SCALE).to(SCALE_DTYPE).float()
    s_l, s_h = new[:, :spec.n_scale_groups], new[:, spec.n_scale_groups:]
    q_new = cl * s_l[:, gl] + ch * s_h[:, gh]
    # Keep a row's old scales where fp16 rounding (or numerics) made it worse.
    better = _row_loss(w - q_new, h) < _row_loss(w - q, h)
    s_l = torch.where(better[:, None], s_l, scales.t())
    s_h = torch.where(better[:, None], s_h, hscales.t())
    q = torch.where(better[:, None], q_new, q)
    return s_l.t().contiguous(), s_h.t().contiguous(), q


def _row_loss(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row d H d^T, [N] float64."""
    d = d.double()
    return ((d @ h.double()) * d).sum(1)