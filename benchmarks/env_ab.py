"""Decode step time of one checkpoint under two process environments, in alternating processes: settings that
only take effect at process start (THP_MEM_ALLOC_ENABLE, allocator or OpenMP variables) cannot be A/B-ed in one.

    python benchmarks/env_ab.py CKPT --env THP_MEM_ALLOC_ENABLE=1 [--env NAME=VALUE ...] [--batches 1,16]
        [--threads 2] [--rounds 6] [--steps 64] [--context 60]

Each round starts one process per side (A: the environment as it is, B: with the --env settings), which loads the
checkpoint into the serving runner (server/batched_llama.py), prefills every row, and times --steps decode steps
per batch size after a warm-up; the sides alternate (A B, then B A). Prints each round's ms/step and the median
ratio B/A per batch; with --out, the same table as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(a) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from mamp.kernels import cpu_matmul
    from mamp.kernels.checkpoint import load_checkpoint
    from mamp.server.batched_llama import BatchedLlama

    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    model, _ = load_checkpoint(a.checkpoint)
    runner = BatchedLlama(model, max(batches), a.context + 2 * (a.steps + 8))
    out = {"isa": cpu_matmul.int8_isa(), "ms": {}}
    with torch.inference_mode():
        for batch in batches:
            slots = list(range(batch))
            for s in slots:
                runner.release(s)
                runner.prefill(s, list(range(10, 10 + a.context)))
            pos = [a.context] * batch
            for _ in range(4):  # warm-up
                runner.decode(slots, [7] * batch, pos)
                pos = [p + 1 for p in pos]
            t0 = time.perf_counter()
            for _ in range(a.steps):
                runner.decode(slots, [7] * batch, pos)
                pos = [p + 1 for p in pos]
            out["ms"][str(batch)] = (time.perf_counter() - t0) / a.steps * 1e3
    print("RESULT " + json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for side B (repeatable)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    extra = dict(kv.split("=", 1) for kv in a.env)
    if not extra:
        ap.error("give at least one --env NAME=VALUE")
    sides = {"A": dict(os.environ), "B": {**os.environ, **extra}}
    cmd = [sys.executable, __file__, a.checkpoint, "--child", "--batches", a.batches, "--threads", str(a.threads),
           "--steps", str(a.steps), "--context", str(a.context)]
    ms = {s: [] for s in sides}
    isa = None
    for r in range(a.rounds):
        for side in ("A", "B") if r % 2 == 0 else ("B", "A"):
            proc = subprocess.run(cmd, env=sides[side], capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"env_ab.py: side {side} failed:\n{proc.stderr[-2000:]}")
            res = json.loads(lines[-1][7:])
            isa = res["isa"]
            ms[side].append(res["ms"])
            print(f"round {r} side {side}: " + "  ".join(f"batch {b}: {v:.2f} ms" for b, v in res["ms"].items()),
                  flush=True)
    lines = [f"B = A with {' '.join(a.env)}; {a.threads} threads, {a.steps} steps after {a.context} prompt tokens, "
             f"{a.rounds} alternating rounds, integer path {isa}", "",
             "| batch | A ms/step (median) | B ms/step (median) | B / A per round (median) |", "|---|---|---|---|"]
    for b in a.batches.split(","):
        ta, tb = [m[b] for m in ms["A"]], [m[b] for m in ms["B"]]
        ratios = [y / x for x, y in zip(ta, tb)]
        lines.append(f"| {b} | {statistics.median(ta):.3f} | {statistics.median(tb):.3f} | "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        a.out.write_text(f"command: python benchmarks/env_ab.py {' '.join(sys.argv[1:])}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
