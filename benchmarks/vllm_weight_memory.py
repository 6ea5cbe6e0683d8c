"""What vLLM holds in memory for a checkpoint's weights, against the checkpoint's own size (issue 16's target:
the packed layers stay packed, within 10 % of the file).

    VLLM_CPU_KVCACHE_SPACE=1 VENV/bin/python benchmarks/vllm_weight_memory.py CKPT [CKPT ...] [--dtype float32]

Run with a vLLM venv's interpreter (mamp installed there: `pip install --no-deps -e .`). Each checkpoint is loaded
with vLLM's offline engine (eager, in this process), and the model's parameters and buffers are summed, each
storage once (a tied embedding's shared tensors count once; vLLM's RoPE cos/sin table is a buffer, listed apart),
next to the bytes of the checkpoint's safetensors files.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def weight_bytes(model) -> dict:
    """Bytes of parameters and of buffers, each underlying storage once."""
    seen: set[int] = set()
    out = {"parameters": 0, "buffers": 0}
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if t.numel() == 0 or ptr in seen:
                continue
            seen.add(ptr)
            out[kind] += t.untyped_storage().nbytes()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process, for apply_model
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    print("| checkpoint | safetensors bytes | vLLM parameters bytes | ratio | vLLM buffers bytes |")
    print("|---|---|---|---|---|")
    for ckpt in a.checkpoints:
        llm = LLM(model=ckpt, dtype=a.dtype, enforce_eager=True, max_model_len=512, max_num_seqs=4)
        got = llm.apply_model(weight_bytes)[0]
        file = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
        print(f"| {Path(ckpt).name} | {file:,} | {got['parameters']:,} | {got['parameters'] / file:.3f} "
              f"| {got['buffers']:,} |", flush=True)
        del llm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
