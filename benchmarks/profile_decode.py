"""Where a decode step's time goes: the batched runner on a checkpoint, one sequence, torch.profiler by op.

    python benchmarks/profile_decode.py CHECKPOINT [--threads 1] [--batch 1] [--steps 20]

Prints the mean step time, then the ops by self CPU time (per step: divide by --steps).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mamp.kernels.checkpoint import load_checkpoint
from mamp.server.batched_llama import BatchedLlama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_checkpoint(a.checkpoint)
    runner = BatchedLlama(model, max(16, a.batch), 512)
    slots = list(range(a.batch))
    for s in slots:
        runner.prefill(s, list(range(10, 60)))
    pos = [50] * a.batch

    def step():
        runner.decode(slots, [7] * a.batch, pos)
        pos[:] = [x + 1 for x in pos]

    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(2 * a.steps):
        step()
    print(f"decode step, batch {a.batch}, {a.threads} thread(s): {(time.perf_counter() - t0) / (2 * a.steps) * 1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
