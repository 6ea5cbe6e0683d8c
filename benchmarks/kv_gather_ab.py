"""Decode step at batch 16 with the running sequences in dense slots (KV cache read in place, as a view) against
the same sequences in another order (the cache gathered, a copy per layer), alternated in one process.

    python benchmarks/kv_gather_ab.py CHECKPOINT THREADS CONTEXT
"""
import statistics
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[2]))
from mamp.kernels.checkpoint import load_checkpoint
from mamp.server.batched_llama import BatchedLlama
model, _ = load_checkpoint(sys.argv[1])
r = BatchedLlama(model, 16, 512)
for s in range(16): r.prefill(s, list(range(10, 10 + int(sys.argv[3]))))
dense = list(range(16)); scattered = [15] + list(range(15))  # same sequences, not in slot order -> gather
L = int(sys.argv[3])
def run(slots, n=8):
    t = time.perf_counter()
    for i in range(n): r.decode(slots, [7] * 16, [L + i] * 16)
    return (time.perf_counter() - t) / n * 1e3
run(dense, 3); run(scattered, 3)
res = {"dense (view)": [], "scattered (gather)": []}
for _ in range(5):
    res["dense (view)"].append(run(dense)); res["scattered (gather)"].append(run(scattered))
for k, v in res.items(): print(f"threads {sys.argv[2]} ctx {L}: {k}: median {statistics.median(v):.1f} ms")
