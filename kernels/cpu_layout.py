"""The column-tiled layout the CPU kernels read fastest (kernels/cpu_layout.h): every packed tensor [rows, N]
rearranged to [N/16, rows, 16], so that a kernel walking a 16-column tile down the rows streams contiguous memory.
In the checkpoint's row-major layout that walk touches one cache line every N*4 bytes, which hardware
prefetchers do not follow (docs/RESULTS.md: 5.4 GB/s on a single core that reads 25 GB/s sequentially).

A layer is tiled at load (PackedLinear.process_after_loading, for the C++ kernels on the CPU, when N % 16 == 0)
in place of its row-major buffers, never as a second copy; the checkpoint format on disk does not change, and
state_dict, .to() and the reference path see row-major tensors again (untile).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mamp.kernels.packing import PackedTensors, PackedWeight, PackSpec

TILE = 16


def can_tile(spec: PackSpec) -> bool:
    return spec.out_features % TILE == 0


def out_features(qweight: torch.Tensor) -> int:
    """N of a packed qweight in either layout: [R, N] row-major or [N/16, R, 16] column-tiled."""
    return qweight.shape[0] * qweight.shape[2] if qweight.dim() == 3 else qweight.shape[1]


def tile_tensor(t: torch.Tensor) -> torch.Tensor:
    """[rows, N] -> [N/16, rows, 16], contiguous."""
    rows, n = t.shape
    return t.view(rows, n // TILE, TILE).permute(1, 0, 2).contiguous()


def untile_tensor(t: torch.Tensor) -> torch.Tensor:
    """[N/16, rows, 16] -> [rows, N], contiguous."""
    tiles, rows, _ = t.shape
    return t.permute(1, 0, 2).reshape(rows, tiles * TILE).contiguous()


@dataclass
class TiledWeight(PackedTensors):
    """A layer's packed tensors in the column-tiled layout, with its spec: what the C++ ops take instead of a
    PackedWeight (same field names)."""

    def untile(self) -> PackedWeight:
        return PackedWeight(self.spec, **{k: untile_tensor(v) for k, v in self.tensors().items()})


def tile(packed: PackedWeight) -> TiledWeight:
    if not can_tile(packed.spec):
        raise ValueError(f"column tiling needs out_features % {TILE} == 0, got {packed.spec.out_features}")
    return TiledWeight(packed.spec, **{k: tile_tensor(v) for k, v in packed.tensors().items()})
