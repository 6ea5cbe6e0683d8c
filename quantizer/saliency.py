"""Second-order group saliency (METHOD.md 1.1) and the top-K salient-group mask.

A group is 16 consecutive input rows of one output channel: W[n, 16g:16g+16] in PyTorch's [N, K] layout.
"""
from __future__ import annotations

import torch

from mamp.kernels.packing import GROUP


def group_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """S[n, g] = sum_j w_nj^2 / [H^-1]_jj^2 over the 16 rows j of group g.

    weight: [N, K]; hinv_diag: [K] (diag of the damped inverse Hessian). K is zero-padded to a multiple of 16,
    so padded rows add nothing. Returns [N, ceil(K/16)] float32.
    """
    n, k = weight.shape
    kp = -(-k // GROUP) * GROUP
    s = weight.float().pow(2) / hinv_diag.float().pow(2).unsqueeze(0)
    s = torch.nn.functional.pad(s, (0, kp - k))
    return s.reshape(n, kp // GROUP, GROUP).sum(-1)


def top_k_mask(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Per 16-row block g, mark the k output channels whose group g is most salient. [N, G] -> [N, G] bool."""
    n, g = saliency.shape
    mask = torch.zeros(n, g, dtype=torch.bool, device=saliency.device)
    k = max(0, min(int(k), n))
    if k:
        idx = saliency.topk(k, dim=0).indices  # [k, G]
        mask.scatter_(0, idx, True)
    return mask
