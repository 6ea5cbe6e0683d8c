"""Token-level perplexity of a mamp checkpoint (or an ordinary HF checkpoint) on a text file.

    mamp eval / python -m mamp.quantizer.eval CHECKPOINT --text FILE [--seqlen 2048] [--max-tokens N]

The text is tokenized whole without BOS and cut into non-overlapping windows of seqlen tokens (the last partial
window is dropped); every window scores its seqlen - 1 next-token predictions.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, device="cpu", progress: bool = True) -> tuple[float, int]:
    """(perplexity, scored tokens) of a 1-D token tensor in non-overlapping windows of seqlen."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        ids = tokens[i * seqlen:(i + 1) * seqlen].to(device)[None]
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += seqlen - 1
    return math.exp(nll / count), count


def load_any(path: str, device="cpu", verify: bool = True):
    """(model, tokenizer, description): a mamp checkpoint via load_checkpoint, else an HF checkpoint in fp32
    (load_plain_hf: refused if weights are missing). Damaged checkpoints raise CheckpointError."""
    from mamp.kernels.checkpoint import CheckpointError, load_checkpoint, load_plain_hf, read_quantization_config

    if not Path(path).is_dir():
        raise CheckpointError(f"{path} is not a folder")
    q = read_quantization_config(path)
    if q is not None:
        model, tok = load_checkpoint(path, device=device, verify=verify)
        if tok is None:
            raise CheckpointError(f"{path} has no tokenizer files; scoring text needs one")
        widths = f"{q.bits}-bit" if q.budget is None else \
            f"budget {q.budget:g} bits/weight ({q.allocation} widths {'/'.join(map(str, sorted({s.bits for s in q.layers.values()})))})"
        desc = (f"mamp checkpoint: method {q.method}, {widths}, salient bits {q.salient_bits}, "
                f"salient groups {100 * q.salient_group_fraction:.2f}%, {q.bits_per_weight:.4f} bits per weight")
        return model, tok, desc
    model, tok = load_plain_hf(path, device, torch.float32)
    return model, tok, "unquantized HF checkpoint (float32)"


def tokenize_file(tokenizer, path: str | Path, max_tokens: int | None = None) -> torch.Tensor:
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def main(argv: list[str] | None = None, prog: str = "python -m mamp.quantizer.eval") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True, help="text file to score")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint's files against its manifest (sizes, sha256)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        t0 = time.time()
        model, tok, desc = load_any(args.checkpoint, args.device, args.verify)
        tokens = tokenize_file(tok, args.text, args.max_tokens)
        ppl, count = perplexity(model, tokens, args.seqlen, args.device)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"model: {args.checkpoint}\nmethod: {desc}")
    print(f"text: {args.text}  tokens used: {count // (args.seqlen - 1) * args.seqlen}  context: {args.seqlen}  "
          f"scored tokens: {count}")
    print(f"perplexity: {ppl:.4f}  ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
