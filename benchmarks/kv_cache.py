"""KV-cache dtypes measured through the serving runner's own cache (server/kv_cache.py): perplexity and the KL
divergence of next-token distributions against the first kind listed (fp32 by default), on WikiText-2
(quantizer/eval.py's windows: the text tokenized whole without BOS, non-overlapping windows of --seqlen, every
window scoring its seqlen - 1 next-token predictions), and the most concurrent sequences of --seq-tokens that
the allocator fits in --memory.

    python benchmarks/kv_cache.py CKPT --text ../shared/assets/wikitext-2-raw/test.txt [--seqlen 2048]
        [--max-windows N] [--memory 1GiB] [--out benchmarks/results/kv_cache.txt]

Each window is prefilled once per dtype with every position's logits. A quantized cache is read back for every
key and value, the window's own included (BatchedLlama.prefill), so each position sees exactly what a decode
step at that position would see: the cache's quantized entries of all positions up to its own.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))

from mamp.quantizer.eval import load_any, tokenize_file
from mamp.server.batched_llama import BatchedLlama
from mamp.server.config import parse_bytes
from mamp.server.kv_cache import NoFreeBlocks, PagedKVCache, bytes_per_token

KINDS = ("fp32", "fp16", "int8", "int4")  # the first listed is the reference ("auto": 16-bit, fp16 on a CPU)


def capacity(runner: BatchedLlama, kind: str, memory: int, seq_tokens: int) -> tuple[int, int, int]:
    """(sequences of seq_tokens the allocator admits in `memory`, bytes per token, pool tokens): a real pool, real
    allocations until NoFreeBlocks (no tensors are touched, so no memory is committed)."""
    per_token = bytes_per_token(kind, len(runner.layers), runner.num_kv_heads, runner.head_dim, runner.dtype)
    blocks = memory // (per_token * 16)
    rows = blocks // -(-seq_tokens // 16) + 1
    cache = PagedKVCache(len(runner.layers), rows, runner.num_kv_heads, runner.head_dim, seq_tokens, runner.device,
                         runner.dtype, kind, num_blocks=blocks)
    n = 0
    try:
        while True:
            cache.ensure(n, seq_tokens)
            n += 1
    except NoFreeBlocks:
        pass
    return n, cache.bytes_per_token, cache.capacity_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--text", default=str(REPO.parent / "shared/assets/wikitext-2-raw/test.txt"))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="default: the whole text")
    p.add_argument("--memory", default="1GiB", help="the fixed KV memory for the capacity count")
    p.add_argument("--seq-tokens", type=int, default=2048)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=("auto",) + KINDS)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)

    model, tok, desc = load_any(args.checkpoint)
    tokens = tokenize_file(tok, args.text)
    n = tokens.numel() // args.seqlen
    if args.max_windows:
        n = min(n, args.max_windows)
    if n == 0:
        raise SystemExit(f"error: {args.text} has fewer than {args.seqlen} tokens")
    runners = {k: BatchedLlama(model, 1, args.seqlen, kv_cache_dtype=k) for k in args.kinds}
    ref_kind = args.kinds[0]
    nll = {k: 0.0 for k in args.kinds}
    kl = {k: 0.0 for k in args.kinds}
    top1 = {k: 0 for k in args.kinds}
    count = 0
    t0 = time.time()
    for i in tqdm(range(n), desc="windows", unit="window"):
        ids = tokens[i * args.seqlen:(i + 1) * args.seqlen]
        target = ids[1:]
        ref_lp = None
        for k in args.kinds:
            runner = runners[k]
            runner.release(0)
            logits = runner.prefill(0, ids.tolist(), all_logits=True)[:-1]
            lp = F.log_softmax(logits, dim=-1)
            nll[k] += float(F.nll_loss(lp, target, reduction="sum"))
            if ref_lp is None:
                ref_lp = lp
            else:
                kl[k] += float(F.kl_div(lp, ref_lp, log_target=True, reduction="sum"))  # KL(ref || k)
                top1[k] += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
        count += args.seqlen - 1
    elapsed = time.time() - t0
    memory = parse_bytes(args.memory)
    ref_ppl = math.exp(nll[ref_kind] / count)
    base_runner = runners[ref_kind]
    lines = [f"# KV cache dtypes through the serving runner: {args.checkpoint} ({desc})",
             (f"# text {args.text}: {n} windows of {args.seqlen} ({count} scored tokens); reference cache "
             f"{ref_kind} ({base_runner.dtype}); {elapsed:.0f} s; {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
             (f"# capacity: concurrent sequences of {args.seq_tokens} tokens the allocator admits in {args.memory}; "
             "16-bit: the count for a bf16 cache of the same geometry"),
             ("| KV dtype | perplexity | vs reference | KL(ref || dtype) per token | top-1 agreement | bytes/token | "
             f"sequences in {args.memory} | vs 16-bit |"),
             "|---|---|---|---|---|---|---|---|"]
    bf16_per_token = 2 * len(base_runner.layers) * base_runner.num_kv_heads * base_runner.head_dim * 2
    seqs16 = (memory // (bf16_per_token * 16)) // -(-args.seq_tokens // 16)
    for k in args.kinds:
        ppl = math.exp(nll[k] / count)
        seqs, per_token, _ = capacity(base_runner, k, memory, args.seq_tokens)
        kl_s = "-" if k == ref_kind else f"{kl[k] / count:.5f}"
        agree = "-" if k == ref_kind else f"{100 * top1[k] / count:.2f}%"
        lines.append(f"| {k if k != 'auto' else f'auto ({base_runner.dtype})'.replace('torch.', '')} | {ppl:.4f} | "
                     f"{100 * (ppl / ref_ppl - 1):+.3f}% | {kl_s} | {agree} | {per_token} | {seqs} | "
                     f"{seqs / seqs16:.2f}x |")
    lines.append(f"| (16-bit cache, computed) | - | - | - | - | {bf16_per_token} | {seqs16} | 1.00x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
