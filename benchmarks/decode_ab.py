"""Decode step time of one checkpoint under two CPU kernel choices, in alternating rounds in one process: the
batched runner (what the server runs), fp32 activations against int8 activations (MAMP_CPU_ACTIVATIONS).

    python benchmarks/decode_ab.py CKPT [--batches 1,16] [--threads 1,2] [--rounds 5] [--steps 8] [--context 60]

Each (batch, threads) cell alternates the two models round by round; prints the median step time of each and
the ratio, and the integer path's instruction set.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mamp.kernels import cpu_matmul  # noqa: E402
from mamp.kernels.checkpoint import load_checkpoint  # noqa: E402
from mamp.kernels.packed_linear import PackedLinear  # noqa: E402
from mamp.server.batched_llama import BatchedLlama  # noqa: E402


def load(ckpt: str, activations: str, batch: int, max_len: int):
    os.environ[cpu_matmul.ACTIVATIONS_ENV] = activations
    model, _ = load_checkpoint(ckpt)
    kernels = sorted({m.kernel_name for m in model.modules() if isinstance(m, PackedLinear)})
    return BatchedLlama(model, max(16, batch), max_len), kernels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=60, help="prompt tokens per sequence before timing")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    max_len = a.context + a.rounds * (a.steps + 1) + 16  # each cell prefills its slots afresh
    runners = {mode: load(a.checkpoint, mode, max(batches), max_len) for mode in ("float", "int8")}
    print(f"{a.checkpoint}: kernels float={runners['float'][1]} int8={runners['int8'][1]}, "
          f"integer path {cpu_matmul.int8_isa()}")
    print("\n| batch | threads | fp32 activations ms/step | int8 activations ms/step | speed-up |")
    print("|---|---|---|---|---|")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in batches:
            slots = list(range(batch))
            pos = {}
            with torch.no_grad():
                for mode, (runner, _) in runners.items():
                    for s in slots:
                        runner.prefill(s, list(range(10, 10 + a.context)))
                    pos[mode] = [a.context] * batch
            times = {"float": [], "int8": []}
            for _ in range(a.rounds):
                for mode, (runner, _) in runners.items():
                    with torch.no_grad():
                        runner.decode(slots, [7] * batch, pos[mode])  # warm
                        pos[mode] = [p + 1 for p in pos[mode]]
                        t0 = time.perf_counter()
                        for _ in range(a.steps):
                            runner.decode(slots, [7] * batch, pos[mode])
                            pos[mode] = [p + 1 for p in pos[mode]]
                    times[mode].append((time.perf_counter() - t0) / a.steps * 1e3)
            f, i = statistics.median(times["float"]), statistics.median(times["int8"])
            print(f"| {batch} | {threads} | {f:.2f} | {i:.2f} | {f / i:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
