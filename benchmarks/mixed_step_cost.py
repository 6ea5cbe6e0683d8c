"""What a prompt chunk adds to a decode step: 15 decode rows alone, and with a chunk of --chunk prompt rows of a
16th sequence beside them at positions 0, 256 and 496 (its rows attend to up to 512 cached positions), in one
process, alternating; median step times and their ratio to the decode-only step.

    python benchmarks/mixed_step_cost.py CKPT [--chunk 16] [--context 150] [--rounds 10] [--threads 2]

The ratio is the stall a running stream sees while a long prompt is prefilled in chunks of that size (issue 13's
prefill target: no stall over 2 decode steps, first token under 1 s).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mamp.kernels.checkpoint import load_checkpoint
from mamp.server.batched_llama import BatchedLlama

STARTS = (0, 256, 496)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--context", type=int, default=150, help="the decode rows' cached positions")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_checkpoint(a.checkpoint)
    runner = BatchedLlama(model, 16, 2048)
    for slot in range(15):
        runner.prefill(slot, list(range(10, 10 + a.context)))

    def step(start: int | None) -> float:
        slots, tokens, positions = list(range(15)), [7] * 15, [a.context] * 15
        if start is not None:
            slots += [15] * a.chunk
            tokens += [9] * a.chunk
            positions += range(start, start + a.chunk)
            runner.cache.ensure(15, start + a.chunk)
        t0 = time.perf_counter()
        runner.decode(slots, tokens, positions, list(range(15)) if start is not None else None)
        return (time.perf_counter() - t0) * 1e3

    cases = [None, *STARTS]
    for _ in range(3):
        for c in cases:
            step(c)
    times: dict = {c: [] for c in cases}
    for _ in range(a.rounds):
        for c in cases:
            times[c].append(step(c))
    base = statistics.median(times[None])
    print(f"chunk {a.chunk}, decode rows at {a.context} positions, {a.threads} threads, {a.rounds} rounds")
    print("| step | median ms | / decode step |")
    print("|---|---|---|")
    for c in cases:
        t = statistics.median(times[c])
        label = "15 decode rows" if c is None else f"+ chunk at {c}..{c + a.chunk - 1}"
        print(f"| {label} | {t:.2f} | {t / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
