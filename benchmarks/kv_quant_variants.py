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
    mse64    asym64 with the range shrunk by the ratio of least squared error (1 .. 0.75), per token
    sym4     per token and head, symmetric, codes -7 .. 7, after the rotation (one fp16 scale: 34 bytes)
    nf4      per token and head, NF4 levels with an absmax scale, after the rotation
    kivi16, kivi32, kivi64   per channel over blocks of 16 / 32 / 64 tokens (KIVI's keys), after the rotation;
             the partial last block is quantized as it stands (in serving it would wait in a residual buffer)
    s-KIND   keys divided per channel by max|k|^alpha (statistics from --calib, the RoPE pairs sharing one
             scale; queries would be multiplied by the same), then KIND, then multiplied back (SmoothAttention)
    c-KIND   keys minus their per-channel mean over the --calib window but its first position (per layer and head),
             then KIND: a constant
             shift of every key changes no softmax, so serving would not even add it back
    p-KIND   keys minus their mean before RoPE rotated to each position (R(p) mu), then KIND, added back
    q-KIND   c- with the mean of the sequence's own positions 1 .. 63 (no calibration)
    r-KIND   p- with the mean of the sequence's own positions 1 .. 63 (no calibration): the served int4 keys
             (kernels/kv_quant.key_center), --center-pairs of them

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


def _mse4(x: torch.Tensor) -> torch.Tensor:
    """Per-token asymmetric 4-bit over the whole last dim, the range shrunk about its middle by the ratio (of
    1, 0.95, .. 0.75) that gives the least squared error; fp16 scale and zero."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best, err = x, None
    for r in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75):
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * r
        s, z = (2 * half / 15).half().float(), (mid - half).half().float()
        y = torch.round((x - z) / s.clamp_min(1e-12)).clamp(0, 15) * s + z
        e = (y - x).square().sum(-1, keepdim=True)
        if err is None:
            best, err = y, e
        else:
            best, err = torch.where(e < err, y, best), torch.minimum(e, err)
    return best


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
MEAN: dict[int, torch.Tensor] = {}  # layer -> [KVH, D] per-channel key mean (c- variants)
PRE: dict[int, torch.Tensor] = {}  # layer -> [KVH, D] per-channel mean of the keys before RoPE (p- variants)
ROPE: dict[str, object] = {}  # "fn": positions -> (cos, sin) [L, D]
SINK = {"n": 0}
PAIRS = {"n": None}  # --center-pairs  # --sink: the first n positions' keys and values not quantized


def _top_pairs(mu: torch.Tensor) -> torch.Tensor:
    """mu [KVH, D] with all but the --center-pairs RoPE pairs (i, i + D/2) of largest norm zeroed, per head."""
    h = mu.shape[-1] // 2
    if PAIRS["n"] is None or PAIRS["n"] >= h:
        return mu
    norm = mu[:, :h].square() + mu[:, h:].square()
    keep = torch.zeros_like(norm, dtype=torch.bool).scatter_(1, norm.topk(PAIRS["n"], dim=1).indices, True)
    return mu * keep.repeat(1, 2)


def fake_quant(x: torch.Tensor, how: str, layer: int = 0) -> torch.Tensor:
    if SINK["n"] and x.shape[2] > SINK["n"]:
        n = SINK["n"]
        SINK["n"] = 0
        try:
            return torch.cat([x[:, :, :n], fake_quant(x[:, :, n:], how, layer)], 2)
        finally:
            SINK["n"] = n
    if how.startswith(("p-", "r-")):  # the pre-RoPE mean, rotated to each position, subtracted and added back
        cos, sin = ROPE["fn"](torch.arange(x.shape[2]))
        if how[0] == "p":
            mu = kv_quant.rope_rotate(PRE[layer][None, :, None, :], cos, sin)
        else:  # the served centering: the sequence's own first positions but the first (kernels/kv_quant.py)
            mu = torch.stack([kv_quant.rope_rotate(_top_pairs(kv_quant.key_center(xb, cos[0], sin[0]))[:, None],
                                                   cos[0], sin[0]) for xb in x])
        return fake_quant(x - mu, how[2:]) + mu
    if how.startswith(("c-", "q-")):
        mu = MEAN[layer][None, :, None, :] if how[0] == "c" else x[:, :, 1:64].mean(2, keepdim=True)
        return fake_quant(x - mu, how[2:]) + mu
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
    inner = {"asym32": lambda t: _groups4(t, 32), "mse64": _mse4, "sym4": _sym4, "nf4": _nf4, "kivi16": lambda t: _kivi(t, 16),
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
    p.add_argument("--calib", default=str(REPO.parent / "shared/assets/wikitext-2/valid.txt"))
    p.add_argument("--alpha", type=float, default=0.5, help="s- variants: key channel scale max|k|^alpha")
    p.add_argument("--center-pairs", type=int, default=None, help="r-: center only the N RoPE pairs of largest mean (default: all, as served)")
    p.add_argument("--sink", type=int, default=0, help="the first N positions not quantized")
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
            MEAN[layer] = k[:, :, 1:].mean(dim=(0, 2))  # not the first position (an outlier, the attention sink)
            cos, sin = ROPE["fn"](torch.arange(k.shape[2]))
            PRE[layer] = kv_quant.rope_rotate(k, cos, -sin).mean(dim=(0, 2))  # R(-p) undoes RoPE
        return fake_quant(k, how["k"], layer), fake_quant(v, how["v"], layer)

    PagedKVCache.read, PagedKVCache._store = fake_read, as_auto(store)
    SINK["n"] = args.sink
    PAIRS["n"] = args.center_pairs
    rope_runner = BatchedLlama(model, 1, 16)  # its RoPE (any position), built once
    ROPE["fn"] = lambda pos: tuple(t[0] for t in rope_runner._rope(pos[None]))
    if any(v[:2] in ("s-", "c-", "p-") or ",s-" in v or ",c-" in v or ",p-" in v for v in args.variants):
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
