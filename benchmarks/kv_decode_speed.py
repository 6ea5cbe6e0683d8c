"""Decode-step time of the serving runner by KV-cache dtype (and block size), in alternating rounds.

    python benchmarks/kv_decode_speed.py CKPT [--kinds fp32 fp16 int8 int4] [--contexts 128 1024] [--batches 1 16]
        [--block-sizes 16] [--threads 2] [--rounds 5]

For each (cached tokens, batch): every runner prefills `batch` sequences of that many tokens, then each round
times 8 decode steps per runner in turn; the median over rounds is reported, and each runner's ratio to the first.
With one kind and several --block-sizes it compares block sizes instead (a block as long as the context is a
contiguous cache per sequence). The runner's native decode layer serves a packed checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))

from mamp.kernels.checkpoint import load_checkpoint  # noqa: E402
from mamp.server.batched_llama import BatchedLlama  # noqa: E402
from mamp.server.kv_cache import PagedKVCache  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--kinds", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--block-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_checkpoint(a.checkpoint)
    rows, max_len = max(a.batches), max(a.contexts) + 16
    runners = {}
    for kind in a.kinds:
        for bs in a.block_sizes:
            r = BatchedLlama(model, rows, max_len, kv_cache_dtype=kind)
            c = r.cache
            blocks = rows * -(-max_len // bs)
            r.cache = PagedKVCache(c.num_layers, rows, c.num_kv_heads, c.head_dim, max_len, c.device, c.dtype, kind,
                                   num_blocks=blocks, block_size=bs)
            runners[f"{kind}/{bs}"] = r
    print(f"# {a.checkpoint}, {a.threads} threads, medians of {a.rounds} alternating rounds of 8 steps; "
          f"native layer: {next(iter(runners.values())).native is not None}")
    print("| cached tokens | batch | " + " | ".join(f"{k} ms" for k in runners) + " |")
    print("|---|---|" + "---|" * len(runners))
    for ctx in a.contexts:
        for b in a.batches:
            for r in runners.values():
                for s in range(rows):
                    r.release(s)
                for s in range(b):
                    r.prefill(s, [5] * ctx)
            times = {k: [] for k in runners}
            for _ in range(a.rounds):
                for k, r in runners.items():
                    t = time.perf_counter()
                    for step in range(8):
                        r.decode(list(range(b)), [7] * b, [ctx + step] * b)
                    times[k].append((time.perf_counter() - t) / 8 * 1e3)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            first = next(iter(med.values()))
            print(f"| {ctx} | {b} | " + " | ".join(f"{v:.2f} ({v / first:.2f}x)" for v in med.values()) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
