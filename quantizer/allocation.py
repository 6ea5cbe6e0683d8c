"""Per-layer widths under a bit budget: which unit of the decoder gets 2, 4 or 8 bits.

A unit is what engines fuse and therefore what shares one width: a decoder layer's q/k/v, its o_proj, its
gate/up, its down_proj. Each width's cost is exact: the bits the packed format stores for the unit's linears at
that width (PackSpec.stored_bits: words, bitmap, both grids). `allocate` minimises the summed predicted error
(quantizer/sensitivity.py) under the budget, a knapsack solved by dynamic programming; `rule_allocation` is the hand-written alternative, after llama.cpp's
mixes (more bits for attention V and the FFN down projections of the first and last layers, and every third one
between). Both never exceed the budget: a budget below every unit at the smallest width is a BudgetError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from mamp.kernels.packing import BITS, PackSpec

STAGE_KEYS = ("qkv", "o", "gate_up", "down")  # the pipeline's STAGES, in order


class BudgetError(ValueError):
    """A budget no allocation can meet."""


@dataclass(frozen=True)
class Unit:
    """One unit: decoder layer `layer`, stage `stage` (STAGE_KEYS), its linears' (in, out) shapes."""

    layer: int
    stage: str
    shapes: tuple[tuple[int, int], ...]

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.stage

    @property
    def weights(self) -> int:
        return sum(k * n for k, n in self.shapes)

    def stored_bits(self, bits: int, group_size: int = 128, salient_group_size: int = 128) -> int:
        """Exact bits the checkpoint stores for this unit at width `bits` (h = b)."""
        return sum(PackSpec(k, n, bits=bits, salient_bits=bits, group_size=group_size,
                            salient_group_size=salient_group_size).stored_bits() for k, n in self.shapes)


Widths = dict[tuple[int, str], int]


def stored_bits(units: list[Unit], widths: Mapping[tuple[int, str], int], **group) -> int:
    return sum(u.stored_bits(widths[u.key], **group) for u in units)


def budget_bits(units: list[Unit], budget: float) -> float:
    """The bits a budget in bits per weight allows the units together."""
    return budget * sum(u.weights for u in units)


def check_budget(units: list[Unit], budget: float, widths=BITS, **group) -> None:
    low = min(widths)
    least = stored_bits(units, {u.key: low for u in units}, **group)
    total = sum(u.weights for u in units)
    if least > budget_bits(units, budget):
        raise BudgetError(f"a budget of {budget:g} bits per weight is below the smallest this model can be stored "
                          f"in ({least / total:.4f}: every layer at {low} bits)")


def allocate(units: list[Unit], error: Mapping[tuple[int, str], Mapping[int, float]], budget: float,
             widths=BITS, resolution: int = 1 << 15, **group) -> Widths:
    """Widths minimising sum(error[unit][width]) with stored bits <= budget * weights.

    A knapsack solved by dynamic programming over the bits above every unit at the smallest width (the budget's
    slack), in `resolution` steps with each unit's extra bits rounded up (so the answer never exceeds the
    budget, and is at least as good as the best allocation of a budget smaller by units x one step); then a fill
    pass spends what the rounding left on single upgrades that fit exactly, best error saved per bit first."""
    check_budget(units, budget, widths, **group)
    cap = budget_bits(units, budget)
    ws = sorted(widths)
    low = ws[0]
    cost = {u.key: {w: u.stored_bits(w, **group) for w in ws} for u in units}
    chosen = {u.key: low for u in units}
    slack = cap - sum(cost[k][low] for k in chosen)
    if slack >= 1 and len(ws) > 1:
        steps = resolution
        g = slack / steps
        inf = float("inf")
        dp = torch.full((steps + 1,), inf, dtype=torch.float64)
        dp[0] = 0.0
        picks, extras = [], []
        for u in units:
            extra = [math.ceil((cost[u.key][w] - cost[u.key][low]) / g) for w in ws]
            new = torch.full_like(dp, inf)
            pick = torch.zeros(steps + 1, dtype=torch.uint8)
            for j, (w, c) in enumerate(zip(ws, extra)):
                if c > steps:
                    continue
                cand = torch.full_like(dp, inf)
                cand[c:] = dp[:steps + 1 - c] + float(error[u.key][w])
                better = cand < new
                new[better] = cand[better]
                pick[better] = j
            dp = new
            picks.append(pick)
            extras.append(extra)
        s = int(torch.argmin(dp))
        for u, pick, extra in zip(reversed(units), reversed(picks), reversed(extras)):
            j = int(pick[s])
            chosen[u.key] = ws[j]
            s -= extra[j]
    used = sum(cost[k][w] for k, w in chosen.items())
    while True:  # fill: what the rounding left, on single upgrades that still fit
        best = None
        for k, w in chosen.items():
            for w2 in ws:
                extra = cost[k][w2] - cost[k][w]
                gain = float(error[k][w]) - float(error[k][w2])
                if extra > 0 and gain > 0 and used + extra <= cap and (best is None or gain / extra > best[0]):
                    best = (gain / extra, k, w2, extra)
        if best is None:
            return chosen
        _, k, w2, extra = best
        chosen[k] = w2
        used += extra


def more_bits_layer(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def rule_allocation(units: list[Unit], budget: float, widths=BITS, **group) -> Widths:
    """A llama.cpp-like hand-written mix: from every unit at the largest width that fits uniformly, raise units
    one width step in a fixed order while the budget allows: q/k/v (holds V) and down_proj of the `more_bits`
    layers, then q/k/v and down_proj of the others, then o_proj, then gate/up; repeat while anything moved."""
    check_budget(units, budget, widths, **group)
    cap = budget_bits(units, budget)
    ws = sorted(widths)
    base = ws[0]
    for w in ws:
        if stored_bits(units, {u.key: w for u in units}, **group) <= cap:
            base = w
    chosen = {u.key: base for u in units}
    used = stored_bits(units, chosen, **group)
    n = 1 + max(u.layer for u in units)

    def tier(u: Unit) -> int:
        if u.stage in ("qkv", "down"):
            return 0 if more_bits_layer(u.layer, n) else 1
        return 2 if u.stage == "o" else 3

    order = sorted(units, key=lambda u: (tier(u), u.stage != "qkv", u.layer))
    moved = True
    while moved:
        moved = False
        for u in order:
            w = chosen[u.key]
            if w == ws[-1]:
                continue
            w2 = ws[ws.index(w) + 1]
            extra = u.stored_bits(w2, **group) - u.stored_bits(w, **group)
            if used + extra <= cap:
                chosen[u.key] = w2
                used += extra
                moved = True
    return chosen


def describe(units: list[Unit], widths: Mapping[tuple[int, str], int]) -> str:
    """One line per decoder layer: 'layer  3: qkv 4  o 2  gate_up 2  down 8'."""
    by_layer: dict[int, list[str]] = {}
    for u in sorted(units, key=lambda u: (u.layer, STAGE_KEYS.index(u.stage))):
        by_layer.setdefault(u.layer, []).append(f"{u.stage} {widths[u.key]}")
    width = len(str(max(by_layer))) if by_layer else 1
    return "\n".join(f"layer {i:>{width}}: " + "  ".join(parts) for i, parts in sorted(by_layer.items()))
