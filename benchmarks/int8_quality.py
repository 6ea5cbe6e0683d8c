"""Perplexity of a packed checkpoint with the CPU kernel's activations in fp32 and in int8 (per block of 32 or
128 inputs), every row of every window through the kernel under test: the integer kernel normally serves only
decode rows (M <= 16), so this forces it on the evaluation's prefill-sized calls too.

    python benchmarks/int8_quality.py CKPT --text ../shared/assets/wikitext-2-raw/test.txt --seqlen 1024 \\
        --max-tokens 20480 [--blocks 32,128] [--threads 2]

Prints a table: mode, perplexity, ratio to the fp32-activation figure, seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mamp.kernels import cpu_matmul  # noqa: E402
from mamp.kernels.packed_linear import PackedLinear  # noqa: E402
from mamp.quantizer.eval import load_any, perplexity, tokenize_file  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--text", required=True)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--blocks", default="32,128", help="int8 activation block sizes to measure")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    modes = [("float", None)] + [("int8", int(b)) for b in a.blocks.split(",")]
    rows, base = [], None
    tokens = None
    for kind, block in modes:
        os.environ[cpu_matmul.ACTIVATIONS_ENV] = kind
        if block:
            cpu_matmul.ACT_BLOCK = block
            cpu_matmul.INT8_MAX_M = 1 << 30  # every call, not only decode rows
        model, tok, _ = load_any(a.checkpoint)
        kernels = sorted({m.kernel_name for m in model.modules() if isinstance(m, PackedLinear)})
        if tokens is None:
            tokens = tokenize_file(tok, a.text, a.max_tokens)
        t0 = time.perf_counter()
        ppl, n = perplexity(model, tokens, a.seqlen)
        dt = time.perf_counter() - t0
        base = base if base is not None else ppl
        label = "fp32 activations" if kind == "float" else f"int8 activations, blocks of {block}"
        rows.append((label, ",".join(kernels), ppl, ppl / base, dt, n))
        print(f"{label}: {ppl:.4f} ({dt:.0f} s)", flush=True)
    isa = cpu_matmul.int8_isa()
    print(f"\n{a.checkpoint}, {n} scored tokens, context {a.seqlen}, {a.threads} threads, integer path {isa}\n")
    print("| activations | kernel | perplexity | vs fp32 | seconds |")
    print("|---|---|---|---|---|")
    for label, k, ppl, ratio, dt, _ in rows:
        print(f"| {label} | {k} | {ppl:.4f} | {ratio:.4f}x | {dt:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
