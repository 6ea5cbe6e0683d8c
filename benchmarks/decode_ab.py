"""Decode step time of one checkpoint under two choices, in alternating rounds in one process: the batched runner
(what the server runs), either fp32 against int8 activations (MAMP_CPU_ACTIVATIONS; --compare activations) or
the Python decoder-layer stages against the native decode layer (kernels/native_decode.py; --compare native).

    python benchmarks/decode_ab.py CKPT [--compare activations|native] [--batches 1,16] [--threads 1,2]
        [--rounds 5] [--steps 8] [--context 60]

Each (batch, threads) cell alternates the two round by round; prints the median step time of each and the
ratio, and the integer path's instruction set.
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
    ap.add_argument("--compare", choices=["activations", "native"], default="activations")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=60, help="prompt tokens per sequence before timing")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    max_len = a.context + a.rounds * (a.steps + 1) + 16  # each cell prefills its slots afresh
    if a.compare == "activations":
        runners = {mode: load(a.checkpoint, mode, max(batches), max_len) for mode in ("float", "int8")}
        names = ("fp32 activations", "int8 activations")
    else:  # one runner; the Python stages where its native layers are switched off
        runner, kernels = load(a.checkpoint, os.environ.get(cpu_matmul.ACTIVATIONS_ENV, "int8"), max(batches),
                               max_len)
        if runner.native is None:
            raise SystemExit(f"decode_ab.py: no native decode here ({runner.native_reason})")
        runners = {"python": (runner, kernels), "native": (runner, kernels)}
        names = ("Python stages", "native layer")
    (m0, (_, k0)), (m1, (_, k1)) = runners.items()
    print(f"{a.checkpoint}: kernels {m0}={k0} {m1}={k1}, integer path {cpu_matmul.int8_isa()}")
    print(f"\n| batch | threads | {names[0]} ms/step | {names[1]} ms/step | speed-up |")
    print("|---|---|---|---|---|")
    native_layers = runners.get("native", (None,))[0].native if a.compare == "native" else None

    def use(mode: str):
        runner = runners[mode][0]
        if a.compare == "native":
            runner.native = native_layers if mode == "native" else None
        return runner

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
            times = {mode: [] for mode in runners}
            for _ in range(a.rounds):
                for mode in runners:
                    runner = use(mode)
                    with torch.no_grad():
                        runner.decode(slots, [7] * batch, pos[mode])  # warm
                        pos[mode] = [p + 1 for p in pos[mode]]
                        t0 = time.perf_counter()
                        for _ in range(a.steps):
                            runner.decode(slots, [7] * batch, pos[mode])
                            pos[mode] = [p + 1 for p in pos[mode]]
                    times[mode].append((time.perf_counter() - t0) / a.steps * 1e3)
            f, i = (statistics.median(times[m]) for m in runners)
            print(f"| {batch} | {threads} | {f:.2f} | {i:.2f} | {f / i:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
