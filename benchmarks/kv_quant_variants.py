"""How 4-bit (and 8-bit) KV-cache quantizers other than the served ones would score: keys and values are
fake-quantized (quantized and dequantized in fp32) as the runner reads its cache, so any scheme can be tried
without a kernel; the served int8 / int4 themselves are measured by benchmarks/kv_cache.py through the real cache.

    python benchmarks/kv_quant_variants.py CKPT --windows 3 --variants none,none asym64,none kivi64,none none,sym4

A variant is KEYS,VALUES, each one of:
    none     not quantized
    int8     the served int8 (per token and head, symmetric, after the Hadamard rotation)
    int8-nr  the same without the rotation
    asym64   the served int4 (per token and head, asymmetric, after the rotation); asym32: groups of 32
    asym64-nr  the served int4 without the rotation
    sym4     per token and head, symmetric, codes -7 .. 7, after the rotation (one fp16 scale: 34 bytes)
    nf4      per token and head, NF4 levels with an absmax scale, after the rotation
    kivi16, kivi32, kivi64   per channel over blocks of 16 / 32 / 64 tokens (KIVI's keys), after the rotation;
             the partial last block is quantized as it stands (in serving it would wait in a residual buffer)
    s-KIND   keys divided per channel by max|k|^alpha (statistics from --calib, the RoPE pairs sharing one
             scale; queries would be multiplied by the same), then KIND, then multiplied back (SmoothAttention)

Windows of --seqlen tokens from the start of WikiText-2's test split, every position's logits from one prefill
that reads the (fake-quantized) cache for every key (BatchedLlama.prefill); perplexity relative to the first
variant.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO.parent))

from mamp.kernels import kv_quant  # noqa: E402
from mamp.quantizer.eval import load_any, tokenize_file  # noqa: E402
from mamp.server.batched_llama import BatchedLlama  # noqa: E402
from mamp.server.kv_cache import PagedKVCache  # noqa: E402


def _groups4(x: torch.Tensor, g: int) -> torch.Tensor:
    """Per-token asymmetric 4-bit over groups of g along the last dim, fp16 scale and zero."""
    y = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    s, z = ((hi - lo) / 15).half().float(), lo.half().float()
    return (torch.round((y - z) / s.clamp_min(1e-12)).clamp(0, 15) * s + z).reshape(x.shape)


def _sym4(x: torch.Tensor) -> torch.Tensor:
    a = (x.abs().amax(-1, keepdim=True) / 7).half().float()
    return torch.round(x / a.clamp_min(1e-12)).clamp(-7, 7) * a


def _nf4(x: torch.Tensor) -> torch.Tensor:
    from statistics import NormalDist

    levels = torch.tensor([NormalDist().inv_cdf((i + 0.5) / 16) for i in range(16)])
    levels = levels / levels.abs().max()
    a = x.abs().amax(-1, keepdim=True).half().float()
    return levels[((x / a.clamp_min(1e-12))[..., None] - levels).abs().argmin(-1)] * a


def _kivi(x: torch.Tensor, t: int) -> torch.Tensor:
    """x [B, KVH, L, D]: per channel over blocks of t tokens, asymmetric 4-bit, fp16 scale and zero."""
    b, h, n, d = x.shape
    y = F.pad(x, (0, 0, 0, (-n) % t)).reshape(b, h, -1, t, d)
    lo, hi = y.amin(3, keepdim=True), y.amax(3, keepdim=True)
    s, z = ((hi - lo) / 15).half().float(), lo.half().float()
    return (torch.round((y - z) / s.clamp_min(1e-12)).clamp(0, 15) * s + z).reshape(b, h, -1, d)[:, :, :n]


SMOOTH: dict[int, torch.Tensor] = {}  # layer -> [KVH, D] per-channel key scale (s- variants)


def fake_quant(x: torch.Tensor, how: str, layer: int = 0) -> torch.Tensor:
    if how.startswith("s-"):
        lam = SMOOTH[layer][None, :, None, :]
        return fake_quant(x / lam, how[2:]) * lam
    if how == "none":
        return x
    if how in ("int8", "asym64"):
        kind = "int8" if how == "int8" else "int4"
        return kv_quant.dequantize(*kv_quant.quantize(x, kind), kind)
    if how == "int8-nr":
        a = (x.abs().amax(-1, keepdim=True) / 127).half().float()
        return torch.round(x / a.clamp_min(1e-12)).clamp(-127, 127) * a
    if how == "asym64-nr":
        return _groups4(x, x.shape[-1])
    inner = {"asym32": lambda t: _groups4(t, 32), "sym4": _sym4, "nf4": _nf4, "kivi16": lambda t: _kivi(t, 16),
             "kivi32": lambda t: _kivi(t, 32), "kivi64": lambda t: _kivi(t, 64)}
    if how not in inner:
        raise SystemExit(f"error: unknown variant {how!r}")
    return kv_quant.rotate(inner[how](kv_quant.rotate(x)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--text", default=str(REPO.parent / "shared/assets/wikitext-2-raw/test.txt"))
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--calib", default=str(REPO.parent / "shared/assets/wikitext-2-raw/valid.txt"))
    p.add_argument("--alpha", type=float, default=0.5, help="s- variants: key channel scale max|k|^alpha")
    p.add_argument("--variants", nargs="+", default=["none,none", "int8,int8", "asym64,asym64"])
    args = p.parse_args(argv)
    model, tok, _ = load_any(args.checkpoint)
    tokens = tokenize_file(tok, args.text)
    how: dict[str, str] = {}
    read, store = PagedKVCache.read, PagedKVCache._store

    def as_auto(fn):  # the cache stores and reads fp32; "fake" only makes prefill read every key back
        def call(self, *a):
            self.kind = "auto"
            try:
                return fn(self, *a)
            finally:
                self.kind = "fake"
        return call

    def fake_read(self, layer, rows, length):
        k, v = as_auto(read)(self, layer, rows, length)
        if how.get("record"):
            m = k.abs().amax(dim=(0, 2))  # [KVH, D]
            d = m.shape[-1] // 2
            m = torch.maximum(m[:, :d], m[:, d:]).repeat(1, 2)  # RoPE pairs (i, i + D/2) share one scale
            SMOOTH[layer] = torch.maximum(SMOOTH.get(layer, m), m)
        return fake_quant(k, how["k"], layer), fake_quant(v, how["v"], layer)

    PagedKVCache.read, PagedKVCache._store = fake_read, as_auto(store)
    if any(v.startswith("s-") or ",s-" in v for v in args.variants):
        # per-channel key statistics from calibration text (not the scored windows): max |k| per layer, head, channel
        how.update(k="none", v="none", record="1")
        calib = tokenize_file(tok, args.calib)[:args.seqlen]
        runner = BatchedLlama(model, 1, args.seqlen)
        runner.cache.kind = "fake"
        runner.prefill(0, calib.tolist(), all_logits=False)
        del how["record"]
        for layer, m in SMOOTH.items():
            SMOOTH[layer] = m.clamp_min(1e-3).pow(args.alpha)
    first = None
    print("| keys | values | perplexity | vs first |\n|---|---|---|---|")
    for variant in args.variants:
        how["k"], how["v"] = variant.split(",")
        runner = BatchedLlama(model, 1, args.seqlen)
        runner.cache.kind = "fake"  # not "auto": prefill then reads every key back through the cache
        nll = 0.0
        for i in range(args.windows):
            ids = tokens[i * args.seqlen:(i + 1) * args.seqlen]
            runner.release(0)
            logits = runner.prefill(0, ids.tolist(), all_logits=True)[:-1]
            nll += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        ppl = math.exp(nll / (args.windows * (args.seqlen - 1)))
        first = first or ppl
        print(f"| {how['k']} | {how['v']} | {ppl:.4f} | {100 * (ppl / first - 1):+.3f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
