"""Helpers several test files share (no test module imports another): random packed layers, float64 checks
with the dot-product error bound, a tiny word-level tokenizer and tiny Llamas."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from mamp.kernels.packing import PackedWeight, PackSpec, dequantize, pack

# |y - y64| <= TOL * (|x| @ |W|^T + |bias|): fp32 accumulation, then rounding to the output dtype.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def random_packed(spec: PackSpec, frac: float, seed: int = 0) -> tuple[PackedWeight, tuple]:
    g = torch.Generator().manual_seed(seed)
    n = spec.out_features
    low = torch.randint(0, 1 << spec.bits, (n, spec.padded_in), generator=g)
    high = torch.randint(0, 1 << spec.salient_bits, (n, spec.n_high_codes), generator=g)
    sal = torch.rand(n, spec.n_groups, generator=g) < frac
    scales = torch.rand(spec.n_scale_groups, n, generator=g) + 0.01
    zeros = torch.randint(0, 1 << spec.bits, (spec.n_scale_groups, n), generator=g)
    hscales = torch.rand(spec.n_salient_scale_groups, n, generator=g) + 0.01
    hzeros = torch.randint(0, 1 << spec.salient_bits, (spec.n_salient_scale_groups, n), generator=g)
    return pack(spec, low, high, sal, scales, zeros, hscales, hzeros), (low, high, sal)


def make_case(k, n, bits, hbits, frac, seed=0, groups=(64, 32)):
    spec = PackSpec(k, n, bits=bits, salient_bits=hbits, group_size=groups[0], salient_group_size=groups[1])
    packed, _ = random_packed(spec, frac, seed=seed)
    return spec, packed


def make_x(m, k, dtype, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a transposed view: stride 1 along M, not K
        return torch.randn(k, m, generator=g).to(dtype).t()
    return torch.randn(m, k, generator=g).to(dtype)


def check_close(y, x, packed, bias, w=None):
    """y against x W^T + bias in float64, with the dot-product error bound scaled by |x| |W|^T.

    w: dequantize(packed) in float64, when the caller already has it."""
    w = dequantize(packed).double() if w is None else w
    xd = x.double()
    y64 = xd @ w.t()
    bound = xd.abs() @ w.abs().t()
    if bias is not None:
        y64 = y64 + bias.double()
        bound = bound + bias.double().abs()
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert torch.isfinite(y).all(), "unwritten (NaN) or non-finite outputs"
    err = (y.double() - y64).abs()
    tol = TOL[x.dtype] * bound + 1e-30
    worst = float((err / tol).max())
    assert worst <= 1.0, f"error {worst:.3g}x the {x.dtype} tolerance"


WORDS = [f"w{i}" for i in range(500)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(inter: int = 176, seed: int = 0, tie: bool = True, heads: int = 4, kv_heads: int = 2,
               hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=512, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def write_text(path: Path, n_words: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g)
    path.write_text(" ".join(WORDS[i] for i in idx.tolist()))
    return path


def save_tiny(folder: Path, inter: int = 176, tie: bool = True) -> Path:
    tiny_llama(inter, tie=tie).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run_interpreted(test_file: str, select: str, no_skips: bool = False) -> None:
    """Runs the tests of `test_file` that `-k select` picks on the CPU under TRITON_INTERPRET=1, in a child process
    (the variable must be set before triton is imported, and the rest of the suite must not see it); asserts that
    they ran and passed (and, with no_skips, that none was skipped)."""
    path = Path(test_file).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(path), "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", select]
    r = subprocess.run(cmd, cwd=path.parents[1], env=env, capture_output=True, text=True, timeout=1200)
    tail = (r.stdout[-6000:] + "\n" + r.stderr[-3000:]).strip()
    print(tail)
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail
    assert not no_skips or "skipped" not in r.stdout, tail
